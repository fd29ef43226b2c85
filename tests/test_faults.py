"""Faults the training core and the tracking layer survive, each caused for real: a diverging loss, a
truncated checkpoint, a full disk (a file-size limit), a corrupt image file, an MLflow server that goes
away mid-run, an encmm process killed with SIGKILL. Ray-level faults are in test_ray_train / test_sweep."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from encmm.trainables.engine import NonFiniteLossError, fit, load_resume_checkpoint
from tests.conftest import free_port
from tests.test_engine import tiny_config


# ------------------------------------------------------------------ NaN / inf loss
def test_diverging_loss_stops_the_run_with_the_reason_and_saves_no_checkpoint(tmp_path):
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss in epoch 0, detected at step \d+ \(.*loss=(nan|inf)"
    ):
        fit(tiny_config("schedule.epochs=2", "optim.lr=1e30"), checkpoint_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # the diverged weights never reached a checkpoint


def test_skip_policy_skips_nonfinite_updates_and_counts_them(tmp_path):
    history = []
    fit(
        tiny_config("schedule.epochs=2", "optim.lr=1e30", "optim.on_nonfinite=skip"),
        checkpoint_dir=tmp_path,
        log=lambda metrics, step: history.append(metrics),
    )
    assert [m["epoch"] for m in history] == [0, 1]
    assert history[0]["train/skipped_steps"] > 0 and history[1]["train/skipped_steps"] > 0
    weights = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    # An update from a NaN loss would have made the weights NaN: every such step was skipped.
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


# ------------------------------------------------------------------ checkpoints
def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = tiny_config("schedule.epochs=3")

    class Crash(Exception):
        pass

    def crash_at_epoch_1(metrics, step):
        if step == 1:
            raise Crash  # logged after the checkpoint: last.pt holds epoch 1, last.pt.prev epoch 0

    with pytest.raises(Crash):
        fit(cfg, log=crash_at_epoch_1, checkpoint_dir=tmp_path)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    resumed = []
    fit(cfg, log=lambda metrics, step: resumed.append(step), checkpoint_dir=tmp_path)
    assert resumed == [1, 2]  # resumed after epoch 0, from last.pt.prev
    assert f"checkpoint {last} is unreadable" in caplog.text  # a warning of the encmm.trainables.engine logger


def test_unreadable_checkpoints_only_mean_starting_over(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert load_resume_checkpoint([junk, tmp_path / "missing.pt"]) is None


def test_worker_mode_resume_falls_back_to_rays_previous_committed_checkpoint(tmp_path):
    """Ray Train keeps `num_to_keep=2` committed checkpoints in the run folder: when the one
    `get_checkpoint()` names is corrupt, the resume takes the newest older one."""
    from encmm.trainables.engine import save_checkpoint
    from encmm.trainables.ray_worker import CHECKPOINT_FILE, committed_checkpoints

    folders = [tmp_path / f"checkpoint_2026-11-26_10-00-0{i}.000000" for i in range(3)]
    for epoch, folder in enumerate(folders):
        save_checkpoint({"epoch": epoch, "model": {}, "optimizer": {}}, folder / CHECKPOINT_FILE)
    latest = folders[-1] / CHECKPOINT_FILE
    latest.write_bytes(latest.read_bytes()[:100])
    candidates = committed_checkpoints(tmp_path, latest)
    assert candidates == [latest, folders[1] / CHECKPOINT_FILE, folders[0] / CHECKPOINT_FILE]
    ckpt, path = load_resume_checkpoint(candidates)
    assert ckpt["epoch"] == 1 and path == folders[1] / CHECKPOINT_FILE


DISK_FULL_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    from encmm.trainables.engine import CheckpointWriteError, save_checkpoint

    path = Path(sys.argv[1])
    save_checkpoint({"epoch": 0, "weights": torch.zeros(1000)}, path, keep_previous=True)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        save_checkpoint({"epoch": 1, "weights": torch.ones(1_000_000)}, path, keep_previous=True)
    except CheckpointWriteError as exc:
        print(exc)
        sys.exit(3)
""")


def test_checkpoint_write_on_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.pt"
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"cannot write checkpoint {path}" in done.stdout and "the previous checkpoint is intact" in done.stdout
    kept = torch.load(path, weights_only=True)
    assert kept["epoch"] == 0 and torch.equal(kept["weights"], torch.zeros(1000))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


# ------------------------------------------------------------------ corrupt images
def make_image_folder(root: Path, per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) // (2 if label == "a" else 1)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    bad = root / "train" / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))  # a PNG header, then garbage
    return bad


def image_folder_config(root: Path, *overrides: str):
    return tiny_config(
        "data.name=imagefolder", f"data.root={root}", "data.batch_size=4", "schedule.epochs=1", *overrides
    )


def test_corrupt_image_stops_training_with_an_error_naming_the_file(tmp_path):
    from encmm.trainables.data import BadImageError

    bad = make_image_folder(tmp_path / "images")
    with pytest.raises(BadImageError, match=f"cannot decode image {bad}"):
        fit(image_folder_config(tmp_path / "images"))


