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

Ranks use a float64 Gram matrix of each image's smaller side and `torch.linalg.eigvalsh`: the squared
singular values, exact enough that the integer ranks equal a float64 SVD's (a float32 Gram is not;
stack.md).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
ROTATION_THRESHOLDS = (0.9, 0.99)
SEP_THRESHOLDS_PERCENT = (50, 60, 70, 80, 90)
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


def _sep_moments(tokens: Tensor, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and population std `[D]` of the SEP curves of all tokens with nonzero energy.

    Chunks are merged with Chan et al.'s pairwise update, stable where sum-of-squares is not.
    `order` permutes the channels first (the robustness check).
    """
    d = tokens.shape[-1]
    count, mean, m2 = 0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    mean, m2 = mean.to(tokens.device), m2.to(tokens.device)
    for chunk in tokens.split(max(1, _CHUNK_BYTES // (16 * d))):
        chunk = chunk.to(torch.float64)
        if order is not None:
            chunk = chunk[:, order]
        cumulative = torch.fft.fft(chunk, dim=-1).abs().square().cumsum(-1)
        total = cumulative[:, -1:]
        curves = 100.0 * cumulative[total[:, 0] > 0] / total[total[:, 0] > 0]
        if curves.shape[0] == 0:
            continue
        size, chunk_mean = curves.shape[0], curves.mean(0)
        delta = chunk_mean - mean
        merged = count + size
        mean = mean + delta * (size / merged)
        m2 = m2 + (curves - chunk_mean).square().sum(0) + delta.square() * (count * size / merged)
        count = merged
    if count == 0:
        raise ValueError("every token has zero energy: the SEP is undefined")
    return mean, (m2 / count).sqrt()


def sep_curves(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """SEP (paper.md, Diagnostics 3): per token x in R^D, e_k = |FFT(x)_k|^2 (full complex FFT, natural
    order) and curve[j] = 100 * sum_{k<=j} e_k / sum_k e_k; `[T, D]` -> (mean `[D]`, std `[D]`) over
    tokens, float64, population std. Tokens with zero energy have no curve and are skipped.
    """
    return _sep_moments(_check_tokens(tokens))


def sep_bandwidth(
    mean_curve: Tensor, thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT
) -> dict[float, tuple[int, float]]:
    """Bandwidth at t%: d = (first 0-based j with mean_curve[j] >= t) + 1, and d / D.

    `mean_curve` `[D]` in percent -> {t: (d, d / D)}. Same tolerance as ranks, in percent units.
    """
    curve = torch.as_tensor(mean_curve, dtype=torch.float64).reshape(-1)
    size = curve.numel()
    result = {}
    for t in thresholds_percent:
        d = min(int((curve < t - 100.0 * RANK_TOLERANCE).sum()) + 1, size)
        result[t] = (d, d / size)
    return result


def sep_permutation_bandwidths(
    tokens: Tensor,
    num_permutations: int,
    seed: int,
    thresholds_percent: Sequence[float] = SEP_THRESHOLDS_PERCENT,
) -> tuple[np.ndarray, dict[float, dict[str, float]]]:
    """SEP bandwidth ratio d/D under `num_permutations` seeded random channel orders.

    `tokens` `[T, D]` -> (ratios `[num_permutations, len(thresholds)]`, {t: {"mean", "ci_low",
    "ci_high"}}), the interval a 95% percentile bootstrap of the mean over permutations.
    """
    tokens = _check_tokens(tokens)
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    generator = torch.Generator().manual_seed(seed)
    ratios = np.empty((num_permutations, len(thresholds_percent)))
    for row in range(num_permutations):
        order = torch.randperm(tokens.shape[-1], generator=generator).to(tokens.device)
        bandwidth = sep_bandwidth(_sep_moments(tokens, order)[0], thresholds_percent)
        ratios[row] = [bandwidth[t][1] for t in thresholds_percent]
    resamples = np.random.default_rng(seed).integers(0, num_permutations, (_BOOTSTRAP_SAMPLES, num_permutations))
    boot_means = ratios[resamples].mean(1)  # [B, len(thresholds)]
    low, high = np.percentile(boot_means, [2.5, 97.5], axis=0)
    summary = {
        t: {"mean": float(ratios[:, col].mean()), "ci_low": float(low[col]), "ci_high": float(high[col])}
        for col, t in enumerate(thresholds_percent)
    }
    return ratios, summary


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
    captured energy vs d over images ([C] each), "sep": {"mean", "std", "bandwidth": {"0.5": {"d",
    "ratio"}, ...}, "permutation": {"num_permutations", "bandwidth": {"0.5": {"mean", "ci_low",
    "ci_high"}}} only if permutations > 0}, "rotation": {"to_shared": {"0.9": {"overlap_mean",
    "overlap_median", "angle_mean_deg"}, "0.99": ...}, "pairwise": {same, or {} with < 2 images}}}.
    `center` subtracts each image's token mean before everything.
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
        "sep": _sep_summary(x.reshape(-1, c), permutations, seed),
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


def _sep_summary(tokens: Tensor, permutations: int, seed: int) -> dict:
    mean, std = sep_curves(tokens)
    bandwidth = sep_bandwidth(mean)
    sep = {
        "mean": mean.tolist(),
        "std": std.tolist(),
        "bandwidth": {threshold_key(t / 100): {"d": d, "ratio": r} for t, (d, r) in bandwidth.items()},
    }
    if permutations > 0:
        _, summary = sep_permutation_bandwidths(tokens, permutations, seed)
        sep["permutation"] = {
            "num_permutations": permutations,
            "bandwidth": {threshold_key(t / 100): stats for t, stats in summary.items()},
        }
    return sep
