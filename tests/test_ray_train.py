"""Real Ray Train runs (2 CPU workers, DDP over gloo) tracked in a real MLflow store: one killed mid-epoch with
its checkpoints in a bucket (moto's S3 server on loopback), one uninterrupted on the local filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from encmm.trainables.config import load_train_config, with_absolute_paths
from tests.conftest import TINY_DIGITS

pytestmark = pytest.mark.ray


def test_worker_killed_mid_epoch_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(
    ray_cluster, tmp_path, tracking_uri, monkeypatch, inject_fault, s3_bucket, caplog
):
    from mlflow.tracking import MlflowClient

    from encmm.orchestrator.training import run_train
    from tests.test_storage import objects

    monkeypatch.chdir(tmp_path)
    overrides = [
        *TINY_DIGITS,
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
        "optim.lr=3e-3",
        "optim.lr_base_batch=64",
        "resources.workers=2",
        "resources.cpus_per_worker=0.5",
        # random shifts and drop-path: each rank draws its own streams, and the resumed epoch must draw them again
        "data.augment=shift",
        "student.drop_path=0.1",
    ]
    marker = tmp_path / "killed.pid"
    # Rank 0 is SIGKILLed when it reaches batch 3 of epoch 1 (epoch 0's checkpoint is committed by then).
    inject_fault("ray-killed", match={"name": "ray-killed"}, epoch=1, batch=3, marker=marker)
    in_bucket = [*overrides, "name=ray-killed", f"tracking.storage={s3_bucket}/ckpt"]
    killed = run_train(with_absolute_paths(load_train_config(None, in_bucket)), tracking_uri)
    straight = run_train(with_absolute_paths(load_train_config(None, [*overrides, "name=ray-straight"])), tracking_uri)

    assert marker.exists(), "the fault was never injected"
    client = MlflowClient(tracking_uri)
    run = client.get_run(killed["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["resources.workers"] == "2" and run.data.params["student.width"] == "32"
    # Resumed from the epoch-0 checkpoint: only epoch 1 was repeated, every epoch logged exactly once.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/acc1")]
    assert sorted(steps) == [0, 1]
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name LIKE 'ray-killed%'")) == 1
    # Same seed, same result as the run nobody killed (DDP over gloo on CPU: equal up to float rounding).
    for key in ("train/loss", "val/loss", "val/acc1", "best/val/acc1"):
        assert killed[key] == pytest.approx(straight[key], rel=1e-4, abs=1e-6), key
        assert run.data.metrics[f"final/{key}"] == pytest.approx(killed[key], rel=1e-6)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.pt"]
    # The console said so: one progress line, from the tag the resumed rank 0 set.
    assert run.data.tags["encmm.resumed"].startswith("epoch 1 from ")
    assert "[ray-killed]: workers restarted; resumed at epoch 1 from " in caplog.text
    # Its checkpoints were only ever in the bucket: the resume read them from there.
    run_name = Path(killed["run_dir"]).name
    assert run.data.tags["encmm.checkpoint_dir"] == f"{s3_bucket}/ckpt/{run_name}"
    stored = objects(f"{s3_bucket}/ckpt/{run_name}")
    assert "best.pt" in stored and any(name.endswith("/checkpoint.pt") for name in stored), stored
    assert not list(Path(killed["run_dir"]).glob("checkpoint_*")) and (Path(killed["run_dir"]) / "best.pt").is_file()