def test_corrupt_image_is_skipped_and_counted_when_configured(tmp_path):
    make_image_folder(tmp_path / "images")
    history = []
    fit(
        image_folder_config(tmp_path / "images", "data.on_bad_image=skip", "schedule.epochs=2"),
        log=lambda metrics, step: history.append(metrics),
    )
    # 17 train files, batches of 4 with drop_last: the broken one is read once per epoch.
    assert [m["data/skipped_images"] for m in history] == [1.0, 1.0]


@pytest.mark.ray
def test_corrupt_image_fails_encmm_train_with_one_line_naming_the_file(ray_cluster, tmp_path, monkeypatch):
    """Through the CLI and a Ray Train worker actor: the worker's error reaches the user as its own line."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from encmm.orchestrator.cli import app

    bad = make_image_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        "data.name=imagefolder",
        f"data.root={tmp_path / 'images'}",
        "data.img_size=16",
        "data.batch_size=4",
        "student.width=32",
        "student.depth=2",
        "student.head_dim=16",
        "student.patch_size=4",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "resources.max_failures=0",
        "resources.cpus_per_worker=0.5",
    ]
    result = CliRunner().invoke(app, ["train", "--tracking-uri", uri, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("encmm: error:")]
    assert len(lines) == 1 and f"BadImageError: cannot decode image {bad}" in lines[0], result.stderr[-2000:]
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("encmm").experiment_id])
    assert run.info.status == "FAILED" and str(bad) in run.data.tags["encmm.error"]


# ------------------------------------------------------------------ MLflow server going away mid-run
def start_mlflow_server(store: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--default-artifact-root",
            (store / "artifacts").as_uri(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_health(process, port)
    return process


def wait_for_health(process: subprocess.Popen, port: int, timeout: float = 90) -> None:
    """Until the MLflow server ``process`` answers ``/health`` on ``port``; stopped and raised otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise RuntimeError("mlflow server did not start")


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


class NetworkLink:
    """A TCP forwarder between the client and a real MLflow server that the test can cut and restore:
    while cut, connections are refused and open ones are closed, as when a server's node goes away."""

    def __init__(self, port: int, upstream: int):
        self.port, self.upstream = port, upstream
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.server
def test_metrics_logged_while_the_mlflow_server_is_unreachable_reach_it_when_it_is_back(tmp_path):
    from mlflow.tracking import MlflowClient

    from encmm.orchestrator import tracking

    server_port, port = free_port(), free_port()
    server = start_mlflow_server(tmp_path, server_port)
    link = NetworkLink(port, server_port)
    link.restore()
    uri = f"http://127.0.0.1:{port}"
    try:
        run_id = tracking.start_run(uri, "faults", "server-outage")
        spool = tmp_path / "run" / tracking.SPOOL_FILE
        logger = tracking.RunLogger(uri, run_id, spool=str(spool))
        seconds_per_failed_log, spooled_while_down = [], []

        def log(metrics, step):
            started = time.monotonic()
            logger(metrics, step)
            if step in (1, 2):
                seconds_per_failed_log.append(time.monotonic() - started)
            if step == 0:
                link.cut()  # epochs 1 and 2 cannot reach the server
            elif step == 2:
                spooled_while_down.append(spool.is_file())
                link.restore()  # back before epoch 3: the spool goes first

        fit(tiny_config("schedule.epochs=5"), log=log)
        # Failed fast: MLflow's own retries would hold each call for minutes.
        assert len(seconds_per_failed_log) == 2 and max(seconds_per_failed_log) < 60
        assert spooled_while_down == [True] and not spool.exists()
        assert logger.flush() == 0
        client = MlflowClient(uri)
        steps = [m.step for m in client.get_metric_history(run_id, "val/acc1")]
        assert sorted(steps) == [0, 1, 2, 3, 4]  # every epoch exactly once
        tracking.end_run(uri, run_id)
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        link.cut()
        stop_server(server)


def test_unreachable_mlflow_server_at_start_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from encmm.orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["train", "--tracking-uri", uri])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("encmm: error:") and uri in lines[0], result.output
    assert not list(tmp_path.iterdir())  # no run folder, no local store


# ------------------------------------------------------------------ an encmm process killed with SIGKILL
@pytest.mark.server
def test_runs_of_a_killed_process_end_failed_not_running(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        import time
        from encmm.orchestrator import tracking
        parent = tracking.start_run({uri!r}, "faults", "sweep", tags={{"encmm.kind": "sweep"}})
        child = tracking.start_run({uri!r}, "faults", "trial", parent_run_id=parent)
        done = tracking.start_run({uri!r}, "faults", "done-trial", parent_run_id=parent)
        tracking.end_run({uri!r}, done, "FINISHED")
        tracking.close_runs_if_process_dies({uri!r}, [parent], children_of=[parent])
        print(parent, child, done, flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    parent, child, done = process.stdout.readline().split()
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "RUNNING"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.time() + 60
    while time.time() < deadline and client.get_run(child).info.status == "RUNNING":
        time.sleep(0.5)
    for run_id in (parent, child):
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert f"process {process.pid}" in run.data.tags["encmm.error"]
    assert client.get_run(done).info.status == "FINISHED"  # a closed run is left as it was
