"""Features saved by any tool: `encmm diagnose --features <file or folder>`.

Two layouts (paper.md, "Diagnostics": block outputs, patch tokens only, no final norm):
- one array `[L, I, N, C]` (layers, images, tokens, channels) in a .npy, .npz or .pt file;
- a folder of per-image arrays `[L, N, C]`, one file per image (.npy/.npz/.pt), taken in sorted
  file-name order (the layout the paper's code saves).

A .npz holds one array (or several, one of them named "features"); a .pt holds a tensor/array (or a
dict with "features"), loaded with `weights_only=True`. Errors are ValueError with a one-line message.

`open_saved_features` checks a path without holding its features (a folder file by file, a .npy in
chunks; a .npz/.pt is read whole, then dropped) and returns a picklable reader whose `read(positions)`
gives one `[b, N, C]` tensor per selected layer: per-image files are read one by one, a .npy is
memory-mapped for each read, a .npz/.pt is loaded whole once per reading process. No Ray, no MLflow.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SUFFIXES = (".npy", ".npz", ".pt", ".pth")


def _from_npz(path: Path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if "features" in names:
            return archive["features"]
        if len(names) != 1:
            raise ValueError(f"{path}: holds {len(names)} arrays {names}; expected one, or one named 'features'")
        return archive[names[0]]


def _from_pt(path: Path) -> Tensor | np.ndarray:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a one-line user error
        raise ValueError(f"{path}: not a readable torch file ({exc.__class__.__name__})") from None
    if isinstance(value, dict):
        if "features" not in value:
            raise ValueError(f"{path}: a dict without a 'features' entry (keys {sorted(map(str, value))[:5]})")
        value = value["features"]
    if not isinstance(value, (Tensor, np.ndarray)):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not an array")
    return value


def _real_tensor(value: Tensor | np.ndarray, path: Path) -> Tensor:
    """A real floating tensor (float16/bfloat16/integers -> float32; float64 kept); ValueError otherwise."""
    if isinstance(value, np.ndarray) and value.dtype.kind not in "iuf":  # strings, objects, bools, complex, ...
        raise ValueError(f"{path}: dtype {value.dtype} is not a real number type")
    tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    if tensor.is_complex() or tensor.dtype == torch.bool or not (tensor.is_floating_point() or _is_integer(tensor)):
        raise ValueError(f"{path}: dtype {tensor.dtype} is not a real number type")
    if tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)
    return tensor


def _one_line(path: Path, exc: ValueError) -> ValueError:
    message = str(exc).splitlines()[0] if str(exc) else "unreadable"
    return ValueError(message if message.startswith(str(path)) else f"{path}: {message}")


def load_array(path: str | Path) -> Tensor:
    """One saved array as a real floating tensor (float16/bfloat16/integers -> float32; float64 kept)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            value = _from_npz(path)
        else:
            value = _from_pt(path)
    except ValueError as exc:
        raise _one_line(path, exc) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    return _real_tensor(value, path)


