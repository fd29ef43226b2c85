"""Feature collection for the diagnostics (paper.md, "Diagnostics", common protocol).

Features are block outputs, patch tokens only (prefix tokens such as CLS removed), no final norm, one
`[B, N, C]` float32 tensor per layer and batch. They come from timm's `forward_intermediates(x, indices,
norm=False, output_fmt="NLC", intermediates_only=True)`, so every timm family that has it works:

- ViT / DeiT: one layer per block of `model.blocks`.
- CaiT: its self-attention blocks (`model.blocks`); the class-attention blocks are not intermediates.
- Swin and convolutional families: one layer per stage; their `NCHW` maps become `[B, H*W, C]`.
  Stages differ in width and token count, hence a list of per-layer tensors, not one array.

encmm-trained students (trainables/models.py), recognised by their parts so that this module does
not import the training package:

- PlainStudent (`.backbone`): every backbone block.
- LiftStudent (`.backbone` + `.lift`): blocks 0..L-2 as they are; layer L-1 is the lifted map
  lift(patch tokens of block L-1) `[B, N, target]`, the tensor that is distilled and classified
  (the raw output of block L-1 only feeds it).
- WideLastStudent (`.trunk` + `.entry` + `.wide_blocks`): every trunk block, then every widened
  block (patch tokens of its output, after the entry Linear + LayerNorm fed it); the last layer is
  the last widened block, as distilled.

Images come from picklable sources (`ResizedImages`, `ImageFiles`, `DatasetImages`) that return any batch
of the selected images by position; `ModelFeatures` pairs a model with a source and reads the features of
one batch at a time, so a worker holds one batch's features, never a whole layer's `[I, N, C]`.

Ray- and MLflow-free: the orchestrator drives it (analysis/ray_tasks.py runs it in Ray workers), the
spectra run elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ------------------------------------------------------------------------------- model inputs
@dataclass(frozen=True)
class InputSpec:
    """What a model expects: input size (H, W) and the normalisation its eval transform applies."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875


def timm_input_spec(model: nn.Module) -> InputSpec:
    """The eval-transform settings of a timm model (`timm.data.resolve_data_config`).

    The size follows the patch embedding when the model was built with an `img_size` override
    (timm keeps the pretrained config's size in that case).
    """
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    size = tuple(config["input_size"][1:])
    embed_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(embed_size, (tuple, list)) and len(embed_size) == 2:
        size = tuple(int(s) for s in embed_size)
    return InputSpec(
        size=size,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        interpolation=config.get("interpolation", "bicubic"),
        crop_pct=float(config.get("crop_pct", 0.875)),
    )


def eval_transform(spec: InputSpec):
    """The model's own timm eval transform (resize, centre crop, to tensor, normalise) for image files."""
    from timm.data import create_transform

    return create_transform(
        input_size=(3, *spec.size),
        is_training=False,
        interpolation=spec.interpolation,
        crop_pct=spec.crop_pct,
        mean=spec.mean,
        std=spec.std,
    )


def renormalise(images: Tensor, source_mean, source_std, target_mean, target_std) -> Tensor:
    """Map images normalised with (source_mean, source_std) to (target_mean, target_std), `[B, 3, H, W]`.

    x_t = (x_s * s_std + s_mean - t_mean) / t_std, as trainables/teacher.py's FrozenTeacher does.
    """
    view = (1, -1, 1, 1)
    s_mean, s_std = torch.tensor(source_mean).view(view), torch.tensor(source_std).view(view)
    t_mean, t_std = torch.tensor(target_mean).view(view), torch.tensor(target_std).view(view)
    if torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std):
        return images
    return (images * s_std + s_mean - t_mean) / t_std


