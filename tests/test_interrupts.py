"""Ctrl-C, SIGTERM and SIGHUP to real `encmm` processes: every run they opened ends KILLED, everything they
started (their local Ray cluster included) is gone, and they exit 128 + the signal with one line that says
what to do next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_sweep import TINY_BASE, write_yaml

pytestmark = [pytest.mark.ray, pytest.mark.server]
ENCMM = [sys.executable, "-m", "encmm.orchestrator.cli"]


def start_encmm(args: list[str], folder: Path, uri: str) -> subprocess.Popen:
    """`encmm ARGS` in its own session (as in a terminal: Ctrl-C goes to its whole process group)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.Popen(
        [*ENCMM, *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_run(uri: str, kind: str, proc: subprocess.Popen, *, metric: str | None = None, timeout: float = 300):
    """The first RUNNING run tagged ``encmm.kind = kind`` (that has logged ``metric``, if given)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"encmm exited early: {proc.communicate()[1][-3000:]}"
        experiment = client.get_experiment_by_name("encmm")
        if experiment is not None:
            runs = client.search_runs(
                [experiment.experiment_id], f"tags.`encmm.kind` = '{kind}' and attributes.status = 'RUNNING'"
            )
            runs = [r for r in runs if metric is None or metric in r.data.metrics]
            if runs:
                return client, runs[0]
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no RUNNING {kind} run within {timeout} s")


def interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str, list[psutil.Process]]:
    """Send ``sig`` as a terminal (SIGINT, SIGHUP: the process group) or a supervisor (SIGTERM: the process)
    would; returns the exit code, stderr and the processes encmm had started that are still alive."""
    started = psutil.Process(proc.pid).children(recursive=True)
    if sig == signal.SIGTERM:
        os.kill(proc.pid, sig)
    else:
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=180)
    gone, alive = psutil.wait_procs(started, timeout=30)
    return proc.returncode, err, alive


def serves_ray_dashboard(proc: subprocess.Popen) -> bool:
    """Whether one of the processes ``proc`` started is Ray's dashboard with its web UI (without one, Ray
    still runs a head process of that name for usage stats, ``--disable-frontend``)."""
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            words = child.cmdline()
            if any(w.endswith("dashboard/dashboard.py") for w in words) and "--disable-frontend" not in words:
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def assert_nothing_running(client, experiment_id: str) -> None:
    assert not client.search_runs([experiment_id], "attributes.status = 'RUNNING'"), "a run was left RUNNING"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_ends_its_runs_killed_and_says_how_to_resume(tmp_path, sig):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "stoppable",
            "max_concurrent_trials": 2,  # both train at once (0.5 CPU each), and both resume at once
            # 8 epochs: after the first one is logged, the trial must still be training when the signal lands
            # (with 4, a fast machine once finished it first: FINISHED, not KILLED)
            "base": {**TINY_BASE, "schedule": {"epochs": 8, "warmup_epochs": 0}},
            "search": {"grid": {"optim.lr": [0.003, 0.002]}},
        },
    )
    proc = start_encmm(["sweep", str(sweep_file)], tmp_path, uri)
    client, trial = wait_for_run(uri, "trial", proc, metric="val/acc1")  # a trial is training
    code, err, alive = interrupt(proc, sig)

    assert code == 128 + sig, err[-3000:]
    name = next((tmp_path / "encmm-runs" / "sweeps").iterdir()).name
    assert err.strip().splitlines()[-1] == f"encmm: interrupted; resume with encmm sweep {sweep_file} --resume {name}"
    assert "Traceback" not in err
    assert not alive, f"still running after encmm exited: {[p.cmdline()[:3] for p in alive]}"
    assert_nothing_running(client, trial.info.experiment_id)
    assert client.get_run(trial.info.run_id).info.status == "KILLED"
    parent = client.get_run(trial.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    assert "summary.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    if sig != signal.SIGINT:
        return
    # The line's command finishes the sweep: the interrupted trial re-attaches to its run and resumes.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    resumed = subprocess.run(
        [*ENCMM, "sweep", str(sweep_file), "--resume", name],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    children = client.search_runs([trial.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    assert trial.info.run_id in {c.info.run_id for c in children}
    steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val/acc1")]
    assert sorted(steps) == list(range(8))  # resumed from its last checkpoint: each epoch logged once
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_sweep_interrupted_while_training_its_teacher_ends_the_teacher_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    write_yaml(
        tmp_path / "teacher.yaml",
        {**TINY_BASE, "name": "slow-teacher", "schedule": {"epochs": 40, "warmup_epochs": 0}},
    )
    sweep_file = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "never-started",
            "teacher_training": "teacher.yaml",
            "base": TINY_BASE,
            "search": {"grid": {"student.remedy": ["none"]}},
        },
    )
    proc = start_encmm(["--dashboard", "sweep", str(sweep_file)], tmp_path, uri)
    client, teacher = wait_for_run(uri, "train", proc, metric="val/acc1")
    assert serves_ray_dashboard(proc), "--dashboard started no Ray dashboard"  # and it must go with the rest
    code, err, alive = interrupt(proc, signal.SIGINT)

    assert code == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"encmm: interrupted before the sweep started; nothing to resume: run encmm sweep {sweep_file} again"
    )
    assert not alive, f"still running after encmm exited: {[p.cmdline()[:3] for p in alive]}"
    assert client.get_run(teacher.info.run_id).info.status == "KILLED"
    assert_nothing_running(client, teacher.info.experiment_id)
    assert not client.search_runs([teacher.info.experiment_id], "tags.`encmm.kind` = 'sweep'")


def test_diagnose_stopped_by_sighup_ends_its_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["diagnose", "--model", "vit_tiny_patch16_224", "--model-arg", "img_size=64", "--images-per-class", "60"]
    proc = start_encmm([*args, "--out", str(tmp_path / "diag")], tmp_path, uri)
    client, run = wait_for_run(uri, "diagnose", proc)
    assert not serves_ray_dashboard(proc), "a Ray dashboard without --dashboard"
    code, err, alive = interrupt(proc, signal.SIGHUP)

    assert code == 128 + signal.SIGHUP, err[-3000:]
    assert err.strip().splitlines()[-1] == "encmm: interrupted; the MLflow run is marked KILLED"
    assert not alive, f"still running after encmm exited: {[p.cmdline()[:3] for p in alive]}"
    assert client.get_run(run.info.run_id).info.status == "KILLED"
