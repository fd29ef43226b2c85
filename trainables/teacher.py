"""Frozen teachers: a timm model (pretrained or local weights) or an encmm checkpoint.

A teacher is never wrapped in DDP, stays in eval mode and runs under ``torch.no_grad``.
Its input is renormalised when its mean/std differ from the student's data pipeline.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.cait import TalkingHeadAttn
from torch import nn

from encmm.trainables.config import StudentConfig, TeacherConfig


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """Token grid (H, W) of the first patch embedding inside ``model`` (timm's ``grid_size``)."""
    for module in model.modules():
        grid = getattr(module, "grid_size", None)
        if grid is not None:
            return tuple(grid)
    return None


def token_grid_mismatch(teacher_grid, student_grid) -> str | None:
    """Why feature KD cannot compare these token grids, or None: the maps are compared token by token, and a
    smaller grid would silently broadcast against a larger one in the loss."""
    if teacher_grid == student_grid:
        return None
    return (
        f"teacher token grid {teacher_grid} cannot be matched to the student's {student_grid} "
        f"(same img_size / patch_size ratio needed)"
    )


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

    def cast_weights(self, dtype: torch.dtype) -> FrozenTeacher:
        """Keep the frozen model's weights in ``dtype`` (``teacher.dtype``); where no autocast casts the
        inputs, :meth:`forward` casts them to it. Returns self."""
        self.model.to(dtype)
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the frozen model's weights (float32 unless cast)."""
        return next(self.model.parameters(), torch.empty(0)).dtype

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # always eval: no dropout / drop-path, fixed norms

    @torch.no_grad()  # not inference_mode: its tensors cannot be saved by the student's loss graph
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.renormalise:
            x = x * self.scale + self.shift
        weight_dtype = self.weight_dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight_dtype)
        if self.is_encmm:
            return self.model.forward_distill(x)
        final, taps = self.model.forward_intermediates(
            x, indices=[self.block], norm=False, output_fmt="NLC", intermediates_only=False
        )
        return self.model.forward_head(final), taps[0]

    @property
    def feature_width(self) -> int:
        return teacher_feature_width(self.model)


class FusedTalkingHeadAttn(TalkingHeadAttn):
    """timm's CaiT talking-heads attention as one fused scaled-dot-product attention, for a frozen teacher.

    timm mixes the H heads of every attention entry with ``proj_l`` before the softmax and ``proj_w``
    after it, as Linear(H, H) layers on permuted ``[B, N, N, H]`` copies of the attention maps. Both
    mixings fold into the attention inputs instead, so the maps never leave the fused kernel:

        logits_g = sum_h Wl[g,h] q_h k_h^T (+ bl_g, which the softmax cancels) = Q_g K^T,
            Q_g = [Wl[g,0] q_0 | ... | Wl[g,H-1] q_{H-1}],  K = [k_0 | ... | k_{H-1}]   (inner dim C)
        out_f = sum_g Ww[f,g] P_g v_f + bw_f 1^T v_f,  P_g v_f = block f of  P_g V,  V = [v_0 | ... | v_{H-1}]

    i.e. one ``scaled_dot_product_attention`` of width C = H*d (the H mixed queries stacked as rows), then a
    weighted sum over g.
    H times the FLOPs of the two attention matmuls, in exchange for no pass over the mixed maps. Same
    parameters and state-dict keys as timm's block and, in eval mode, the same function.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).unbind(2)  # [B, N, H, d] each
        mix_l = self.proj_l.weight.to(q.dtype)  # [G, H]
        q_mixed = (mix_l[:, None, :, None] * q[:, None]).reshape(b, h, n, c)  # [B, G, N, (H, d)]
        mixed = self.attend(q_mixed, k.reshape(b, 1, n, c), v.reshape(b, 1, n, c))  # block f of [b, g, n] = P_g v_f
        mix_w = self.proj_w.weight.to(mixed.dtype).t()  # [G, F]
        out = (mixed.reshape(b, h, n, h, d) * mix_w[None, :, None, :, None]).sum(1)  # [B, N, F, d]
        out = out + self.proj_w.bias.to(out.dtype)[:, None] * v.sum(1, keepdim=True)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))

    def attend(self, q_mixed: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor) -> torch.Tensor:
        """SDPA of the mixed queries ``[B, G, N, C]`` over ``k_all``, ``v_all`` ``[B, 1, N, C]``. The G mixed
        queries of an image all attend to the same keys: they are stacked as G*N query rows of one head, so
        K and V are read once, not expanded per head. Returns ``[B, 1, G*N, C]``: rows in (g, n) order, so it
        reshapes to ``[B, G, N, C]``."""
        b, g, n, c = q_mixed.shape
        return F.scaled_dot_product_attention(q_mixed.reshape(b, 1, g * n, c), k_all, v_all, scale=self.scale)


def fuse_talking_heads(model: nn.Module, attention: type[TalkingHeadAttn] = FusedTalkingHeadAttn) -> int:
    """Swap timm's talking-heads blocks inside ``model`` for ``attention`` (a subclass computing the same
    function from the same parameters) in place: same parameters, same state dict. Only for inference:
    blocks that would apply attention dropout are left alone. Returns how many were swapped (0 for a model
    without talking heads, e.g. every non-CaiT)."""
    swapped = 0
    for module in model.modules():
        if type(module) is TalkingHeadAttn and (not module.training or module.attn_drop.p == 0):
            module.__class__ = attention
            swapped += 1
    return swapped


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
    from encmm.trainables.models import build_student

    spec = ckpt["spec"]
    cfg = StudentConfig.model_validate(spec["student"])
    model = build_student(
        cfg,
        num_classes=spec["num_classes"],
        img_size=spec["img_size"],
        target_width=spec.get("target_width"),
        tap_block=spec.get("tap_block", -1),
    )
    if load_weights:
        model.load_state_dict(ckpt["model"])
    return model, spec


def build_teacher(
    cfg: TeacherConfig,
    *,
    student_mean,
    student_std,
    checkpoint_path: str | None = None,
    img_size: int | None = None,
    load_weights: bool = True,
) -> FrozenTeacher:
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
    return FrozenTeacher(
        model, cfg.block, student_mean=student_mean, student_std=student_std, teacher_mean=mean, teacher_std=std
    )