def resize_images(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize `[B, 3, h, w]` -> `[B, 3, *size]` (align_corners=False, as trainables/data.py)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- image selection
def first_per_class(labels: Sequence[int], k: int) -> list[int]:
    """Indices of the first `k` items of each class in dataset order, grouped by ascending class."""
    if k < 1:
        raise ValueError(f"images per class must be >= 1, got {k}")
    chosen: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        bucket = chosen.setdefault(int(label), [])
        if len(bucket) < k:
            bucket.append(index)
    return [index for label in sorted(chosen) for index in chosen[label]]


def image_folder_files(root: str | Path, k: int) -> list[Path]:
    """The first `k` image files (sorted by path) of every class folder of an ImageFolder `root`.

    Classes are the sub-folders of `root` in sorted order; files are searched recursively with
    timm's image extensions. Raises ValueError (one line) when no image is found.
    """
    from timm.data.readers.img_extensions import get_img_extensions

    if k < 1:
        raise ValueError(f"images per class must be >= 1, got {k}")
    root = Path(root)
    extensions = get_img_extensions(as_set=True)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (ImageFolder layout: {root}/<class>/<image>)")
    files = []
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
        files.extend(images[:k])
    if not files:
        raise ValueError(f"{root}: no image files in its {len(classes)} class folders")
    return files


# ------------------------------------------------------------------------------ image sources
# Each source is a small picklable object that a Ray worker receives: `images(positions)` returns the
# normalised `[B, 3, H, W]` float32 batch of the images at those positions (global image indices 0..I-1,
# in selection order), whatever subset or order is asked for. File handles, transforms and datasets are
# built lazily in the process that reads, never pickled.
class ImageSource(Protocol):
    def __len__(self) -> int: ...

    def images(self, positions: Sequence[int]) -> Tensor: ...


class ResizedImages:
    """Images held at their native size `[I, 3, h, w]` (normalised with `source_mean`/`source_std`), resized
    (`resize_images`) and re-normalised (`renormalise`) to `spec` one batch at a time: each image gets the
    numbers it gets when all are resized at once, without holding them all at the model's size."""

    def __init__(self, images: Tensor, spec: InputSpec, source_mean, source_std):
        self.native, self.spec = images.contiguous(), spec
        self.source_mean, self.source_std = tuple(source_mean), tuple(source_std)

    def __len__(self) -> int:
        return int(self.native.shape[0])

    def images(self, positions: Sequence[int]) -> Tensor:
        batch = resize_images(self.native[list(positions)], self.spec.size)
        return renormalise(batch, self.source_mean, self.source_std, self.spec.mean, self.spec.std)


class _LazyState:
    """Pickles without the attributes named in `_lazy` (rebuilt on first use where the object is read)."""

    _lazy: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._lazy}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class ImageFiles(_LazyState):
    """Image files (absolute paths, in selection order) through the model's eval transform (`eval_transform`)."""

    _lazy = ("_transform",)

    def __init__(self, files: Sequence[str | Path], spec: InputSpec):
        self.files, self.spec = [str(Path(f).resolve()) for f in files], spec

    def __len__(self) -> int:
        return len(self.files)

    def images(self, positions: Sequence[int]) -> Tensor:
        from PIL import Image

        if getattr(self, "_transform", None) is None:
            self._transform = eval_transform(self.spec)
        batch = []
        for position in positions:
            with Image.open(self.files[position]) as image:
                batch.append(self._transform(image.convert("RGB")))
        return torch.stack(batch)


class DatasetImages(_LazyState):
    """Items `indices` (in selection order) of a timm dataset `timm.data.create_dataset(name, root=root,
    split=split, download=False)` with the model's eval transform; each reading process opens it once."""

    _lazy = ("_dataset",)

    def __init__(self, name: str, root: str | Path, indices: Sequence[int], spec: InputSpec, split: str = "validation"):
        self.name, self.root, self.split = name, str(Path(root).resolve()), split
        self.indices, self.spec = [int(i) for i in indices], spec

    def __len__(self) -> int:
        return len(self.indices)

    def open(self):
        """The dataset (created on first use in this process)."""
        if getattr(self, "_dataset", None) is None:
            from timm.data import create_dataset

            self._dataset = create_dataset(
                self.name, root=self.root, split=self.split, download=False, transform=eval_transform(self.spec)
            )
        return self._dataset

    def images(self, positions: Sequence[int]) -> Tensor:
        dataset = self.open()
        return torch.stack([dataset[self.indices[p]][0] for p in positions])


# --------------------------------------------------------------------------------- extraction
def _as_tokens(x: Tensor) -> Tensor:
    """`[B, N, C]` stays; a `[B, C, H, W]` map becomes `[B, H*W, C]`."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"unexpected intermediate shape {tuple(x.shape)}")


def _timm_intermediates(model: nn.Module, x: Tensor, indices: list[int] | None) -> list[Tensor]:
    """Block outputs of a timm model via `forward_intermediates`, prefix tokens stripped by timm.

    Families that only emit maps (Swin, CNNs) assert on "NLC"; they are asked for "NCHW".
    """
    kwargs = dict(indices=indices, norm=False, intermediates_only=True)
    try:
        outputs = model.forward_intermediates(x, output_fmt="NLC", **kwargs)
    except (AssertionError, ValueError):
        outputs = model.forward_intermediates(x, output_fmt="NCHW", **kwargs)
    return [_as_tokens(o) for o in outputs]


def _vit_with_final(vit: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(all tokens after the last block and the model's final norm, patch tokens of every block)."""
    return vit.forward_intermediates(x, indices=None, norm=False, output_fmt="NLC", intermediates_only=False)


