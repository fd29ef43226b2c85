"""The training core: set-up, one epoch, evaluation, checkpoints. No Ray, no MLflow.

Reading order is execution order: :func:`setup_training` builds everything a run holds,
:func:`run_epochs` loops :func:`train_one_epoch` + :func:`evaluate` and hands each epoch's
metrics and full checkpoint to callbacks. :func:`fit` is the in-process driver (tests, bare GPU
boxes); ``trainables.ray_worker`` is the Ray Train one. Distributed runs are plain
``torch.distributed``: rank and world size are read from the initialised process group.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from encmm.trainables import storage
from encmm.trainables.config import TrainConfig
from encmm.trainables.data import DataBundle, build_datasets, build_loaders
from encmm.trainables.losses import DistillationLoss
from encmm.trainables.models import build_student, count_parameters, timm_no_weight_decay
from encmm.trainables.storage import Location
from encmm.trainables.teacher import (
    FrozenTeacher,
    build_teacher,
    fuse_talking_heads,
    patch_grid,
    token_grid_mismatch,
)

log = logging.getLogger(__name__)

LogFn = Callable[[dict, int], None]


class Distiller(nn.Module):
    """The trainable parts: the student and, when widths differ, the student-side projector.

    The projector is a loss-side module (FitNets): it is trained but never part of inference.
    """

    def __init__(
        self,
        student: nn.Module,
        projector: nn.Module | None = None,
        no_weight_decay: set[str] | frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.student = student
        self.projector = projector
        self._no_weight_decay = set(no_weight_decay)

    def no_weight_decay(self) -> set[str]:
        """Parameter names timm's ``create_optimizer_v2`` keeps out of weight decay (besides 1-D ones)."""
        return set(self._no_weight_decay)

    def forward(self, x: torch.Tensor, with_features: bool = True):
        if not with_features:
            return self.student(x), None
        logits, feat = self.student.forward_distill(x)
        if self.projector is not None:
            feat = self.projector(feat)
        return logits, feat


@dataclass
class TrainingState:
    cfg: TrainConfig
    device: torch.device
    distiller: nn.Module  # possibly DDP-wrapped / compiled: use for training forward only
    core: Distiller  # unwrapped, for state dicts and eval
    teacher: FrozenTeacher | None
    criterion: DistillationLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: object | None
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    autocast_dtype: torch.dtype | None
    spec: dict
    rank: int = 0
    world_size: int = 1
    num_updates: int = 0
    best: dict = field(default_factory=lambda: {"val/acc1": -1.0, "epoch": -1})


