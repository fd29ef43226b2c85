"""The one module of analysis/ that speaks Ray: per-layer diagnostics fanned out as Ray tasks.

Each layer's `[I, N, C]` features go into the object store once (`ray.put`, as numpy: zero-copy for
the tasks on the same node) and one task per layer runs `analysis.spectra.diagnose_layer`. Layers
listed in `arrays_for` also return per-image arrays for the figures (ranks, rotation overlaps and
angles). Results come back in layer order; `on_done(position)` fires as each task finishes, so the
caller can drive a progress bar.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import ray
import torch

from encmm.analysis import spectra


def _tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # object-store arrays are read-only; nothing here writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def per_image_arrays(
    features: torch.Tensor, thresholds: Sequence[float], center: bool, num_pairs: int, seed: int
) -> dict[str, np.ndarray]:
    """Per-image values behind one layer's summaries, for histograms.

    {"svd_rank", "pca_rank": `[I, P]`, and for p in spectra.ROTATION_THRESHOLDS:
    "overlap_to_shared/<p>", "angle_to_shared/<p>": `[I]`, "overlap_pairwise/<p>", "angle_pairwise/<p>":
    `[num_pairs]` (absent with < 2 images)}: the same definitions and seed as `diagnose_layer`.
    """
    arrays = spectra.layer_rank_arrays(features, thresholds, center)
    x = spectra.check_features(features)
    if center:  # as diagnose_layer: subtract each image's token mean
        x = x - x.mean(dim=1, keepdim=True)
    rotation_p = list(spectra.ROTATION_THRESHOLDS)
    ranks = spectra.svd_rank(x, rotation_p)
    eigenvectors = spectra.shared_basis(x)[1]
    bases = spectra.right_singular_bases(x, int(ranks.max()))
    for col, p in enumerate(rotation_p):
        key = spectra.threshold_key(p)
        overlap, angle = spectra.rotation_to_shared(x, ranks[:, col], eigenvectors, bases=bases)
        arrays[f"overlap_to_shared/{key}"], arrays[f"angle_to_shared/{key}"] = overlap.numpy(), angle.numpy()
        if x.shape[0] >= 2 and num_pairs >= 1:
            overlap, angle = spectra.pairwise_rotation(x, ranks[:, col], num_pairs, seed, bases=bases)
            arrays[f"overlap_pairwise/{key}"], arrays[f"angle_pairwise/{key}"] = overlap.numpy(), angle.numpy()
    return arrays


@ray.remote
def _diagnose_task(
    features: np.ndarray,
    thresholds: list[float],
    center: bool,
    permutations: int,
    num_pairs: int,
    seed: int,
    with_arrays: bool,
    device: str,
) -> tuple[dict, dict | None]:
    x = _tensor(features).to(device)
    result = spectra.diagnose_layer(
        x, thresholds, center=center, permutations=permutations, num_pairs=num_pairs, seed=seed
    )
    arrays = per_image_arrays(x.cpu(), thresholds, center, num_pairs, seed) if with_arrays else None
    return result, arrays


def diagnose_layers(
    layers: Sequence[torch.Tensor],
    *,
    thresholds: Sequence[float],
    center: bool = False,
    permutations: int = 0,
    num_pairs: int = 500,
    seed: int = 0,
    arrays_for: Sequence[int] = (),
    num_gpus: float = 0.0,
    on_done: Callable[[int], None] | None = None,
) -> list[tuple[dict, dict | None]]:
    """Run `diagnose_layer` on every `[I, N, C]` tensor of `layers` as parallel Ray tasks.

    `arrays_for`: positions in `layers` that also return `per_image_arrays`. With `num_gpus` > 0 each
    task takes that share of a GPU and runs the math there. Returns [(diagnostics, arrays or None)] in
    the order of `layers`. Ray must be initialised by the caller.
    """
    device = "cuda" if num_gpus > 0 else "cpu"
    task = _diagnose_task.options(num_gpus=num_gpus) if num_gpus > 0 else _diagnose_task
    refs = [ray.put(layer.numpy()) for layer in layers]
    pending = {
        task.remote(
            ref, list(thresholds), center, permutations, num_pairs, seed, position in arrays_for, device
        ): position
        for position, ref in enumerate(refs)
    }
    results: list = [None] * len(refs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        position = pending.pop(done[0])
        results[position] = ray.get(done[0])
        if on_done is not None:
            on_done(position)
    return results
