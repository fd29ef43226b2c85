"""`encmm sweep`: real Tune sweeps on a local Ray cluster, tracked in a real MLflow store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from encmm.orchestrator.cli import app
from tests.test_storage import objects

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
TINY_BASE = {
    "data": {"name": "digits", "img_size": 16, "batch_size": 64},
    "student": {"width": 32, "depth": 2, "head_dim": 16, "patch_size": 4},
    "schedule": {"epochs": 1, "warmup_epochs": 0},
    "optim": {"lr": 3e-3, "lr_base_batch": 64},
    "resources": {"workers": 1, "cpus_per_worker": 0.5},
}


def write_yaml(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def is_sweep_file(path: Path) -> bool:
    return "search" in (yaml.safe_load(path.read_text()) or {})


@pytest.mark.parametrize("name", sorted(p.name for p in EXPERIMENTS.glob("*.yaml") if is_sweep_file(p)))
def test_dry_run_of_every_shipped_sweep_prints_its_plan(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):  # the ImageNet sweep is pointed at a stand-in ImageFolder
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
        (tmp_path / "imagenet" / split / "n01440764" / "tench.JPEG").write_bytes(b"")
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(EXPERIMENTS / name),
            "--dry-run",
            "--set",
            f"data.root={tmp_path / 'imagenet'}",
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "trials" in result.output and "trial(s) at once" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "encmm-runs").exists()


def test_paper_sweep_plans_six_trials_of_four_gpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
        (tmp_path / "imagenet" / split / "n01440764" / "tench.JPEG").write_bytes(b"")
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(EXPERIMENTS / "imagenet-cait-s24-deit-tiny.yaml"),
            "--dry-run",
            "--set",
            f"data.root={tmp_path / 'imagenet'}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "6 trials" in result.output and "4 Train worker(s), 40.01 CPU, 4 GPU" in result.output


def test_every_shipped_train_config_is_valid():
    from encmm.trainables.config import load_train_config
    from encmm.trainables.preflight import check_train_config

    sweeps = [path for path in EXPERIMENTS.glob("*.yaml") if is_sweep_file(path)]
    bases = {b for path in sweeps if isinstance(b := yaml.safe_load(path.read_text()).get("base"), str)}
    trainable = [path for path in EXPERIMENTS.glob("*.yaml") if path not in sweeps and path.name not in bases]
    assert trainable  # digits-teacher.yaml at least
    for path in trainable:
        check_train_config(load_train_config(path), str(path))


@pytest.mark.ray
def test_two_trial_sweep_survives_a_killed_trial_and_a_diverging_one_and_reuses_its_teacher(
    ray_cluster, tmp_path, monkeypatch, tracking_uri, inject_fault, s3_bucket
):
    """Trial lr=0.003 has its process SIGKILLed mid-epoch 1: Tune retries it and it resumes from its epoch-0
    checkpoint. Trial lr=1e30 diverges to a NaN loss: its run ends FAILED with the reason, the sweep goes on.
    The trials keep their checkpoints in a bucket (`tracking.storage`, a local S3 server); the teacher on disk."""
    from mlflow.tracking import MlflowClient

    from encmm.orchestrator import sweep_command as sc

    monkeypatch.chdir(tmp_path)
    write_yaml(
        tmp_path / "teacher.yaml",
        {**TINY_BASE, "name": "tiny-teacher", "student": {**TINY_BASE["student"], "width": 64}},
    )
    sweep_file = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "tiny",
            "teacher_training": "teacher.yaml",
            "mismatch_images": 40,
            "base": {
                **TINY_BASE,
                "schedule": {"epochs": 2, "warmup_epochs": 0},
                "student": {**TINY_BASE["student"], "remedy": "lift"},
                "kd": {"beta": 1.0, "alpha": 0.5},
                "tracking": {"storage": s3_bucket},
            },
            "search": {"grid": {"optim.lr": [0.003, 1.0e30]}},
        },
    )
    setup = sc.prepare_sweep(str(sweep_file), [], tracking_uri)
    plan = sc.start_sweep(setup, None)
    marker = tmp_path / "killed.pid"
    inject_fault("lr-0.003", match={"optim.lr": 0.003}, epoch=1, batch=3, marker=marker)
    rows, best = sc.run_sweep(plan, resume=False, address=None)

    assert marker.exists(), "the fault was never injected"
    client = MlflowClient(tracking_uri)
    parent = client.get_run(plan.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"summary.csv", "summary.md", "sweep.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "teacher/svd_rank_p99/0.99" in parent.data.metrics
    assert parent.data.metrics["trials/finished"] == 1 and parent.data.metrics["trials/failed"] == 1
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2 and len(rows) == 2  # one run per trial, the retried one included
    by_lr = {float(c.data.params["optim.lr"]): c for c in children}
    good, diverged = by_lr[0.003], by_lr[1e30]
    assert good.info.status == "FINISHED"
    assert good.data.params["kd.alpha"] == "0.5" and good.data.params["student.width"] == "32"
    assert sorted(m.step for m in client.get_metric_history(good.info.run_id, "val/acc1")) == [0, 1]
    for key in (
        "val/acc1",
        "final/val/acc1",
        "diag/svd_rank_p99/0.99",
        "diag/pca_rank_p99/0.99",
        "diag/sep_ratio_90",
        "diag/feat_mse",
        "params_inference",
    ):
        assert key in good.data.metrics, key
    assert [a.path for a in client.list_artifacts(good.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    trial_id = good.data.tags["encmm.trial_id"]
    stored = objects(f"{s3_bucket}/sweeps/{plan.sweep_dir.name}/trials/{trial_id}")
    assert {"checkpoint.pt", "checkpoint.pt.prev", "best.pt"} <= set(stored), stored  # the resume read these
    assert not (plan.sweep_dir / "trials" / trial_id / "checkpoint.pt").exists()
    assert diverged.info.status == "FAILED"
    assert "non-finite loss in epoch 0" in diverged.data.tags["encmm.error"]
    assert best is not None and best["run_id"] == good.info.run_id
    # The teacher was trained once, tagged by its config hash, and is found again instead of retrained.
    assert sc.ensure_teacher(setup, None) == plan.base["teacher"]["run_id"]


@pytest.mark.ray
def test_sweep_driver_killed_mid_sweep_resumes_without_rerunning_or_duplicating_trials(
    ray_cluster, tmp_path, monkeypatch
):
    """SIGKILL to a real `encmm sweep` process and everything it started (as when its node is preempted),
    right after its first trial finished; resuming it (``encmm.sweep(..., resume=NAME)``, what `encmm sweep
    FILE --resume NAME` calls; that command line itself: test_interrupts) finishes the sweep."""
    from mlflow.tracking import MlflowClient

    import encmm

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "name": "resumable",
            "max_concurrent_trials": 1,
            "base": {**TINY_BASE, "student": {**TINY_BASE["student"], "target_width": 48}},
            "search": {"grid": {"student.remedy": ["none", "lift"]}},
        },
    )
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "encmm.orchestrator.cli", "sweep", str(sweep_file)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    client = MlflowClient(uri)
    first_finished = None
    deadline = time.time() + 420
    while time.time() < deadline and first_finished is None:
        time.sleep(1)
        experiment = client.get_experiment_by_name("encmm") if (tmp_path / "mlflow.db").exists() else None
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], filter_string="tags.`encmm.kind` = 'trial'")
            done = [r for r in runs if r.info.status == "FINISHED"]
            first_finished = done[0] if done else None
    assert first_finished is not None, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    name = next((tmp_path / "encmm-runs" / "sweeps").iterdir()).name
    parent_id = first_finished.data.tags["mlflow.parentRunId"]
    experiment_id = first_finished.info.experiment_id
    deadline = time.time() + 60  # the watchdog closes what the killed process left open
    while time.time() < deadline and client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        time.sleep(0.5)
    assert not client.search_runs([experiment_id], "attributes.status = 'RUNNING'"), "a run was left RUNNING"
    assert client.get_run(parent_id).info.status == "FAILED"

    monkeypatch.chdir(tmp_path)  # on the session's cluster, in this process
    resumed = encmm.sweep(str(sweep_file), tracking_uri=uri, resume=name)
    assert resumed.status == "FINISHED" and resumed.parent_run_id == parent_id and resumed.name == name
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    trial_ids = [c.data.tags["encmm.trial_id"] for c in children]
    assert len(children) == 2 and len(set(trial_ids)) == 2  # no duplicate child runs
    assert all(c.info.status == "FINISHED" for c in children)
    again = client.get_run(first_finished.info.run_id)
    assert again.info.end_time == first_finished.info.end_time  # the finished trial was not re-run
    assert [m.step for m in client.get_metric_history(again.info.run_id, "val/acc1")] == [0]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/finished"] == 2
    assert {"summary.csv", "summary.md"} <= {a.path for a in client.list_artifacts(parent_id)}
