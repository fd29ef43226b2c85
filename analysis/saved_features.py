"""Features saved by any tool: `encmm diagnose --features <file or folder>`.

Two layouts (paper.md, "Diagnostics": block outputs, patch tokens only, no final norm):
- one array `[L, I, N, C]` (layers, images, tokens, channels) in a .npy, .npz or .pt file;
- a folder of per-image arrays `[L, N, C]`, one file per image (.npy/.npz/.pt), taken in sorted
  file-name order (the layout the paper's code saves).

A .npz holds one array (or several, one of them named "features"); a .pt holds a tensor/array (or a
dict with "features"), loaded with `weights_only=True`. Errors are ValueError with a one-line message.
No Ray, no MLflow.
"""

from __future__ import annotations

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
        message = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.__class__.__name__})") from None
    if isinstance(value, np.ndarray) and value.dtype.kind not in "iuf":  # strings, objects, bools, complex, ...
        raise ValueError(f"{path}: dtype {value.dtype} is not a real number type")
    tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    if tensor.is_complex() or tensor.dtype == torch.bool or not (tensor.is_floating_point() or _is_integer(tensor)):
        raise ValueError(f"{path}: dtype {tensor.dtype} is not a real number type")
    if tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)
    return tensor


def _is_integer(tensor: Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def _check(features: Tensor, where: str, rank: int, layout: str) -> None:
    if features.ndim != rank:
        raise ValueError(f"{where}: expected a {rank}-D array {layout}, got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"{where}: empty array of shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{where}: contains NaN or inf")


def load_saved_features(path: str | Path) -> list[Tensor]:
    """`--features` -> one tensor `[I, N, C]` per layer (a list of L views of one `[L, I, N, C]` tensor).

    Raises ValueError (one line): missing path, wrong rank, empty array, NaN/inf, empty folder,
    per-image arrays of different shapes.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise ValueError(f"{path}: empty folder (no {'/'.join(SUFFIXES)} files)")
        images = []
        for file in files:
            image = load_array(file)
            _check(image, str(file), 3, "[layers, tokens, channels]")
            if images and image.shape != images[0].shape:
                raise ValueError(
                    f"{file}: shape {tuple(image.shape)} differs from {files[0].name}'s {tuple(images[0].shape)}"
                )
            images.append(image)
        dtype = torch.float64 if any(i.dtype == torch.float64 for i in images) else torch.float32
        features = torch.stack([i.to(dtype) for i in images], dim=1)  # [L, I, N, C]
    else:
        features = load_array(path)
        _check(features, str(path), 4, "[layers, images, tokens, channels]")
    return list(features.unbind(0))
