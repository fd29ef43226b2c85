"""Checks that need more than the schema: run before any work starts (no run, no folder yet).

Models are built on the ``meta`` device, so checking an ImageNet-sized geometry allocates nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import timm
import torch

from encmm.trainables import storage
from encmm.trainables.config import ConfigError, StudentConfig, TeacherConfig, TrainConfig
from encmm.trainables.models import build_student
from encmm.trainables.teacher import (
    create_timm_teacher,
    load_checkpoint_file,
    model_from_checkpoint,
    patch_grid,
    teacher_feature_width,
    token_grid_mismatch,
)


def _fail(source: str, field: str, message: str) -> None:
    raise ConfigError(f"{source}: {field}: {message}")


def check_data(cfg: TrainConfig, source: str) -> None:
    data = cfg.data
    if data.name == "imagefolder":
        root = Path(data.root)
        if not root.is_dir():
            _fail(source, "data.root", f"folder {root} does not exist")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                _fail(source, "data.root", f"{root} has no {split}/ folder (ImageFolder layout: train/, val/)")
            classes = [p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith(".")]
            if not classes:
                _fail(source, "data.root", f"{root / split} holds no class folders")
            if not any(_holds_an_image(folder) for folder in classes):
                _fail(
                    source,
                    "data.root",
                    f"{root / split}: no image files in its {len(classes)} class folders (empty dataset)",
                )
    if data.img_size % cfg.student.patch_size:
        _fail(
            source, "data.img_size", f"{data.img_size} is not divisible by student.patch_size {cfg.student.patch_size}"
        )


def _holds_an_image(folder: Path) -> bool:
    """Stops at the first image file: cheap on ImageNet's 1,300-image class folders."""
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = get_img_extensions(as_set=True)
    return any(p.suffix.lower() in extensions and p.is_file() for p in folder.rglob("*"))


def check_in_process(cfg: TrainConfig, source: str) -> None:
    """What an in-process run (``engine.fit``: no Ray, no MLflow) cannot do, refused before it builds anything."""
    if cfg.data.loader == "ray_data":
        _fail(
            source,
            "data.loader",
            "ray_data runs its input tasks on a Ray cluster, and engine.fit trains in this process without Ray: "
            "use data.loader=dataloader here, or encmm train / encmm sweep",
        )


def check_storage(cfg: TrainConfig, source: str) -> None:
    """A bucket for checkpoints must exist and be listable from here (credentials, endpoint) before a run."""
    uri = cfg.tracking.storage
    if uri is not None and storage.is_bucket(uri) and (reason := _bucket_problem(uri)):
        _fail(source, "tracking.storage", reason)


@functools.lru_cache(maxsize=8)  # a sweep checks every trial's config: one round trip per bucket
def _bucket_problem(uri: str) -> str | None:
    return storage.check_reachable(uri)


def check_timm_name(name: str, source: str, field: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        _fail(source, field, f"unknown timm model {name!r}{hint}")


def describe_teacher(cfg: TrainConfig, source: str, checkpoint_path: str | None) -> tuple[tuple | None, int]:
    """(token grid, feature width) of the configured teacher, without loading weights."""
    teacher = cfg.teacher
    if teacher.img_size and teacher.img_size != cfg.data.img_size:
        _fail(
            source,
            "teacher.img_size",
            f"{teacher.img_size} != data.img_size {cfg.data.img_size} (the teacher sees the student's batch)",
        )
    if teacher.source == "timm":
        check_timm_name(teacher.model, source, "teacher.model")
        if teacher.pretrained_file and not Path(teacher.pretrained_file).is_file():
            _fail(source, "teacher.pretrained_file", f"file {teacher.pretrained_file} does not exist")
        model = _meta_timm_teacher(teacher.model_dump_json(), cfg.data.img_size)
        if not hasattr(model, "forward_intermediates"):
            _fail(source, "teacher.model", f"{teacher.model} has no forward_intermediates (not a ViT family timm taps)")
        blocks = len(getattr(model, "blocks", []))
        if blocks and not -blocks <= teacher.block < blocks:
            _fail(source, "teacher.block", f"{teacher.block} is outside the teacher's {blocks} blocks")
        return patch_grid(model), teacher_feature_width(model)
    path = checkpoint_path or teacher.checkpoint
    if not path or not Path(path).is_file():
        _fail(source, "teacher.checkpoint", f"file {path} does not exist")
    try:
        ckpt = load_checkpoint_file(path)
        with torch.device("meta"):
            model, _ = model_from_checkpoint(ckpt, load_weights=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        _fail(source, "teacher.checkpoint", f"{path} is not an encmm checkpoint ({exc.__class__.__name__})")
    return patch_grid(model), teacher_feature_width(model)


def describe_model(cfg: TrainConfig, num_classes: int = 10, target_width: int | None = None):
    """The student ``cfg`` builds, on the meta device (no memory, no weights)."""
    target = cfg.student.target_width or target_width
    return _meta_student(cfg.student.model_dump_json(), num_classes, cfg.data.img_size, target, cfg.kd.student_block)


# A sweep checks every trial's config, and most trials share their teacher and student geometry: each
# distinct model is built once per process (building a timm model, even on meta, takes up to a second).
@functools.lru_cache(maxsize=64)
def _meta_student(student_json: str, num_classes: int, img_size: int, target_width, tap_block: int):
    with torch.device("meta"):
        return build_student(
            StudentConfig.model_validate_json(student_json),
            num_classes=num_classes,
            img_size=img_size,
            target_width=target_width,
            tap_block=tap_block,
        )


@functools.lru_cache(maxsize=16)
def _meta_timm_teacher(teacher_json: str, img_size: int):
    with torch.device("meta"):
        teacher = TeacherConfig.model_validate_json(teacher_json)
        return create_timm_teacher(teacher, load_weights=False, img_size=img_size)


def check_train_config(
    cfg: TrainConfig, source: str, *, teacher_checkpoint: str | None = None, teacher_config: TrainConfig | None = None
) -> dict:
    """Raise :class:`ConfigError` (one line) for anything that would fail later; returns a small plan.

    ``teacher_config`` stands in for a teacher that is not trained yet (a sweep trains it first).
    """
    check_data(cfg, source)
    check_storage(cfg, source)
    check_timm_name(cfg.student.model, source, "student.model")
    depth = cfg.student.depth
    if not -depth <= cfg.kd.student_block < depth:
        _fail(source, "kd.student_block", f"{cfg.kd.student_block} is outside the student's {depth} blocks")
    grid_t, width_t = None, None
    if cfg.kd.uses_teacher and teacher_config is not None:
        teacher = describe_model(teacher_config)
        grid_t, width_t = patch_grid(teacher), teacher.feature_width
    elif cfg.kd.uses_teacher:
        grid_t, width_t = describe_teacher(cfg, source, teacher_checkpoint)
    target = width_t
    try:
        student = describe_model(cfg, target_width=target)
    except (ValueError, AssertionError, RuntimeError) as exc:
        _fail(source, "student", str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
    grid_s = patch_grid(student)
    if cfg.kd.beta > 0:
        if why := token_grid_mismatch(grid_t, grid_s):
            _fail(source, "teacher", why)
        if student.feature_width > width_t and cfg.student.projector == "avgpool":
            _fail(
                source,
                "student.projector",
                f"avgpool pools the teacher's {width_t} channels down; the "
                f"student's are wider ({student.feature_width}): use linear",
            )
    return {"teacher_width": width_t, "student_grid": grid_s, "teacher_grid": grid_t}
