"""Certified fast per-image SVD ranks: a fast spectrum (cuSOLVER's batched gesvda on CUDA) whose ranks are
certified equal to the reference method's (`analysis.spectra.energy_spectrum`: float64 Gram + eigvalsh) by an
a-posteriori error margin, the images inside that margin recomputed by the reference. The margin is rigorous for
the fast side; for the reference it rests on a stated model of LAPACK's eigensolver error (`gram_eigen_error`).
Not yet timed on a GPU: `bench/gpu_check.sh` (stage spectra) measures it against the reference.

Pure tensor math, as `analysis.spectra` (paper.md, Diagnostics 1): no I/O, no Ray. `spectra.svd_rank` takes this
path on a device where `device_fast_spectrum` has one; the CPU keeps the reference (fastest there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from encmm.analysis import spectra
from encmm.analysis.spectra import (
    RANK_TOLERANCE,
    check_features,
    check_thresholds,
    cumulative_energy,
    cumulative_sums,
    energy_spectrum,
    map_chunks,
    required_rank,
    smaller_gram,
)

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# LAPACK bounds a symmetric eigensolver's backward error by p(K) u ||G||_2 with p "a modestly growing function"
# of K (LAPACK Users' Guide, 3rd ed., sec. 4.7) and publishes no constant; `gram_eigen_error` assumes
# p(K) = EIGEN_ERROR_FACTOR * K. An assumption, not a proof.
EIGEN_ERROR_FACTOR = 8.0
# Multiplies the whole certification margin, for the second-order terms the derivation leaves out (the rounding
# of ||X||_F^2 itself and of the norms in the bounds: relative errors below 1e-11).
CERTIFY_SAFETY = 2.0
_REFUSED_PIECE = 8  # a refused chunk is halved down to this many images, which the reference then computes
_FAST_BATCH_BYTES = 1 << 30  # working set per chunk of the certified path on an accelerator (~320 images 196x384)


class SpectrumBound(NamedTuple):
    """A fast spectrum and its error bound (`certified_svd_rank`): energies `[b, K]` float64, descending, >= 0,
    approximating the squared singular values s_j^2 of each image, and error `[b]` float64, an eta with
    |energies_j - s_j^2| <= eta for every j (inf: no bound)."""

    energies: Tensor
    error: Tensor


# (chunk `[b, N, C]`, float64 ||X_i||_F^2 `[b]`) -> SpectrumBound. May refuse a chunk by raising
# torch.linalg.LinAlgError "... failed to converge ..." (cuSOLVER's gesvda does on rank-deficient matrices).
FastSpectrum = Callable[[Tensor, Tensor], SpectrumBound]


class CertifiedRanks(NamedTuple):
    """`certified_svd_rank`'s result: ranks `[I, P]` long, equal to the reference method's; rechecked `[I]`
    bool, images whose ranks the reference computed (uncertain, or refused); refused `[I]` bool, images in a
    piece of a chunk that the fast spectrum refused."""

    ranks: Tensor
    rechecked: Tensor
    refused: Tensor


def _gamma(n: int, u: float) -> float:
    """gamma_n = n u / (1 - n u), the relative error bound of n roundings (Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., Lemma 3.1)."""
    return n * u / (1.0 - n * u)


def gram_eigen_error(energy: Tensor, long_side: int, short_side: int, unit_roundoff: float) -> Tensor:
    """Bound eta `[b]` on |e_j - s_j^2| for the eigenvalues e of the smaller Gram matrix formed and solved in a
    precision of unit roundoff u; energy = ||X||_F^2 `[b]`, L = long side, K = short side:

        eta = (gamma_{L+2} + EIGEN_ERROR_FACTOR * K * u) * ||X||_F^2.

    Rounding X to the working precision and forming G = X X^T there gives G + D with |D| <= gamma_{L+2} |X||X|^T
    entrywise (Higham eq. 3.13), so ||D||_2 <= ||D||_F <= gamma_{L+2} ||X||_F^2. A backward-stable eigensolver
    returns the eigenvalues of G + D + F with ||F||_2 <= p(K) u ||G||_2 <= p(K) u ||X||_F^2; Weyl's inequality
    adds the two. p(K) = EIGEN_ERROR_FACTOR * K is assumed: this bound is a documented model, not a proof.
    """
    return (_gamma(long_side + 2, unit_roundoff) + EIGEN_ERROR_FACTOR * short_side * unit_roundoff) * energy


def gram_spectrum(chunk: Tensor, energy: Tensor, dtype: torch.dtype = torch.float32) -> SpectrumBound:
    """Eigenvalues of the smaller Gram matrix formed and solved in `dtype`, with `gram_eigen_error`'s bound;
    `[b, N, C]`, ||X||_F^2 `[b]` -> SpectrumBound.

    A posteriori check of the model: it implies |sum_j e_j - ||X||_F^2| <= K eta + gamma_{NC} ||X||_F^2 (the
    computed trace against the float64 Frobenius energy); an image that breaks it gets error inf.
    """
    _, n, c = chunk.shape
    short = min(n, c)
    energies = torch.linalg.eigvalsh(smaller_gram(chunk.to(dtype))).flip(-1).to(torch.float64).clamp_min(0.0)
    error = gram_eigen_error(energy, max(n, c), short, UNIT_ROUNDOFF[dtype])
    slack = short * error + _gamma(n * c, UNIT_ROUNDOFF[torch.float64]) * energy
    return SpectrumBound(energies, torch.where((energies.sum(-1) - energy).abs() <= slack, error, math.inf))


def ritz_spectrum(gram: Tensor, vectors: Tensor, energy: Tensor, long_side: int) -> SpectrumBound:
    """Rayleigh quotients e_j = q_j^T G q_j of approximate eigenvectors Q of the smaller Gram matrix, with an a
    posteriori bound; gram `[b, K, K]` as `smaller_gram` forms it, vectors Q `[b, K, K]`, energy
    F = ||X||_F^2 `[b]`, all float64, L = long side -> SpectrumBound. With g_n = gamma_n at u = 2^-53:

        eta = (1 + g_{K^2+2}) ||R||_F + 2 g_{K+1} sqrt(K) (1 + w) F + w (1 + g_{L+2}) F + g_{L+2} F,
        R = Q^T G Q - diag(e) (its off-diagonal part),  w = (||Q^T Q - I||_F + g_{K+1} K) / (1 - g_{K+1} K).

    Derivation. The computed G, symmetrised, has eigenvalues within g_{L+2} F of the s_j^2 (Higham eq. 3.13,
    Weyl). If w < 1, Q is nonsingular and Ostrowski's theorem (Horn & Johnson, Matrix Analysis, Thm 4.5.9)
    puts the eigenvalues of Q^T G Q at theta_j lambda_j(G), theta_j in [1 - w, 1 + w]: within
    w ||G||_2 <= w (1 + g_{L+2}) F of lambda_j(G). Q^T G Q = diag(e) + R with R symmetric, so by Weyl its
    sorted eigenvalues lie within ||R||_2 <= ||R||_F of the sorted e. The other terms bound float64 rounding
    in forming Q^T G Q, Q^T Q and their norms (Higham eq. 3.13, ||Q||_2^2 <= 1 + w, ||Q||_F^2 <= K (1 + w)).
    Nothing depends on how Q was computed, which is what certifies cuSOLVER's gesvda: its accuracy is
    documented only as "computes eigenvalues of A^T A". Rayleigh quotients minimise ||R||_F over all diagonal
    choices of e. w >= 1/2, or anything non-finite, gives error inf. Negative e_j (round-off) are clamped to 0,
    which only brings them nearer to s_j^2 >= 0.
    """
    u = UNIT_ROUNDOFF[torch.float64]
    k = gram.shape[-1]
    projected = vectors.mT @ (((gram + gram.mT) / 2) @ vectors)
    energies = projected.diagonal(dim1=-2, dim2=-1)
    residual = (projected - torch.diag_embed(energies)).square().sum((-2, -1)).sqrt()
    departure = (vectors.mT @ vectors - torch.eye(k, dtype=torch.float64, device=gram.device)).square()
    g_k, g_l = _gamma(k + 1, u), _gamma(long_side + 2, u)
    w = (departure.sum((-2, -1)).sqrt() + g_k * k) / (1 - g_k * k)
    rounding = 2 * g_k * math.sqrt(k) * (1 + w) + w * (1 + g_l) + g_l
    error = (1 + _gamma(k * k + 2, u)) * residual + rounding * energy
    energies = energies.sort(-1, descending=True).values.clamp_min(0.0)
    return SpectrumBound(energies, torch.where((w < 0.5) & torch.isfinite(error), error, math.inf))


def svd_spectrum(chunk: Tensor, energy: Tensor, driver: str | None = "gesvda") -> SpectrumBound:
    """`ritz_spectrum` of the singular vectors of the smaller side from a float64 `torch.linalg.svd` (`driver`:
    cuSOLVER's on CUDA, None elsewhere); `[b, N, C]`, ||X||_F^2 `[b]` -> SpectrumBound.

    float64, not float32: the certificate's margin scales with the working precision (about 1e-9 of the energy
    here, 1e-4 with float32 vectors, which would send many real images to the re-check), and batched gesvda
    ran equally fast in both on an H100 (1.29 vs 1.28 s for 24,000 images of 196x384; BENCHMARKS.md, sec. 5).
    """
    x = chunk.to(torch.float64)
    if driver is None:  # a CPU: its thread pool must not race on the process-wide warning filters
        left, _, right = torch.linalg.svd(x, full_matrices=False)
    else:
        with warnings.catch_warnings():  # torch warns once about a refusal, which the caller handles
            warnings.filterwarnings("ignore", message=".*failed to converge")
            left, _, right = torch.linalg.svd(x, full_matrices=False, driver=driver)
    vectors = left if x.shape[-2] <= x.shape[-1] else right.mT
    return ritz_spectrum(smaller_gram(x), vectors, energy, max(x.shape[-2:]))


def device_fast_spectrum(device: torch.device) -> FastSpectrum | None:
    """The fast spectrum that `svd_rank` certifies on `device`: batched gesvda where torch runs cuSOLVER (its
    singular values alone took 1.29 s against the reference's 37 s for 24,000 images of 196x384 on an H100,
    BENCHMARKS.md sec. 5; with the vectors this path needs, not timed yet); None elsewhere. On a CPU the reference is
    kept: the float32 Gram (`gram_spectrum`) is 2x faster, but its bound is too loose to certify any real image,
    so with the re-check it is 2x slower (bench_spectra.py, row encmm-certified-f32gram)."""
    if device.type == "cuda" and torch.version.cuda is not None:
        return partial(svd_spectrum, driver="gesvda")
    return None


def _fast_or_reference(fast: FastSpectrum, chunk: Tensor, energy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(energies `[b, K]`, error `[b]`, refused `[b]` bool) of a chunk `[b, N, C]`: `fast`'s; where it refuses
    ("failed to converge"), `_refused_halves`'s. Any other error propagates."""
    try:
        return _fast_bound(fast, chunk, energy)
    except _Refused:
        return _refused_halves(fast, chunk, energy)


