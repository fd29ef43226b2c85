"""Connecting to Ray: a local cluster by default, or the one ``--address`` / ``RAY_ADDRESS`` names."""
from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    """Start (or join) Ray once per process. A local dashboard listens on 127.0.0.1 only."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(dashboard_host="127.0.0.1", **kwargs)
