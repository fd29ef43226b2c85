"""The one module that speaks Ray Train.

:func:`train_loop_per_worker` is an ordinary PyTorch loop (``trainables.engine``) with three Ray
calls: ``prepare_model`` (DDP), ``get_checkpoint`` (resume after a worker failure) and ``report``
(per-epoch metrics + checkpoint). :func:`build_trainer` builds the ``TorchTrainer`` for one run;
the caller (``encmm train`` or a Tune trial) calls ``fit()``.

A Train run with the same ``(storage_path, name)`` resumes from its last checkpoint by itself.
Rank 0 also writes ``best.pt`` into ``<storage>/<name>/`` (shared storage on a cluster).

Local mode (``resources.local_mode``, auto for one CPU worker): ``ScalingConfig(num_workers=0)`` runs
the loop inside the calling process (the Tune trial driver, or ``encmm train``) with no controller or
worker actor to start. Ray Train then keeps reported checkpoints in memory only, never calls the
RunConfig callbacks, and does not restart a failed worker, so the loop commits each epoch's checkpoint
to ``<storage>/<name>/checkpoint.pt`` itself (a retried Tune trial resumes from it) and hands each
epoch's metrics to ``report_fn`` (``ray.tune.report`` in a sweep, where ``TuneReportCallback`` would
otherwise forward them).
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
from trainables.engine import TrainingState, checkpoint_state, resolve_device, restore_state, run_epochs, \
    save_checkpoint, setup_training

CHECKPOINT_FILE = "checkpoint.pt"
HEALTH_CHECK_INTERVAL_S = 0.5  # Ray Train default 2.0; a missed poll only counts after 10 min
BEST_FILE = "best.pt"


def _arm_fault(fault: dict | None, epoch: int, rank: int) -> None:
    """Fault injection for tests: SIGKILL this worker ``delay_s`` seconds (0 = at once) into the epoch after
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


def train_loop_per_worker(config: dict[str, Any]) -> dict:
    """Runs on every DDP rank. ``config``: train (json dump), log (rank-0 callable), run_dir, local, ..."""
    cfg = TrainConfig.model_validate(config["train"])
    local = config.get("local", False)
    run_dir = Path(config["run_dir"])
    # Inside a Tune trial Ray's ``ray.train.*`` calls raise in local mode (Train V2 defers to ``ray.tune``
    # there): a local loop is rank 0 and reports through ``report_fn`` when it has one.
    rank = 0 if local else ray.train.get_context().get_world_rank()
    if local:  # one process, no DDP: the engine's own device choice (Ray sets CUDA_VISIBLE_DEVICES if any)
        state = setup_training(cfg, device=resolve_device(cfg.resources.gpus_per_worker),
                               teacher_checkpoint=config.get("teacher_checkpoint"))
    else:
        device = ray.train.torch.get_device()
        state = setup_training(cfg, device=device, teacher_checkpoint=config.get("teacher_checkpoint"),
                               wrap_model=lambda module: ray.train.torch.prepare_model(module, move_to_device=device))
    start_epoch = 0
    if local:
        resume_file = run_dir / CHECKPOINT_FILE
        if resume_file.is_file():
            start_epoch = restore_state(state, torch.load(resume_file, map_location="cpu", weights_only=True))
            print(f"encmm: resuming {cfg.name} at epoch {start_epoch} from {resume_file}", flush=True)
    elif (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:
            ckpt = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        start_epoch = restore_state(state, ckpt)
        if rank == 0:
            print(f"encmm: resuming {cfg.name} at epoch {start_epoch} from {checkpoint.path}", flush=True)
    log: Callable | None = config.get("log") if rank == 0 else None
    report_fn: Callable | None = config.get("report_fn")

    def report_local(epoch: int, metrics: dict, is_best: bool, state: TrainingState) -> None:
        ckpt = checkpoint_state(state, epoch, metrics)
        save_checkpoint(ckpt, run_dir / CHECKPOINT_FILE)  # committed (atomic rename) before the next epoch
        if is_best:
            save_checkpoint(ckpt, run_dir / BEST_FILE)
        if report_fn is not None:
            report_fn(metrics)
        else:
            ray.train.report(metrics)  # the Result's metrics (encmm train)
        _arm_fault(config.get("inject_failure"), epoch, rank)

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

    return run_epochs(state, start_epoch, log=log, on_epoch_end=report_local if local else report)


def build_trainer(cfg: TrainConfig, *, run_name: str, storage_path: str, log: Callable | None = None,
                  teacher_checkpoint: str | None = None, callbacks: list | None = None,
                  report_fn: Callable[[dict], None] | None = None,
                  inject_failure: dict | None = None) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for ``cfg`` whose checkpoints live in ``storage_path/run_name``.

    ``callbacks`` (Train ``UserCallback``s) serve worker-actor runs; ``report_fn(metrics)`` is what a
    local-mode run (``cfg.resources.runs_local``) calls after each epoch instead. The loop returns the
    last epoch's metrics (``Result.return_value``; a local run given ``report_fn`` has no ``Result.metrics``).
    """
    res = cfg.resources
    local = res.runs_local
    # Train's controller collects reports (and commits checkpoints) on its health-check tick, 2 s by
    # default; every epoch waits for its commit, so the tick is idle time per epoch. Propagated by Ray
    # to the controller it starts from this process; a value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    loop_config = {
        "train": cfg.model_dump(mode="json"), "log": log, "teacher_checkpoint": teacher_checkpoint,
        "run_dir": str(Path(storage_path) / run_name), "inject_failure": inject_failure,
        "local": local, "report_fn": report_fn if local else None,
    }
    scaling = ray.train.ScalingConfig(num_workers=0) if local else ray.train.ScalingConfig(
        num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=None if local else (callbacks or None)),
    )
