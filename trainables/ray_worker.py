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

MLflow conventions, from rank 0 (the process that trains) when ``log`` is encmm's ``RunLogger``: around the
epochs ``log.track_training`` names the run's datasets and samples system metrics; after the last epoch
``log.log_trained_model`` logs ``best.pt``'s network as an MLflow model. A plain ``log`` callable gets
metrics only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from encmm.trainables.config import TrainConfig
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

console = logging.getLogger(__name__)  # the worker's own lines (Ray's log files; the console with --verbose)

CHECKPOINT_FILE = "checkpoint.pt"
HEALTH_CHECK_INTERVAL_S = 0.5  # Ray Train default 2.0; a missed poll only counts after 10 min
BEST_FILE = "best.pt"


NONFINITE_KEY = "encmm/nonfinite"  # in the loop's return value: the run stopped on a NaN/inf loss


class FaultInjectingLoader:
    """Fault injection for tests: wraps the train loader and SIGKILLs this process when it is about
    to yield batch ``fault["batch"]`` of epoch ``fault["epoch"]`` (mid-epoch, after the previous epoch's
    checkpoint was committed), on rank ``fault.get("rank", 0)``, once per ``fault["marker"]`` file."""

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


def committed_checkpoints(run_dir: Path, latest: Path) -> list[Path]:
    """``latest`` (from ``get_checkpoint()``), then the run's older committed checkpoints, newest first
    (those Ray Train keeps in ``run_dir``, found when the storage is a local or shared filesystem)."""
    older = sorted((p / CHECKPOINT_FILE for p in run_dir.glob("checkpoint_*") if p.is_dir()), reverse=True)
    return [latest] + [p for p in older if p.parent.resolve() != latest.parent.resolve()]


def train_loop_per_worker(config: dict[str, Any]) -> dict:
    """Runs on every DDP rank. ``config``: train (json dump), log (rank-0 callable), run_dir, local, ..."""
    cfg = TrainConfig.model_validate(config["train"])
    local = config.get("local", False)
    run_dir = Path(config["run_dir"])
    # Inside a Tune trial Ray's ``ray.train.*`` calls raise in local mode (Train V2 defers to ``ray.tune``
    # there): a local loop is rank 0 and reports through ``report_fn`` when it has one.
    rank = 0 if local else ray.train.get_context().get_world_rank()
    if local:  # one process, no DDP: the engine's own device choice (Ray sets CUDA_VISIBLE_DEVICES if any)
        state = setup_training(
            cfg,
            device=resolve_device(cfg.resources.gpus_per_worker),
            teacher_checkpoint=config.get("teacher_checkpoint"),
        )
        found = load_resume_checkpoint([run_dir / CHECKPOINT_FILE])
    else:
        device = ray.train.torch.get_device()
        state = setup_training(
            cfg,
            device=device,
            teacher_checkpoint=config.get("teacher_checkpoint"),
            wrap_model=lambda module: ray.train.torch.prepare_model(module, move_to_device=device),
        )
        found = None
        if (latest := ray.train.get_checkpoint()) is not None:
            with latest.as_directory() as folder:  # a download when the storage is remote
                found = load_resume_checkpoint(committed_checkpoints(run_dir, Path(folder) / CHECKPOINT_FILE))
    start_epoch = 0
    if found:
        start_epoch = restore_state(state, found[0])
        if rank == 0:
            console.warning(f"encmm: resuming {cfg.name} at epoch {start_epoch} from {found[1]}")
    fault = config.get("inject_failure")
    if fault and rank == fault.get("rank", 0):
        state.train_loader = FaultInjectingLoader(state.train_loader, fault)
    log: Callable | None = config.get("log") if rank == 0 else None
    report_fn: Callable | None = config.get("report_fn")

    def report_local(epoch: int, metrics: dict, is_best: bool, state: TrainingState) -> None:
        ckpt = checkpoint_state(state, epoch, metrics)
        # Committed (atomic rename, the previous one kept as a fallback) before the next epoch.
        save_checkpoint(ckpt, run_dir / CHECKPOINT_FILE, keep_previous=True)
        if is_best:
            save_checkpoint(ckpt, run_dir / BEST_FILE)
        if report_fn is not None:
            report_fn(metrics)
        else:
            ray.train.report(metrics)  # the Result's metrics (encmm train)

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

    tracked = rank == 0 and hasattr(log, "track_training")  # encmm's RunLogger, not a plain callable
    try:
        with log.track_training(cfg.data.model_dump(mode="json")) if tracked else contextlib.nullcontext():
            final = run_epochs(state, start_epoch, log=log, on_epoch_end=report_local if local else report)
    except NonFiniteLossError as exc:
        # Every rank detects it at the same step. Retrying would diverge again from the same checkpoint:
        # end the loop normally and let the driver fail the run with this reason.
        return {NONFINITE_KEY: str(exc)}
    if tracked and (run_dir / BEST_FILE).is_file():
        log.log_trained_model(run_dir / BEST_FILE, example_images(state.val_loader.dataset))
    return final


def example_images(dataset, count: int = 2) -> torch.Tensor:
    """The first ``count`` images of ``dataset`` as one CPU batch ``[count, 3, S, S]`` (repeated when it
    holds fewer): the logged model's input example."""
    images = [dataset[index % len(dataset)][0] for index in range(count)]
    return torch.stack(images).float().cpu()


def build_trainer(
    cfg: TrainConfig,
    *,
    run_name: str,
    storage_path: str,
    log: Callable | None = None,
    teacher_checkpoint: str | None = None,
    callbacks: list | None = None,
    report_fn: Callable[[dict], None] | None = None,
    inject_failure: dict | None = None,
) -> ray.train.torch.TorchTrainer:
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
        "train": cfg.model_dump(mode="json"),
        "log": log,
        "teacher_checkpoint": teacher_checkpoint,
        "run_dir": str(Path(storage_path) / run_name),
        "inject_failure": inject_failure,
        "local": local,
        "report_fn": report_fn if local else None,
    }
    scaling = (
        ray.train.ScalingConfig(num_workers=0)
        if local
        else ray.train.ScalingConfig(num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)
    )
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=None if local else (callbacks or None),
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
