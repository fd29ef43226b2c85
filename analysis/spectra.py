"""Spectral diagnostics of encoding mismatch (paper.md, "Diagnostics" 1-3).

Pure tensor math: torch, plus numpy for percentile statistics only; no I/O. Every function runs on the
device its input lives on. One layer's features are `[I, N, C]`: I images, N patch tokens, C channels,
one matrix X_i in R^{N x C} per image.

1. Per-image SVD rank: E_k = sum_{j<=k} s_j^2 / sum_j s_j^2, d_p = smallest k >= 1 with E_k >= p.
2. Shared basis: eigenvectors V of C = (1/T) sum_i X_i^T X_i (uncentered, T tokens in all); per image
   the captured energy ||X_i V_d||_F^2 / ||X_i||_F^2 and the first d reaching p.
3. Subspace rotation (encmm's addition): cosines of the principal angles between an image's top-k
   right-singular subspace and the shared top-k PCA subspace, or another image's; summarised as the
   overlap mean(cos^2) (1 = same subspace, about k/C for random subspaces) and the mean angle.
4. Token Spectral Energy Pattern (SEP): e_k = |FFT(x)_k|^2 along channels, natural order;
   curve[j] = 100 * sum_{k<=j} e_k / sum_k e_k; bandwidth = first j with mean curve >= t, plus 1.
   "Pooled": of the mean curve over all tokens of all images (the paper's bandwidth). "Per image": of
   each image's mean curve, then averaged over images (the authors' permutation-robustness statistic).

Ranks use a float64 Gram matrix of each image's smaller side and `torch.linalg.eigvalsh`: the squared
singular values, exact enough that the integer ranks equal a float64 SVD's (a float32 Gram is not;
stack.md). On CUDA, `svd_rank` takes cuSOLVER's batched gesvda spectra instead (its singular values alone ran
29x faster on an H100) and certifies every image's ranks against that reference method with an a-posteriori
error margin; the reference recomputes the images inside the margin and the chunks that gesvda refuses
(`analysis.certified_ranks`).

One layer's report (`diagnose_layer`) is assembled by `layer_report`, `sep_report` and `layer_arrays`
from per-image values and additive sums (`layer_values`, `image_sep_moments`, `permuted_sep_terms`,
`token_gram_sum`); `analysis.streaming` computes those from batches of images and calls the same assembly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
ROTATION_THRESHOLDS = (0.9, 0.99)
SEP_THRESHOLDS_PERCENT = (50, 60, 70, 80, 90)
# The two statistics of the SEP permutation check (`sep_permutation_per_image`, `sep_permutation_bandwidths`);
# one line each for diagnostics.json.
SEP_STATISTICS = ("per-image", "pooled")
SEP_STATISTIC_DEFINITIONS = {
    "per-image": "per image, d/D where the mean SEP curve of its tokens first reaches t; mean over images, "
    "under each random channel order and in natural order (original_mean); delta = mean - "
    "original_mean, 95% CI by a paired bootstrap over images",
    "pooled": "d/D where the mean SEP curve over all tokens of all images first reaches t, under each random "
    "channel order; mean and 95% bootstrap CI over permutations; original_mean = natural order",
}
# A cumulative fraction counts as reaching p when E_k >= p - RANK_TOLERANCE. Float64 round-off in E_k
# is ~1e-15, so an energy that equals p exactly (by construction) is reached whichever way it rounds.
RANK_TOLERANCE = 1e-12
_CHUNK_BYTES = 16 << 20  # float64 working set per chunk of large matrix products: bounds memory
# Batched small-matrix work (Gram + eigvalsh per image) runs fastest on the CPU in chunks that stay in
# the L2 cache (1.7x faster on 2 cores than one 300 MB batch); an accelerator wants big batches.
CPU_BATCH_BYTES = 2 << 20
_DEVICE_BATCH_BYTES = 256 << 20
_BOOTSTRAP_SAMPLES = 1000


# ----------------------------------------------------------------------------------------- checks
def check_features(features: Tensor | np.ndarray, check_finite: bool = True) -> Tensor:
    """Return `features` as a floating tensor `[I, N, C]`, or raise ValueError (one line).

    `check_finite=False` leaves the NaN/inf test to the caller (a full pass over the features costs
    a quarter of `svd_rank`, which checks its Gram diagonals instead).
    """
    if not isinstance(features, Tensor):
        features = torch.as_tensor(np.asarray(features))
    if features.ndim != 3:
        raise ValueError(f"features must be 3-D [images, tokens, channels], got shape {tuple(features.shape)}")
    if features.numel() == 0:
        raise ValueError(f"features are empty: shape {tuple(features.shape)}")
    if features.is_complex() or features.dtype == torch.bool:
        raise ValueError(f"features must be real numbers, got dtype {features.dtype}")
    if not features.is_floating_point():
        features = features.to(torch.float64)
    if check_finite and not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    return features


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    """Return thresholds as floats, or raise ValueError unless all lie in the open interval (0, 1)."""
    values = tuple(float(p) for p in thresholds)
    if not values:
        raise ValueError("thresholds are empty")
    if not all(0.0 < p < 1.0 for p in values):
        raise ValueError(f"thresholds must lie in (0, 1), got {list(values)}")
    return values


def threshold_key(p: float) -> str:
    """JSON key of a threshold: 0.8 -> "0.8", 0.95 -> "0.95"."""
    return format(p, "g")


ROTATION_KEYS = tuple(threshold_key(p) for p in ROTATION_THRESHOLDS)  # the rotation entries' JSON keys


def rank_thresholds(thresholds: Sequence[float]) -> list[float]:
    """The thresholds at which `diagnose_layer` computes SVD ranks: the requested ones and
    ROTATION_THRESHOLDS, sorted, each once."""
    return sorted(set(thresholds) | set(ROTATION_THRESHOLDS))


def ranks_at(ranks: Tensor, thresholds: Sequence[float], wanted: Sequence[float]) -> Tensor:
    """The columns of `ranks` `[I, len(rank_thresholds(thresholds))]`, computed at `rank_thresholds(thresholds)`,
    that belong to the thresholds `wanted`, in that order: `[I, len(wanted)]`."""
    computed = rank_thresholds(thresholds)
    return ranks[:, [computed.index(p) for p in wanted]]


def map_chunks(
    fn: Callable[[Tensor], Tensor], x: Tensor, bytes_per_item: int, budget: int = _CHUNK_BYTES
) -> list[Tensor]:
    """Apply `fn` to chunks of `x` along dim 0, each holding about `budget` bytes.

    On a CPU the chunks run on one thread per intra-op thread: batched LAPACK calls (eigvalsh)
    loop over the batch on a single core, so this is what lets them use every core.
    """
    chunk = max(1, budget // max(1, bytes_per_item))
    workers = torch.get_num_threads() if x.device.type == "cpu" else 1
    chunk = min(chunk, max(1, math.ceil(x.shape[0] / workers)))
    pieces = x.split(chunk)
    if workers == 1 or len(pieces) == 1:
        return [fn(piece) for piece in pieces]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, pieces))


# ------------------------------------------------------------------------------- 1. SVD rank
def energy_spectrum(features: Tensor) -> Tensor:
    """Squared singular values s_1^2 >= s_2^2 >= ... of each image, `[I, N, C]` -> `[I, min(N, C)]` float64.

    Computed as eigenvalues of the smaller Gram matrix (X X^T `[N, N]` or X^T X `[C, C]`) in float64;
    round-off can make the smallest ones slightly negative, so they are clamped to 0.
    """
    x = check_features(features, check_finite=False)
    _, n, c = x.shape

    def spectrum(chunk: Tensor) -> Tensor:
        gram = smaller_gram(chunk.to(torch.float64))
        # A NaN/inf entry makes its row's squared norm, a diagonal entry, NaN/inf.
        if not torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all():
            raise ValueError("features contain NaN or inf")
        return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)

    return torch.cat(map_chunks(spectrum, x, 8 * (n * c + min(n, c) ** 2), _batch_bytes(x)))


def smaller_gram(x: Tensor) -> Tensor:
    """Gram matrix of each image's smaller side, `[b, N, C]` -> X X^T `[b, N, N]` if N <= C else X^T X `[b, C, C]`."""
    return x @ x.mT if x.shape[-2] <= x.shape[-1] else x.mT @ x


