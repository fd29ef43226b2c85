"""The one module that speaks Ray Train.

:func:`train_loop_per_worker` is an ordinary PyTorch loop (``trainables.engine``) with three Ray
calls: ``prepare_model`` (DDP), ``get_checkpoint`` (resume after a worker failure) and ``report``
(per-epoch metrics + checkpoint). :func:`build_trainer` builds the ``TorchTrainer`` for one run;
the caller (``encmm train`` or a Tune trial) calls ``fit()``.

A Train run with the same ``(storage_path, name)`` resumes from its last checkpoint by itself.
Rank 0 also writes ``best.pt`` into ``<storage>/<name>/`` (shared storage on a cluster).

How the run executes, on worker actors or in Train local mode inside the calling process, and what that
changes (resources, reporting, resume, restarts, callbacks) is ``trainables.execution``; the two loop
set-ups below are the Ray side of it.

MLflow conventions, from rank 0 (the process that trains) when ``log`` is encmm's ``RunLogger``: around the
epochs ``log.track_training`` names the run's datasets and samples system metrics; after the last epoch
``log.log_trained_model`` logs ``best.pt``'s network as an MLflow model. A plain ``log`` callable gets
metrics only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from encmm.trainables import storage
from encmm.trainables.config import TrainConfig
from encmm.trainables.data import normalise_images
from encmm.trainables.engine import (
    NonFiniteLossError,
    TrainingState,
    checkpoint_state,
    load_resume_checkpoint,
    resolve_device,
    restore_state,
    run_epochs,
    save_checkpoint,
    setup_training,
)
from encmm.trainables.execution import Execution
from encmm.trainables.storage import Location

console = logging.getLogger(__name__)  # the worker's own lines (Ray's log files; the console with --verbose)

CHECKPOINT_FILE = "checkpoint.pt"
HEALTH_CHECK_INTERVAL_S = 0.5  # Ray Train default 2.0; a missed poll only counts after 10 min
BEST_FILE = "best.pt"

NONFINITE_KEY = "encmm/nonfinite"  # in the loop's return value: the run stopped on a NaN/inf loss

EpochEnd = Callable[[int, dict, bool, TrainingState], None]


def committed_checkpoints(run_dir: Location, latest: Path, latest_folder: str | None = None) -> list[Location]:
    """``latest`` (from ``get_checkpoint()``), then the run's older committed checkpoints, newest first
    (those Ray Train keeps in ``run_dir``: a folder, or a bucket prefix). ``latest_folder``: the name of
    ``latest``'s folder in ``run_dir`` when ``latest`` is a downloaded copy (default: its parent's name)."""
    latest_folder = latest_folder or latest.parent.name
    folders = sorted(storage.subfolders(run_dir, "checkpoint_"), key=str, reverse=True)
    return [latest] + [storage.child(f, CHECKPOINT_FILE) for f in folders if Path(str(f)).name != latest_folder]


def start_in_process(cfg: TrainConfig, run_dir: Location, teacher_checkpoint: str | None, report_fn: Callable | None):
    """Train local mode: one process, no DDP, the engine's own device choice (Ray sets CUDA_VISIBLE_DEVICES).
    Train keeps reported checkpoints in memory only here, so each epoch's is committed to
    ``<run_dir>/checkpoint.pt`` by the loop (a retried Tune trial resumes from it). Inside a Tune trial
    ``ray.train.*`` calls raise (Train V2 defers to ``ray.tune``): the metrics go to ``report_fn``."""
    state = setup_training(
        cfg, device=resolve_device(cfg.resources.gpus_per_worker), teacher_checkpoint=teacher_checkpoint
    )
    found = load_resume_checkpoint([storage.child(run_dir, CHECKPOINT_FILE)])

    def on_epoch_end(epoch: int, metrics: dict, is_best: bool, state: TrainingState) -> None:
        ckpt = checkpoint_state(state, epoch, metrics)
        # Committed (atomic rename, the previous one kept as a fallback) before the next epoch.
        save_checkpoint(ckpt, storage.child(run_dir, CHECKPOINT_FILE), keep_previous=True)
        if is_best:
            save_checkpoint(ckpt, storage.child(run_dir, BEST_FILE))
        (report_fn or ray.train.report)(metrics)  # ray.train.report: the Result's metrics (encmm train)

    return state, 0, found, on_epoch_end


def start_on_worker_actor(cfg: TrainConfig, run_dir: Location, teacher_checkpoint: str | None):
    """One DDP rank on a Train worker actor: resume from Train's last committed checkpoint (older ones kept
    in ``run_dir`` are the fallback) and report each epoch's checkpoint for the controller to commit."""
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()
    state = setup_training(
        cfg,
        device=device,
        teacher_checkpoint=teacher_checkpoint,
        wrap_model=lambda module: ray.train.torch.prepare_model(module, move_to_device=device),
    )
    found = None
    if (latest := ray.train.get_checkpoint()) is not None:
        with latest.as_directory() as folder:  # a download when the storage is a bucket
            candidates = committed_checkpoints(run_dir, Path(folder) / CHECKPOINT_FILE, Path(latest.path).name)
            found = load_resume_checkpoint(candidates)

    def on_epoch_end(epoch: int, metrics: dict, is_best: bool, state: TrainingState) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            reported = None
            if rank == 0:
                ckpt = checkpoint_state(state, epoch, metrics)
                save_checkpoint(ckpt, Path(tmp) / CHECKPOINT_FILE)
                if is_best:
                    save_checkpoint(ckpt, storage.child(run_dir, BEST_FILE))
                reported = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=reported)
        # Block until the controller has committed this checkpoint: a worker killed from here on
        # resumes after this epoch, so at most the epoch in flight is repeated.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    return state, rank, found, on_epoch_end


