"""The one module that speaks Ray Train.

:func:`train_loop_per_worker` is an ordinary PyTorch loop (``trainables.engine``) with three Ray
calls: ``prepare_model`` (DDP), ``get_checkpoint`` (resume after a worker failure) and ``report``
(per-epoch metrics + checkpoint). :func:`build_trainer` builds the ``TorchTrainer`` for one run;
the caller (``encmm train`` or a Tune trial) calls ``fit()``.

A Train run with the same ``(storage_path, name)`` resumes from its last checkpoint by itself.
Rank 0 also writes ``best.pt`` into ``<storage>/<name>/`` (shared storage on a cluster).
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import ray.train
import ray.train.torch
import torch

from trainables.config import TrainConfig
from trainables.engine import TrainingState, checkpoint_state, restore_state, run_epochs, save_checkpoint, \
    setup_training

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"


def _arm_fault(fault: dict | None, epoch: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL this worker ``delay_s`` seconds into the epoch after
    ``fault["after_epoch"]`` (mid-epoch, after that epoch's checkpoint was reported), once per marker file."""
    if not fault or rank != fault.get("rank", 0) or epoch != fault["after_epoch"]:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    timer = threading.Timer(fault.get("delay_s", 1.0), os.kill, args=(os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every DDP rank. ``config``: train (json dump), log (rank-0 callable), run_dir, ..."""
    cfg = TrainConfig.model_validate(config["train"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    state = setup_training(cfg, device=device, teacher_checkpoint=config.get("teacher_checkpoint"),
                           wrap_model=lambda module: ray.train.torch.prepare_model(module, move_to_device=device))
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            ckpt = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        start_epoch = restore_state(state, ckpt)
        if rank == 0:
            print(f"encmm: resuming {cfg.name} at epoch {start_epoch} from {checkpoint.path}", flush=True)
    run_dir = Path(config["run_dir"])
    log: Callable | None = config.get("log") if rank == 0 else None

    def report(epoch: int, metrics: dict, is_best: bool, state: TrainingState) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            reported = None
            if rank == 0:
                ckpt = checkpoint_state(state, epoch, metrics)
                save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
                if is_best:
                    save_checkpoint(ckpt, run_dir / BEST_FILE)
                reported = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=reported)
        # Block until the controller has committed this checkpoint: a worker killed from here on
        # resumes after this epoch, so at most the epoch in flight is repeated.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        _arm_fault(config.get("inject_failure"), epoch, rank)

    run_epochs(state, start_epoch, log=log, on_epoch_end=report)


def build_trainer(cfg: TrainConfig, *, run_name: str, storage_path: str, log: Callable | None = None,
                  teacher_checkpoint: str | None = None, callbacks: list | None = None,
                  inject_failure: dict | None = None) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for ``cfg`` whose checkpoints live in ``storage_path/run_name``."""
    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    loop_config = {
        "train": cfg.model_dump(mode="json"), "log": log, "teacher_checkpoint": teacher_checkpoint,
        "run_dir": str(Path(storage_path) / run_name), "inject_failure": inject_failure,
    }
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or None),
    )