def _batch_bytes(x: Tensor) -> int:
    return CPU_BATCH_BYTES if x.device.type == "cpu" else _DEVICE_BATCH_BYTES


def cumulative_energy(energies: Tensor) -> Tensor:
    """E_k = sum_{j<=k} e_j / sum_j e_j along the last dim, `[..., K]` -> `[..., K]` (last entry 1)."""
    cumulative, total = cumulative_sums(energies)
    if (total <= 0).any():
        raise ValueError("an image has zero energy: its rank is undefined")
    return cumulative / total.unsqueeze(-1)


def cumulative_sums(energies: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_{j<=k} e_j `[..., K]`, the total `[...]`) in float64: what `cumulative_energy` divides, computed
    once for it and for `certified_ranks`, so that both give the same E_k to the last bit."""
    cumulative = energies.to(torch.float64).cumsum(-1)
    return cumulative, cumulative[..., -1]


def required_rank(cumulative_energy: Tensor, thresholds: Sequence[float]) -> Tensor:
    """d_p = smallest k >= 1 with E_k >= p - RANK_TOLERANCE (paper.md, Diagnostics 1).

    `cumulative_energy` `[..., K]` is non-decreasing with last entry 1; returns `[..., P]` long, one
    column per threshold. Should no entry reach p, d_p = K.
    """
    p = torch.tensor(check_thresholds(thresholds), dtype=torch.float64, device=cumulative_energy.device)
    energy = cumulative_energy.to(torch.float64)
    below = energy.unsqueeze(-2) < (p - RANK_TOLERANCE).unsqueeze(-1)  # [..., P, K]
    return (below.sum(-1) + 1).clamp_max(energy.shape[-1])


def svd_rank(features: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Tensor:
    """Per-image SVD rank d_p(X_i), `[I, N, C]` -> `[I, P]` long, by the reference method (float64 Gram +
    eigvalsh: `energy_spectrum`); where the device has a fast spectrum (`certified_ranks.device_fast_spectrum`:
    CUDA), the same ranks from `certified_ranks.certified_svd_rank`."""
    x = check_features(features, check_finite=False)
    if x.device.type != "cpu":  # the certified path's own module builds on this one's reference functions
        from encmm.analysis.certified_ranks import certified_svd_rank, device_fast_spectrum

        fast = device_fast_spectrum(x.device)
        if fast is not None:
            return certified_svd_rank(x, thresholds, fast).ranks
    return required_rank(cumulative_energy(energy_spectrum(x)), thresholds)


# --------------------------------------------------------------------------- 2. shared basis
def shared_basis(features: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of C = (1/T) sum_i X_i^T X_i (paper.md, Diagnostics 2), uncentered, float64.

    `[I, N, C]` -> (eigenvalues `[C]` descending, eigenvectors `[C, C]` as columns in the same order).
    """
    x = check_features(features)
    return basis_from_gram(token_gram_sum(x), x.shape[0] * x.shape[1])


