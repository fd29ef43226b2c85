"""MLflow under load: many concurrent tiny trials, and two sweeps at once, against SQLite and a server.

    python3 bench/bench_tracking_load.py                      # 16 trials x 3 epochs, all three cases
    python3 bench/bench_tracking_load.py --trials 24 --epochs 2 --cases sqlite server

Each case runs real ``encmm sweep`` processes (subprocesses, each starting its own local Ray cluster in a
temp folder of its own: own ``RAY_TMPDIR``, no ``RAY_ADDRESS``) on a grid of ``--trials`` seeds of a tiny
student on digits, every trial in Train local mode holding ``--cpus-per-worker`` CPUs, all of them at once
(``max_concurrent_trials`` = trials):

- ``sqlite``: one sweep, tracked in ``sqlite:///<folder>/mlflow.db`` (the default store);
- ``server``: one sweep, tracked in a real ``mlflow server`` (SQLite backend) started here, stopped by PID;
- ``two-sweeps``: two sweeps started at the same moment from the same folder, on one new SQLite store.

Figures per case, read back from MLflow after the sweeps end:
- expected: trials x epochs x the metrics one epoch logs. The per-epoch keys are what the training loop
  hands its ``log`` callable, filtered as ``tracking.RunLogger`` filters them: taken from a real one-epoch
  ``fit`` of the same trial config in this process (no Ray, no MLflow), not written down here;
- read back: values in the metric history of every child run, for those keys; lost = (key, step) pairs
  expected and missing, duplicates = values beyond one per (key, step); spooled = metric lines still
  waiting in trials' spool files (``tracking.SPOOL_FILE``: taken by nobody);
- failed trials (child runs not FINISHED, or missing), parent status, occurrences of "database is locked"
  in the sweep's console output, Ray's worker logs and the runs' ``encmm.error`` tags, wall time.
Prints a table; writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from encmm.orchestrator import ui_command

REPO = Path(__file__).resolve().parents[1]
ENCMM = [sys.executable, "-m", "encmm.orchestrator.cli"]
LOCKED = re.compile(r"database is locked", re.IGNORECASE)
SWEEP_LINE = re.compile(r"sweep (\S+): parent run ([0-9a-f]{32})")


def sweep_tree(name: str, trials: int, epochs: int, cpus_per_worker: float) -> dict:
    """A sweep of ``trials`` seeds of a tiny student on digits (no teacher), all trials at once."""
    return {
        "name": name,
        "max_concurrent_trials": trials,
        "mismatch_images": 8,
        "base": {
            "data": {"name": "digits", "img_size": 16, "batch_size": 64},
            "student": {"width": 32, "depth": 2, "head_dim": 16, "patch_size": 4},
            "schedule": {"epochs": epochs, "warmup_epochs": 0},
            "optim": {"lr": 3e-3, "lr_base_batch": 64},
            "resources": {"workers": 1, "cpus_per_worker": cpus_per_worker, "local_mode": "on"},
        },
        "search": {"grid": {"seed": list(range(trials))}},
    }


def epoch_metric_keys(tree: dict) -> list[str]:
    """The metric keys one epoch of this sweep's trials sends to MLflow: a real one-epoch ``fit`` of its
    base config (no Ray, no MLflow) with a capturing ``log``, filtered by ``tracking.loggable_metrics``."""
    from encmm.orchestrator.tracking import loggable_metrics
    from encmm.trainables.config import TrainConfig
    from encmm.trainables.engine import fit

    base = json.loads(json.dumps(tree["base"]))
    base["schedule"]["epochs"] = 1
    seen: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        fit(TrainConfig.model_validate(base), log=lambda metrics, step: seen.append(metrics), checkpoint_dir=folder)
    assert len(seen) == 1, f"one epoch logged {len(seen)} times"
    return sorted(loggable_metrics(seen[0]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on a SQLite backend, started as ``encmm ui`` starts it (own process group);
    returns once ``/health`` answers."""
    command = ui_command.server_command(f"sqlite:///{folder / 'server.db'}", ui_command.DEFAULT_HOST, port)
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ui_command.wait_healthy(ui_command.server_url(ui_command.DEFAULT_HOST, port), process)
    except BaseException:
        stop_process_group(process)
        raise
    return process


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGKILL ``process`` and its group (it leads its own session), by PID."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def start_sweep(folder: Path, sweep_file: Path, uri: str, label: str) -> tuple[subprocess.Popen, Path, Path]:
    """``encmm sweep FILE`` in ``folder`` with a Ray temp folder of its own; (process, log file, ray tmp)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_TRACKING_URI=uri, RAY_TMPDIR=str(ray_tmp))
    out = folder / f"{label}.log"
    process = subprocess.Popen(
        [*ENCMM, "sweep", str(sweep_file)],
        cwd=folder,
        env=env,
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, out, ray_tmp


def count_locked_in_ray_logs(ray_tmp: Path) -> int:
    total = 0
    for path in ray_tmp.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            try:
                total += len(LOCKED.findall(path.read_text(errors="replace")))
            except OSError:
                continue
    return total


def read_back(uri: str, name: str, keys: list[str], epochs: int, trials: int) -> dict:
    """What the store holds for sweep ``name``: per-epoch metric values of every child run, their status."""
    from mlflow.tracking import MlflowClient

    from encmm.orchestrator import tracking

    client = MlflowClient(uri)
    parent = tracking.find_sweep_run(uri, name)
    children = tracking.list_child_runs(uri, parent.info.run_id)
    read = distinct = 0
    locked_tags = 0
    for child in children:
        locked_tags += len(LOCKED.findall(child.data.tags.get("encmm.error", "")))
        for key in keys:
            history = client.get_metric_history(child.info.run_id, key)
            read += len(history)
            distinct += len({m.step for m in history if 0 <= m.step < epochs})
    expected = trials * epochs * len(keys)
    finished = sum(1 for c in children if c.info.status == "FINISHED")
    return {
        "sweep": name,
        "parent_status": parent.info.status,
        "child_runs": len(children),
        "trials_finished": finished,
        "trials_failed": trials - finished,
        "metrics_expected": expected,
        "metrics_read_back": read,
        "metrics_lost": expected - distinct,
        "metrics_duplicated": read - distinct,
        "locked_in_error_tags": locked_tags,
    }


def spooled_lines(folder: Path) -> int:
    from encmm.orchestrator.tracking import SPOOL_FILE

    return sum(len(p.read_text().splitlines()) for p in folder.rglob(SPOOL_FILE))


def run_case(case: str, root: Path, args, keys: list[str]) -> dict:
    """One case: its sweep process(es), then what MLflow holds."""
    folder = root / case
    folder.mkdir()
    labels = ["a", "b"] if case == "two-sweeps" else ["a"]
    server = None
    if case == "server":
        port = free_port()
        server = start_mlflow_server(folder, port)
        uri = f"http://127.0.0.1:{port}"
    else:
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    tree = sweep_tree("load", args.trials, args.epochs, args.cpus_per_worker)
    sweep_file = folder / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(tree))
    started = time.time()
    procs = [start_sweep(folder, sweep_file, uri, label) for label in labels]
    try:
        for process, _, _ in procs:
            process.wait(timeout=args.timeout)
        wall = time.time() - started
        results = []
        for label, (process, out, ray_tmp) in zip(labels, procs):
            text = out.read_text(errors="replace")
            match = SWEEP_LINE.search(text)
            row = {"case": case, "process": label, "exit_code": process.returncode, "wall_s": wall}
            row["locked_in_output"] = len(LOCKED.findall(text))
            row["locked_in_ray_logs"] = count_locked_in_ray_logs(ray_tmp)
            if match is None:
                row["error"] = "no 'sweep NAME: parent run ID' line: " + " | ".join(text.strip().splitlines()[-3:])
            else:
                row.update(read_back(uri, match.group(1), keys, args.epochs, args.trials))
                row["sweep_dir"] = str(folder / "encmm-runs" / "sweeps" / match.group(1))
            results.append(row)
        for row in results:
            row["spooled"] = spooled_lines(Path(row["sweep_dir"])) if "sweep_dir" in row else None
        if case == "two-sweeps":
            names = [r.get("sweep") for r in results]
            for row in results:
                row["distinct_names"] = len(set(names)) == len(names) and None not in names
        return results
    finally:
        for process, _, ray_tmp in procs:
            if process.poll() is None:
                stop_process_group(process)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if server is not None:
            stop_process_group(server)


def print_table(rows: list[dict]) -> None:
    columns = [
        ("case", "case"),
        ("process", "proc"),
        ("exit_code", "exit"),
        ("parent_status", "parent"),
        ("trials_finished", "finished"),
        ("trials_failed", "failed"),
        ("metrics_expected", "expected"),
        ("metrics_read_back", "read back"),
        ("metrics_lost", "lost"),
        ("metrics_duplicated", "dup"),
        ("spooled", "spooled"),
        ("locked", "'database is locked'"),
        ("wall_s", "wall s"),
    ]
    print("| " + " | ".join(title for _, title in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        locked = sum(row.get(k, 0) for k in ("locked_in_output", "locked_in_ray_logs", "locked_in_error_tags"))
        cells = []
        for key, _ in columns:
            value = locked if key == "locked" else row.get(key, "-")
            cells.append(f"{value:.1f}" if isinstance(value, float) else str(value))
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        if "error" in row:
            print(f"{row['case']}/{row['process']}: {row['error']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus-per-worker", type=float, default=0.1)
    parser.add_argument("--cases", nargs="+", default=["sqlite", "server", "two-sweeps"])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one case's sweeps may take")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "tracking_load.json"))
    args = parser.parse_args()
    unknown = sorted(set(args.cases) - {"sqlite", "server", "two-sweeps"})
    if unknown or args.trials < 1 or args.epochs < 1 or args.cpus_per_worker <= 0:
        parser.error(f"bad arguments: cases {unknown or 'ok'}, trials/epochs >= 1, cpus-per-worker > 0")
    keys = epoch_metric_keys(sweep_tree("load", args.trials, args.epochs, args.cpus_per_worker))
    print(f"per-epoch metric keys ({len(keys)}): {', '.join(keys)}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="encmm-load-") as root:
        for case in args.cases:
            print(f"[bench] {case}: {args.trials} trials x {args.epochs} epochs ...", flush=True)
            rows += run_case(case, Path(root), args, keys)
    print_table(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("trials", "epochs", "cpus_per_worker", "cases")}
    out.write_text(
        json.dumps({"settings": settings, "epoch_metric_keys": keys, "cpus": os.cpu_count(), "rows": rows}, indent=2)
    )
    print(f"wrote {out}")
    ok = all(
        r.get("exit_code") == 0 and r.get("metrics_lost") == 0 and r.get("trials_failed") == 0 and "error" not in r
        for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
