"""``encmm ui``: the MLflow UI on the store encmm uses, bound to 127.0.0.1 by default.

``mlflow server`` runs as its own process group (so Ctrl-C stops it and its workers together). Runs
created by encmm keep absolute ``file:`` artifact locations beside the SQLite store; the server reads
those directly (``--no-serve-artifacts``: no proxy that would resolve them against its own folder).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from encmm.orchestrator import tracking
from encmm.orchestrator.interrupts import Interrupted, interruptible
from encmm.trainables.config import ConfigError

HEALTH_TIMEOUT_S = 120.0
DEFAULT_HOST = "127.0.0.1"  # loopback only: the UI serves every run, param and artifact of the store
DEFAULT_PORT = 5000


def server_command(uri: str, host: str, port: int) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-serve-artifacts",
    ]
    if uri.startswith("sqlite:///"):
        # new experiments created through the UI land beside encmm's own ones
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        command += ["--default-artifact-root", root.resolve().as_uri()]
    return command


def experiment_url(base: str, uri: str, sweep: str | None) -> str:
    """URL of the sweep's experiment (or of encmm's default experiment, or the UI's home)."""
    if sweep:
        parent = tracking.find_sweep_run(uri, sweep)
        return f"{base}/#/experiments/{parent.info.experiment_id}/runs"
    if tracking.store_exists(uri):
        experiment_id = tracking.experiment_id(uri, tracking.DEFAULT_EXPERIMENT)
        if experiment_id is not None:
            return f"{base}/#/experiments/{experiment_id}/runs"
    return f"{base}/"


def wait_healthy(base: str, process: subprocess.Popen, timeout: float = HEALTH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(
                f"mlflow server exited with code {process.returncode} before answering "
                f"(is port {base.rsplit(':', 1)[-1]} free?)"
            )
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise ConfigError(f"mlflow server did not answer {base}/health within {timeout:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 10 s."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check_port_free(host: str, port: int) -> None:
    """A :class:`ConfigError` when ``host:port`` cannot be bound (another server holds it), before anything
    starts. The probe binds as the server will (``SO_REUSEADDR``, so a port in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--port {port}: {host}:{port} is in use ({exc.strerror or exc}); "
                "stop what holds it or pick another --port"
            ) from exc


def server_url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def start_server(uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> subprocess.Popen:
    """``mlflow server`` on ``uri`` in its own process group (stop it with :func:`stop_server`); returns at once."""
    return subprocess.Popen(server_command(uri, host, port), start_new_session=True)


def run_ui(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    tracking_uri: str | None = None,
    sweep: str | None = None,
    echo=print,
) -> int:
    """Serve until Ctrl-C, SIGTERM or SIGHUP (or until the server dies); the server and its workers are
    stopped in every case. Returns the server's exit code: 0 on Ctrl-C, 128 + the signal on SIGTERM/SIGHUP."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking(uri)
    if uri.startswith(("http://", "https://")):  # a server already: nothing to start
        echo(experiment_url(uri.rstrip("/"), uri, sweep))
        return 0
    if sweep:
        tracking.find_sweep_run(uri, sweep)  # unknown sweep: fail before starting anything
    check_port_free(host, port)
    base = server_url(host, port)
    with interruptible():
        process = start_server(uri, host, port)
        try:
            wait_healthy(base, process)
            echo(f"MLflow UI on {uri}")
            echo(experiment_url(base, uri, sweep))
            echo("Ctrl-C to stop")
            return process.wait()
        except Interrupted as stopped:  # Ctrl-C is how the UI is meant to stop: exit 0
            return 0 if stopped.signum == signal.SIGINT else stopped.exit_code
        finally:
            stop_server(process)