def token_gram_sum(features: Tensor) -> Tensor:
    """sum_i X_i^T X_i over the images of `[I, N, C]`, float64 `[C, C]`, uncentered.

    One Gram per chunk of images, summed in chunk order; NaN/inf are not checked (`shared_basis` checks).
    """
    x = check_features(features, check_finite=False)
    _, n, c = x.shape

    def gram(chunk: Tensor) -> Tensor:
        tokens = chunk.to(torch.float64).reshape(-1, c)
        return tokens.mT @ tokens

    return torch.stack(map_chunks(gram, x, 8 * n * c)).sum(0)


def basis_from_gram(gram_sum: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
    """`shared_basis` from a `token_gram_sum` over `tokens` tokens in all: the eigen-decomposition of
    C = gram_sum / tokens -> (eigenvalues `[C]` descending, round-off below 0 clamped, eigenvectors `[C, C]`
    as columns in the same order)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_sum / tokens)
    return eigenvalues.flip(-1).clamp_min(0.0), eigenvectors.flip(-1)


def captured_energy(features: Tensor, eigenvectors: Tensor) -> Tensor:
    """Cumulative captured energy ||X_i V_d||_F^2 / ||X_i||_F^2 for d = 1..K.

    `features` `[I, N, C]`, `eigenvectors` `[C, K]` orthonormal columns -> `[I, K]` float64.
    """
    x = check_features(features)
    _, n, c = x.shape
    basis = eigenvectors.to(device=x.device, dtype=torch.float64)

    def captured(chunk: Tensor) -> Tensor:
        chunk = chunk.to(torch.float64)
        energy = (chunk @ basis).square().sum(-2).cumsum(-1)  # [b, K]
        return energy / chunk.square().sum((-2, -1)).unsqueeze(-1)

    energies = torch.cat(map_chunks(captured, x, 8 * n * (c + basis.shape[-1])))
    if not torch.isfinite(energies).all():
        raise ValueError("an image has zero energy: its rank is undefined")
    return energies


def pca_rank(
    features: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, eigenvectors: Tensor | None = None
) -> Tensor:
    """Per-image rank in the shared basis: first d with captured energy >= p, `[I, N, C]` -> `[I, P]` long."""
    if eigenvectors is None:
        eigenvectors = shared_basis(features)[1]
    return required_rank(captured_energy(features, eigenvectors), thresholds)


def rank_stats(ranks: Tensor | np.ndarray) -> dict[str, float]:
    """Statistics of per-image ranks `[I]`: p99 (numpy.percentile, linear, as the paper), mean, median,
    population std, 25th/75th percentiles, as python floats."""
    values = np.asarray(ranks.cpu() if isinstance(ranks, Tensor) else ranks, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no ranks to summarise")
    return {
        "p99": float(np.percentile(values, 99)),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std()),
        "q25": float(np.percentile(values, 25)),
        "q75": float(np.percentile(values, 75)),
    }


# ------------------------------------------------------------------------ 3. subspace rotation
def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between span(a) and span(b), descending.

    `a` `[..., C, k]`, `b` `[..., C, l]` with orthonormal columns -> `[..., min(k, l)]`: the singular
    values of a^T b (Bjorck & Golub 1973), clamped to [0, 1] against round-off.
    """
    return torch.linalg.svdvals(a.mT @ b).clamp(0.0, 1.0)


def subspace_overlap(cosines: Tensor) -> Tensor:
    """Overlap = mean of cos^2 over the principal angles, `[..., k]` -> `[...]`.

    1 for the same subspace, 0 for orthogonal ones, k/C in expectation for random k-dim subspaces of R^C.
    """
    return cosines.square().mean(-1)


def right_singular_bases(features: Tensor, k_max: int) -> Tensor:
    """Top-`k_max` right singular vectors of each image as columns, `[I, N, C]` -> `[I, C, k_max]` float64.

    From the eigenvectors of X^T X when N >= C; else v_j = X^T u_j / s_j from those of X X^T. Columns
    whose s_j is 0 come back as zeros; such columns lie beyond the image's rank and are never used.
    """
    x = check_features(features)
    _, n, c = x.shape
    if not 1 <= k_max <= min(n, c):
        raise ValueError(f"k_max must lie in [1, {min(n, c)}], got {k_max}")

    def bases(chunk: Tensor) -> Tensor:
        chunk = chunk.to(torch.float64)
        if n >= c:
            return torch.linalg.eigh(chunk.mT @ chunk)[1].flip(-1)[..., :k_max]
        values, left = torch.linalg.eigh(chunk @ chunk.mT)
        values, left = values.flip(-1)[..., :k_max], left.flip(-1)[..., :k_max]
        sigma = values.clamp_min(0.0).sqrt()
        inverse = torch.where(sigma > 0, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
        return (chunk.mT @ left) * inverse.unsqueeze(-2)

    return torch.cat(map_chunks(bases, x, 8 * (n * c + min(n, c) ** 2 + c * k_max), _batch_bytes(x)))


def _block_angles(products: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Overlap and mean principal angle (degrees) of the leading k x k blocks of `products` `[M, K, K]`.

    Masking outside the block keeps its singular values and adds exact zeros, so one batched svdvals
    serves every k without a loop; the first k of the descending values are the block's cosines.
    """
    keep = torch.arange(products.shape[-1], device=products.device) < k.unsqueeze(-1)  # [M, K]
    masked = products * keep.unsqueeze(-1) * keep.unsqueeze(-2)
    cosines = torch.linalg.svdvals(masked).clamp(0.0, 1.0)
    size = k.to(torch.float64)
    overlap = (cosines.square() * keep).sum(-1) / size
    angle = (torch.rad2deg(torch.arccos(cosines)) * keep).sum(-1) / size
    return overlap, angle


def _check_ranks(ranks: Tensor, num_images: int, max_rank: int) -> Tensor:
    ranks = torch.as_tensor(ranks).to(torch.long).reshape(-1)
    if ranks.numel() != num_images or not ((ranks >= 1) & (ranks <= max_rank)).all():
        raise ValueError(f"ranks must be {num_images} integers in [1, {max_rank}]")
    return ranks


def rotation_to_shared(
    features: Tensor, ranks: Tensor, eigenvectors: Tensor, *, bases: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rotation of each image's subspace against the shared one.

    For image i with k = ranks[i] (its own d_p): principal angles between its top-k right singular
    subspace and span(eigenvectors[:, :k]). `features` `[I, N, C]`, `ranks` `[I]`, `eigenvectors`
    `[C, >=k]` -> (overlap `[I]`, mean principal angle in degrees `[I]`). `bases` reuses
    `right_singular_bases(features, >= max k)`.
    """
    x = check_features(features)
    i, n, c = x.shape
    k = _check_ranks(ranks, i, min(n, c)).to(x.device)
    k_max = int(k.max())
    if bases is None:
        bases = right_singular_bases(x, k_max)
    shared = eigenvectors.to(device=x.device, dtype=torch.float64)[:, :k_max]
    products = bases[..., :k_max].mT @ shared  # [I, k_max, k_max]
    return _block_angles(products, k)


def rotations_to_shared(
    features: Tensor, ranks: Tensor, eigenvectors: Tensor, *, bases: Tensor | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """`rotation_to_shared` at each of ROTATION_THRESHOLDS: `ranks` `[I, len(ROTATION_THRESHOLDS)]`, one
    column per threshold -> {ROTATION_KEYS[col]: (overlap `[I]`, angle `[I]`)}. All columns share one
    `right_singular_bases(features, ranks.max())` (or `bases`)."""
    if bases is None:
        bases = right_singular_bases(features, int(ranks.max()))
    return {
        key: rotation_to_shared(features, ranks[:, col], eigenvectors, bases=bases)
        for col, key in enumerate(ROTATION_KEYS)
    }


def rotation_pairs(num_images: int, num_pairs: int, seed: int) -> tuple[Tensor, Tensor]:
    """The pairs (i, j), i != j, that `pairwise_rotation` measures: (first, second), each `[num_pairs]` long on
    the CPU, uniform over ordered pairs, from `torch.Generator().manual_seed(seed)`."""
    if num_images < 2 or num_pairs < 1:
        raise ValueError(f"pairwise rotation needs >= 2 images and >= 1 pair, got {num_images} and {num_pairs}")
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, num_images, (num_pairs,), generator=generator)
    second = torch.randint(0, num_images - 1, (num_pairs,), generator=generator)
    return first, second + (second >= first)  # uniform over j != i


def pairwise_rotation(
    features: Tensor, ranks: Tensor, num_pairs: int, seed: int, *, bases: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rotation between images: a seeded sample of `num_pairs` pairs (i, j), i != j, uniform.

    Principal angles between the top-k right singular subspaces of X_i and X_j, k = min(ranks[i],
    ranks[j]) -> (overlap `[num_pairs]`, mean principal angle in degrees `[num_pairs]`).
    """
    x = check_features(features)
    i, n, c = x.shape
    first, second = rotation_pairs(i, num_pairs, seed)
    k_all = _check_ranks(ranks, i, min(n, c)).to(x.device)
    first, second = first.to(x.device), second.to(x.device)
    if bases is None:
        bases = right_singular_bases(x, int(k_all.max()))
    return pair_angles(bases, first, second, torch.minimum(k_all[first], k_all[second]))


def pair_angles(
    bases: Tensor, first: Tensor, second: Tensor, k: Tensor, k_max: int | None = None
) -> tuple[Tensor, Tensor]:
    """Overlap and mean principal angle (degrees) between the top-k[m] columns of bases[first[m]] and
    bases[second[m]] for each pair m: `bases` `[I, C, >= k_max]`, `first`, `second`, `k` `[M]` -> (`[M]`, `[M]`).

    The products are padded to `k_max` columns (default max(k); pass the maximum over all pairs so that a
    subset of them gets the numbers the whole set gets) and taken in chunks of pairs: gathering both bases of
    every pair at once would copy `[M, C, k_max]` twice.
    """
    first, second, k = (t.to(bases.device) for t in (first, second, k))
    k_max = int(k.max()) if k_max is None else k_max
    step = max(1, _CHUNK_BYTES // (16 * bases.shape[-2] * k_max))
    parts = [
        _block_angles(bases[a, :, :k_max].mT @ bases[b, :, :k_max], size)
        for a, b, size in zip(first.split(step), second.split(step), k.split(step))
    ]
    return torch.cat([o for o, _ in parts]), torch.cat([g for _, g in parts])


# ----------------------------------------------------------------------------------- 4. SEP
def _check_tokens(tokens: Tensor | np.ndarray) -> Tensor:
    if not isinstance(tokens, Tensor):
        tokens = torch.as_tensor(np.asarray(tokens))
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 2-D [tokens, channels] array, got {tuple(tokens.shape)}")
    if not torch.isfinite(tokens).all():
        raise ValueError("tokens contain NaN or inf")
    return tokens


def _sep_blocks(x: Tensor) -> list[tuple[int, Tensor]]:
    """Split `[I, N, D]` into (first image, `[g, m, D]` block) pieces of about `_CHUNK_BYTES` complex
    working set: whole images where one fits, else slices of one image's tokens."""
    i, n, d = x.shape
    per_image = 16 * n * d
    if per_image <= _CHUNK_BYTES:
        step = _CHUNK_BYTES // per_image
        return [(a, x[a : a + step]) for a in range(0, i, step)]
    step = max(1, _CHUNK_BYTES // (16 * d))
    return [(a, x[a : a + 1, s : s + step]) for a in range(i) for s in range(0, n, step)]


def image_sep_moments(
    x: Tensor, order: Tensor | None = None, with_spread: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per image of `x` `[I, N, D]` (as `check_features` returns it), over its tokens with nonzero energy:
    (count `[I]`, mean SEP curve `[I, D]`, sum of squared deviations `[I, D]` or None), float64; an image
    with no such token has count 0 and a zero curve.

    Pieces of an image are merged with Chan et al.'s pairwise update, stable where sum-of-squares is
    not; plain sums over whole blocks keep it deterministic on an accelerator (no atomics). `order`
    permutes the channels first (the robustness check).
    """
    i, _, d = x.shape
    options = {"dtype": torch.float64, "device": x.device}
    count, mean = torch.zeros(i, **options), torch.zeros(i, d, **options)
    m2 = torch.zeros(i, d, **options) if with_spread else None
    for first, block in _sep_blocks(x):
        block = block.to(torch.float64)
        if order is not None:
            block = block[..., order]
        cumulative = torch.fft.fft(block, dim=-1).abs().square().cumsum(-1)  # [g, m, D]
        total = cumulative[..., -1:]
        alive = total > 0  # [g, m, 1]; a zero token has no curve (0 / 0)
        curves = 100.0 * cumulative / total.masked_fill(~alive, 1.0)
        size = alive.sum(1).to(torch.float64)  # [g, 1]
        block_mean = curves.sum(1) / size.clamp_min(1.0)  # zero tokens contribute exact zeros
        rows = slice(first, first + block.shape[0])
        merged = count[rows].unsqueeze(-1) + size
        weight = torch.where(merged > 0, size / merged.clamp_min(1.0), 0.0)
        delta = block_mean - mean[rows]
        if m2 is not None:
            spread = ((curves - block_mean.unsqueeze(1)).square() * alive).sum(1)
            m2[rows] += spread + delta.square() * (count[rows].unsqueeze(-1) * weight)
        mean[rows] += delta * weight
        count[rows] = merged.squeeze(-1)
    return count, mean, m2


def _pooled_sums(count: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """The additive part of pooling per-image moments (count `[I]`, mean `[I, D]`): (sum_i count_i *
    mean_i `[D]`, sum_i count_i), which sum over disjoint sets of images."""
    return (count.unsqueeze(-1) * mean).sum(0), count.sum()


def _pooled_mean(weighted: Tensor, total: Tensor) -> Tensor:
    """The mean curve over all tokens from `_pooled_sums` (or several stacked, `total` `[R, 1]`)."""
    if (total == 0).any():
        raise ValueError("every token has zero energy: the SEP is undefined")
    return weighted / total


def _pooled_moments(count: Tensor, mean: Tensor, m2: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Merge per-image moments into the moments over all tokens: (mean `[D]`, population std `[D]`)."""
    weighted, total = _pooled_sums(count, mean)
    pooled = _pooled_mean(weighted, total)
    if m2 is None:
        return pooled, None
    spread = m2.sum(0) + (count.unsqueeze(-1) * (mean - pooled).square()).sum(0)
    return pooled, (spread / total).sqrt()


def sep_curves(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """SEP (paper.md, Diagnostics 3): per token x in R^D, e_k = |FFT(x)_k|^2 (full complex FFT, natural
    order) and curve[j] = 100 * sum_{k<=j} e_k / sum_k e_k; `[T, D]` -> (mean `[D]`, std `[D]`) over
    tokens, float64, population std. Tokens with zero energy have no curve and are skipped.
    """
    return _pooled_moments(*image_sep_moments(_check_tokens(tokens).unsqueeze(0)))


def sep_image_curves(features: Tensor) -> tuple[Tensor, Tensor]:
    """Image-level SEP curves: for each image the mean of its tokens' SEP curves (as `sep_curves`).

    `[I, N, D]` -> (curves `[I, D]` float64 in percent, token counts `[I]` long). Tokens with zero
    energy are skipped; an image with no other token has count 0 and a NaN curve.
    """
    count, mean, _ = image_sep_moments(check_features(features), with_spread=False)
    mean[count == 0] = float("nan")
    return mean, count.to(torch.long)


def sep_dims(curves: Tensor, thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT) -> Tensor:
    """d(t) = (first 0-based j with curve[j] >= t) + 1 for each curve, same tolerance as ranks in
    percent units; `[..., D]` in percent -> `[..., P]` long, one column per threshold, at most D."""
    curves = torch.as_tensor(curves, dtype=torch.float64)
    t = torch.tensor([float(v) for v in thresholds_percent], dtype=torch.float64, device=curves.device)
    below = curves.unsqueeze(-2) < (t - 100.0 * RANK_TOLERANCE).unsqueeze(-1)  # [..., P, D]
    return (below.sum(-1) + 1).clamp_max(curves.shape[-1])


def sep_bandwidth(
    mean_curve: Tensor, thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT
) -> dict[float, tuple[int, float]]:
    """Bandwidth at t% of one curve (`sep_dims`), and d / D: `mean_curve` `[D]` in percent -> {t: (d, d / D)}."""
    curve = torch.as_tensor(mean_curve, dtype=torch.float64).reshape(-1)
    dims = sep_dims(curve, thresholds_percent).tolist()
    return {t: (d, d / curve.numel()) for t, d in zip(thresholds_percent, dims)}


def _permuted_image_curves(x: Tensor, num_permutations: int, seed: int):
    """Yield (count `[I]`, mean curves `[I, D]`) of `[I, N, D]` under each seeded channel order.

    Order r is the r-th `torch.randperm(D)` of `torch.Generator().manual_seed(seed)`: one global
    permutation shared by every token of every image.
    """
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_permutations):
        order = torch.randperm(x.shape[-1], generator=generator).to(x.device)
        count, mean, _ = image_sep_moments(x, order, with_spread=False)
        yield count, mean


def permuted_sep_terms(
    x: Tensor, num_permutations: int, seed: int, thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT
) -> tuple[Tensor, Tensor, Tensor]:
    """What both permutation statistics need of `x` `[I, N, D]` (as `image_sep_moments`) under each of the
    `num_permutations` seeded channel orders (`_permuted_image_curves`).

    Returns (weighted sums `[R, D]` and token counts `[R]` of the pooled mean curve, which add over
    disjoint sets of images; every image's ratio b_i^p = d_i / D `[I, R, P]` float64 on the CPU, zero-energy
    images included), the input of `sep_report`.
    """
    sums, counts, ratios = [], [], []
    for count, curves in _permuted_image_curves(x, num_permutations, seed):
        weighted, total = _pooled_sums(count, curves)
        sums.append(weighted)
        counts.append(total)
        ratios.append(torch.from_numpy(_bandwidth_ratios(curves, thresholds_percent)))
    return torch.stack(sums), torch.stack(counts), torch.stack(ratios, 1)


def _pooled_ratios(sums: Tensor, counts: Tensor, thresholds_percent: Sequence[float]) -> np.ndarray:
    """The pooled bandwidth ratios `[R, P]` under each permutation from `permuted_sep_terms`' sums."""
    return _bandwidth_ratios(_pooled_mean(sums, counts.unsqueeze(-1)), thresholds_percent)


def _kept_permuted(ratios: Tensor, keep: Tensor) -> np.ndarray:
    """b_i^p `[R, I', P]` of the kept images from `permuted_sep_terms`' ratios `[I, R, P]`."""
    return ratios[keep.cpu()].transpose(0, 1).contiguous().numpy()


def _bootstrap_rows(size: int, seed: int) -> np.ndarray:
    """`_BOOTSTRAP_SAMPLES` resamples of `size` indices with replacement: `[B, size]`, numpy's default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, size, (_BOOTSTRAP_SAMPLES, size))


def _resampled_means(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mean of `values` `[K, P]` over each resample `rows` `[B, K]` -> `[B, P]`, in pieces of bounded memory."""
    step = max(1, _CHUNK_BYTES // (8 * values.size))
    return np.concatenate([values[rows[a : a + step]].mean(1) for a in range(0, rows.shape[0], step)])


def _pooled_summary(
    ratios: np.ndarray, natural: np.ndarray | None, seed: int, thresholds_percent: Sequence[float]
) -> dict[float, dict[str, float]]:
    """Pooled statistic from ratios `[R, P]` under permutations: {t: {"mean", "ci_low", "ci_high"}}, plus
    "original_mean" (= `natural` `[P]`, the natural-order ratios), "std_over_permutations" and the
    delta (mean and interval minus original_mean) when `natural` is given."""
    low, high = np.percentile(_resampled_means(ratios, _bootstrap_rows(ratios.shape[0], seed)), [2.5, 97.5], axis=0)
    mean = ratios.mean(0)
    summary = {}
    for c, t in enumerate(thresholds_percent):
        summary[t] = {"mean": float(mean[c]), "ci_low": float(low[c]), "ci_high": float(high[c])}
        if natural is not None:
            summary[t].update(
                original_mean=float(natural[c]),
                std_over_permutations=float(ratios[:, c].std()),
                delta_mean=float(mean[c] - natural[c]),
                delta_ci_low=float(low[c] - natural[c]),
                delta_ci_high=float(high[c] - natural[c]),
            )
    return summary


def sep_permutation_bandwidths(
    tokens: Tensor,
    num_permutations: int,
    seed: int,
    thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT,
) -> tuple[np.ndarray, dict[float, dict[str, float]]]:
    """The pooled permutation statistic: bandwidth ratio d/D of the mean SEP curve over all `tokens`
    `[T, D]` under `num_permutations` seeded random channel orders (`permuted_sep_terms`).

    Returns (ratios `[num_permutations, P]`, {t: {"mean", "ci_low", "ci_high"}}), the interval a 95%
    percentile bootstrap of the mean over permutations (resamples `default_rng(seed)`).
    """
    x = _check_tokens(tokens).unsqueeze(0)
    sums, counts, _ = permuted_sep_terms(x, num_permutations, seed, thresholds_percent)
    ratios = _pooled_ratios(sums, counts, thresholds_percent)
    return ratios, _pooled_summary(ratios, None, seed, thresholds_percent)


def _per_image_summary(
    original: np.ndarray, permuted: np.ndarray, seed: int, thresholds_percent: Sequence[float]
) -> dict[float, dict[str, float]]:
    """Per-image statistic from b_i `[I, P]` and b_i^p `[R, I, P]` (see `sep_permutation_per_image`)."""
    per_permutation = permuted.mean(1)  # [R, P]: image mean under each order
    rows = _bootstrap_rows(original.shape[0], seed)
    boot_permuted = _resampled_means(permuted.mean(0), rows)  # paired: the same images in both terms
    boot_delta = boot_permuted - _resampled_means(original, rows)
    low, high = np.percentile(boot_permuted, [2.5, 97.5], axis=0)
    delta_low, delta_high = np.percentile(boot_delta, [2.5, 97.5], axis=0)
    mean, natural = per_permutation.mean(0), original.mean(0)
    return {
        t: {
            "mean": float(mean[c]),
            "ci_low": float(low[c]),
            "ci_high": float(high[c]),
            "original_mean": float(natural[c]),
            "original_std": float(original[:, c].std()),
            "std_over_permutations": float(per_permutation[:, c].std()),
            "delta_mean": float(mean[c] - natural[c]),
            "delta_ci_low": float(delta_low[c]),
            "delta_ci_high": float(delta_high[c]),
        }
        for c, t in enumerate(thresholds_percent)
    }


def _bandwidth_ratios(curves: Tensor, thresholds_percent: Sequence[float]) -> np.ndarray:
    """b = d / D `[..., P]` float64 of curves `[..., D]` (`sep_dims`)."""
    return sep_dims(curves, thresholds_percent).cpu().numpy() / curves.shape[-1]


def _images_with_energy(count: Tensor) -> Tensor:
    keep = count > 0
    if not keep.any():
        raise ValueError("every token has zero energy: the SEP is undefined")
    return keep


def sep_permutation_per_image(
    features: Tensor,
    num_permutations: int,
    seed: int,
    thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT,
) -> tuple[np.ndarray, np.ndarray, dict[float, dict[str, float]]]:
    """The per-image permutation statistic (the authors' `analyze_sep_permutation_robustness.py`).

    `features` `[I, N, D]`. Image i's curve is the mean of its tokens' SEP curves (`sep_image_curves`);
    b_i(t) = d_i(t) / D with d_i(t) = (first 0-based j where that curve >= t) + 1. Under channel order
    p (`permuted_sep_terms`, the same seed as the pooled statistic) the same gives b_i^p(t).
    Images whose tokens all have zero energy are left out (I' images remain).

    Returns (b_i `[I', P]`, b_i^p `[R, I', P]`, {t: stats}) with, per threshold t:
    "original_mean" / "original_std": mean / population std over images of b_i;
    "mean" / "std_over_permutations": mean / population std over permutations of mean_i b_i^p;
    "delta_mean" = mean - original_mean;
    "delta_ci_low" / "delta_ci_high": 2.5 / 97.5 percentiles, over `_BOOTSTRAP_SAMPLES` resamples of
    the images with replacement (`default_rng(seed).integers(0, I', (B, I'))`), of
    mean_{i in resample}(mean_p b_i^p) - mean_{i in resample}(b_i), a paired bootstrap of the
    expected delta; "ci_low" / "ci_high": the same percentiles of the first term alone.
    """
    x = check_features(features)
    count, natural, _ = image_sep_moments(x, with_spread=False)
    keep = _images_with_energy(count)
    original = _bandwidth_ratios(natural[keep], thresholds_percent)
    permuted = _kept_permuted(permuted_sep_terms(x, num_permutations, seed, thresholds_percent)[2], keep)
    return original, permuted, _per_image_summary(original, permuted, seed, thresholds_percent)


# ------------------------------------------------------------------------------ one layer
def prepare(features: Tensor, center: bool) -> Tensor:
    """`check_features`, then with `center` each image's token mean subtracted: what every diagnostic of a
    layer runs on."""
    x = check_features(features)
    return x - x.mean(dim=1, keepdim=True) if center else x


def layer_rank_arrays(
    features: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, center: bool = False
) -> dict[str, np.ndarray]:
    """Per-image ranks for histograms: {"svd_rank": `[I, P]`, "pca_rank": `[I, P]`} int64 arrays."""
    x = prepare(features, center)
    return {
        "svd_rank": svd_rank(x, thresholds).cpu().numpy(),
        "pca_rank": pca_rank(x, thresholds).cpu().numpy(),
    }


class LayerValues(NamedTuple):
    """The per-image values behind one layer's report (`layer_report`) and arrays (`layer_arrays`), all
    but the SEP's (`sep_report`)."""

    svd_rank: Tensor  # [I, len(rank_thresholds(thresholds))] long: SVD ranks at rank_thresholds(thresholds)
    eigenvalues: Tensor  # [C] float64 descending: the shared basis's (`shared_basis`)
    captured: Tensor  # [I, C] float64: `captured_energy` in the shared basis
    to_shared: dict[str, tuple[Tensor, Tensor]]  # ROTATION_KEYS -> (overlap [I], angle [I]): `rotations_to_shared`
    pairwise: dict[str, tuple[Tensor, Tensor]]  # ROTATION_KEYS -> (overlap, angle) [num_pairs]; {} without pairs


def layer_values(features: Tensor, thresholds: Sequence[float], num_pairs: int, seed: int) -> LayerValues:
    """`LayerValues` of `prepare`d features `[I, N, C]`; no pairwise rotation with < 2 images or no pairs."""
    x = check_features(features, check_finite=False)
    svd = svd_rank(x, rank_thresholds(thresholds))
    eigenvalues, eigenvectors = shared_basis(x)
    captured = captured_energy(x, eigenvectors)
    ranks = ranks_at(svd, thresholds, ROTATION_THRESHOLDS)
    bases = right_singular_bases(x, int(ranks.max()))
    to_shared = rotations_to_shared(x, ranks, eigenvectors, bases=bases)
    pairwise = {}
    if x.shape[0] >= 2 and num_pairs >= 1:
        pairwise = {
            key: pairwise_rotation(x, ranks[:, col], num_pairs, seed, bases=bases)
            for col, key in enumerate(ROTATION_KEYS)
        }
    return LayerValues(svd, eigenvalues, captured, to_shared, pairwise)


def _rotation_summary(overlap: Tensor, angle: Tensor) -> dict[str, float]:
    return {
        "overlap_mean": float(overlap.mean()),
        "overlap_median": float(np.median(overlap.cpu().numpy())),
        "angle_mean_deg": float(angle.mean()),
    }


def layer_report(values: LayerValues, thresholds: Sequence[float], tokens: int, sep: dict) -> dict:
    """`diagnose_layer`'s dict from the layer's `LayerValues`, its token count N and its "sep" entry
    (`sep_report`)."""
    svd = ranks_at(values.svd_rank, thresholds, thresholds)
    pca = required_rank(values.captured, thresholds)
    percentiles = np.percentile(values.captured.cpu().numpy(), [50, 10, 1], axis=0).tolist()
    return {
        "tokens": tokens,
        "channels": values.eigenvalues.shape[-1],
        "svd_rank": {threshold_key(p): rank_stats(svd[:, col]) for col, p in enumerate(thresholds)},
        "pca_rank": {threshold_key(p): rank_stats(pca[:, col]) for col, p in enumerate(thresholds)},
        "pca_spectrum": cumulative_energy(values.eigenvalues).tolist(),
        "energy_percentiles": dict(zip(("median", "p10", "p1"), percentiles)),
        "sep": sep,
        "rotation": {
            "to_shared": {key: _rotation_summary(*rotation) for key, rotation in values.to_shared.items()},
            "pairwise": {key: _rotation_summary(*rotation) for key, rotation in values.pairwise.items()},
        },
    }


def layer_arrays(values: LayerValues, thresholds: Sequence[float]) -> dict[str, np.ndarray]:
    """The per-image arrays for histograms from the layer's `LayerValues`, numpy: {"svd_rank", "pca_rank":
    `[I, P]`, and for each key of ROTATION_KEYS: "overlap_to_shared/<key>", "angle_to_shared/<key>": `[I]`,
    "overlap_pairwise/<key>", "angle_pairwise/<key>": `[num_pairs]` (absent without pairs)}."""
    arrays = {
        "svd_rank": ranks_at(values.svd_rank, thresholds, thresholds).cpu().numpy(),
        "pca_rank": required_rank(values.captured, thresholds).cpu().numpy(),
    }
    for key in values.to_shared:
        for kind, rotations in (("to_shared", values.to_shared), ("pairwise", values.pairwise)):
            for name, value in zip(("overlap", "angle"), rotations.get(key, ())):
                arrays[f"{name}_{kind}/{key}"] = value.cpu().numpy()
    return arrays


def sep_report(
    count: Tensor, curves: Tensor, m2: Tensor, permuted: tuple[Tensor, Tensor, Tensor] | None, seed: int
) -> dict:
    """The "sep" entry of `diagnose_layer` from per-image moments (count `[I]`, mean curve `[I, D]`, squared
    deviations `[I, D]`: `image_sep_moments`) and, for the permutation statistics, `permuted_sep_terms`'
    (sums, counts, ratios) or None. Both statistics come from the same permutations (they differ only in
    how curves are averaged)."""
    thresholds = SEP_THRESHOLDS_PERCENT
    mean, std = _pooled_moments(count, curves, m2)
    keep = _images_with_energy(count)
    original = _bandwidth_ratios(curves[keep], thresholds)
    bandwidth = sep_bandwidth(mean, thresholds)
    sep = {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "bandwidth": {threshold_key(t / 100): {"d": d, "ratio": r} for t, (d, r) in bandwidth.items()},
        "image_bandwidth": {
            threshold_key(t / 100): {"mean": float(original[:, c].mean()), "std": float(original[:, c].std())}
            for c, t in enumerate(thresholds)
        },
    }
    if permuted is not None:
        sums, counts, ratios = permuted
        natural = np.array([r for _, r in bandwidth.values()])
        summaries = {
            "per-image": _per_image_summary(original, _kept_permuted(ratios, keep), seed, thresholds),
            "pooled": _pooled_summary(_pooled_ratios(sums, counts, thresholds), natural, seed, thresholds),
        }
        sep["permutation_statistics"] = {
            name: {
                "statistic": name,
                "definition": SEP_STATISTIC_DEFINITIONS[name],
                "num_permutations": sums.shape[0],
                "num_images": int(keep.sum()),
                "bandwidth": {threshold_key(t / 100): stats for t, stats in summary.items()},
            }
            for name, summary in summaries.items()
        }
    return sep


def diagnose_layer(
    features: Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    center: bool = False,
    permutations: int = 0,
    num_pairs: int = 500,
    seed: int = 0,
) -> dict:
    """Every diagnostic of one layer `[I, N, C]` as JSON-serialisable python types.

    Shape: {"tokens", "channels", "svd_rank": {"0.8": rank_stats, ...}, "pca_rank": {same},
    "pca_spectrum": [C] cumulative eigen-energy, "energy_percentiles": {"median", "p10", "p1"} of the
    captured energy vs d over images ([C] each), "sep": {"mean", "std": [C] over all tokens,
    "bandwidth": {"0.5": {"d", "ratio"}, ...} of that pooled mean curve (the paper's number),
    "image_bandwidth": {"0.5": {"mean", "std"}, ...} over images of each image's own b_i = d_i/D,
    "permutation_statistics": {"per-image": block, "pooled": block} only if permutations > 0},
    "rotation": {"to_shared": {"0.9": {"overlap_mean", "overlap_median", "angle_mean_deg"}, "0.99": ...},
    "pairwise": {same, or {} with < 2 images}}}. A permutation block is {"statistic", "definition",
    "num_permutations", "num_images", "bandwidth": {"0.5": stats}}, stats as `sep_permutation_per_image`
    or, pooled, {"mean", "ci_low", "ci_high"} of `sep_permutation_bandwidths` plus "original_mean" (the
    natural-order ratio), "std_over_permutations" and "delta_mean", "delta_ci_low", "delta_ci_high"
    (mean and interval minus original_mean). Both come from the same permutations, so a caller (encmm
    diagnose --sep-statistic) picks one without recomputing. `center` subtracts each image's token mean
    before everything.
    """
    x = prepare(features, center)
    thresholds = check_thresholds(thresholds)
    values = layer_values(x, thresholds, num_pairs, seed)
    count, curves, m2 = image_sep_moments(x)
    permuted = permuted_sep_terms(x, permutations, seed) if permutations > 0 else None
    return layer_report(values, thresholds, x.shape[1], sep_report(count, curves, m2, permuted, seed))