def resolve_device(gpus_per_worker: int) -> torch.device:
    if gpus_per_worker > 0 and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def distributed_context() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) for ``epoch`` on ``rank`` from (seed, rank, epoch)
    alone: each rank draws its own augmentation, random-erasing and drop-path streams, as DeiT and timm do, and
    a resumed run draws, on every rank, what the uninterrupted one drew, with no RNG state in the checkpoint
    (restoring one saved state on every rank made all ranks share one stream after a resume). Loader worker
    processes are the exception: persistent, they are seeded once when first started and keep their streams
    across epochs, so with ``data.num_workers > 0`` a resumed run's augmentations differ. Hashed, so seed
    s + 1 does not replay seed s one rank or one epoch later."""
    import numpy as np

    entropy = [seed % 2**64, rank, epoch]
    seed_everything(int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]))


def resolve_target_width(cfg: TrainConfig, teacher: FrozenTeacher | None) -> int | None:
    return cfg.student.target_width or (teacher.feature_width if teacher is not None else None)


def build_projector(cfg: TrainConfig, student: nn.Module, teacher: FrozenTeacher | None) -> nn.Module | None:
    """A Linear student->teacher projector when the feature loss is on and widths differ."""
    if teacher is None or cfg.kd.beta == 0 or cfg.student.projector != "linear":
        return None
    s_width, t_width = student.feature_width, teacher.feature_width
    return nn.Linear(s_width, t_width) if s_width != t_width else None


def decay_exempt_names(cfg: TrainConfig, student: nn.Module) -> set[str]:
    """``optim.no_weight_decay``: the names (relative to :class:`Distiller`) that skip weight decay.

    ``auto`` reproduces the authors' runs: their plain DeiT baseline hands timm's model to the optimizer,
    which reads its ``no_weight_decay()`` set (``pos_embed``, ``cls_token``); their Lift / WideLast /
    UniformWide wrappers do not forward that set, so those decay.
    """
    policy = cfg.optim.no_weight_decay
    if policy == "auto":
        policy = "timm" if cfg.student.remedy == "none" else "none"
    return {f"student.{name}" for name in timm_no_weight_decay(student)} if policy == "timm" else set()


def setup_training(
    cfg: TrainConfig,
    *,
    device: torch.device,
    teacher_checkpoint: str | None = None,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    data: DataBundle | None = None,
) -> TrainingState:
    """Build data, teacher, student (+projector), loss, AdamW, cosine schedule and EMA for ``cfg``.

    ``wrap_model`` wraps the trainable module for distributed training (e.g. DDP); the teacher is
    never wrapped. ``teacher_checkpoint`` is the local file of a ``teacher.source=run`` teacher.
    ``data`` is your own dataset pair (images ``[3, S, S]`` normalised with its ``mean``/``std``, or uint8
    with ``uint8=True``, S = ``cfg.data.img_size``; ``num_classes`` sizes the student's head) used instead of
    ``build_datasets(cfg.data)``; ``cfg.data`` still sets the batch sizes and loader workers.
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    rank, world_size = distributed_context()
    seed_everything(cfg.seed)
    data = data if data is not None else build_datasets(cfg.data)
    train_loader, val_loader = build_loaders(
        cfg.data,
        data,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        pin_memory=device.type == "cuda",
        device=device,  # data.pipeline=fast: batches are normalised (and erased) on it
    )
    teacher = None
    if cfg.kd.uses_teacher:
        teacher = build_teacher(
            cfg.teacher,
            student_mean=data.mean,
            student_std=data.std,
            checkpoint_path=teacher_checkpoint,
            img_size=cfg.data.img_size,
        ).to(device)
        if switched_on(cfg.teacher.fused_attention, device):
            fuse_talking_heads(teacher.model)  # CaiT: its head mixing took ~44% of a compiled KD step on an H100
        if cfg.teacher.dtype == "bfloat16":
            teacher.cast_weights(torch.bfloat16)
    target_width = resolve_target_width(cfg, teacher)
    torch.manual_seed(cfg.seed)  # same init on every rank and on resume, whatever was built before
    student = build_student(
        cfg.student,
        num_classes=data.num_classes,
        img_size=cfg.data.img_size,
        target_width=target_width,
        tap_block=cfg.kd.student_block,
    )
    # encmm train / sweep refuse this in their preflight; engine.fit and the Python API here, before training
    if teacher is not None and cfg.kd.beta > 0:
        if why := token_grid_mismatch(patch_grid(teacher), patch_grid(student)):
            raise ValueError(f"teacher: {why}")
    projector = build_projector(cfg, student, teacher)
    core = Distiller(student, projector, decay_exempt_names(cfg, student)).to(device)
    align = (
        "avgpool"
        if (
            teacher is not None
            and cfg.kd.beta > 0
            and projector is None
            and student.feature_width != teacher.feature_width
        )
        else None
    )
    criterion = DistillationLoss(cfg.kd, align=align, student_width=student.feature_width)

    global_batch = cfg.data.batch_size * world_size
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_base_batch
    fused = device.type == "cuda"
    optimizer = create_optimizer_v2(
        core, opt="adamw", lr=lr, weight_decay=cfg.optim.weight_decay, **({"fused": True} if fused else {})
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.schedule.epochs,
        warmup_epochs=cfg.schedule.warmup_epochs,
        warmup_lr=cfg.schedule.warmup_lr,
        min_lr=cfg.schedule.min_lr,
        step_on_epochs=cfg.schedule.step_on == "epoch",
        updates_per_epoch=len(train_loader),
    )
    ema = None
    if cfg.optim.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(student, decay=cfg.optim.ema_decay)

    # The models above come from cfg.seed on every rank, so they start identical; each epoch then seeds its own
    # streams per rank (run_epochs: seed_epoch).
    use_bf16 = cfg.resources.precision == "bf16" or (cfg.resources.precision == "auto" and device.type == "cuda")
    distiller: nn.Module = wrap_model(core) if wrap_model else core
    if switched_on(cfg.resources.compile, device):
        mode = None if cfg.resources.compile_mode == "default" else cfg.resources.compile_mode
        distiller = torch.compile(distiller, mode=mode)
        if teacher is not None:
            teacher.compile(mode=mode)  # in place (same module, same state dict): its forward is most of a KD step
    spec = {
        "student": cfg.student.model_dump(mode="json"),
        "num_classes": data.num_classes,
        "img_size": cfg.data.img_size,
        "target_width": target_width,
        "tap_block": cfg.kd.student_block,
        "mean": list(data.mean),
        "std": list(data.std),
        "params_inference": count_parameters(student),
    }
    return TrainingState(
        cfg,
        device,
        distiller,
        core,
        teacher,
        criterion,
        optimizer,
        scheduler,
        ema,
        train_loader,
        val_loader,
        torch.bfloat16 if use_bf16 else None,
        spec,
        rank=rank,
        world_size=world_size,
    )


def switched_on(setting: str, device: torch.device) -> bool:
    """An ``auto | on | off`` switch of the GPU fast paths (``resources.compile``, ``teacher.fused_attention``):
    auto means on CUDA."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _autocast(state: TrainingState):
    if state.autocast_dtype is None:
        return torch.autocast(state.device.type, enabled=False)
    return torch.autocast(state.device.type, dtype=state.autocast_dtype)


def _all_reduce_sum(tensor: torch.Tensor, state: TrainingState) -> torch.Tensor:
    if state.world_size > 1:
        dist.all_reduce(tensor)
    return tensor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and ``optim.on_nonfinite`` is ``stop``: the run cannot go on."""


NONFINITE_CHECK_EVERY = 25  # stop mode: steps between host syncs that look for a NaN/inf loss


def _nonfinite_message(epoch: int, step: int, losses: dict[str, torch.Tensor]) -> str:
    values = ", ".join(f"{name}={value.item():.4g}" for name, value in sorted(losses.items()))
    return f"non-finite loss in epoch {epoch}, detected at step {step} ({values}); optim.on_nonfinite=stop"


def train_one_epoch(state: TrainingState, epoch: int) -> dict[str, float]:
    """One pass over the train loader; returns ``train/*`` metrics averaged over all ranks.

    A NaN/inf loss either stops the run (:class:`NonFiniteLossError`, raised on every rank within
    ``NONFINITE_CHECK_EVERY`` steps, before any checkpoint of the diverged weights) or, with
    ``optim.on_nonfinite=skip``, skips that step's update on every rank and counts it.
    """
    state.distiller.train()
    state.train_loader.sampler.set_epoch(epoch)
    needs_features = state.teacher is not None and state.cfg.kd.beta > 0
    skip_nonfinite = state.cfg.optim.on_nonfinite == "skip"
    sums: dict[str, torch.Tensor] = {}
    nonfinite = torch.zeros((), device=state.device)
    seen = skipped = 0
    start = time.perf_counter()
    last_step = len(state.train_loader) - 1
    for step, (images, labels) in enumerate(state.train_loader):
        images = images.to(state.device, non_blocking=True)
        labels = labels.to(state.device, non_blocking=True)
        with _autocast(state):
            teacher_logits = feat_t = None
            if state.teacher is not None:
                teacher_logits, feat_t = state.teacher(images)
            logits, feat_s = state.distiller(images, with_features=needs_features)
            losses = state.criterion(logits, labels, feat_s, teacher_logits, feat_t)
        bad = (~torch.isfinite(losses["loss"].detach())).float()
        if skip_nonfinite and _all_reduce_sum(bad, state).item() > 0:  # same decision on every rank
            skipped += 1
            continue
        state.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if state.cfg.optim.clip_grad:
            nn.utils.clip_grad_norm_(state.core.parameters(), state.cfg.optim.clip_grad)
        state.optimizer.step()
        state.num_updates += 1
        state.scheduler.step_update(num_updates=state.num_updates)
        if state.ema is not None:
            state.ema.update(state.core.student, step=state.num_updates)
        # Accumulate on device: no host sync inside the step (the stop-mode NaN check below reads one
        # flag every NONFINITE_CHECK_EVERY steps; skip mode reads one per step, as it must decide).
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * len(labels)
        seen += len(labels)
        if not skip_nonfinite:
            nonfinite += bad
            if (step % NONFINITE_CHECK_EVERY == 0 or step == last_step) and _all_reduce_sum(
                nonfinite.clone(), state
            ).item() > 0:
                raise NonFiniteLossError(_nonfinite_message(epoch, step, losses))
    elapsed = time.perf_counter() - start
    names = sorted(sums)
    totals = _all_reduce_sum(
        torch.stack([sums[n] for n in names] + [torch.tensor(float(seen), device=state.device)]), state
    ).tolist()
    count = max(totals[-1], 1.0)
    metrics = {f"train/{n}": v / count for n, v in zip(names, totals)}
    metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]
    metrics["train/img_per_s"] = count / elapsed
    metrics["time/epoch_s"] = elapsed
    if skip_nonfinite:
        metrics["train/skipped_steps"] = float(skipped)
    skipped_images = getattr(state.train_loader.dataset, "skipped_images", None)
    if skipped_images is not None:
        metrics["data/skipped_images"] = float(skipped_images())
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, state: TrainingState, prefix: str = "val") -> dict[str, float]:
    """Top-1 / top-5 and CE loss of ``model`` on the val loader, summed over ranks."""
    model.eval()
    totals = torch.zeros(4, device=state.device)  # loss sum, top1, top5, count
    for images, labels in state.val_loader:
        images = images.to(state.device, non_blocking=True)
        labels = labels.to(state.device, non_blocking=True)
        with _autocast(state):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top.eq(labels[:, None])
        totals += torch.stack(
            [
                nn.functional.cross_entropy(logits, labels, reduction="sum"),
                correct[:, :1].sum().float(),
                correct.any(dim=1).sum().float(),
                torch.tensor(float(len(labels)), device=state.device),
            ]
        )
    loss, top1, top5, count = _all_reduce_sum(totals, state).tolist()
    count = max(count, 1.0)
    return {
        f"{prefix}/loss": loss / count,
        f"{prefix}/acc1": 100.0 * top1 / count,
        f"{prefix}/acc5": 100.0 * top5 / count,
    }


