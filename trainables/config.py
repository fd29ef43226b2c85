"""Typed configuration for one encmm training run.

One pydantic model per component, ``extra="forbid"`` everywhere, so a typo is an
error and not a silently ignored key. A run config is YAML -> dict -> dotted
overrides (``--set kd.alpha=0.9``) -> :class:`TrainConfig`. Across process
boundaries (Ray workers) pass ``model_dump(mode="json")`` and validate again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from encmm.trainables.storage import bucket_scheme_error, is_bucket


class ConfigError(ValueError):
    """A bad config: the message is one line naming the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _yaml_switch(value: Any) -> Any:
    """YAML 1.1 reads a bare ``on`` / ``off`` (``--set resources.compile=on``) as a boolean."""
    return {True: "on", False: "off"}[value] if isinstance(value, bool) else value


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]


class DataConfig(_Strict):
    name: Literal["digits", "imagefolder", "timm", "synthetic"] = "digits"
    root: str | None = Field(None, description="imagefolder: folder holding train/ and val/; timm: dataset root")
    dataset: str | None = Field(None, description="timm create_dataset name, e.g. torch/cifar100")
    download: bool = False
    img_size: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0, description="per worker")
    eval_batch_size: int | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="digits/synthetic: held-out fraction")
    split_seed: int = 0
    augment: Literal["none", "shift", "deit"] = "none"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = Field(0.4, ge=0)
    random_erasing: float = Field(0.25, ge=0, le=1)
    crop_pct: float = Field(0.875, gt=0, le=1)
    repeated_aug: bool = False
    loader: Literal["dataloader", "ray_data"] = Field(
        "dataloader",
        description="imagefolder: who reads, decodes and augments; dataloader = num_workers processes beside "
        "each Train worker; ray_data = Ray Data tasks on any node with a free CPU (CPU-only nodes feed GPU "
        "nodes), same samples, order and shards (trainables/ray_data_input.py); needs Ray (encmm train/sweep)",
    )
    synthetic_samples: int = Field(256, gt=0)
    synthetic_classes: int = Field(4, gt=1)
    on_bad_image: Literal["error", "skip"] = Field(
        "error",
        description="imagefolder: an image file that cannot be decoded stops the run with an error "
        "naming it, or is skipped (replaced by the next image) and counted in data/skipped_images",
    )
    pipeline: Literal["standard", "fast"] = Field(
        "standard",
        description="imagefolder input path, same recipe either way: standard = timm's create_transform in "
        "the loader workers (float32 out, normalised and randomly erased there); fast = JPEGs decoded at a "
        "reduced DCT scale where the random crop allows (PIL draft), other crops resized by torch's uint8 "
        "kernels, uint8 images out of the workers, "
        "normalisation and random erasing on the training device (timm PrefetchLoader); "
        "imagefolder only",
    )

    @model_validator(mode="after")
    def _needs_root(self) -> DataConfig:
        if self.name == "imagefolder" and not self.root:
            raise ValueError("data.root is required for data.name=imagefolder")
        if self.name == "timm" and not self.dataset:
            raise ValueError("data.dataset is required for data.name=timm")
        if self.pipeline == "fast" and self.name != "imagefolder":
            raise ValueError(
                f"data.pipeline=fast reads an ImageFolder (data.name=imagefolder); data.name is {self.name}"
            )
        if self.loader == "ray_data" and self.name != "imagefolder":
            raise ValueError(
                f"data.loader=ray_data reads an ImageFolder (data.name=imagefolder); data.name is {self.name}"
            )
        return self


Remedy = Literal["none", "lift", "widelast", "uniformwide"]


class StudentConfig(_Strict):
    model: str = Field("deit_tiny_patch16_224", description="timm ViT architecture the student is built from")
    width: int = Field(192, gt=0, description="embed dim of the narrow blocks")
    depth: int = Field(12, gt=0)
    num_heads: int | None = Field(None, gt=0, description="default: width // head_dim")
    head_dim: int = Field(64, gt=0)
    patch_size: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    drop_path: float = Field(0.0, ge=0, lt=1)
    remedy: Remedy = "none"
    target_width: int | None = Field(
        None, gt=0, description="width Lift/WideLast expand to; default: the teacher's feature width"
    )
    wide_blocks: int = Field(1, gt=0, description="widelast: how many last blocks are wide")
    projector: Literal["linear", "avgpool"] = Field(
        "linear", description="remedy none, widths differ: student-side Linear or teacher-channel average pooling"
    )

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.width // self.head_dim

    @model_validator(mode="after")
    def _check_geometry(self) -> StudentConfig:
        if self.num_heads is None and self.width % self.head_dim:
            raise ValueError(f"student.width {self.width} is not divisible by student.head_dim {self.head_dim}")
        if self.width % self.heads:
            raise ValueError(f"student.width {self.width} is not divisible by student.num_heads {self.heads}")
        if self.remedy == "widelast" and self.wide_blocks >= self.depth:
            raise ValueError(f"student.wide_blocks {self.wide_blocks} must be < student.depth {self.depth}")
        return self