def _map_npy(path: Path) -> np.memmap:
    """A .npy memory-mapped read-only (nothing read yet); ValueError (one line) if it cannot be."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays cannot be mapped: refused without unpickling anything
        raise _one_line(path, exc) from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.__class__.__name__})") from None


def _is_integer(tensor: Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _check(features: Tensor, where: str, rank: int, layout: str) -> None:
    if features.ndim != rank:
        raise ValueError(f"{where}: expected a {rank}-D array {layout}, got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"{where}: empty array of shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{where}: contains NaN or inf")


_CHECK_ELEMENTS = 1 << 22  # elements per chunk while a .npy is checked for NaN/inf


def _check_npy(path: Path) -> tuple[tuple[int, ...], torch.dtype]:
    """`_check` of a `[L, I, N, C]` .npy read in chunks of its raw data (any element order will do for the
    NaN/inf check), so that the check holds no more than one chunk. Returns (shape, tensor dtype)."""
    mapped = _map_npy(path)
    shape, dtype = tuple(mapped.shape), mapped.dtype
    offset = getattr(mapped, "offset", 0)
    del mapped
    tensor_dtype = _real_tensor(np.zeros(0, dtype=dtype), path).dtype  # refuses what is not a real number
    if len(shape) != 4:
        raise ValueError(f"{path}: expected a 4-D array {_ARRAY}, got shape {shape}")
    if min(shape) == 0:
        raise ValueError(f"{path}: empty array of shape {shape}")
    if dtype.kind == "f":
        total = int(np.prod(shape))
        with path.open("rb") as handle:
            handle.seek(offset)
            for start in range(0, total, _CHECK_ELEMENTS):
                chunk = np.fromfile(handle, dtype=dtype, count=min(_CHECK_ELEMENTS, total - start))
                if not np.isfinite(chunk).all():
                    raise ValueError(f"{path}: contains NaN or inf")
    return shape, tensor_dtype


_IMAGE = "[layers, tokens, channels]"
_ARRAY = "[layers, images, tokens, channels]"


class SavedFeatures:
    """Checked `--features`: `num_layers` layers of `num_images` images `[tokens, channels]` each.

    `select(layers)` picks the layers that `read(positions)` returns, one `[b, N, C]` tensor each (float32,
    or float64 where the files hold float64), on the device of `to(device)`. Picklable: a Ray worker
    receives the reader, not the features; only the path must exist where it reads.
    """

    _lazy: tuple[str, ...] = ()

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype):
        self.num_layers, self.num_images, self.tokens, self.channels = shape
        self.dtype, self.layers, self.device = dtype, list(range(self.num_layers)), torch.device("cpu")

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._lazy}

    def select(self, layers: Sequence[int]) -> SavedFeatures:
        """A copy that reads `layers` (indices in [0, num_layers))."""
        chosen = copy.copy(self)
        chosen.layers = [int(i) for i in layers]
        return chosen

    def to(self, device: torch.device | str) -> SavedFeatures:
        self.device = torch.device(device)
        return self

    def read(self, positions: Sequence[int]) -> list[Tensor]:
        raise NotImplementedError


class FeatureFolder(SavedFeatures):
    """A folder of per-image `[L, N, C]` files, image i = the i-th file in sorted name order; a read opens
    only the files of its images."""

    def __init__(self, files: Sequence[Path], shape: tuple[int, int, int], dtype: torch.dtype):
        super().__init__((shape[0], len(files), shape[1], shape[2]), dtype)
        self.files = [str(Path(f).resolve()) for f in files]

    def read(self, positions: Sequence[int]) -> list[Tensor]:
        out: list[Tensor] = []
        for row, position in enumerate(positions):  # one file in memory at a time, copied into the batch
            image = load_array(self.files[position]).to(self.dtype)
            if not out:
                out = [torch.empty((len(positions), *image.shape[1:]), dtype=self.dtype) for _ in self.layers]
            for batch, layer in zip(out, self.layers):
                batch[row] = image[layer]
            del image
        return [batch.to(self.device) for batch in out]


class FeatureArray(SavedFeatures):
    """One `[L, I, N, C]` file: a .npy is memory-mapped for each read (only the rows read are touched, and
    unmapped afterwards); a .npz/.pt cannot be mapped and is loaded whole, once per reading process."""

    _lazy = ("_loaded",)

    def __init__(self, path: Path, shape: tuple[int, int, int, int], dtype: torch.dtype):
        super().__init__(shape, dtype)
        self.path = str(Path(path).resolve())

    def read(self, positions: Sequence[int]) -> list[Tensor]:
        path, positions = Path(self.path), list(positions)
        if path.suffix.lower() == ".npy":
            mapped = _map_npy(path)
            rows = [_real_tensor(np.array(mapped[layer, positions]), path) for layer in self.layers]
            del mapped
        else:
            if getattr(self, "_loaded", None) is None:
                self._loaded = load_array(path)
            rows = [self._loaded[layer, positions] for layer in self.layers]
        return [row.to(self.device) for row in rows]


def open_saved_features(path: str | Path) -> SavedFeatures:
    """Check `--features` and return its reader (all layers selected), holding none of its features.

    Raises ValueError (one line): missing path, wrong rank, empty array, NaN/inf, empty folder,
    per-image arrays of different shapes.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if not path.is_dir():
        if path.suffix.lower() == ".npy":
            shape, dtype = _check_npy(path)
        else:
            features = load_array(path)
            _check(features, str(path), 4, _ARRAY)
            shape, dtype = tuple(features.shape), features.dtype
            del features
        return FeatureArray(path, shape, dtype)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ValueError(f"{path}: empty folder (no {'/'.join(SUFFIXES)} files)")
    shape, wide = None, False
    for file in files:  # one image in memory at a time
        image = load_array(file)
        _check(image, str(file), 3, _IMAGE)
        if shape is not None and tuple(image.shape) != shape:
            raise ValueError(f"{file}: shape {tuple(image.shape)} differs from {files[0].name}'s {shape}")
        shape, wide = tuple(image.shape), wide or image.dtype == torch.float64
    return FeatureFolder(files, shape, torch.float64 if wide else torch.float32)