class _Refused(Exception):
    """`fast` refused a chunk: cuSOLVER's "failed to converge" (gesvda on rank-deficient matrices)."""


def _fast_bound(fast: FastSpectrum, chunk: Tensor, energy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    try:
        bound = fast(chunk, energy)
    except torch.linalg.LinAlgError as exc:
        if "failed to converge" not in str(exc):
            raise
        raise _Refused from exc
    return bound.energies, bound.error, torch.zeros_like(energy, dtype=torch.bool)


def _reference(chunk: Tensor, energy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return energy_spectrum(chunk), torch.zeros_like(energy), torch.ones_like(energy, dtype=torch.bool)


def _refused_halves(fast: FastSpectrum, chunk: Tensor, energy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A refused chunk: `fast` on each half; a refused half is halved again, down to `_REFUSED_PIECE` images,
    which the reference computes. Where every half is refused too (a layer of rank-deficient images, such as a
    Lift student's lifted map, rank <= its narrow width), the whole chunk goes to the reference at once: two
    more refusals, not one per level."""
    if chunk.shape[0] <= _REFUSED_PIECE:
        return _reference(chunk, energy)
    half = (chunk.shape[0] + 1) // 2
    pieces = list(zip(chunk.split(half), energy.split(half)))
    parts: list = []
    for piece in pieces:
        try:
            parts.append(_fast_bound(fast, *piece))
        except _Refused:
            parts.append(None)
    if all(part is None for part in parts):
        return _reference(chunk, energy)
    parts = [part if part is not None else _refused_halves(fast, *piece) for part, piece in zip(parts, pieces)]
    return tuple(torch.cat(column) for column in zip(*parts))


def _certify(
    energies: Tensor, error: Tensor, reference_error: Tensor, thresholds: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """(ranks `[b, P]` long from `energies` `[b, K]`, uncertain `[b]` bool): `certified_svd_rank`'s test."""
    k = energies.shape[-1]
    cumulative, total = cumulative_sums(energies)
    cumulative = cumulative / total.unsqueeze(-1)  # as cumulative_energy, without its zero-energy error
    ranks = required_rank(cumulative, thresholds)
    steps = torch.arange(1, k + 1, dtype=torch.float64, device=energies.device)
    spread = torch.maximum(steps, k - steps)  # max(k, K - k)
    slack = total - k * (error + reference_error)  # a lower bound on the reference's total
    scale = error / total + torch.where(slack > 0, reference_error / slack, math.inf)
    margin = CERTIFY_SAFETY * (spread * scale.unsqueeze(-1) + (4 * k + 8) * UNIT_ROUNDOFF[torch.float64])
    target = torch.tensor(thresholds, dtype=torch.float64, device=energies.device) - RANK_TOLERANCE
    at, before = ranks - 1, (ranks - 2).clamp_min(0)  # indices of E_d and E_{d-1}
    reached = cumulative.gather(-1, at) - margin.gather(-1, at) >= target
    short = (ranks == 1) | (cumulative.gather(-1, before) + margin.gather(-1, before) < target)
    return ranks, ~(reached & short).all(-1)


def certified_svd_rank(features: Tensor, thresholds: Sequence[float], fast: FastSpectrum) -> CertifiedRanks:
    """Per-image SVD ranks from a fast spectrum, each certified equal to the reference method's (float64 Gram +
    eigvalsh, `energy_spectrum`) or recomputed by it; `[I, N, C]` -> CertifiedRanks.

    Certificate. Let d = d_p from the fast cumulative energies E^_k and t = p - RANK_TOLERANCE: the reference
    gives d too iff its E'_{d-1} < t <= E'_d. If |e_j - s_j^2| <= eta for sorted spectra, then with S_k, T_k
    the head and tail sums of the s_j^2, E_k = S_k / S and S^ = sum_j e_j,

        E^_k - E_k = [(1 - E_k)(S^_k - S_k) - E_k (T^_k - T_k)] / S^,   so   |E^_k - E_k| <= max(k, K - k) eta / S^,

    as |S^_k - S_k| <= k eta and |T^_k - T_k| <= (K - k) eta. The same holds for the reference with its eta'
    (`gram_eigen_error` in float64) and S' >= S^ - K (eta + eta'). An image is certified when at every p

        (d = 1 or E^_{d-1} + m_{d-1} < t)   and   E^_d - m_d >= t,
        m_k = CERTIFY_SAFETY [max(k, K - k) (eta / S^ + eta' / (S^ - K (eta + eta'))) + (4K + 8) u],

    the last term covering float64 rounding (u = 2^-53) in both cumulative sums: then E_k and E'_k lie on the
    same side of t as E^_k at k = d - 1 and d, so the reference's rank is d. The other images, and every
    piece of a chunk that `fast` refuses, get the reference's ranks.
    """
    x = check_features(features, check_finite=False)
    thresholds = check_thresholds(thresholds)
    _, n, c = x.shape

    def certify(chunk: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        energy = chunk.to(torch.float64).square().sum((-2, -1))
        if not torch.isfinite(energy).all():
            raise ValueError("features contain NaN or inf")
        if (energy <= 0).any():
            raise ValueError("an image has zero energy: its rank is undefined")
        energies, error, refused = _fast_or_reference(fast, chunk, energy)
        reference_error = gram_eigen_error(energy, max(n, c), min(n, c), UNIT_ROUNDOFF[torch.float64])
        ranks, uncertain = _certify(energies, error, reference_error, thresholds)
        return ranks, uncertain & ~refused, refused

    budget = spectra.CPU_BATCH_BYTES if x.device.type == "cpu" else _FAST_BATCH_BYTES
    parts = map_chunks(certify, x, 8 * (3 * n * c + 5 * min(n, c) ** 2), budget)
    ranks, uncertain, refused = (torch.cat(column) for column in zip(*parts))
    if uncertain.any():
        ranks[uncertain] = required_rank(cumulative_energy(energy_spectrum(x[uncertain])), thresholds)
    return CertifiedRanks(ranks, uncertain | refused, refused)