class TeacherConfig(_Strict):
    source: Literal["none", "timm", "checkpoint", "run"] = "none"
    model: str | None = Field(None, description="timm name (source=timm)")
    pretrained: bool = True
    pretrained_file: str | None = Field(None, description="local weights for a timm teacher (offline)")
    checkpoint: str | None = Field(None, description="encmm checkpoint file (source=checkpoint)")
    run_id: str | None = Field(None, description="MLflow run of an encmm training run (source=run)")
    img_size: int | None = Field(None, gt=0, description="override the timm teacher's input size")
    block: int = Field(-1, description="teacher block whose patch tokens are distilled (-1 = last)")
    fused_attention: Switch = Field(
        "auto",
        description="CaiT teachers: run talking-heads attention as one fused scaled-dot-product attention "
        "(same weights, same function; BENCHMARKS.md section 5); auto = on CUDA",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="the frozen teacher's weights while training: bfloat16 halves their memory and reads and "
        "spares bf16 autocast a cast of every weight each step (it computes in bf16 there anyway); its "
        "LayerNorm gains and biases are then bf16-rounded too",
    )

    @model_validator(mode="after")
    def _check_source(self) -> TeacherConfig:
        needed = {"timm": "model", "checkpoint": "checkpoint", "run": "run_id"}.get(self.source)
        if needed and not getattr(self, needed):
            raise ValueError(f"teacher.{needed} is required for teacher.source={self.source}")
        return self


class KDConfig(_Strict):
    """L = (1 - alpha) CE_ls + beta L_feat + alpha T^2 KL(p_t || p_s)  (paper.md)."""

    alpha: float = Field(0.0, ge=0, le=1, description="weight of the soft-logit KL term")
    beta: float = Field(0.0, ge=0, description="weight of the feature loss")
    temperature: float = Field(1.0, gt=0)
    feature_loss: Literal["mse", "fft"] = "mse"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    student_block: int = Field(-1, description="student block whose patch tokens are distilled (-1 = last)")

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0 or self.beta > 0


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0, description="base lr for a global batch of lr_base_batch")
    lr_base_batch: int = Field(512, gt=0, description="lr is scaled by global_batch / lr_base_batch")
    weight_decay: float = Field(0.05, ge=0)
    clip_grad: float | None = Field(None, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1, description="timm ModelEmaV3 (None = off)")
    no_weight_decay: Literal["auto", "timm", "none"] = Field(
        "auto",
        description="which tensors of >= 2 dims skip weight decay (1-D ones, biases and norms, always do): "
        "timm = the backbone's own no_weight_decay() set (pos_embed, cls_token), none = every "
        "one decays; auto = what the authors' released code ran: timm for remedy none (a bare "
        "timm model), none for lift / widelast / uniformwide (their wrapper modules hide the set)",
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN/inf loss: stop the run (it ends FAILED with the reason), or skip that step's "
        "update and count it in train/skipped_steps (one host sync per step)",
    )


class ScheduleConfig(_Strict):
    epochs: int = Field(300, gt=0)
    warmup_epochs: int = Field(5, ge=0)
    warmup_lr: float = Field(1e-6, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    step_on: Literal["update", "epoch"] = Field(
        "update",
        description="update: warm-up and cosine advance every optimizer step (timm step_update); "
        "epoch: the authors' DeiT loop, timm's scheduler stepped once after each epoch, so "
        "epoch e trains at the formula's value for e - 1 (epochs 0 and 1 at warmup_lr)",
    )


class ResourcesConfig(_Strict):
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: int = Field(0, ge=0, description="whole GPUs only")
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: Switch = "auto"
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode of the student step and the teacher when compile is on: reduce-overhead "
        "replays CUDA graphs, max-autotune also autotunes Triton matmuls (minutes of compilation)",
    )
    max_failures: int = Field(3, ge=0, description="worker failures tolerated (resume from last checkpoint)")
    local_mode: Switch = Field(
        "auto",
        description="Ray Train local mode: the single worker runs inside the calling process (the Tune "
        "trial driver, or `encmm train` itself) instead of a worker actor, with no Train "
        "controller start-up; auto = on for 1 worker without GPUs in a sweep (Tune retries a "
        "failed trial from its last checkpoint); `encmm train` keeps a worker actor on auto, "
        "so a killed worker is restarted by Ray Train",
    )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @model_validator(mode="after")
    def _check_local_mode(self) -> ResourcesConfig:
        if self.local_mode == "on" and self.workers != 1:
            raise ValueError(f"resources.local_mode=on runs one worker in-process; resources.workers is {self.workers}")
        return self


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<cwd>/mlflow.db")
    experiment: str = "encmm"
    output_dir: str = Field(
        "encmm-runs", description="resolved configs, sweep plans and summaries; checkpoints too unless `storage`"
    )
    storage: str | None = Field(
        None,
        description="where checkpoints live (Ray's storage_path): a folder every node sees, or a bucket "
        "(s3://BUCKET/PREFIX, gs://...); default: output_dir",
    )

    @field_validator("output_dir")
    @classmethod
    def _filesystem_folder(cls, value: str) -> str:
        # Sweep plans, summaries and the metric spool are plain files: a bucket URI would be taken for a
        # relative folder named "s3:". Checkpoints can go to a bucket: that is `storage`.
        if is_bucket(value):
            raise ValueError(
                f"{value}: output_dir must be a folder (plans and summaries are files); "
                f"to keep checkpoints in a bucket set tracking.storage: {value}"
            )
        return value

    @field_validator("storage")
    @classmethod
    def _storage_location(cls, value: str | None) -> str | None:
        if value is not None and is_bucket(value) and (reason := bucket_scheme_error(value)):
            raise ValueError(reason)
        return value

    def checkpoint_root(self) -> str:
        """Where runs' checkpoints go: ``storage``, else ``output_dir``."""
        return self.storage or self.output_dir


