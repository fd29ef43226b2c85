"""Known-answer and property tests of analysis.spectra (paper.md, "Diagnostics")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from encmm.analysis import certified_ranks, spectra
from encmm.analysis.certified_ranks import (
    UNIT_ROUNDOFF,
    SpectrumBound,
    certified_svd_rank,
    gram_eigen_error,
    gram_spectrum,
    svd_spectrum,
)
from encmm.analysis.spectra import (
    RANK_TOLERANCE,
    SEP_STATISTICS,
    captured_energy,
    cumulative_energy,
    diagnose_layer,
    energy_spectrum,
    layer_rank_arrays,
    pairwise_rotation,
    pca_rank,
    principal_cosines,
    rank_stats,
    required_rank,
    rotation_to_shared,
    sep_bandwidth,
    sep_curves,
    sep_dims,
    sep_image_curves,
    sep_permutation_bandwidths,
    sep_permutation_per_image,
    shared_basis,
    subspace_overlap,
    svd_rank,
)

THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


# ------------------------------------------------------------------ float64 numpy references
def reference_rank(energies: np.ndarray, thresholds) -> list[int]:
    """d_p from energies in accumulation order: smallest k with E_k >= p (same tolerance)."""
    cumulative = np.cumsum(energies) / np.sum(energies)
    return [int(np.sum(cumulative < p - RANK_TOLERANCE)) + 1 for p in thresholds]


def reference_svd_ranks(x: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    return np.array(
        [reference_rank(np.linalg.svd(xi.astype(np.float64), compute_uv=False) ** 2, thresholds) for xi in x]
    )


def reference_shared_basis(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tokens = x.reshape(-1, x.shape[-1]).astype(np.float64)
    values, vectors = np.linalg.eigh(tokens.T @ tokens / tokens.shape[0])
    return values[::-1], vectors[:, ::-1]


def reference_pca_ranks(x: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    _, vectors = reference_shared_basis(x)
    return np.array([reference_rank(np.sum((xi.astype(np.float64) @ vectors) ** 2, axis=0), thresholds) for xi in x])


SEP_T = (50, 60, 70, 80, 90)


def reference_sep_image_curves(x: np.ndarray) -> np.ndarray:
    """Per image the mean over its nonzero tokens of 100 * cumsum(|fft(x)|^2) / sum, `[I, N, D]` -> `[I, D]`."""
    curves = []
    for image in x.astype(np.float64):
        tokens = []
        for token in image:
            energy = np.abs(np.fft.fft(token)) ** 2
            if energy.sum() > 0:
                tokens.append(100.0 * np.cumsum(energy) / energy.sum())
        curves.append(np.mean(tokens, axis=0))
    return np.array(curves)


def reference_sep_dims(curve: np.ndarray, thresholds=SEP_T) -> list[int]:
    """First 0-based j with curve[j] >= t (ranks' tolerance, in percent), plus 1."""
    return [next((j + 1 for j, v in enumerate(curve) if v >= t - 100 * RANK_TOLERANCE), len(curve)) for t in thresholds]


def reference_per_image_statistic(x: np.ndarray, num_permutations: int, seed: int, thresholds=SEP_T) -> dict:
    """The authors' per-image SEP permutation statistic, with loops. The random draws follow the
    documented protocol: orders from torch.randperm on a seeded generator, resamples from default_rng(seed)."""
    d = x.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(d, generator=generator).numpy() for _ in range(num_permutations)]
    dims = np.array([reference_sep_dims(c, thresholds) for c in reference_sep_image_curves(x)])
    permuted_dims = np.array(
        [[reference_sep_dims(c, thresholds) for c in reference_sep_image_curves(x[:, :, order])] for order in orders]
    )
    b, bp = dims / d, permuted_dims / d  # [I, P], [R, I, P]
    per_permutation = np.array(
        [[np.mean(bp[r, :, c]) for c in range(len(thresholds))] for r in range(num_permutations)]
    )
    mean_over_orders = bp.mean(0)  # [I, P]
    resamples = np.random.default_rng(seed).integers(0, x.shape[0], (1000, x.shape[0]))
    permuted_boot, delta_boot = [], []
    for rows in resamples:
        permuted_term = np.mean([mean_over_orders[i] for i in rows], axis=0)
        permuted_boot.append(permuted_term)
        delta_boot.append(permuted_term - np.mean([b[i] for i in rows], axis=0))
    summary = {}
    for c, t in enumerate(thresholds):
        mean = per_permutation[:, c].mean()
        summary[t] = {
            "mean": mean,
            "std_over_permutations": per_permutation[:, c].std(),
            "original_mean": b[:, c].mean(),
            "original_std": b[:, c].std(),
            "delta_mean": mean - b[:, c].mean(),
            "ci_low": np.percentile([v[c] for v in permuted_boot], 2.5),
            "ci_high": np.percentile([v[c] for v in permuted_boot], 97.5),
            "delta_ci_low": np.percentile([v[c] for v in delta_boot], 2.5),
            "delta_ci_high": np.percentile([v[c] for v in delta_boot], 97.5),
        }
    return {"dims": dims, "permuted_dims": permuted_dims, "summary": summary}


# ---------------------------------------------------------------------------- feature makers
def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q


def union_of_subspaces(rng, ranks, tokens, channels, spectrum=None) -> np.ndarray:
    """Image i = U_i diag(s) V_i^T with its own random rank-r_i subspace; flat spectrum by default."""
    images = []
    for r in ranks:
        s = np.ones(r) if spectrum is None else spectrum[:r]
        images.append(orthonormal(rng, tokens, r) @ np.diag(s) @ orthonormal(rng, channels, r).T)
    return np.stack(images)


def realistic(rng, images, tokens, channels, rank=6, noise=0.05) -> np.ndarray:
    shared = rng.standard_normal((rank, channels))
    own = rng.standard_normal((images, rank, channels)) * 0.5
    return rng.standard_normal((images, tokens, rank)) @ (shared + own) + noise * rng.standard_normal(
        (images, tokens, channels)
    )


