"""Distillation losses (paper.md, "Distillation setup").

    L = (1 - alpha) * CE_ls(z_s, y) + beta * L_feat(F_s, F_t) + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))

CE_ls is cross-entropy with label smoothing; KL is averaged over the batch. L_feat compares patch-token
maps ``[B, N, C]`` (N = H*W): ``mse`` is the plain mean squared error, ``fft`` the MSE between
``rfft2`` over (H, W) with ``norm="ortho"``, real and imaginary parts stacked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from torch import nn

from encmm.trainables.config import KDConfig


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, C]`` with N = H*W square -> ``[B, C, H, W]``."""
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


def feature_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


def feature_fft_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the 2-D spatial spectra (``rfft2`` over H, W, ortho) of two token maps."""
    fs = torch.fft.rfft2(tokens_to_map(student.float()), norm="ortho")
    ft = torch.fft.rfft2(tokens_to_map(teacher.float()), norm="ortho")
    return F.mse_loss(torch.view_as_real(fs), torch.view_as_real(ft))


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), mean over the batch (Hinton et al.)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def pool_teacher_channels(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Adaptive average pooling of teacher channels C_t -> ``width`` (the released code's alignment):
    ``[B, N, C_t] -> [B, N, width]``. Output channel j averages input channels
    ``floor(j C_t / width) .. ceil((j + 1) C_t / width) - 1``: equal bins of ``C_t / width`` when it
    divides, uneven (overlapping) bins otherwise, e.g. 384 -> 219 for the UniformWide control."""
    return F.adaptive_avg_pool1d(tokens, width)


class DistillationLoss(nn.Module):
    """``forward(logits, labels, feat_s, teacher_logits, feat_t) -> dict`` of named losses (``loss`` = total).

    ``feat_s`` is the student's distilled map already in teacher space when a projector is used;
    with ``align="avgpool"`` the teacher map is pooled to the student's width here.
    """

    def __init__(self, cfg: KDConfig, align: str | None = None, student_width: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.ce = LabelSmoothingCrossEntropy(cfg.label_smoothing) if cfg.label_smoothing > 0 else nn.CrossEntropyLoss()
        self.feature_fn = feature_fft_mse if cfg.feature_loss == "fft" else feature_mse
        self.align, self.student_width = align, student_width

    def forward(self, logits, labels, feat_s=None, teacher_logits=None, feat_t=None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ce = self.ce(logits.float(), labels)
        losses = {"ce": ce}
        total = (1.0 - cfg.alpha) * ce
        if cfg.beta > 0:
            if self.align == "avgpool":
                feat_t = pool_teacher_channels(feat_t, self.student_width)
            feat = self.feature_fn(feat_s, feat_t)
            losses["feat"] = feat
            total = total + cfg.beta * feat
        if cfg.alpha > 0:
            kl = soft_kl(logits, teacher_logits, cfg.temperature)
            losses["kl"] = kl
            total = total + cfg.alpha * kl
        losses["loss"] = total
        return losses
