"""Connecting to Ray: a local cluster by default, or the one ``--address`` / ``RAY_ADDRESS`` names."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os

from encmm.orchestrator import env_flag


def init_ray(address: str | None = None, runtime_env: dict | None = None, dashboard: bool | None = None) -> None:
    """Start (or join) Ray once per process.

    A local cluster that encmm starts has Ray's dashboard only with ``dashboard`` (default: ``encmm
    --dashboard`` / ``ENCMM_DASHBOARD=1``): it costs about 2 s of start-up and a process for the length of
    the command, while runs, metrics and figures are in MLflow. It listens on 127.0.0.1 only: the dashboard
    (``dashboard_host``) and,
    because its node IP is 127.0.0.1, Ray's own servers too (GCS, raylet, workers, agents, metrics). A
    cluster named by ``address`` / ``RAY_ADDRESS`` (or one ``ray start`` left running on this machine,
    which ``ray.init()`` joins) is used as it is. ``runtime_env``: Ray's runtime environment for this job
    (``ray.init(runtime_env=...)``), which every task and actor it starts inherits.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray's own console output (worker logs, Train's per-report lines, raylet dumps) only with --verbose:
    # encmm's progress lines come from this process; the workers' logs stay in Ray's session folder.
    verbose = env_flag("ENCMM_VERBOSE")
    if dashboard is None:
        dashboard = env_flag("ENCMM_DASHBOARD")
    kwargs = {
        "ignore_reinit_error": True,
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "runtime_env": runtime_env,
    }
    if address:
        ray.init(address=address, **kwargs)
    elif _running_cluster() is not None:  # what ray.init() joins without an address: unchanged
        ray.init(dashboard_host="127.0.0.1", **kwargs)
    else:
        with _loopback_node_ip():
            ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", **kwargs)
        atexit.register(_kill_monitor_first)  # last in, first out: runs before the ray.shutdown Ray registered


def _running_cluster() -> str | None:
    """Address of a cluster ``ray start`` left on this machine (what ``ray.init()`` would join), else None."""
    from ray._private import services

    try:
        return services.find_bootstrap_address(None)  # /tmp/ray/ray_current_cluster
    except Exception:  # noqa: BLE001 - an unreadable address file: ray.init() reports it itself
        return ""


@contextlib.contextmanager
def _loopback_node_ip():
    """Let ``ray.init`` pick 127.0.0.1 as the node IP of the local cluster it starts.

    ``ray.init(_node_ip_address="127.0.0.1")`` does not do it: Ray swaps a loopback address for the
    machine's routable IP, and its gRPC servers (GCS, raylet, core workers, dashboard agent) and metrics
    exporters then listen on every interface. Ray keeps a node IP of 127.0.0.1 only where it treats the
    host as local-only (``ray_constants.ENABLE_RAY_CLUSTER`` false, as on macOS/Windows); every server
    then binds 127.0.0.1. Read only while the node starts; restored afterwards.
    """
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _kill_monitor_first() -> None:
    """At exit, before Ray's own shutdown: SIGKILL the autoscaler monitor of the local cluster this process
    started. Ray's shutdown stops the GCS first, then gives the monitor 1 s to exit on SIGTERM, which it
    spends trying to report its own end to that GCS, and then SIGKILLs it anyway: 1 s per command."""
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get(getattr(ray_constants, "PROCESS_TYPE_MONITOR", None), []):
        info.process.kill()
