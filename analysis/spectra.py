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
stack.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

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
_CPU_BATCH_BYTES = 2 << 20
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


def _map_chunks(
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
        chunk = chunk.to(torch.float64)
        gram = chunk @ chunk.mT if n <= c else chunk.mT @ chunk
        # A NaN/inf entry makes its row's squared norm, a diagonal entry, NaN/inf.
        if not torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all():
            raise ValueError("features contain NaN or inf")
        return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0.0)

    return torch.cat(_map_chunks(spectrum, x, 8 * (n * c + min(n, c) ** 2), _batch_bytes(x)))


def _batch_bytes(x: Tensor) -> int:
    return _CPU_BATCH_BYTES if x.device.type == "cpu" else _DEVICE_BATCH_BYTES


def cumulative_energy(energies: Tensor) -> Tensor:
    """E_k = sum_{j<=k} e_j / sum_j e_j along the last dim, `[..., K]` -> `[..., K]` (last entry 1)."""
    cumulative = energies.to(torch.float64).cumsum(-1)
    total = cumulative[..., -1:]
    if (total <= 0).any():
        raise ValueError("an image has zero energy: its rank is undefined")
    return cumulative / total


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
    """Per-image SVD rank d_p(X_i), `[I, N, C]` -> `[I, P]` long."""
    return required_rank(cumulative_energy(energy_spectrum(features)), thresholds)


