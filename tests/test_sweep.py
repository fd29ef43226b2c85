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

from orchestrator.cli import app

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
    result = CliRunner().invoke(app, ["sweep", str(EXPERIMENTS / name), "--dry-run",
                                      "--set", f"data.root={tmp_path / 'imagenet'}",
                                      "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 0, result.output
    assert "trials" in result.output and "trial(s) at once" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "encmm-runs").exists()


def test_paper_sweep_plans_six_trials_of_four_gpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    result = CliRunner().invoke(app, ["sweep", str(EXPERIMENTS / "imagenet-cait-s24-deit-tiny.yaml"), "--dry-run",
                                      "--set", f"data.root={tmp_path / 'imagenet'}"])
    assert result.exit_code == 0, result.output
    assert "6 trials" in result.output and "4 Train worker(s), 40.01 CPU, 4 GPU" in result.output


def test_every_shipped_train_config_is_valid():
    from trainables.config import load_train_config
    from trainables.preflight import check_train_config

    for path in EXPERIMENTS.glob("*.yaml"):
        if not is_sweep_file(path):
            check_train_config(load_train_config(path), str(path))


@pytest.mark.ray
def test_two_trial_sweep_logs_parent_and_child_runs_and_reuses_its_teacher(ray_cluster, tmp_path, monkeypatch,
                                                                         tracking_uri):
    from mlflow.tracking import MlflowClient

    from orchestrator import sweep_command as sc

    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path / "teacher.yaml", {**TINY_BASE, "name": "tiny-teacher",
                                           "student": {**TINY_BASE["student"], "width": 64}})
    sweep_file = write_yaml(tmp_path / "sweep.yaml", {
        "name": "tiny", "teacher_training": "teacher.yaml", "mismatch_images": 40,
        "base": {**TINY_BASE, "kd": {"beta": 1.0, "alpha": 0.5}},
        "search": {"grid": {"student.remedy": ["none", "lift"]}}})
    setup = sc.prepare_sweep(str(sweep_file), [], tracking_uri)
    plan = sc.start_sweep(setup, None)
    rows, best = sc.run_sweep(plan, resume=False, address=None)

    client = MlflowClient(tracking_uri)
    parent = client.get_run(plan["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"summary.csv", "summary.md", "sweep.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "teacher/svd_rank_p99/0.99" in parent.data.metrics
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and len(rows) == 2
    assert sorted(c.data.params["student.remedy"] for c in children) == ["lift", "none"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["kd.alpha"] == "0.5" and child.data.params["student.width"] == "32"
        assert child.data.tags["encmm.trial_id"]
        for key in ("val/acc1", "final/val/acc1", "diag/svd_rank_p99/0.99", "diag/pca_rank_p99/0.99",
                    "diag/sep_ratio_90", "diag/feat_mse", "params_inference"):
            assert key in child.data.metrics, key
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert best is not None and best["status"] == "FINISHED"
    # The teacher was trained once, tagged by its config hash, and is found again instead of retrained.
    assert sc.ensure_teacher(setup, None) == plan["base"]["teacher"]["run_id"]


@pytest.mark.ray
def test_interrupted_sweep_resumes_without_rerunning_or_duplicating_trials(tmp_path):
    """Ctrl-C (SIGINT) on a real `encmm sweep` process, then `--resume` finishes it."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = write_yaml(tmp_path / "sweep.yaml", {
        "name": "resumable", "max_concurrent_trials": 1,
        "base": {**TINY_BASE, "student": {**TINY_BASE["student"], "target_width": 48}},
        "search": {"grid": {"student.remedy": ["none", "lift", "widelast"]}}})
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "MLFLOW_TRACKING_URI": uri}
    encmm = [sys.executable, "-m", "orchestrator.cli"]
    proc = subprocess.Popen([*encmm, "sweep", str(sweep_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = MlflowClient(uri)
    first_finished = None
    deadline = time.time() + 420
    while time.time() < deadline and first_finished is None:
        time.sleep(2)
        experiment = client.get_experiment_by_name("encmm") if (tmp_path / "mlflow.db").exists() else None
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], filter_string="tags.`encmm.kind` = 'trial'")
            done = [r for r in runs if r.info.status == "FINISHED"]
            first_finished = done[0] if done else None
    assert first_finished is not None, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=180)

    name = next((tmp_path / "encmm-runs" / "sweeps").iterdir()).name
    parent_id = first_finished.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status != "RUNNING"
    resumed = subprocess.run([*encmm, "sweep", str(sweep_file), "--resume", name], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    children = client.search_runs([first_finished.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    trial_ids = [c.data.tags["encmm.trial_id"] for c in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3  # no duplicate child runs
    assert all(c.info.status == "FINISHED" for c in children)
    again = client.get_run(first_finished.info.run_id)
    assert again.info.end_time == first_finished.info.end_time  # the finished trial was not re-run
    assert [m.step for m in client.get_metric_history(again.info.run_id, "val/acc1")] == [0]
    assert client.get_run(parent_id).info.status == "FINISHED"
