"""Shared fixtures: one local Ray cluster per test session, tiny configs, a temp MLflow store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

TINY_STUDENT = ["student.width=32", "student.depth=2", "student.head_dim=16", "student.patch_size=4"]
TINY_DIGITS = ["data.name=digits", "data.img_size=16", "data.batch_size=64"] + TINY_STUDENT


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test that needs one (start-up costs ~5 s)."""
    import ray

    from encmm.orchestrator.ray_cluster import init_ray

    init_ray(None)
    yield ray
    ray.shutdown()


@pytest.fixture()
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
