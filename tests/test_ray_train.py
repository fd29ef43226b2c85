"""One real Ray Train run (2 CPU workers, DDP over gloo) tracked in a real MLflow store."""
from __future__ import annotations

import pytest

from tests.conftest import TINY_DIGITS
from trainables.config import load_train_config, with_absolute_paths

pytestmark = pytest.mark.ray


def test_two_worker_run_survives_a_killed_worker_and_ends_finished_in_mlflow(ray_cluster, tmp_path, tracking_uri,
                                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.train_command import run_train

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(load_train_config(None, [
        *TINY_DIGITS, "name=ray-fault", "schedule.epochs=3", "schedule.warmup_epochs=0", "optim.lr=3e-3",
        "optim.lr_base_batch=64", "resources.workers=2", "resources.cpus_per_worker=0.5"]))
    marker = tmp_path / "killed.pid"
    result = run_train(cfg, tracking_uri, inject_failure={"after_epoch": 0, "marker": str(marker), "delay_s": 0.0})

    assert marker.exists(), "the fault was never injected"
    client = MlflowClient(tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["resources.workers"] == "2" and run.data.params["student.width"] == "32"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")]
    # Resumed from the epoch-0 checkpoint: every epoch logged exactly once (a restart from scratch repeats 0).
    assert sorted(steps) == [0, 1, 2]
    assert "final/val/acc1" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.pt"]
    assert (tmp_path / "encmm-runs").is_dir()
