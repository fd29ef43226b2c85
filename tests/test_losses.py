"""Distillation losses (trainables.losses) against paper.md, "Distillation setup":

    L = (1 - alpha) * CE_ls(z_s, y) + beta * L_feat + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))

Property tests (hypothesis) on small shapes, float64 numpy references, and the gradient path with a
real frozen timm teacher.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from encmm.trainables.config import KDConfig, StudentConfig, TeacherConfig
from encmm.trainables.losses import (
    DistillationLoss,
    feature_fft_mse,
    feature_mse,
    pool_teacher_channels,
    soft_kl,
    tokens_to_map,
)
from encmm.trainables.models import build_student
from encmm.trainables.teacher import build_teacher

FEATURE_LOSSES = {"mse": feature_mse, "fft": feature_fft_mse}
PROPERTY = settings(max_examples=25, deadline=None)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# Token maps [B, N, C] with N = side^2.
token_shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6))
seeds = st.integers(0, 2**31 - 1)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """float64: T^2 * mean_b sum_k p_t (log p_t - log p_s)."""
    log_ps = np_log_softmax(student.double().numpy() / t)
    log_pt = np_log_softmax(teacher.double().numpy() / t)
    return float(t * t * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1).mean())


def reference_fft_mse(student: torch.Tensor, teacher: torch.Tensor) -> float:
    b, n, c = student.shape
    side = math.isqrt(n)

    def spectrum(tokens):
        grid = tokens.double().numpy().transpose(0, 2, 1).reshape(b, c, side, side)
        f = np.fft.rfft2(grid, axes=(-2, -1), norm="ortho")
        return np.stack([f.real, f.imag], axis=-1)

    return float(((spectrum(student) - spectrum(teacher)) ** 2).mean())


# ------------------------------------------------------------------ token maps
def test_tokens_to_map_puts_token_h_times_side_plus_w_at_row_h_column_w():
    b, side, c = 2, 3, 4
    tokens = torch.arange(b * side * side * c, dtype=torch.float32).reshape(b, side * side, c)
    grid = tokens_to_map(tokens)
    assert grid.shape == (b, c, side, side)
    for h in range(side):
        for w in range(side):
            torch.testing.assert_close(grid[:, :, h, w], tokens[:, h * side + w, :])


def test_tokens_to_map_rejects_a_non_square_token_count():
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(torch.zeros(1, 12, 4))


# ------------------------------------------------------------------ feature losses
@PROPERTY
@given(shape=token_shapes, seed=seeds, name=st.sampled_from(sorted(FEATURE_LOSSES)))
def test_feature_loss_is_zero_when_student_equals_teacher(shape, seed, name):
    b, side, c = shape
    tokens = randn(b, side * side, c, seed=seed, scale=3.0)
    assert FEATURE_LOSSES[name](tokens, tokens.clone()).item() == 0.0


@PROPERTY
@given(
    shape=token_shapes,
    seed=seeds,
    name=st.sampled_from(sorted(FEATURE_LOSSES)),
    delta=st.floats(0.05, 10.0),
    where=st.integers(0, 10_000),
)
def test_feature_loss_is_positive_when_the_maps_differ(shape, seed, name, delta, where):
    b, side, c = shape
    teacher = randn(b, side * side, c, seed=seed)
    student = teacher.clone()
    student.view(-1)[where % student.numel()] += delta
    assert FEATURE_LOSSES[name](student, teacher).item() > 0.0


@PROPERTY
@given(shape=token_shapes, seed=seeds)
def test_fft_feature_loss_matches_float64_numpy_rfft2_reference(shape, seed):
    b, side, c = shape
    student = randn(b, side * side, c, seed=seed)
    teacher = randn(b, side * side, c, seed=seed + 1)
    assert feature_fft_mse(student, teacher).item() == pytest.approx(reference_fft_mse(student, teacher), rel=1e-4)


@PROPERTY
@given(shape=token_shapes, seed=seeds)
def test_mse_feature_loss_is_the_mean_squared_difference(shape, seed):
    b, side, c = shape
    student = randn(b, side * side, c, seed=seed)
    teacher = randn(b, side * side, c, seed=seed + 1)
    expected = float(((student.double() - teacher.double()) ** 2).mean())
    assert feature_mse(student, teacher).item() == pytest.approx(expected, rel=1e-5)


@PROPERTY
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(2, 5), st.integers(1, 4)),
    seed=seeds,
    shift=st.tuples(st.integers(0, 4), st.integers(0, 4)),
)
def test_fft_feature_loss_is_invariant_to_a_common_circular_shift_of_the_grid(shape, seed, shift):
    # Shift theorem: rolling both maps multiplies their spectra's difference by a unit phase.
    b, side, c = shape
    student = randn(b, side * side, c, seed=seed)
    teacher = randn(b, side * side, c, seed=seed + 1)

    def roll(tokens):
        grid = tokens.reshape(b, side, side, c).roll(shifts=shift, dims=(1, 2))
        return grid.reshape(b, side * side, c)

    assert feature_fft_mse(roll(student), roll(teacher)).item() == pytest.approx(
        feature_fft_mse(student, teacher).item(), rel=1e-4, abs=1e-7
    )


@PROPERTY
@given(shape=token_shapes, seed=seeds)
def test_fft_feature_loss_is_bounded_by_parseval_over_the_half_spectrum(shape, seed):
    # rfft2 (ortho) keeps half of the W axis: the kept energy lies in [1/2, 1] of the spatial energy.
    b, side, c = shape
    student = randn(b, side * side, c, seed=seed)
    teacher = randn(b, side * side, c, seed=seed + 1)
    spatial = float(((student.double() - teacher.double()) ** 2).sum())
    kept = feature_fft_mse(student, teacher).item() * (b * c * side * (side // 2 + 1) * 2)
    assert 0.5 * spatial * (1 - 1e-4) <= kept <= spatial * (1 + 1e-4)


# ------------------------------------------------------------------ soft KL
@PROPERTY
@given(
    batch=st.integers(1, 4),
    classes=st.integers(2, 10),
    seed=seeds,
    t=st.floats(0.25, 8.0),
    offset=st.floats(-50.0, 50.0),
)
def test_kl_is_zero_when_logits_are_equal_up_to_a_constant(batch, classes, seed, t, offset):
    teacher = randn(batch, classes, seed=seed, scale=4.0)
    assert soft_kl(teacher.clone(), teacher, t).item() == 0.0
    assert soft_kl(teacher + offset, teacher, t).item() == pytest.approx(0.0, abs=1e-4 * t * t)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_soft_kl_is_t_squared_times_batchmean_kl_teacher_to_student(t):
    student = randn(4, 7, seed=0, scale=3.0)
    teacher = randn(4, 7, seed=1, scale=3.0)
    value = soft_kl(student, teacher, t).item()
    assert value == pytest.approx(reference_kl(student, teacher, t), rel=1e-5)
    unscaled = reference_kl(student, teacher, t) / (t * t)
    if t != 1.0:
        assert value != pytest.approx(unscaled, rel=1e-3)  # the T^2 factor is really there
    # KL(p_t || p_s), not KL(p_s || p_t): the arguments are not interchangeable.
    assert value != pytest.approx(reference_kl(teacher, student, t), rel=1e-3)


# ------------------------------------------------------------------ the total
def batch(seed=0, b=4, classes=6, side=2, width=8):
    logits = randn(b, classes, seed=seed, scale=2.0)
    labels = torch.arange(b) % classes
    feat_s = randn(b, side * side, width, seed=seed + 1)
    teacher_logits = randn(b, classes, seed=seed + 2, scale=2.0)
    feat_t = randn(b, side * side, width, seed=seed + 3)
    return logits, labels, feat_s, teacher_logits, feat_t


def reference_ce(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> float:
    logp = np_log_softmax(logits.double().numpy())
    nll = -logp[np.arange(len(labels)), labels.numpy()]
    return float(((1 - smoothing) * nll - smoothing * logp.mean(-1)).mean())


@pytest.mark.parametrize("feature_loss", ["mse", "fft"])
@pytest.mark.parametrize(
    "alpha, beta, temperature, smoothing",
    [
        (0.9, 0.2, 1.0, 0.1),
        (0.0, 0.2, 1.0, 0.1),
        (0.5, 1.5, 3.0, 0.0),
        (0.3, 0.0, 2.0, 0.1),
        (0.0, 0.0, 1.0, 0.1),
        (1.0, 0.2, 1.0, 0.1),
    ],
)
def test_total_is_one_minus_alpha_ce_plus_beta_feat_plus_alpha_kl(feature_loss, alpha, beta, temperature, smoothing):
    cfg = KDConfig(
        alpha=alpha, beta=beta, temperature=temperature, feature_loss=feature_loss, label_smoothing=smoothing
    )
    logits, labels, feat_s, teacher_logits, feat_t = batch()
    out = DistillationLoss(cfg)(logits, labels, feat_s, teacher_logits, feat_t)

    expected_keys = {"loss", "ce"} | ({"feat"} if beta > 0 else set()) | ({"kl"} if alpha > 0 else set())
    assert set(out) == expected_keys
    ce, feat, kl = out["ce"], out.get("feat", torch.tensor(0.0)), out.get("kl", torch.tensor(0.0))
    assert torch.equal(out["loss"], (1.0 - alpha) * ce + beta * feat + alpha * kl)

    # Each term against an independent float64 reference.
    assert ce.item() == pytest.approx(reference_ce(logits, labels, smoothing), rel=1e-5)
    ref_feat = (
        reference_fft_mse(feat_s, feat_t)
        if feature_loss == "fft"
        else float(((feat_s.double() - feat_t.double()) ** 2).mean())
    )
    ref_kl = reference_kl(logits, teacher_logits, temperature)
    if beta > 0:
        assert feat.item() == pytest.approx(ref_feat, rel=1e-5)
    if alpha > 0:
        assert kl.item() == pytest.approx(ref_kl, rel=1e-5)
    total = (1 - alpha) * reference_ce(logits, labels, smoothing) + beta * ref_feat + alpha * ref_kl
    assert out["loss"].item() == pytest.approx(total, rel=1e-5)


@PROPERTY
@given(seed=seeds, feature_loss=st.sampled_from(["mse", "fft"]), alpha=st.floats(0.0, 1.0), beta=st.floats(0.0, 5.0))
def test_only_cross_entropy_remains_when_student_equals_teacher(seed, feature_loss, alpha, beta):
    logits, labels, feat_s, _, _ = batch(seed)
    cfg = KDConfig(alpha=alpha, beta=beta, feature_loss=feature_loss)
    out = DistillationLoss(cfg)(logits, labels, feat_s, logits.clone(), feat_s.clone())
    assert out.get("feat", torch.tensor(0.0)).item() == 0.0
    assert out.get("kl", torch.tensor(0.0)).item() == 0.0
    assert out["loss"].item() == pytest.approx((1 - alpha) * out["ce"].item(), rel=1e-6, abs=1e-12)


# ------------------------------------------------------------------ average-pool alignment
@PROPERTY
@given(shape=token_shapes, seed=seeds, ratio=st.integers(1, 4))
def test_avgpool_of_teacher_channels_repeating_the_student_map_gives_the_student_map(shape, seed, ratio):
    b, side, c = shape
    student = randn(b, side * side, c, seed=seed)
    teacher = student.repeat_interleave(ratio, dim=-1)  # channel j -> teacher channels j*r .. j*r + r-1
    assert teacher.shape[-1] == c * ratio
    torch.testing.assert_close(pool_teacher_channels(teacher, c), student)
    cfg = KDConfig(beta=1.0)
    out = DistillationLoss(cfg, align="avgpool", student_width=c)(
        randn(b, 3, seed=seed), torch.zeros(b, dtype=torch.long), student, None, teacher
    )
    assert out["feat"].item() == pytest.approx(0.0, abs=1e-10)


@PROPERTY
@given(shape=token_shapes, seed=seeds, ratio=st.integers(1, 4))
def test_avgpool_preserves_the_mean_over_channels(shape, seed, ratio):
    b, side, c = shape
    teacher = randn(b, side * side, c * ratio, seed=seed)
    pooled = pool_teacher_channels(teacher, c)
    assert pooled.shape == (b, side * side, c)
    torch.testing.assert_close(pooled.mean(-1), teacher.mean(-1))


# ------------------------------------------------------------------ gradients: student side only
IMG, PATCH = 32, 16  # 2x2 grid for the student and for the 192-wide vit_tiny teacher


@pytest.fixture(scope="module")
def frozen_teacher():
    torch.manual_seed(0)
    cfg = TeacherConfig(source="timm", model="vit_tiny_patch16_224", pretrained=False)
    return build_teacher(
        cfg, student_mean=(0.5, 0.5, 0.5), student_std=(0.25, 0.25, 0.25), img_size=IMG, load_weights=False
    )


@pytest.mark.parametrize("feature_loss", ["mse", "fft"])
@pytest.mark.parametrize("setup", ["lift", "linear-projector", "avgpool"])
def test_gradients_flow_only_into_the_student(frozen_teacher, setup, feature_loss):
    teacher = frozen_teacher
    teacher.train()  # must stay in eval regardless
    assert not teacher.training and not teacher.model.training
    torch.manual_seed(1)
    cfg = StudentConfig(width=32, depth=2, head_dim=16, patch_size=PATCH, remedy="lift" if setup == "lift" else "none")
    student = build_student(cfg, num_classes=1000, img_size=IMG, target_width=teacher.feature_width).train()
    projector = nn.Linear(32, teacher.feature_width) if setup == "linear-projector" else None
    align = "avgpool" if setup == "avgpool" else None
    criterion = DistillationLoss(
        KDConfig(alpha=0.9, beta=0.2, feature_loss=feature_loss), align=align, student_width=student.feature_width
    )

    x = randn(2, 3, IMG, IMG, seed=2)
    teacher_logits, feat_t = teacher(x)
    assert not teacher_logits.requires_grad and not feat_t.requires_grad
    # Not inference tensors: autograd must be able to save them (F.mse_loss saves its target).
    assert not feat_t.is_inference() and not teacher_logits.is_inference()
    assert feat_t.shape == (2, (IMG // PATCH) ** 2, 192)
    logits, feat_s = student.forward_distill(x)
    if projector is not None:
        feat_s = projector(feat_s)
    out = criterion(logits, torch.tensor([0, 1]), feat_s, teacher_logits, feat_t)
    out["loss"].backward()

    assert out["feat"].item() > 0 and out["kl"].item() > 0
    trainable = list(student.parameters()) + (list(projector.parameters()) if projector is not None else [])
    assert all(p.grad is not None for p in trainable)
    assert student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0  # reaches the first layer
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
