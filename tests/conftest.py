"""Shared fixtures: one local Ray cluster per test session, tiny configs, a temp MLflow store."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import tests.fault_injection
from tests.fault_injection import FAULTS_ENV, arm_fault, setup_worker

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Where tests arm faults (tests/fault_injection.py): set before the session's Ray cluster starts, so that
# every Ray worker inherits it. With no fault armed, nothing is injected.
os.environ.setdefault(FAULTS_ENV, tempfile.mkdtemp(prefix="encmm-test-faults-"))

TINY_STUDENT = ["student.width=32", "student.depth=2", "student.head_dim=16", "student.patch_size=4"]
TINY_DIGITS = ["data.name=digits", "data.img_size=16", "data.batch_size=64"] + TINY_STUDENT


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every test that needs one (start-up costs ~5 s). Its workers run
    the fault-injection set-up hook (pickled by value: the workers need not import ``tests``)."""
    import ray
    import ray.cloudpickle

    from encmm.orchestrator.ray_cluster import init_ray

    ray.cloudpickle.register_pickle_by_value(tests.fault_injection)
    init_ray(None, runtime_env={"worker_process_setup_hook": setup_worker})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_script_sweep(ray_cluster, tmp_path_factory):
    """The embedded digits sweep (two arms, one epoch), run once by a script through ``encmm.sweep`` and
    ``encmm.report`` on the session's cluster (``tests/digits_script.py``): {"process", "folder", "uri"}."""
    from tests.digits_script import run_digits_script

    address = ray_cluster.get_runtime_context().gcs_address  # the session's cluster: no second one on 2 cores
    return run_digits_script(tmp_path_factory.mktemp("digits-script"), address)


@pytest.fixture()
def inject_fault():
    """``inject_fault(name, match=..., epoch=..., batch=..., marker=...)`` arms a SIGKILL for the runs whose
    config matches (``tests/fault_injection.py``); every fault armed in a test is disarmed after it."""
    armed: list[Path] = []

    def arm(name: str, **fault) -> Path:
        armed.append(arm_fault(name, **fault))
        return armed[-1]

    yield arm
    for path in armed:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _remove_fault_folder():
    yield
    shutil.rmtree(os.environ[FAULTS_ENV], ignore_errors=True)


@pytest.fixture()
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