def _encmm_kind(model: nn.Module) -> str | None:
    if hasattr(model, "forward_distill"):
        if hasattr(model, "trunk") and hasattr(model, "wide_blocks"):
            return "widelast"
        if hasattr(model, "backbone") and hasattr(model, "lift"):
            return "lift"
        if hasattr(model, "backbone"):
            return "plain"
    return None


def _all_layers(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Every layer's patch tokens of one batch, `[B, N_l, C_l]` each (see the module docstring)."""
    kind = _encmm_kind(model)
    if kind == "plain":
        return _timm_intermediates(model.backbone, x, None)
    if kind == "lift":
        final, taps = _vit_with_final(model.backbone, x)  # backbone.norm is Identity: final = raw tokens
        return taps[:-1] + [model.lift(final[:, model.backbone.num_prefix_tokens :])]
    if kind == "widelast":
        final, taps = _vit_with_final(model.trunk, x)
        tokens, wide = model.entry(final), []
        for block in model.wide_blocks:
            tokens = block(tokens)
            wide.append(tokens[:, model.trunk.num_prefix_tokens :])
        return taps + wide
    return _timm_intermediates(model, x, None)


def layers_of(model: nn.Module, x: Tensor, layers: Sequence[int] | None) -> list[Tensor]:
    """The features of one batch `x` `[B, 3, H, W]`: `[B, N_l, C_l]` for each of `layers` (ascending
    non-negative indices; None: every layer), as the module docstring defines them. The caller sets eval
    mode and `torch.no_grad`."""
    if _encmm_kind(model) is None and layers is not None:
        return _timm_intermediates(model, x, list(layers))  # timm runs only what the indices need
    outputs = _all_layers(model, x)
    return outputs if layers is None else [outputs[i] for i in layers]


def check_extractable(model: nn.Module) -> None:
    """Raise ValueError (one line) if features cannot be read from `model`."""
    if _encmm_kind(model) is None and not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{type(model).__name__} has no forward_intermediates: cannot read its blocks")


def _has_no_blocks(model: nn.Module) -> bool:
    """True when the module list that forward_intermediates walks (blocks / layers / stages) is empty."""
    inner = getattr(model, "backbone", None) or getattr(model, "trunk", None) or model
    for name in ("blocks", "layers", "stages"):
        container = getattr(inner, name, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)):
            return len(container) == 0 and len(getattr(model, "wide_blocks", ())) == 0
    return False


def probe_layers(model: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """(tokens, channels) of every layer, from one blank image of `size`; ValueError if there are none."""
    check_extractable(model)
    if _has_no_blocks(model):
        raise ValueError(f"{type(model).__name__} has no blocks")
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        outputs = _all_layers(model, torch.zeros(1, 3, *size, device=device))
    if not outputs:
        raise ValueError(f"{type(model).__name__} has no blocks: forward_intermediates returned no layer")
    return [(int(o.shape[1]), int(o.shape[2])) for o in outputs]


class ModelFeatures:
    """A model and its image source, read one batch at a time: `read(positions)` runs the images at those
    positions through the model (eval mode, `torch.no_grad`, float32: the spectra are sensitive to
    precision) and returns one `[b, N_l, C_l]` float32 tensor per selected layer, on the model's device.

    Picklable (the model's weights travel with it), so that a Ray worker can hold a replica; `to(device)`
    moves it where the worker reads.
    """

    def __init__(self, model: nn.Module, source: ImageSource, layers: Sequence[int] | None = None):
        check_extractable(model)
        self.model, self.source = model.eval(), source
        self.layers = None if layers is None else sorted(set(int(i) for i in layers))
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.source)

    def to(self, device: torch.device | str) -> ModelFeatures:
        self.device = torch.device(device)
        self.model = self.model.eval().to(self.device)
        return self

    def read(self, positions: Sequence[int]) -> list[Tensor]:
        x = self.source.images(positions).to(self.device, torch.float32)
        with torch.no_grad():
            return [output.float() for output in layers_of(self.model, x, self.layers)]