def train_loop_per_worker(config: dict[str, Any]) -> dict:
    """Runs on every DDP rank. ``config``: train (json dump), log (rank-0 callable), run_dir, in_process, ..."""
    cfg = TrainConfig.model_validate(config["train"])
    run_dir = storage.as_location(config["run_dir"])
    teacher_checkpoint = config.get("teacher_checkpoint")
    if config.get("in_process", False):
        state, rank, found, on_epoch_end = start_in_process(cfg, run_dir, teacher_checkpoint, config.get("report_fn"))
    else:
        state, rank, found, on_epoch_end = start_on_worker_actor(cfg, run_dir, teacher_checkpoint)
    start_epoch = 0
    if found:
        start_epoch = restore_state(state, found[0])
        if rank == 0:
            console.warning(f"encmm: resuming {cfg.name} at epoch {start_epoch} from {found[1]}")
    log: Callable | None = config.get("log") if rank == 0 else None
    tracked = rank == 0 and hasattr(log, "track_training")  # encmm's RunLogger, not a plain callable
    if tracked and found:
        log.note_resume(start_epoch, found[1])  # the driver's console says so (encmm train's progress lines)
        if "metrics" in found[0]:  # committed, maybe not logged when the worker was lost
            log.log_metrics_if_missing(found[0]["metrics"], found[0]["epoch"])
    try:
        with log.track_training(cfg.data.model_dump(mode="json")) if tracked else contextlib.nullcontext():
            final = run_epochs(state, start_epoch, log=log, on_epoch_end=on_epoch_end)
    except NonFiniteLossError as exc:
        # Every rank detects it at the same step. Retrying would diverge again from the same checkpoint:
        # end the loop normally and let the driver fail the run with this reason.
        return {NONFINITE_KEY: str(exc)}
    if tracked and storage.exists(best := storage.child(run_dir, BEST_FILE)):
        with tempfile.TemporaryDirectory() as tmp:
            example = example_images(state.val_loader.dataset, state.spec["mean"], state.spec["std"])
            log.log_trained_model(storage.local_copy(best, Path(tmp)), example)
    return final


def example_images(dataset, mean, std, count: int = 2) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` as one normalised float32 CPU batch ``[count, 3, S, S]``
    (repeated when it holds fewer; uint8 images of ``data.pipeline=fast`` normalised with ``mean``/``std``):
    the logged model's input example."""
    images = [torch.as_tensor(dataset[index % len(dataset)][0]) for index in range(count)]
    return normalise_images(torch.stack(images), mean, std).float().cpu()


def build_trainer(
    cfg: TrainConfig,
    *,
    run_name: str,
    storage_path: str,
    log: Callable | None = None,
    teacher_checkpoint: str | None = None,
    callbacks: list | None = None,
    report_fn: Callable[[dict], None] | None = None,
    execution: Execution | None = None,
) -> ray.train.torch.TorchTrainer:
    """A ``TorchTrainer`` for ``cfg`` whose checkpoints live in ``storage_path/run_name`` (a folder or a
    bucket URI, see ``trainables.storage``).

    ``execution`` (default: what ``cfg.resources`` asks for in a sweep) says whether it trains on worker
    actors, where ``callbacks`` (Train ``UserCallback``s) run, or in local mode, where the loop calls
    ``report_fn(metrics)`` after each epoch instead. The loop returns the last epoch's metrics
    (``Result.return_value``; a local run given ``report_fn`` has no ``Result.metrics``).
    """
    execution = execution or Execution.of(cfg.resources)
    # Train's controller collects reports (and commits checkpoints) on its health-check tick, 2 s by
    # default; every epoch waits for its commit, so the tick is idle time per epoch. Propagated by Ray
    # to the controller it starts from this process; a value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    loop_config = {
        "train": cfg.model_dump(mode="json"),
        "log": log,
        "teacher_checkpoint": teacher_checkpoint,
        "run_dir": str(storage.child(storage.as_location(storage_path), run_name)),
        "in_process": execution.in_process,
        "report_fn": report_fn if execution.in_process else None,
    }
    scaling = (
        ray.train.ScalingConfig(num_workers=0)
        if execution.in_process
        else ray.train.ScalingConfig(
            num_workers=execution.workers, use_gpu=execution.use_gpu, resources_per_worker=execution.worker_bundle()
        )
    )
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if execution.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=execution.worker_restarts),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=(callbacks or None) if execution.reports_through_callbacks else None,
        ),
    )


def final_metrics(result) -> dict:
    """The numeric last-epoch metrics of a finished ``fit()``: the loop's return value (it has
    ``best/epoch``), else the last report. Raises :class:`NonFiniteLossError` with the loop's reason
    when the run stopped on a NaN/inf loss."""
    returned = result.return_value or {}
    if NONFINITE_KEY in returned:
        raise NonFiniteLossError(returned[NONFINITE_KEY])
    reported = returned or result.metrics or {}
    return {key: value for key, value in reported.items() if isinstance(value, (int, float))}
