"""Shared fixtures: one local Ray cluster per test session, tiny configs, a temp MLflow store."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import tests.fault_injection
from tests.fault_injection import FAULTS_ENV, arm_fault, setup_worker

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Where tests arm faults (tests/fault_injection.py): set before the session's Ray cluster starts, so that
# every Ray worker inherits it. With no fault armed, nothing is injected.
os.environ.setdefault(FAULTS_ENV, tempfile.mkdtemp(prefix="encmm-test-faults-"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the servers and clusters tests start)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Bucket tests talk to a local S3-compatible server (moto's, started by the `s3_bucket` fixture), never to
# AWS: the endpoint and dummy credentials are set before the session's Ray cluster starts, so every Ray
# worker (where checkpoints are written) inherits them, as on a cluster whose nodes share an environment.
# (setdefault: this module is imported twice, by pytest and as ``tests.conftest``; one port for both.)
S3_PORT = int(os.environ.setdefault("ENCMM_TEST_S3_PORT", str(free_port())))
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="encmm-test",
    AWS_SECRET_ACCESS_KEY="encmm-test",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

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
    init_ray(None, runtime_env={"worker_process_setup_hook": setup_worker}, dashboard=True)
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


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server (a real HTTP server from PyPI) on the loopback port the AWS env names."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield os.environ["AWS_ENDPOINT_URL"]
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture()
def s3_bucket(s3_server):
    """A new, empty bucket on the local S3 server: ``s3://<bucket>``."""
    import pyarrow.fs

    name = f"encmm-{uuid.uuid4().hex[:12]}"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    pyarrow.fs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(name)
    return f"s3://{name}"
