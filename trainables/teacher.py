"""Frozen teachers: a timm model (pretrained or local weights) or an encmm checkpoint.

A teacher is never wrapped in DDP, stays in eval mode and runs under ``torch.no_grad``.
Its input is renormalised when its mean/std differ from the student's data pipeline.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from trainables.config import StudentConfig, TeacherConfig


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """Token grid (H, W) of the first patch embedding inside ``model`` (timm's ``grid_size``)."""
    for module in model.modules():
        grid = getattr(module, "grid_size", None)
        if grid is not None:
            return tuple(grid)
    return None


class FrozenTeacher(nn.Module):
    """``forward(x) -> (logits [B, K], tokens [B, N, C])`` of a frozen model, ``x`` in student space.

    A timm model is tapped at ``block`` through ``forward_intermediates`` (patch tokens, no norm);
    an encmm-trained model is tapped where it was distilled itself (``forward_distill``).
    """

    def __init__(self, model: nn.Module, block: int, *, student_mean, student_std, teacher_mean, teacher_std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.is_encmm = hasattr(model, "forward_distill")
        self.block = block
        s_mean, s_std = torch.tensor(student_mean), torch.tensor(student_std)
        t_mean, t_std = torch.tensor(teacher_mean), torch.tensor(teacher_std)
        # x_t = (x_s * s_std + s_mean - t_mean) / t_std, folded into one affine map per channel.
        self.renormalise = not (torch.allclose(s_mean, t_mean) and torch.allclose(s_std, t_std))
        self.register_buffer("scale", (s_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)  # always eval: no dropout / drop-path, fixed norms

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved by the student's loss graph
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.renormalise:
            x = x * self.scale + self.shift
        if self.is_encmm:
            return self.model.forward_distill(x)
        final, taps = self.model.forward_intermediates(
            x, indices=[self.block], norm=False, output_fmt="NLC", intermediates_only=False)
        return self.model.forward_head(final), taps[0]

    @property
    def feature_width(self) -> int:
        return teacher_feature_width(self.model)


def teacher_feature_width(model: nn.Module) -> int:
    if hasattr(model, "feature_width"):
        return model.feature_width
    return getattr(model, "embed_dim", None) or model.num_features


def create_timm_teacher(cfg: TeacherConfig, *, load_weights: bool, img_size: int | None = None) -> nn.Module:
    """``cfg.model`` from timm at ``cfg.img_size`` (default: the student's input size)."""
    kwargs = {}
    if cfg.img_size or img_size:
        kwargs["img_size"] = cfg.img_size or img_size
    if load_weights and cfg.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(cfg.pretrained_file).resolve()))
    pretrained = load_weights and (cfg.pretrained or bool(cfg.pretrained_file))
    return timm.create_model(cfg.model, pretrained=pretrained, **kwargs)


def load_checkpoint_file(path: str | Path) -> dict:
    """An encmm checkpoint, loaded with ``weights_only=True`` (no code runs from the file)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def model_from_checkpoint(ckpt: dict, *, load_weights: bool = True) -> tuple[nn.Module, dict]:
    """Rebuild the trained student an encmm checkpoint describes; returns (model, spec)."""
    from trainables.models import build_student

    spec = ckpt["spec"]
    cfg = StudentConfig.model_validate(spec["student"])
    model = build_student(cfg, num_classes=spec["num_classes"], img_size=spec["img_size"],
                          target_width=spec.get("target_width"), tap_block=spec.get("tap_block", -1))
    if load_weights:
        model.load_state_dict(ckpt["model"])
    return model, spec


def build_teacher(cfg: TeacherConfig, *, student_mean, student_std, checkpoint_path: str | None = None,
                  img_size: int | None = None, load_weights: bool = True) -> FrozenTeacher:
    """The frozen teacher for ``cfg``. For ``source=run`` the caller resolves ``checkpoint_path``."""
    if cfg.source == "timm":
        model = create_timm_teacher(cfg, load_weights=load_weights, img_size=img_size)
        mean, std = model.pretrained_cfg.get("mean"), model.pretrained_cfg.get("std")
    elif cfg.source in ("checkpoint", "run"):
        path = checkpoint_path or cfg.checkpoint
        model, spec = model_from_checkpoint(load_checkpoint_file(path), load_weights=load_weights)
        mean, std = spec["mean"], spec["std"]
    else:
        raise ValueError("teacher.source is none")
    return FrozenTeacher(model, cfg.block, student_mean=student_mean, student_std=student_std,
                         teacher_mean=mean, teacher_std=std)
