"""Fault injection for the fault-tolerance tests, entirely outside the product.

The session's Ray cluster is started with :func:`setup_worker` as the job's ``worker_process_setup_hook``
(Ray's public runtime-env hook; ``tests/conftest.py``), so it runs in every Ray worker process (trial
drivers, Train workers) before any task. It arranges that, once ``encmm.trainables.ray_worker`` is imported
there, the training state it sets up gets its train loader wrapped when an armed fault matches the run.

A test arms a fault with the ``inject_fault`` fixture; each armed fault is one JSON file in the folder
``ENCMM_TEST_FAULTS`` names (set before the cluster starts, so the workers inherit it):

    {"match": {"optim.lr": 0.003}, "epoch": 1, "batch": 3, "rank": 0, "marker": "/tmp/.../killed.pid"}

The rank-``rank`` worker of every run whose flattened config matches ``match`` is SIGKILLed when it is about
to yield batch ``batch`` of epoch ``epoch`` (mid-epoch, after the previous epoch's checkpoint was
committed), once: the marker file it writes first (its PID) disarms the fault and tells the test it fired.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

FAULTS_ENV = "ENCMM_TEST_FAULTS"
PATCHED_MODULE = "encmm.trainables.ray_worker"


class KillingLoader:
    """Wraps a train loader: SIGKILLs this process at ``fault``'s epoch and batch, once per marker file."""

    def __init__(self, loader, fault: dict):
        self.loader, self.fault = loader, fault
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        marker = Path(self.fault["marker"])
        for index, batch in enumerate(self.loader):
            if self.sampler.epoch == self.fault["epoch"] and index == self.fault["batch"] and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch


def armed_faults() -> list[dict]:
    folder = os.environ.get(FAULTS_ENV)
    if not folder or not Path(folder).is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))]


def with_faults(setup_training):
    """``setup_training`` whose state gets a :class:`KillingLoader` when an armed fault matches the run."""

    def setup(cfg, *args, **kwargs):
        import torch.distributed as dist

        from encmm.trainables.config import flatten

        state = setup_training(cfg, *args, **kwargs)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        params = flatten(cfg.model_dump(mode="json"))
        for fault in armed_faults():
            matches = all(params.get(key) == value for key, value in fault["match"].items())
            if matches and rank == fault.get("rank", 0) and not Path(fault["marker"]).exists():
                state.train_loader = KillingLoader(state.train_loader, fault)
        return state

    return setup


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches ``PATCHED_MODULE`` right after it is first imported (importing it here would cost every Ray
    worker, the ones that never train included, the import of torch and Ray Train)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != PATCHED_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.setup_training = with_faults(module.setup_training)

        spec.loader.exec_module = exec_module
        return spec


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: arm the patch in this worker process."""
    if PATCHED_MODULE in sys.modules:
        module = sys.modules[PATCHED_MODULE]
        module.setup_training = with_faults(module.setup_training)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def arm_fault(name: str, *, match: dict, epoch: int, batch: int, marker: Path, rank: int = 0) -> Path:
    """Arm one fault for the runs whose config matches ``match``; returns its file (delete it to disarm)."""
    path = Path(os.environ[FAULTS_ENV]) / f"{name}.json"
    fault = {"match": match, "epoch": epoch, "batch": batch, "rank": rank, "marker": str(marker)}
    path.write_text(json.dumps(fault))
    return path