def checkpoint_state(state: TrainingState, epoch: int, metrics: dict) -> dict:
    """Everything needed to resume exactly after ``epoch``; loadable with ``weights_only=True``."""
    return {
        "epoch": epoch,
        "num_updates": state.num_updates,
        "best": dict(state.best),
        "model": state.core.student.state_dict(),
        "projector": state.core.projector.state_dict() if state.core.projector is not None else None,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "spec": state.spec,
        "metrics": dict(metrics),
        "config": state.cfg.model_dump(mode="json"),
    }


def restore_state(state: TrainingState, ckpt: dict) -> int:
    """Load a checkpoint into ``state``; returns the first epoch still to run."""
    state.core.student.load_state_dict(ckpt["model"])
    if state.core.projector is not None and ckpt.get("projector") is not None:
        state.core.projector.load_state_dict(ckpt["projector"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.ema is not None and ckpt.get("ema") is not None:
        state.ema.load_state_dict(ckpt["ema"])
    state.num_updates = ckpt["num_updates"]
    state.scheduler.step_update(num_updates=state.num_updates)
    if state.cfg.schedule.step_on == "epoch":
        state.scheduler.step(ckpt["epoch"])
    state.best = dict(ckpt["best"])
    return ckpt["epoch"] + 1


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


def save_checkpoint(ckpt: dict, path: Location, *, keep_previous: bool = False) -> None:
    """Write atomically: a crash or a full disk mid-write leaves the previous file intact.

    ``keep_previous`` keeps the file being replaced as ``<name>.prev`` (the fallback of
    :func:`load_resume_checkpoint` when the newest one turns out unreadable). ``path`` may be a bucket URI
    (``trainables.storage``): the checkpoint is then one upload, the previous object copied first.
    """
    if storage.is_bucket(path):
        return _upload_checkpoint(ckpt, path, keep_previous=keep_previous)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:  # through a Python file: a full disk raises OSError with its errno
            torch.save(ckpt, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer re-raises a failed write as RuntimeError
        cause = _os_error_in_chain(exc)
        if cause is None:
            raise
        kept = (
            "the previous checkpoint is intact"
            if path.exists() or previous_checkpoint(path).exists()
            else "no earlier checkpoint existed"
        )
        raise CheckpointWriteError(
            cause.errno, f"cannot write checkpoint {path}: {cause.strerror or cause}; {kept}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _os_error_in_chain(exc: BaseException | None) -> OSError | None:
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__context__
    return exc


def _upload_checkpoint(ckpt: dict, uri: str, *, keep_previous: bool) -> None:
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    try:
        if keep_previous and storage.exists(uri):
            storage.copy(uri, previous_checkpoint(uri))
        storage.upload(buffer.getvalue(), uri)
    except OSError as exc:
        kept = "the previous checkpoint is intact" if storage.exists(uri) else "no earlier checkpoint existed"
        reason = storage.error_line(exc)
        raise CheckpointWriteError(exc.errno or 0, f"cannot write checkpoint {uri}: {reason}; {kept}") from None


def previous_checkpoint(path: Location) -> Location:
    return storage.sibling(path, ".prev")


def load_resume_checkpoint(candidates: list[Location]) -> tuple[dict, Location] | None:
    """The first readable checkpoint of ``candidates`` (newest first), each followed by the file it
    replaced (``<name>.prev``, see :func:`save_checkpoint`), or None when none is readable.

    A truncated or corrupt file is reported and skipped, so a run resumes from the previous good
    checkpoint instead of failing (or, with no good one left, starts over).
    """
    for path in (p for candidate in candidates for p in (candidate, previous_checkpoint(candidate))):
        try:
            if not storage.exists(path):
                continue
            source = io.BytesIO(storage.read_bytes(path)) if storage.is_bucket(path) else path
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or not {"epoch", "model", "optimizer"} <= ckpt.keys():
                raise ValueError("not an encmm training checkpoint")
            return ckpt, path
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to the next one
            log.warning(
                f"encmm: warning: checkpoint {path} is unreadable ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); trying an earlier one"
            )
    return None


EpochEnd = Callable[[int, dict, bool, TrainingState], None]


def run_epochs(
    state: TrainingState, start_epoch: int, *, log: LogFn | None = None, on_epoch_end: EpochEnd | None = None
) -> dict:
    """Train from ``start_epoch`` to the configured end; returns the last epoch's metrics + best."""
    metrics: dict = {}
    for epoch in range(start_epoch, state.cfg.schedule.epochs):
        seed_epoch(state.cfg.seed, state.rank, epoch)
        metrics = train_one_epoch(state, epoch)
        if state.cfg.schedule.step_on == "epoch":
            state.scheduler.step(epoch)  # after the epoch, as DeiT's loop does: the next one trains at f(epoch)
        metrics.update(evaluate(state.core.student, state))
        if state.ema is not None:
            metrics.update(evaluate(state.ema.module, state, prefix="val_ema"))
        metrics["epoch"] = epoch
        is_best = metrics["val/acc1"] > state.best["val/acc1"]
        if is_best:
            state.best = {"val/acc1": metrics["val/acc1"], "epoch": epoch}
        metrics["best/val/acc1"] = state.best["val/acc1"]
        if on_epoch_end is not None:  # the checkpoint first: a worker lost before it repeats the epoch,
            on_epoch_end(epoch, metrics, is_best, state)  # and its metrics must not be in the store yet
        if log is not None and state.rank == 0:
            log(metrics, epoch)
    return {**metrics, "best/epoch": state.best["epoch"]}


def fit(
    cfg: TrainConfig,
    *,
    log: LogFn | None = None,
    checkpoint_dir: str | Path | None = None,
    device: torch.device | None = None,
    teacher_checkpoint: str | None = None,
    data: DataBundle | None = None,
) -> dict:
    """Train in this process (no Ray, no MLflow). Resumes from ``checkpoint_dir/last.pt`` if present.

    ``data``: your own :class:`~encmm.trainables.data.DataBundle` instead of the one ``cfg.data`` names
    (see :func:`setup_training`)."""
    from encmm.trainables.preflight import check_in_process

    check_in_process(cfg, "<TrainConfig>")
    state = setup_training(
        cfg,
        device=device or resolve_device(cfg.resources.gpus_per_worker),
        teacher_checkpoint=teacher_checkpoint,
        data=data,
    )
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start = 0
    if folder is not None and (found := load_resume_checkpoint([folder / "last.pt"])):
        start = restore_state(state, found[0])

    def save(epoch: int, metrics: dict, is_best: bool, state: TrainingState) -> None:
        if folder is None:
            return
        ckpt = checkpoint_state(state, epoch, metrics)
        save_checkpoint(ckpt, folder / "last.pt", keep_previous=True)
        if is_best:
            save_checkpoint(ckpt, folder / "best.pt")

    return run_epochs(state, start, log=log, on_epoch_end=save)