def coloured_images(rng, images, tokens, channels) -> np.ndarray:
    """Images with spectra of their own: a random walk along channels (red) mixed with white noise in a
    per-image proportion, plus a per-image offset; one token of image 1 is zero (no SEP curve)."""
    walk = np.cumsum(rng.standard_normal((images, tokens, channels)), axis=-1)
    mix = rng.uniform(0.0, 1.0, (images, 1, 1))
    x = mix * walk + (1 - mix) * 3 * rng.standard_normal((images, tokens, channels))
    x = x + rng.standard_normal((images, 1, 1))
    x[1, 2] = 0.0
    return x


def flat_and_white_images(rng, images, tokens, channels) -> np.ndarray:
    """Half the images constant tokens (all energy at frequency 0: d = 1 at every t), half white noise
    (d ~ t D): the pooled mean curve reaches 90% near d/D = 0.8, the mean of per-image bandwidths near 0.45."""
    flat = np.ones((images // 2, tokens, channels)) * rng.uniform(1, 2, (images // 2, tokens, 1))
    white = rng.standard_normal((images - images // 2, tokens, channels))
    return np.concatenate([flat, white])


def ill_conditioned(rng, images, tokens, channels, condition=1e8) -> np.ndarray:
    k = min(tokens, channels)
    spectrum = np.logspace(0, -math.log10(condition), k)
    return union_of_subspaces(rng, [k] * images, tokens, channels, spectrum)


# ------------------------------------------------------------------------------------ 1. SVD
@pytest.mark.parametrize("rank", [1, 3, 5, 10, 12])
def test_svd_rank_of_flat_rank_r_images_is_ceil_of_p_times_r(rank):
    x = union_of_subspaces(np.random.default_rng(rank), [rank] * 3, 24, 40)
    # E_k = k / r exactly: 4/5 reaches 0.8 despite round-off, thanks to the documented tolerance.
    expected = [math.ceil(p * rank - 1e-9) for p in THRESHOLDS]
    assert svd_rank(torch.from_numpy(x), THRESHOLDS).tolist() == [expected] * 3


def test_union_of_low_rank_subspaces_has_exact_svd_rank_but_large_pca_rank():
    ranks = [3, 5, 4, 6, 2, 5, 3, 4, 6, 5, 4, 3]
    x = union_of_subspaces(np.random.default_rng(0), ranks, 32, 64)
    svd = svd_rank(torch.from_numpy(x), (0.99,))[:, 0]
    pca = pca_rank(torch.from_numpy(x), (0.99,))[:, 0]
    assert svd.tolist() == ranks
    # The shared basis spans all 50 directions with similar weight: no image is captured early.
    assert (pca >= 3 * torch.tensor(ranks)).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal((20, 16, 40)),
        lambda rng: rng.standard_normal((20, 40, 16)),
        lambda rng: realistic(rng, 30, 24, 48),
        lambda rng: realistic(rng, 30, 64, 24).astype(np.float32),
        lambda rng: ill_conditioned(rng, 10, 20, 30, 1e8),
        lambda rng: ill_conditioned(rng, 10, 30, 20, 1e12),
        lambda rng: union_of_subspaces(rng, [1, 2, 7, 15], 16, 48).astype(np.float32),
    ],
    ids=[
        "gaussian-wide",
        "gaussian-tall",
        "low-rank-noise",
        "low-rank-noise-f32",
        "cond-1e8",
        "cond-1e12",
        "union-f32",
    ],
)
def test_svd_rank_matches_numpy_reference_exactly(make):
    x = make(np.random.default_rng(7))
    assert (svd_rank(torch.from_numpy(x), THRESHOLDS).numpy() == reference_svd_ranks(x)).all()


def test_energy_spectrum_equals_squared_singular_values_descending():
    x = realistic(np.random.default_rng(1), 8, 12, 20)
    expected = np.stack([np.linalg.svd(xi, compute_uv=False) ** 2 for xi in x])
    got = energy_spectrum(torch.from_numpy(x))
    assert got.dtype == torch.float64 and got.shape == (8, 12)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9 * expected.max())


def test_energy_spectrum_is_the_same_in_many_small_chunks(monkeypatch):
    x = torch.from_numpy(realistic(np.random.default_rng(2), 25, 10, 14))
    whole = energy_spectrum(x)
    monkeypatch.setattr(spectra, "CPU_BATCH_BYTES", 1)  # one image per chunk, run on a thread pool
    assert torch.equal(energy_spectrum(x), whole)


def test_required_rank_counts_energy_equal_to_threshold_as_reached():
    cumulative = torch.tensor([[0.1 + 0.7, 0.95, 1.0], [0.5, 0.8999999, 1.0]], dtype=torch.float64)
    assert 0.1 + 0.7 < 0.8  # round-off puts it just below, yet it counts; 0.8999999 is genuinely short
    assert required_rank(cumulative, (0.8, 0.9, 0.95)).tolist() == [[1, 2, 2], [2, 3, 3]]


def test_required_rank_known_answers():
    cumulative = torch.tensor([0.5, 0.8, 0.95, 1.0], dtype=torch.float64)
    assert required_rank(cumulative, THRESHOLDS).tolist() == [2, 3, 3, 4]


images_strategy = st.integers(1, 3).flatmap(
    lambda i: st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
        lambda nc: hnp.arrays(np.float64, (i, *nc), elements=st.integers(-6, 6).map(float))
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=images_strategy, seed=st.integers(0, 2**31 - 1))
def test_svd_rank_properties_bounds_monotone_rotation_invariant_and_below_pca(x, seed):
    x = x[np.abs(x).sum(axis=(1, 2)) > 0]  # a zero image has no rank
    if x.shape[0] == 0:
        return
    features = torch.from_numpy(x)
    ranks = svd_rank(features, THRESHOLDS)
    assert ((ranks >= 1) & (ranks <= min(x.shape[1:]))).all()
    assert (ranks.diff(dim=-1) >= 0).all()  # non-decreasing in p
    assert (ranks.numpy() == reference_svd_ranks(x)).all()
    rotation = torch.from_numpy(orthonormal(np.random.default_rng(seed), x.shape[2], x.shape[2]))
    assert torch.equal(svd_rank(features @ rotation, THRESHOLDS), ranks)
    # Eckart-Young: no fixed basis captures an image's energy with fewer directions than its own SVD.
    assert (pca_rank(features, THRESHOLDS) >= ranks).all()


# ------------------------------------------------------------------------------------ 2. PCA
def test_shared_basis_matches_numpy_second_moment():
    x = realistic(np.random.default_rng(3), 10, 16, 24)
    values, vectors = shared_basis(torch.from_numpy(x))
    expected_values, expected_vectors = reference_shared_basis(x)
    np.testing.assert_allclose(values.numpy(), np.clip(expected_values, 0, None), rtol=1e-9, atol=1e-12)
    # Eigenvectors agree up to sign.
    np.testing.assert_allclose(np.abs(np.sum(vectors.numpy() * expected_vectors, 0)), 1.0, atol=1e-6)


def test_captured_energy_is_cumulative_fraction_ending_at_one():
    x = realistic(np.random.default_rng(4), 6, 10, 12)
    _, vectors = reference_shared_basis(x)
    expected = np.cumsum(np.sum((x @ vectors) ** 2, axis=1), axis=1) / np.sum(x**2, axis=(1, 2))[:, None]
    got = captured_energy(torch.from_numpy(x), torch.from_numpy(vectors.copy()))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(got[:, -1].numpy(), 1.0, rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pca_rank_matches_numpy_reference_exactly(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([realistic(rng, 20, 16, 24), ill_conditioned(rng, 5, 16, 24, 1e6)])
    assert (pca_rank(torch.from_numpy(x), THRESHOLDS).numpy() == reference_pca_ranks(x)).all()


def test_rank_stats_known_answers_use_numpy_linear_percentiles():
    stats = rank_stats(torch.arange(1, 101))
    assert stats == pytest.approx(
        {"p99": 99.01, "mean": 50.5, "median": 50.5, "std": math.sqrt((100**2 - 1) / 12), "q25": 25.75, "q75": 75.25}
    )
    assert all(type(v) is float for v in stats.values())


# ------------------------------------------------------------------------------- 3. rotation
def rotated_copy(rng, channels, k, angles_deg):
    """An orthonormal basis A [C, k] and B, A with its last len(angles) columns turned out of span(A)."""
    full = orthonormal(rng, channels, k + len(angles_deg))
    a, outside = full[:, :k], full[:, k:]
    b = a.copy()
    for col, (theta, w) in enumerate(zip(np.deg2rad(angles_deg), outside.T)):
        b[:, k - 1 - col] = math.cos(theta) * a[:, k - 1 - col] + math.sin(theta) * w
    return a, b


def test_principal_cosines_of_rotated_copy_are_cosines_of_known_angles():
    angles = [10.0, 35.0, 80.0]
    a, b = rotated_copy(np.random.default_rng(5), 20, 6, angles)
    cosines = principal_cosines(torch.from_numpy(a), torch.from_numpy(b))
    expected = sorted([1.0] * 3 + [math.cos(math.radians(t)) for t in angles], reverse=True)
    np.testing.assert_allclose(cosines.numpy(), expected, atol=1e-12)
    assert subspace_overlap(cosines).item() == pytest.approx(np.mean(np.square(expected)))


def test_subspace_overlap_of_random_subspaces_is_near_k_over_c():
    rng = np.random.default_rng(6)
    a = torch.from_numpy(np.stack([orthonormal(rng, 32, 4) for _ in range(400)]))
    b = torch.from_numpy(np.stack([orthonormal(rng, 32, 4) for _ in range(400)]))
    assert subspace_overlap(principal_cosines(a, b)).mean().item() == pytest.approx(4 / 32, abs=0.01)


@pytest.mark.parametrize("tokens", [10, 40])  # fewer tokens than channels, and more
def test_rotation_to_shared_recovers_known_angle_per_image(tokens):
    rng = np.random.default_rng(tokens)
    channels, k, angles = 24, 4, [0.0, 15.0, 45.0, 90.0]
    shared = orthonormal(rng, channels, channels)
    images = []
    for theta in angles:
        a, b = rotated_copy_against(shared, k, theta)
        spectrum = np.diag([4.0, 3.0, 2.0, 1.0])
        images.append(orthonormal(rng, tokens, k) @ spectrum @ b.T)
    x = torch.from_numpy(np.stack(images))
    overlap, angle = rotation_to_shared(x, torch.full((4,), k), torch.from_numpy(shared))
    cos2 = np.cos(np.deg2rad(angles)) ** 2
    np.testing.assert_allclose(overlap.numpy(), (k - 1 + cos2) / k, atol=1e-9)
    np.testing.assert_allclose(angle.numpy(), np.array(angles) / k, atol=1e-5)


def rotated_copy_against(shared, k, theta_deg):
    """span(shared[:, :k]) with its k-th direction turned by theta towards shared[:, k]."""
    theta = math.radians(theta_deg)
    a = shared[:, :k]
    b = a.copy()
    b[:, k - 1] = math.cos(theta) * a[:, k - 1] + math.sin(theta) * shared[:, k]
    return a, b


def test_rotation_uses_each_images_own_rank():
    rng = np.random.default_rng(8)
    shared = orthonormal(rng, 16, 16)
    # Image 0 lives in the shared top-2, image 1 in the shared top-5: both overlap 1 at their own k.
    x = np.stack(
        [orthonormal(rng, 12, 2) @ shared[:, :2].T, orthonormal(rng, 12, 5) @ shared[:, :5].T]
        + [orthonormal(rng, 12, 3) @ shared[:, 8:11].T]  # orthogonal to the shared top-3
    )
    overlap, angle = rotation_to_shared(torch.from_numpy(x), torch.tensor([2, 5, 3]), torch.from_numpy(shared))
    np.testing.assert_allclose(overlap.numpy(), [1.0, 1.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(angle.numpy(), [0.0, 0.0, 90.0], atol=1e-5)


def test_pairwise_rotation_samples_distinct_images_only():
    rng = np.random.default_rng(9)
    basis = orthonormal(rng, 16, 16)
    # Four images in mutually orthogonal subspaces: any pair i != j has overlap 0, i == j would give 1.
    x = torch.from_numpy(np.stack([orthonormal(rng, 20, 4) @ basis[:, 4 * i : 4 * i + 4].T for i in range(4)]))
    overlap, angle = pairwise_rotation(x, torch.full((4,), 4), num_pairs=200, seed=0)
    assert overlap.shape == (200,)
    np.testing.assert_allclose(overlap.numpy(), 0.0, atol=1e-9)
    np.testing.assert_allclose(angle.numpy(), 90.0, atol=1e-5)


def test_pairwise_rotation_uses_min_rank_and_is_seeded():
    rng = np.random.default_rng(10)
    basis = orthonormal(rng, 16, 16)
    # Image 1 holds image 0's 2-D subspace plus 3 more directions: at k = min(2, 5) they coincide.
    x = torch.from_numpy(
        np.stack(
            [
                orthonormal(rng, 20, 2) @ np.diag([2.0, 1.0]) @ basis[:, :2].T,
                orthonormal(rng, 20, 5) @ np.diag([5.0, 4.0, 3.0, 2.0, 1.0]) @ basis[:, [0, 1, 5, 6, 7]].T,
            ]
        )
    )
    ranks = torch.tensor([2, 5])
    overlap, _ = pairwise_rotation(x, ranks, num_pairs=10, seed=3)
    np.testing.assert_allclose(overlap.numpy(), 1.0, atol=1e-9)
    y = torch.from_numpy(realistic(rng, 12, 20, 16))
    first = pairwise_rotation(y, svd_rank(y, (0.9,))[:, 0], num_pairs=50, seed=1)
    again = pairwise_rotation(y, svd_rank(y, (0.9,))[:, 0], num_pairs=50, seed=1)
    assert torch.equal(first[0], again[0])


# ------------------------------------------------------------------------------------ 4. SEP
def test_sep_of_white_tokens_lies_on_the_diagonal():
    tokens = torch.from_numpy(np.random.default_rng(11).standard_normal((20000, 64)))
    mean, std = sep_curves(tokens)
    diagonal = 100.0 * np.arange(1, 65) / 64
    assert np.abs(mean.numpy() - diagonal).max() < 1.0
    assert std[-1].item() < 1e-9 and std[32].item() > 1.0
    assert sep_bandwidth(mean)[90][1] == pytest.approx(0.9, abs=2 / 64)


def test_sep_of_constant_tokens_has_all_energy_at_frequency_zero():
    tokens = torch.full((5, 32), 3.0)
    mean, std = sep_curves(tokens)
    np.testing.assert_allclose(mean.numpy(), 100.0)
    np.testing.assert_allclose(std.numpy(), 0.0, atol=1e-12)
    assert sep_bandwidth(mean) == {t: (1, 1 / 32) for t in (50, 60, 70, 80, 90)}


def test_sep_of_a_pure_tone_splits_energy_between_k_and_d_minus_k():
    d, k0 = 32, 5
    tokens = torch.cos(2 * math.pi * k0 * torch.arange(d, dtype=torch.float64) / d).reshape(1, d)
    mean, _ = sep_curves(tokens)
    expected = np.where(np.arange(d) < k0, 0.0, np.where(np.arange(d) < d - k0, 50.0, 100.0))
    np.testing.assert_allclose(mean.numpy(), expected, atol=1e-9)
    assert sep_bandwidth(mean, (50, 60)) == {50: (k0 + 1, (k0 + 1) / d), 60: (d - k0 + 1, (d - k0 + 1) / d)}


def test_sep_skips_tokens_with_zero_energy():
    white = np.random.default_rng(12).standard_normal((100, 16))
    with_zeros = np.concatenate([white, np.zeros((40, 16))])
    for got, want in zip(sep_curves(torch.from_numpy(with_zeros)), sep_curves(torch.from_numpy(white))):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)


def test_sep_mean_and_std_match_numpy_reference_across_chunks(monkeypatch):
    tokens = np.random.default_rng(13).standard_normal((300, 24)) + 2.0
    energy = np.abs(np.fft.fft(tokens, axis=-1)) ** 2
    curves = 100 * np.cumsum(energy, -1) / energy.sum(-1, keepdims=True)
    monkeypatch.setattr(spectra, "_CHUNK_BYTES", 16 * 24 * 7)  # 7 tokens per chunk
    mean, std = sep_curves(torch.from_numpy(tokens))
    np.testing.assert_allclose(mean.numpy(), curves.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std.numpy(), curves.std(0), rtol=1e-9, atol=1e-9)


def test_sep_bandwidth_changes_under_channel_permutation_while_svd_rank_does_not():
    # SEP depends on channel order (a permuted tone is no tone); the SVD rank does not.
    d, k0 = 32, 2
    tone = torch.cos(2 * math.pi * k0 * torch.arange(d, dtype=torch.float64) / d)
    tokens = tone * torch.linspace(1, 2, 50, dtype=torch.float64).unsqueeze(-1)
    ratios, summary = sep_permutation_bandwidths(tokens, num_permutations=8, seed=0, thresholds_percent=(50,))
    assert sep_bandwidth(sep_curves(tokens)[0], (50,))[50][1] == (k0 + 1) / d
    assert (ratios[:, 0] > (k0 + 1) / d).all()
    assert summary[50]["ci_low"] <= summary[50]["mean"] <= summary[50]["ci_high"]
    permuted = tokens[:, torch.randperm(d)]
    assert torch.equal(svd_rank(tokens.unsqueeze(0)), svd_rank(permuted.unsqueeze(0)))


def test_sep_permutation_of_constant_tokens_keeps_bandwidth_one_and_is_seeded():
    tokens = torch.full((10, 16), 2.0)
    ratios, summary = sep_permutation_bandwidths(tokens, num_permutations=5, seed=4)
    np.testing.assert_allclose(ratios, 1 / 16)
    assert summary[90] == {"mean": 1 / 16, "ci_low": 1 / 16, "ci_high": 1 / 16}
    white = torch.from_numpy(np.random.default_rng(14).standard_normal((200, 32)))
    first = sep_permutation_bandwidths(white, 6, seed=1)
    again = sep_permutation_bandwidths(white, 6, seed=1)
    np.testing.assert_array_equal(first[0], again[0])
    assert first[1] == again[1]


# Block sizes: whole images (default), 3 whole images per block, 2 tokens per block (images split).
@pytest.mark.parametrize("chunk_bytes", [None, 16 * 5 * 16 * 3, 16 * 16 * 2])
def test_sep_per_image_statistic_matches_float64_numpy_reference(monkeypatch, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(spectra, "_CHUNK_BYTES", chunk_bytes)
    x = coloured_images(np.random.default_rng(20), 7, 5, 16)
    want = reference_per_image_statistic(x, num_permutations=4, seed=3)
    curves, counts = sep_image_curves(torch.from_numpy(x))
    np.testing.assert_allclose(curves.numpy(), reference_sep_image_curves(x), rtol=0, atol=1e-9)
    assert counts.tolist() == [5, 4, 5, 5, 5, 5, 5]
    assert sep_dims(curves).tolist() == want["dims"].tolist()
    original, permuted, summary = sep_permutation_per_image(torch.from_numpy(x), num_permutations=4, seed=3)
    assert (original * 16).round().astype(int).tolist() == want["dims"].tolist()  # exact dims
    assert (permuted * 16).round().astype(int).tolist() == want["permuted_dims"].tolist()
    assert set(summary) == set(SEP_T)
    for t in SEP_T:
        assert set(summary[t]) == set(want["summary"][t])
        for key, value in want["summary"][t].items():
            assert summary[t][key] == pytest.approx(value, abs=1e-9), (t, key)
    assert len({summary[t]["original_mean"] for t in SEP_T}) > 1 and np.unique(want["dims"][:, -1]).size > 1


def test_sep_per_image_statistic_is_seeded():
    x = torch.from_numpy(coloured_images(np.random.default_rng(21), 6, 4, 12))
    first = sep_permutation_per_image(x, 5, seed=7)
    again = sep_permutation_per_image(x, 5, seed=7)
    other = sep_permutation_per_image(x, 5, seed=8)
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2]
    np.testing.assert_array_equal(first[0], other[0])  # natural order does not depend on the seed
    assert not np.array_equal(first[1], other[1])


def test_per_image_and_pooled_statistics_differ_when_images_have_different_spectra():
    x = torch.from_numpy(flat_and_white_images(np.random.default_rng(22), 10, 64, 32))
    result = diagnose_layer(x, permutations=4, num_pairs=0, seed=0)
    sep = result["sep"]
    # Pooled mean curve = (100 + diagonal) / 2 reaches 90% at d/D ~ 0.8; per image: 1/D or ~0.9.
    assert sep["bandwidth"]["0.9"]["ratio"] == pytest.approx(0.8, abs=0.07)
    assert sep["image_bandwidth"]["0.9"]["mean"] == pytest.approx((1 / 32 + 0.9) / 2, abs=0.05)
    blocks = sep["permutation_statistics"]
    assert [blocks[name]["statistic"] for name in SEP_STATISTICS] == list(SEP_STATISTICS)
    per_image, pooled = blocks["per-image"]["bandwidth"]["0.9"], blocks["pooled"]["bandwidth"]["0.9"]
    assert per_image["original_mean"] == sep["image_bandwidth"]["0.9"]["mean"]
    assert pooled["original_mean"] == sep["bandwidth"]["0.9"]["ratio"]
    assert pooled["mean"] - per_image["mean"] > 0.25  # the choice of statistic matters


def test_diagnose_layer_permutation_blocks_equal_the_standalone_functions():
    x = coloured_images(np.random.default_rng(23), 6, 8, 16)
    blocks = diagnose_layer(torch.from_numpy(x), permutations=5, num_pairs=0, seed=2)["sep"]["permutation_statistics"]
    _, _, per_image = sep_permutation_per_image(torch.from_numpy(x), 5, seed=2)
    _, pooled = sep_permutation_bandwidths(torch.from_numpy(x.reshape(-1, 16)), 5, seed=2)
    natural = sep_bandwidth(sep_curves(torch.from_numpy(x.reshape(-1, 16)))[0])
    assert blocks["per-image"]["num_images"] == 6 and blocks["pooled"]["num_permutations"] == 5
    for t in SEP_T:
        key = spectra.threshold_key(t / 100)
        assert blocks["per-image"]["bandwidth"][key] == pytest.approx(per_image[t], abs=1e-12)
        got = blocks["pooled"]["bandwidth"][key]
        assert {k: got[k] for k in pooled[t]} == pytest.approx(pooled[t], abs=1e-12)
        assert got["original_mean"] == natural[t][1]
        assert got["delta_mean"] == pytest.approx(got["mean"] - got["original_mean"], abs=1e-12)


def test_per_image_sep_of_white_tokens_is_on_the_diagonal_and_permutations_change_nothing():
    x = torch.from_numpy(np.random.default_rng(24).standard_normal((40, 64, 64)))
    original, permuted, summary = sep_permutation_per_image(x, num_permutations=10, seed=5)
    for t in SEP_T:
        assert summary[t]["original_mean"] == pytest.approx(t / 100, abs=2 / 64)
        assert summary[t]["mean"] == pytest.approx(t / 100, abs=2 / 64)
        assert summary[t]["delta_ci_low"] <= 0.0 <= summary[t]["delta_ci_high"], (t, summary[t])
        assert summary[t]["delta_ci_high"] - summary[t]["delta_ci_low"] < 0.02
        assert summary[t]["ci_low"] <= summary[t]["mean"] <= summary[t]["ci_high"]
    assert original.shape == (40, 5) and permuted.shape == (10, 40, 5)


def test_per_image_sep_leaves_out_images_without_energy():
    x = coloured_images(np.random.default_rng(25), 5, 4, 8)
    with_zero = np.concatenate([x, np.zeros((1, 4, 8))])
    curves, counts = sep_image_curves(torch.from_numpy(with_zero))
    assert counts.tolist()[-1] == 0 and torch.isnan(curves[-1]).all()
    got = sep_permutation_per_image(torch.from_numpy(with_zero), 3, seed=1)
    want = sep_permutation_per_image(torch.from_numpy(x), 3, seed=1)
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="zero energy"):
        sep_permutation_per_image(torch.zeros(2, 3, 4), 3, seed=1)
    with pytest.raises(ValueError, match="num_permutations"):
        sep_permutation_per_image(torch.from_numpy(x), 0, seed=1)


# --------------------------------------------------------------------------------- one layer
def test_diagnose_layer_round_trips_through_json_with_the_documented_shape():
    x = torch.from_numpy(realistic(np.random.default_rng(15), 12, 16, 24).astype(np.float32))
    result = diagnose_layer(x, permutations=3, num_pairs=20, seed=0)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert set(result) == {
        "tokens",
        "channels",
        "svd_rank",
        "pca_rank",
        "pca_spectrum",
        "energy_percentiles",
        "sep",
        "rotation",
    }
    assert (result["tokens"], result["channels"]) == (16, 24)
    assert list(result["svd_rank"]) == ["0.8", "0.9", "0.95", "0.99"] == list(result["pca_rank"])
    assert set(result["svd_rank"]["0.99"]) == {"p99", "mean", "median", "std", "q25", "q75"}
    assert len(result["pca_spectrum"]) == 24 and result["pca_spectrum"][-1] == pytest.approx(1.0)
    assert {k: len(v) for k, v in result["energy_percentiles"].items()} == {"median": 24, "p10": 24, "p1": 24}
    assert list(result["sep"]["bandwidth"]) == ["0.5", "0.6", "0.7", "0.8", "0.9"]
    assert set(result["sep"]["bandwidth"]["0.9"]) == {"d", "ratio"}
    assert list(result["sep"]["image_bandwidth"]) == list(result["sep"]["bandwidth"])
    blocks = result["sep"]["permutation_statistics"]
    assert list(blocks) == list(SEP_STATISTICS) and all(b["num_permutations"] == 3 for b in blocks.values())
    assert set(blocks["per-image"]["bandwidth"]["0.9"]) == {
        "mean",
        "ci_low",
        "ci_high",
        "original_mean",
        "original_std",
        "std_over_permutations",
        "delta_mean",
        "delta_ci_low",
        "delta_ci_high",
    }
    for kind in ("to_shared", "pairwise"):
        assert set(result["rotation"][kind]) == {"0.9", "0.99"}
        assert set(result["rotation"][kind]["0.9"]) == {"overlap_mean", "overlap_median", "angle_mean_deg"}
    expected = reference_svd_ranks(x.numpy())[:, -1]
    assert result["svd_rank"]["0.99"]["p99"] == pytest.approx(np.percentile(expected, 99))


def test_diagnose_layer_of_a_single_image_has_no_pairwise_rotation():
    x = torch.from_numpy(realistic(np.random.default_rng(16), 1, 8, 12))
    result = diagnose_layer(x)
    assert result["rotation"]["pairwise"] == {} and "permutation_statistics" not in result["sep"]
    assert set(result["rotation"]["to_shared"]) == {"0.9", "0.99"}


def test_center_removes_each_images_token_mean_before_ranks():
    rng = np.random.default_rng(17)
    images = []
    for _ in range(3):
        left = orthonormal(rng, 20, 4)
        left = left - left.mean(0)  # zero-mean token coordinates: centering leaves this part intact
        right = orthonormal(rng, 30, 5)
        # The same offset on every token: a fifth direction with energy comparable to the other four.
        images.append(left @ right[:, :4].T + right[:, 4] / math.sqrt(20))
    x = torch.from_numpy(np.stack(images))
    assert (layer_rank_arrays(x, (0.99,), center=True)["svd_rank"][:, 0] == 4).all()
    assert (layer_rank_arrays(x, (0.99,))["svd_rank"][:, 0] == 5).all()
    arrays = layer_rank_arrays(x, THRESHOLDS)
    assert arrays["svd_rank"].shape == arrays["pca_rank"].shape == (3, 4)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "features, thresholds, message",
    [
        (np.ones((4, 5)), THRESHOLDS, "3-D"),
        (np.ones((2, 4, 5, 6)), THRESHOLDS, "3-D"),
        (np.ones((0, 4, 5)), THRESHOLDS, "empty"),
        (np.full((2, 4, 5), np.nan), THRESHOLDS, "NaN"),
        (np.full((2, 4, 5), np.inf), THRESHOLDS, "NaN or inf"),
        (np.ones((2, 4, 5)), (0.0, 0.5), r"\(0, 1\)"),
        (np.ones((2, 4, 5)), (0.5, 1.0), r"\(0, 1\)"),
        (np.ones((2, 4, 5)), (1.5,), r"\(0, 1\)"),
        (np.ones((2, 4, 5)), (), "empty"),
        (np.zeros((2, 4, 5)), THRESHOLDS, "zero energy"),
    ],
)
def test_bad_input_raises_value_error_with_one_line(features, thresholds, message):
    for compute in (svd_rank, pca_rank, lambda x, p: diagnose_layer(x, p)):
        with pytest.raises(ValueError, match=message) as error:
            compute(features, thresholds)
        assert "\n" not in str(error.value)


def test_sep_rejects_bad_tokens():
    with pytest.raises(ValueError, match="2-D"):
        sep_curves(torch.ones(3, 4, 5))
    with pytest.raises(ValueError, match="zero energy"):
        sep_curves(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        sep_curves(torch.tensor([[1.0, float("nan")]]))


def test_rotation_rejects_ranks_outside_the_matrix():
    x = torch.ones(2, 3, 4)
    with pytest.raises(ValueError, match="ranks"):
        rotation_to_shared(x, torch.tensor([1, 4]), torch.eye(4))


# ------------------------------------------------------------------- 1b. certified fast ranks
def reference_ranks(x: torch.Tensor, thresholds=THRESHOLDS) -> torch.Tensor:
    """The reference method, spelled out: float64 Gram + eigvalsh on x's device."""
    return required_rank(cumulative_energy(energy_spectrum(x)), thresholds)


def float64_svd(chunk: torch.Tensor, energy: torch.Tensor):
    """The GPU path's certificate (`ritz_spectrum`) around LAPACK's float64 SVD on the CPU."""
    return svd_spectrum(chunk, energy, driver=None)


def perturbed_spectrum(size: float, claimed: float = 1.0, seed: int = 0):
    """A deliberately inaccurate stand-in: the reference's energies moved by up to `size` * ||X||_F^2 each, at
    random, then sorted. It claims `claimed` times its true bound (that error plus the reference's own)."""

    def fast(chunk: torch.Tensor, energy: torch.Tensor) -> SpectrumBound:
        exact = energy_spectrum(chunk)
        generator = torch.Generator().manual_seed(seed + chunk.shape[0])
        shift = (torch.rand(exact.shape, generator=generator, dtype=torch.float64) * 2 - 1) * size * energy[:, None]
        energies = (exact + shift).clamp_min(0.0).sort(-1, descending=True).values
        own = gram_eigen_error(energy, max(chunk.shape[1:]), min(chunk.shape[1:]), UNIT_ROUNDOFF[torch.float64])
        return SpectrumBound(energies, claimed * (size * energy + own))

    return fast


def refusing(fast):
    """`fast`, except that it refuses any chunk holding a rank-deficient image, as cuSOLVER's gesvda does."""

    def run(chunk: torch.Tensor, energy: torch.Tensor) -> SpectrumBound:
        if (torch.linalg.matrix_rank(chunk.double()) < min(chunk.shape[1:])).any():
            raise torch.linalg.LinAlgError(
                "linalg.svd: (Batch element 3): The algorithm failed to converge because the input matrix is "
                "ill-conditioned or has too many repeated singular values (error code: 102)."
            )
        return fast(chunk, energy)

    return run


def knife_edge_images(dtype=np.float64) -> np.ndarray:
    """Flat spectra of rank 5, 10 and 20: E_k = k / r equals 0.8, 0.9 and 0.95 exactly."""
    return union_of_subspaces(np.random.default_rng(30), [5, 10, 20] * 4, 24, 40).astype(dtype)


STAND_INS = {
    "float32-gram": gram_spectrum,
    "float64-svd-ritz": float64_svd,
    "perturbed-1e-3": perturbed_spectrum(1e-3),
}


@pytest.mark.parametrize("stand_in", STAND_INS.values(), ids=STAND_INS.keys())
@pytest.mark.parametrize(
    "make",
    [
        lambda rng: rng.standard_normal((30, 12, 20)),
        lambda rng: rng.standard_normal((30, 20, 12)).astype(np.float32),
        lambda rng: realistic(rng, 30, 24, 48),
        lambda rng: ill_conditioned(rng, 10, 20, 30, 1e12),
        lambda rng: union_of_subspaces(rng, [1, 2, 7, 15], 16, 48).astype(np.float32),
        lambda rng: knife_edge_images(),
    ],
    ids=["gaussian-wide", "gaussian-tall-f32", "low-rank-noise", "cond-1e12", "union-f32", "knife-edge"],
)
def test_certified_ranks_equal_the_reference_whatever_the_stand_in(make, stand_in):
    x = torch.from_numpy(make(np.random.default_rng(31)))
    certified = certified_svd_rank(x, THRESHOLDS, stand_in)
    assert torch.equal(certified.ranks, reference_ranks(x))
    assert (certified.ranks.numpy() == reference_svd_ranks(x.numpy())).all()
    assert not certified.refused.any()


def test_certificate_rechecks_knife_edges_and_passes_the_rest():
    edges = torch.from_numpy(knife_edge_images())
    clear = torch.from_numpy(realistic(np.random.default_rng(32), 40, 24, 48))
    for stand_in in STAND_INS.values():
        assert certified_svd_rank(edges, THRESHOLDS, stand_in).rechecked.all()  # E_k = p lies inside any margin
    # float64 work certifies all clear-cut images; a looser bound (errors of 1e-5 of the energy) still some.
    assert not certified_svd_rank(clear, THRESHOLDS, float64_svd).rechecked.any()
    assert not certified_svd_rank(clear, THRESHOLDS, perturbed_spectrum(1e-5)).rechecked.all()
    expected = [[math.ceil(p * r - 1e-9) for p in THRESHOLDS] for r in [5, 10, 20] * 4]
    assert certified_svd_rank(edges, THRESHOLDS, gram_spectrum).ranks.tolist() == expected


def test_a_stand_in_that_understates_its_error_gets_ranks_wrong():
    # The control for the tests above: the injected errors do move ranks, so equality comes from the re-check.
    x = torch.from_numpy(np.random.default_rng(33).standard_normal((200, 12, 20)))
    honest = certified_svd_rank(x, THRESHOLDS, perturbed_spectrum(1e-3))
    lying = certified_svd_rank(x, THRESHOLDS, perturbed_spectrum(1e-3, claimed=0.0))
    assert torch.equal(honest.ranks, reference_ranks(x)) and honest.rechecked.any()
    assert not torch.equal(lying.ranks, reference_ranks(x))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=images_strategy, size=st.sampled_from([0.0, 1e-9, 1e-4, 1e-2]), seed=st.integers(0, 2**16))
def test_certified_ranks_equal_the_reference_on_integer_matrices(x, size, seed):
    x = x[np.abs(x).sum(axis=(1, 2)) > 0]  # a zero image has no rank
    if x.shape[0] == 0:
        return
    features = torch.from_numpy(x)  # integer entries: ties, repeated and zero singular values, exact E_k = p
    certified = certified_svd_rank(features, THRESHOLDS, perturbed_spectrum(size, seed=seed))
    assert torch.equal(certified.ranks, reference_ranks(features))
    assert torch.equal(certified_svd_rank(features, THRESHOLDS, refusing(gram_spectrum)).ranks, certified.ranks)


def test_refused_chunks_are_halved_and_their_rank_deficient_pieces_fall_back_to_the_reference(monkeypatch):
    x = np.random.default_rng(34).standard_normal((40, 12, 20))
    deficient = [5, 30]
    x[deficient, 1] = x[deficient, 0]  # a duplicated token
    monkeypatch.setattr(spectra, "CPU_BATCH_BYTES", 1 << 30)  # one chunk per thread
    features = torch.from_numpy(x)
    certified = certified_svd_rank(features, THRESHOLDS, refusing(float64_svd))
    assert torch.equal(certified.ranks, reference_ranks(features))
    assert certified.refused[deficient].all() and int(certified.refused.sum()) <= 2 * certified_ranks._REFUSED_PIECE
    assert torch.equal(certified.rechecked, certified.refused)  # the others are clear-cut in float64


def test_a_chunk_whose_halves_are_refused_too_goes_to_the_reference_at_once(monkeypatch):
    """A layer of rank-deficient images (a Lift student's lifted map has rank <= its narrow width): each chunk
    costs the fast spectrum three refusals (the chunk, its two halves), not one per halving level."""
    x = np.random.default_rng(35).standard_normal((40, 12, 20))
    x[:, 1] = x[:, 0]  # every image has a duplicated token
    per_image = 8 * (3 * 12 * 20 + 5 * 12**2)  # certified_svd_rank's working set per image
    monkeypatch.setattr(spectra, "CPU_BATCH_BYTES", 20 * per_image)  # two chunks of 20 images
    calls: list[int] = []
    refuse = refusing(float64_svd)

    def counted(chunk, energy):
        calls.append(len(chunk))
        return refuse(chunk, energy)

    features = torch.from_numpy(x)
    certified = certified_svd_rank(features, THRESHOLDS, counted)
    assert torch.equal(certified.ranks, reference_ranks(features)) and certified.refused.all()
    assert sorted(calls) == [10, 10, 10, 10, 20, 20]


@pytest.mark.parametrize(
    "error",
    [torch.linalg.LinAlgError("linalg.svd: The input matrix is singular"), RuntimeError("CUDA out of memory")],
)
def test_other_failures_of_the_fast_spectrum_propagate(error):
    def failing(chunk, energy):
        raise error

    with pytest.raises(type(error), match=str(error)):
        certified_svd_rank(torch.ones(3, 4, 5), THRESHOLDS, failing)


@pytest.mark.parametrize(
    "features, thresholds, message",
    [
        (np.full((2, 4, 5), np.nan), THRESHOLDS, "NaN"),
        (np.zeros((2, 4, 5)), THRESHOLDS, "zero energy"),
        (np.ones((2, 4, 5)), (0.5, 1.0), r"\(0, 1\)"),
        (np.ones((4, 5)), THRESHOLDS, "3-D"),
    ],
)
def test_certified_path_rejects_bad_input_as_the_reference_does(features, thresholds, message):
    with pytest.raises(ValueError, match=message):
        certified_svd_rank(features, thresholds, float64_svd)


@pytest.mark.parametrize("stand_in", [gram_spectrum, float64_svd], ids=["float32-gram", "float64-svd-ritz"])
def test_error_bounds_cover_the_distance_to_a_float64_svd(stand_in):
    rng = np.random.default_rng(35)
    for x in (realistic(rng, 10, 24, 48), ill_conditioned(rng, 10, 30, 20, 1e12), knife_edge_images(np.float32)):
        features = torch.from_numpy(x)
        energy = features.double().square().sum((-2, -1))
        bound = stand_in(features, energy)
        exact = torch.from_numpy(np.stack([np.linalg.svd(xi.astype(np.float64), compute_uv=False) ** 2 for xi in x]))
        assert ((bound.energies - exact).abs().amax(-1) <= bound.error).all()
        assert (bound.error < (1e-3 if stand_in is gram_spectrum else 1e-10) * energy).all()


def test_ritz_bound_grows_with_the_eigenvector_error_and_refuses_non_orthogonal_vectors():
    x = torch.from_numpy(realistic(np.random.default_rng(36), 4, 12, 20))
    energy = x.square().sum((-2, -1))
    gram = x @ x.mT
    vectors = torch.linalg.eigh(gram).eigenvectors
    a = torch.from_numpy(np.random.default_rng(37).standard_normal((12, 12)))
    turn = torch.linalg.matrix_exp(1e-4 * (a - a.mT))  # a small rotation
    tight = certified_ranks.ritz_spectrum(gram, vectors, energy, 20)
    loose = certified_ranks.ritz_spectrum(gram, vectors @ turn, energy, 20)  # still orthonormal, no longer eigenvectors
    assert (tight.error < 1e-12 * energy).all() and (loose.error > 1e3 * tight.error).all()
    assert torch.allclose(tight.energies, energy_spectrum(x), rtol=0, atol=1e-12 * float(energy.max()))
    assert torch.isinf(certified_ranks.ritz_spectrum(gram, 2 * vectors, energy, 20).error).all()


@pytest.fixture(scope="module")
def deit_tiny_digit_features() -> torch.Tensor:
    """Every block's patch tokens of a random-init deit_tiny (64 px, 8 px patches: 64 x 192) on the first 3
    digits of each class, as `encmm diagnose` reads them: `[12 * 30, 64, 192]` float32."""
    import timm

    from encmm.analysis import features as feats
    from encmm.trainables.data import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8).eval()
    spec = feats.timm_input_spec(model)
    images, labels = load_digits_tensors(8)
    chosen = feats.first_per_class(labels.tolist(), 3)
    x = feats.renormalise(feats.resize_images(images[chosen], spec.size), DIGITS_MEAN, DIGITS_STD, spec.mean, spec.std)
    with torch.no_grad():
        return torch.cat(feats.layers_of(model, x, None))


@pytest.mark.parametrize("stand_in", STAND_INS.values(), ids=STAND_INS.keys())
def test_certified_ranks_of_real_features_equal_the_reference(deit_tiny_digit_features, stand_in):
    x = deit_tiny_digit_features
    certified = certified_svd_rank(x, THRESHOLDS, stand_in)
    assert torch.equal(certified.ranks, reference_ranks(x))
    if stand_in is float64_svd:  # the GPU path's certificate: real features are clear-cut at its margin
        assert int(certified.rechecked.sum()) <= x.shape[0] // 100


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gesvda_path_gives_the_reference_ranks_on_cuda_including_a_rank_deficient_chunk():
    rng = np.random.default_rng(38)
    clear = torch.from_numpy(realistic(rng, 64, 196, 384).astype(np.float32)).cuda()
    # float64, as built: rounded to float32 they would be full rank numerically, and cuSOLVER might accept them
    deficient = torch.from_numpy(union_of_subspaces(rng, [5, 10, 20, 196] * 4, 196, 384)).cuda()
    fast = certified_ranks.device_fast_spectrum(clear.device)
    assert fast is not None
    for x in (clear, deficient, torch.cat([clear[:20], deficient]), torch.from_numpy(knife_edge_images()).cuda()):
        certified = certified_svd_rank(x, THRESHOLDS, fast)
        assert torch.equal(certified.ranks, reference_ranks(x)), "gesvda path != float64 Gram + eigvalsh on CUDA"
        assert torch.equal(certified.ranks.cpu(), reference_ranks(x.cpu()))
        assert torch.equal(svd_rank(x), certified.ranks)
    assert not certified_svd_rank(clear, THRESHOLDS, fast).rechecked.any()
    refused = certified_svd_rank(deficient, THRESHOLDS, fast).refused
    assert refused.any(), "cuSOLVER accepted every rank-deficient matrix: the fallback went unexercised"
