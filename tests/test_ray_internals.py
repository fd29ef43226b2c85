"""Each Ray (and CPython) internal encmm still relies on, pinned: an upgrade that breaks one fails here, naming
the version and the encmm function that needs another way. (Neither has a public API for these.)"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
VERSION = f"Ray {ray.__version__}"


def test_bootstrap_address_lookup_is_still_where_running_cluster_reads_it():
    from ray._private import services

    assert callable(getattr(services, "find_bootstrap_address", None)), (
        f"{VERSION}: ray._private.services.find_bootstrap_address is gone; "
        "encmm.orchestrator.ray_cluster._running_cluster must find a `ray start` cluster another way"
    )
    assert list(inspect.signature(services.find_bootstrap_address).parameters)[:1] == ["temp_dir"], VERSION


def test_local_only_switch_that_binds_the_local_cluster_to_loopback_still_exists():
    from ray._private import ray_constants

    assert isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool), (
        f"{VERSION}: ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone; "
        "encmm.orchestrator.ray_cluster._loopback_node_ip no longer keeps the local cluster on 127.0.0.1 "
        "(tests/test_security.py checks the binding itself)"
    )


def test_node_process_table_used_to_stop_the_monitor_first_still_exists():
    from ray._private import ray_constants, worker

    assert hasattr(worker, "_global_node"), f"{VERSION}: ray._private.worker._global_node is gone"
    assert isinstance(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None), str), (
        f"{VERSION}: ray_constants.PROCESS_TYPE_MONITOR is gone; encmm.orchestrator.ray_cluster._kill_monitor_first "
        "then does nothing (each command's exit takes ~1 s longer)"
    )
    from ray._private.node import Node

    assert "all_processes" in inspect.getsource(Node), f"{VERSION}: Node.all_processes is gone"


def test_train_checkpoint_folders_are_still_named_checkpoint_star():
    """trainables.ray_worker falls back to Ray Train's older committed checkpoints by their folder names."""
    from ray.train.v2._internal.execution.storage import StorageContext

    source = inspect.getsource(StorageContext)
    assert "checkpoint_" in source, (
        f"{VERSION}: Ray Train no longer names checkpoint folders checkpoint_*; "
        "encmm.trainables.ray_worker's fallback to an older checkpoint must list them another way"
    )


def test_train_v2_switch_is_still_read_from_the_environment():
    import ray.train

    root = Path(ray.train.__file__).parent
    assert any("RAY_TRAIN_V2_ENABLED" in p.read_text(errors="ignore") for p in root.rglob("*.py")), (
        f"{VERSION}: RAY_TRAIN_V2_ENABLED is no longer read; encmm.orchestrator.ray_cluster.init_ray sets it"
    )


def test_exit_handlers_still_run_before_the_fast_exit_after_ray():
    """``orchestrator.cli.exit_fast_after_ray`` runs the atexit handlers (``ray.shutdown``, MLflow's flushes)
    itself, then ``os._exit``s past Ray's native finalizers. ``atexit._run_exitfuncs`` is CPython's, not public:
    pinned here by behaviour (each handler once, last registered first), naming the Python version."""
    import subprocess
    import sys

    script = (
        "import atexit, os\n"
        "atexit.register(print, 'first registered')\n"
        "atexit.register(print, 'last registered')\n"
        "atexit._run_exitfuncs()\n"
        "os._exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.splitlines()) == (3, ["last registered", "first registered"]), (
        f"Python {sys.version.split()[0]}: atexit._run_exitfuncs no longer runs the exit handlers; "
        f"encmm.orchestrator.cli.exit_fast_after_ray must end the process another way ({done.stderr[-500:]})"
    )