class TrainConfig(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    seed: int = 0
    data: DataConfig = DataConfig()
    student: StudentConfig = StudentConfig()
    teacher: TeacherConfig = TeacherConfig()
    kd: KDConfig = KDConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TrainConfig:
        if self.kd.uses_teacher and self.teacher.source == "none":
            raise ValueError("kd.alpha/kd.beta > 0 need a teacher (teacher.source is none)")
        if (
            self.student.remedy in ("lift", "widelast", "uniformwide")
            and self.teacher.source == "none"
            and self.student.target_width is None
        ):
            raise ValueError(f"student.target_width is required for remedy {self.student.remedy} without a teacher")
        if self.student.remedy in ("lift", "widelast") and self.kd.student_block not in (-1, self.student.depth - 1):
            raise ValueError(f"kd.student_block must be the last block for remedy {self.student.remedy}")
        if self.schedule.warmup_epochs >= self.schedule.epochs and self.schedule.warmup_epochs > 0:
            raise ValueError("schedule.warmup_epochs must be < schedule.epochs")
        return self


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"kd.alpha=0.9"`` -> (["kd", "alpha"], 0.9); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict in place and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def _known_fields(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model that holds ``loc``'s last part, or [] where it is no model."""
    node: Any = model_cls
    for part in loc[:-1]:
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return []
        node = field.annotation
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def format_validation_error(source: str, exc: ValidationError, model_cls: type[BaseModel] | None = None) -> str:
    """First pydantic error as ``source: field.path: message`` on one line; an unknown key gets the
    closest known one (``did you mean max_concurrent_trials?``)."""
    import difflib

    err = exc.errors()[0]
    loc = ".".join(str(part) for part in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden" and model_cls is not None and err["loc"]:
        close = difflib.get_close_matches(str(err["loc"][-1]), _known_fields(model_cls, err["loc"]), n=1)
        if close:
            msg = f"{msg} (did you mean {close[0]}?)"
    extra = (
        f" (got {err['input']!r})"
        if err["type"] not in ("extra_forbidden", "value_error", "missing") and not isinstance(err.get("input"), dict)
        else ""
    )
    field = f"{loc}: " if loc else ""
    count = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"{source}: {field}{msg}{extra}{count}".replace("\n", " ")


def validate_model(model_cls: type[BaseModel], raw: dict, source: str):
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model_cls)) from None


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    raw = read_yaml(path) if path is not None else {}
    apply_overrides(raw, overrides or [])
    return validate_model(TrainConfig, raw, str(path) if path is not None else "<defaults>")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"kd": {"alpha": 0.9}} -> {"kd.alpha": 0.9} (MLflow params must be flat)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


PATH_FIELDS = (
    "data.root",
    "teacher.checkpoint",
    "teacher.pretrained_file",
    "tracking.output_dir",
    "tracking.storage",
)


def absolutize_paths(tree: dict, base: Path | None = None) -> dict:
    """Copy of a config dict with every path field made absolute (Ray workers chdir elsewhere)."""
    import copy

    base = (base or Path.cwd()).resolve()
    out = copy.deepcopy(tree)
    for dotted in PATH_FIELDS:
        section, key = dotted.split(".")
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not is_bucket(value):  # a URI is no path: its field checks it
            node[key] = str((base / Path(value).expanduser()).resolve())
    if not (out.get("tracking") or {}).get("output_dir"):
        out.setdefault("tracking", {})["output_dir"] = str(base / TrackingConfig().output_dir)
    return out


def with_absolute_paths(cfg: TrainConfig, base: Path | None = None) -> TrainConfig:
    return TrainConfig.model_validate(absolutize_paths(cfg.model_dump(mode="json"), base))