# --------------------------------------------------------------------------- 2. shared basis
def shared_basis(features: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of C = (1/T) sum_i X_i^T X_i (paper.md, Diagnostics 2), uncentered, float64.

    `[I, N, C]` -> (eigenvalues `[C]` descending, eigenvectors `[C, C]` as columns in the same order).
    """
    x = check_features(features)
    i, n, c = x.shape
    grams = _map_chunks(lambda ch: _token_gram(ch, c), x, 8 * n * c)
    second_moment = torch.stack(grams).sum(0) / (i * n)
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    return eigenvalues.flip(-1).clamp_min(0.0), eigenvectors.flip(-1)


def _token_gram(chunk: Tensor, c: int) -> Tensor:
    tokens = chunk.to(torch.float64).reshape(-1, c)
    return tokens.mT @ tokens


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

    energies = torch.cat(_map_chunks(captured, x, 8 * n * (c + basis.shape[-1])))
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

    return torch.cat(_map_chunks(bases, x, 8 * (n * c + min(n, c) ** 2 + c * k_max), _batch_bytes(x)))


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


def pairwise_rotation(
    features: Tensor, ranks: Tensor, num_pairs: int, seed: int, *, bases: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Rotation between images: a seeded sample of `num_pairs` pairs (i, j), i != j, uniform.

    Principal angles between the top-k right singular subspaces of X_i and X_j, k = min(ranks[i],
    ranks[j]) -> (overlap `[num_pairs]`, mean principal angle in degrees `[num_pairs]`).
    """
    x = check_features(features)
    i, n, c = x.shape
    if i < 2 or num_pairs < 1:
        raise ValueError(f"pairwise rotation needs >= 2 images and >= 1 pair, got {i} and {num_pairs}")
    k_all = _check_ranks(ranks, i, min(n, c)).to(x.device)
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, i, (num_pairs,), generator=generator)
    second = torch.randint(0, i - 1, (num_pairs,), generator=generator)
    second = second + (second >= first)  # uniform over j != i
    first, second = first.to(x.device), second.to(x.device)
    k = torch.minimum(k_all[first], k_all[second])
    k_max = int(k.max())
    if bases is None:
        bases = right_singular_bases(x, int(k_all.max()))
    # Pairs in chunks: gathering both bases of every pair at once would copy [num_pairs, C, k_max] twice.
    step = max(1, _CHUNK_BYTES // (16 * c * k_max))
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


def _image_sep_moments(
    x: Tensor, order: Tensor | None = None, with_spread: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per image of `[I, N, D]`, over its tokens with nonzero energy: (count `[I]`, mean SEP curve
    `[I, D]`, sum of squared deviations `[I, D]` or None), float64; an image with no such token has
    count 0 and a zero curve.

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


def _pooled_moments(count: Tensor, mean: Tensor, m2: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Merge per-image moments into the moments over all tokens: (mean `[D]`, population std `[D]`)."""
    total = count.sum()
    if total == 0:
        raise ValueError("every token has zero energy: the SEP is undefined")
    weight = count.unsqueeze(-1)
    pooled = (weight * mean).sum(0) / total
    if m2 is None:
        return pooled, None
    spread = m2.sum(0) + (weight * (mean - pooled).square()).sum(0)
    return pooled, (spread / total).sqrt()


def sep_curves(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """SEP (paper.md, Diagnostics 3): per token x in R^D, e_k = |FFT(x)_k|^2 (full complex FFT, natural
    order) and curve[j] = 100 * sum_{k<=j} e_k / sum_k e_k; `[T, D]` -> (mean `[D]`, std `[D]`) over
    tokens, float64, population std. Tokens with zero energy have no curve and are skipped.
    """
    return _pooled_moments(*_image_sep_moments(_check_tokens(tokens).unsqueeze(0)))


def sep_image_curves(features: Tensor) -> tuple[Tensor, Tensor]:
    """Image-level SEP curves: for each image the mean of its tokens' SEP curves (as `sep_curves`).

    `[I, N, D]` -> (curves `[I, D]` float64 in percent, token counts `[I]` long). Tokens with zero
    energy are skipped; an image with no other token has count 0 and a NaN curve.
    """
    count, mean, _ = _image_sep_moments(check_features(features), with_spread=False)
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
        count, mean, _ = _image_sep_moments(x, order, with_spread=False)
        yield count, mean


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
    `[T, D]` under `num_permutations` seeded random channel orders (`_permuted_image_curves`).

    Returns (ratios `[num_permutations, P]`, {t: {"mean", "ci_low", "ci_high"}}), the interval a 95%
    percentile bootstrap of the mean over permutations (resamples `default_rng(seed)`).
    """
    x = _check_tokens(tokens).unsqueeze(0)
    ratios = np.stack(
        [
            sep_dims(_pooled_moments(count, mean, None)[0], thresholds_percent).cpu().numpy() / x.shape[-1]
            for count, mean in _permuted_image_curves(x, num_permutations, seed)
        ]
    )
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


def _kept_ratios(curves: Tensor, keep: Tensor, thresholds_percent: Sequence[float]) -> np.ndarray:
    """b_i = d_i / D `[I', P]` of the kept images' curves `[I, D]`."""
    return sep_dims(curves[keep], thresholds_percent).cpu().numpy() / curves.shape[-1]


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
    p (`_permuted_image_curves`, the same seed as the pooled statistic) the same gives b_i^p(t).
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
    count, natural, _ = _image_sep_moments(x, with_spread=False)
    keep = _images_with_energy(count)
    original = _kept_ratios(natural, keep, thresholds_percent)
    permuted = np.stack(
        [
            _kept_ratios(curves, keep, thresholds_percent)
            for _, curves in _permuted_image_curves(x, num_permutations, seed)
        ]
    )
    return original, permuted, _per_image_summary(original, permuted, seed, thresholds_percent)


# ------------------------------------------------------------------------------ one layer
def _prepare(features: Tensor, center: bool) -> Tensor:
    x = check_features(features)
    return x - x.mean(dim=1, keepdim=True) if center else x


def layer_rank_arrays(
    features: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, center: bool = False
) -> dict[str, np.ndarray]:
    """Per-image ranks for histograms: {"svd_rank": `[I, P]`, "pca_rank": `[I, P]`} int64 arrays."""
    x = _prepare(features, center)
    return {
        "svd_rank": svd_rank(x, thresholds).cpu().numpy(),
        "pca_rank": pca_rank(x, thresholds).cpu().numpy(),
    }


def _rotation_summary(overlap: Tensor, angle: Tensor) -> dict[str, float]:
    return {
        "overlap_mean": float(overlap.mean()),
        "overlap_median": float(np.median(overlap.cpu().numpy())),
        "angle_mean_deg": float(angle.mean()),
    }


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
    x = _prepare(features, center)
    thresholds = check_thresholds(thresholds)
    i, n, c = x.shape
    all_p = sorted(set(thresholds) | set(ROTATION_THRESHOLDS))
    svd = svd_rank(x, all_p)
    eigenvalues, eigenvectors = shared_basis(x)
    captured = captured_energy(x, eigenvectors)
    pca = required_rank(captured, thresholds)
    result = {
        "tokens": n,
        "channels": c,
        "svd_rank": {threshold_key(p): rank_stats(svd[:, all_p.index(p)]) for p in thresholds},
        "pca_rank": {threshold_key(p): rank_stats(pca[:, col]) for col, p in enumerate(thresholds)},
        "pca_spectrum": cumulative_energy(eigenvalues).tolist(),
        "energy_percentiles": dict(
            zip(("median", "p10", "p1"), np.percentile(captured.cpu().numpy(), [50, 10, 1], axis=0).tolist())
        ),
        "sep": _sep_summary(x, permutations, seed),
    }
    rotation_ranks = {p: svd[:, all_p.index(p)] for p in ROTATION_THRESHOLDS}
    bases = right_singular_bases(x, int(max(r.max() for r in rotation_ranks.values())))
    to_shared, pairwise = {}, {}
    for p, ranks in rotation_ranks.items():
        to_shared[threshold_key(p)] = _rotation_summary(*rotation_to_shared(x, ranks, eigenvectors, bases=bases))
        if i >= 2 and num_pairs >= 1:
            pairs = pairwise_rotation(x, ranks, num_pairs, seed, bases=bases)
            pairwise[threshold_key(p)] = _rotation_summary(*pairs)
    result["rotation"] = {"to_shared": to_shared, "pairwise": pairwise}
    return result


def _sep_summary(x: Tensor, permutations: int, seed: int) -> dict:
    """The "sep" entry of `diagnose_layer` for `[I, N, D]`: one natural-order pass, one per permutation,
    both permutation statistics from the same passes (they differ only in how curves are averaged)."""
    thresholds = SEP_THRESHOLDS_PERCENT
    count, curves, m2 = _image_sep_moments(x)
    mean, std = _pooled_moments(count, curves, m2)
    keep = _images_with_energy(count)
    original = _kept_ratios(curves, keep, thresholds)
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
    if permutations > 0:
        pooled, permuted = [], []
        for counts, image_curves in _permuted_image_curves(x, permutations, seed):
            pooled.append(sep_dims(_pooled_moments(counts, image_curves, None)[0], thresholds).cpu().numpy())
            permuted.append(_kept_ratios(image_curves, keep, thresholds))
        natural = np.array([r for _, r in bandwidth.values()])
        summaries = {
            "per-image": _per_image_summary(original, np.stack(permuted), seed, thresholds),
            "pooled": _pooled_summary(np.stack(pooled) / x.shape[-1], natural, seed, thresholds),
        }
        sep["permutation_statistics"] = {
            name: {
                "statistic": name,
                "definition": SEP_STATISTIC_DEFINITIONS[name],
                "num_permutations": permutations,
                "num_images": int(keep.sum()),
                "bandwidth": {threshold_key(t / 100): stats for t, stats in summary.items()},
            }
            for name, summary in summaries.items()
        }
    return sep
