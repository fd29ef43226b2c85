"""Students: timm Vision Transformers of a given width, with the paper's remedies.

- ``none``: a plain timm ViT (CLS readout). Feature alignment to a wider teacher lives in the
  loss (student-side projector or teacher-channel pooling), never in the inference graph.
- ``lift``: last-block patch tokens -> Linear(width -> target, no bias) + LayerNorm(target), kept at
  inference; logits = new head(GAP(lifted tokens)). The lifted map is what is distilled.
- ``widelast``: blocks 0..depth-k-1 at ``width``; all tokens enter the last k blocks through
  Linear(no bias) + LayerNorm; those blocks, the final norm and the head are ``target`` wide
  (heads scaled so the head dim stays ``target // heads_wide``); CLS readout.
- ``uniformwide``: control, a plain ViT whose single width matches WideLast's parameter count.

Every student exposes ``forward(x) -> logits`` and ``forward_distill(x) -> (logits, tokens)`` with
tokens ``[B, N, C_feat]`` = patch tokens of the distilled block (no final norm).
"""

from __future__ import annotations

from functools import partial

import timm
import torch
from torch import nn

from encmm.trainables.config import StudentConfig

LAYER_NORM = partial(nn.LayerNorm, eps=1e-6)  # timm's ViT norm
LIFT_NORM_EPS = 1e-5  # the authors' Lift projector uses torch's default LayerNorm eps


def create_vit(cfg: StudentConfig, *, width: int, depth: int, heads: int, img_size: int, num_classes: int) -> nn.Module:
    """A timm VisionTransformer from ``cfg.model`` with the geometry overridden (random init)."""
    return timm.create_model(
        cfg.model,
        pretrained=False,
        img_size=img_size,
        patch_size=cfg.patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=num_classes,
        drop_path_rate=cfg.drop_path,
    )


def wide_heads(cfg: StudentConfig, target_width: int) -> int:
    """Heads of a widened block: keep the narrow blocks' head dim when it divides the target width."""
    head_dim = cfg.width // cfg.heads
    return target_width // head_dim if target_width % head_dim == 0 else cfg.heads


class PlainStudent(nn.Module):
    """Remedy ``none`` / ``uniformwide``: a timm ViT, distilled at ``tap_block``."""

    def __init__(self, backbone: nn.Module, tap_block: int):
        super().__init__()
        self.backbone = backbone
        self.tap_block = tap_block % len(backbone.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_distill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, taps = self.backbone.forward_intermediates(
            x, indices=[self.tap_block], norm=False, output_fmt="NLC", intermediates_only=False
        )
        return self.backbone.forward_head(final), taps[0]

    @property
    def feature_width(self) -> int:
        return self.backbone.embed_dim


class LiftStudent(nn.Module):
    """Remedy ``lift``: the lifting projector and a GAP head over lifted tokens, kept at inference."""

    def __init__(self, backbone: nn.Module, target_width: int, num_classes: int):
        super().__init__()
        backbone.reset_classifier(0)
        backbone.norm = nn.Identity()  # the lifted map is read pre-norm; the old norm would be unused
        self.backbone = backbone
        self.lift = nn.Sequential(
            nn.Linear(backbone.embed_dim, target_width, bias=False), nn.LayerNorm(target_width, eps=LIFT_NORM_EPS)
        )
        self.head = nn.Linear(target_width, num_classes)

    def lifted_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> lifted patch tokens ``[B, N, target]``."""
        tokens = self.backbone.forward_features(x)
        return self.lift(tokens[:, self.backbone.num_prefix_tokens :])

    def forward_distill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lifted = self.lifted_tokens(x)
        return self.head(lifted.mean(dim=1)), lifted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_distill(x)[0]

    @property
    def feature_width(self) -> int:
        return self.head.in_features


class WideLastStudent(nn.Module):
    """Remedy ``widelast``: narrow timm ViT trunk, then ``k`` blocks at the target width."""

    def __init__(self, trunk: nn.Module, wide_blocks: nn.Sequential, target_width: int, num_classes: int):
        super().__init__()
        trunk.reset_classifier(0)
        trunk.norm = nn.Identity()
        self.trunk = trunk
        self.entry = nn.Sequential(nn.Linear(trunk.embed_dim, target_width, bias=False), LAYER_NORM(target_width))
        self.wide_blocks = wide_blocks
        self.norm = LAYER_NORM(target_width)
        self.head = nn.Linear(target_width, num_classes)

    def forward_distill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.wide_blocks(self.entry(self.trunk.forward_features(x)))
        logits = self.head(self.norm(tokens)[:, 0])
        return logits, tokens[:, self.trunk.num_prefix_tokens :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_distill(x)[0]

    @property
    def feature_width(self) -> int:
        return self.head.in_features


def timm_no_weight_decay(model: nn.Module) -> set[str]:
    """Full parameter names that timm's own models exempt from weight decay (their ``no_weight_decay()``
    sets: ``pos_embed``, ``cls_token``, ...), for every timm model nested anywhere in ``model``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if module is not model and callable(getattr(module, "no_weight_decay", None)):
            names |= {f"{prefix}.{name}" for name in module.no_weight_decay()}
    if callable(getattr(model, "no_weight_decay", None)):
        names |= set(model.no_weight_decay())
    return names


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_widelast(cfg: StudentConfig, *, target_width: int, img_size: int, num_classes: int) -> WideLastStudent:
    from timm.models.vision_transformer import Block

    trunk = create_vit(
        cfg, width=cfg.width, depth=cfg.depth - cfg.wide_blocks, heads=cfg.heads, img_size=img_size, num_classes=0
    )
    heads = wide_heads(cfg, target_width)
    wide = nn.Sequential(
        *[
            Block(target_width, heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, norm_layer=LAYER_NORM)
            for _ in range(cfg.wide_blocks)
        ]
    )
    model = WideLastStudent(trunk, wide, target_width, num_classes)
    # timm's ViT init for the new layers (trunc normal 0.02, zero bias), as the trunk got.
    from timm.models.vision_transformer import init_weights_vit_timm

    for module in (model.entry, model.wide_blocks, model.head):
        module.apply(init_weights_vit_timm)
    return model


def match_uniform_width(cfg: StudentConfig, *, target_width: int, img_size: int, num_classes: int) -> int:
    """Width (a multiple of the student's heads) whose plain ViT is closest in size to WideLast."""
    goal = count_parameters(build_widelast(cfg, target_width=target_width, img_size=img_size, num_classes=num_classes))
    heads = cfg.heads
    best, best_gap = cfg.width, None
    for width in range(cfg.width, 2 * target_width + 1, heads):
        size = vit_parameter_count(
            width=width,
            depth=cfg.depth,
            mlp_ratio=cfg.mlp_ratio,
            tokens=(img_size // cfg.patch_size) ** 2 + 1,
            patch_size=cfg.patch_size,
            num_classes=num_classes,
        )
        gap = abs(size - goal)
        if best_gap is None or gap < best_gap:
            best, best_gap = width, gap
    return best


def vit_parameter_count(
    *, width: int, depth: int, mlp_ratio: float, tokens: int, patch_size: int, num_classes: int, in_chans: int = 3
) -> int:
    """Closed form of a timm ViT's size (CLS token, learned pos-embed, qkv bias, final norm, head)."""
    hidden = int(width * mlp_ratio)
    block = (
        2 * 2 * width
        + (3 * width * width + 3 * width)
        + (width * width + width)
        + (width * hidden + hidden)
        + (hidden * width + width)
    )
    embed = in_chans * patch_size * patch_size * width + width + width + tokens * width
    return embed + depth * block + 2 * width + width * num_classes + num_classes


def build_student(
    cfg: StudentConfig, *, num_classes: int, img_size: int, target_width: int | None = None, tap_block: int = -1
) -> nn.Module:
    """The student for ``cfg.remedy``. ``target_width`` defaults to ``cfg.target_width``."""
    target = cfg.target_width or target_width
    if cfg.remedy == "none":
        backbone = create_vit(
            cfg, width=cfg.width, depth=cfg.depth, heads=cfg.heads, img_size=img_size, num_classes=num_classes
        )
        return PlainStudent(backbone, tap_block)
    if target is None:
        raise ValueError(f"remedy {cfg.remedy} needs a target width (student.target_width or a teacher)")
    if cfg.remedy == "lift":
        backbone = create_vit(
            cfg, width=cfg.width, depth=cfg.depth, heads=cfg.heads, img_size=img_size, num_classes=num_classes
        )
        model = LiftStudent(backbone, target, num_classes)
        from timm.models.vision_transformer import init_weights_vit_timm

        model.lift.apply(init_weights_vit_timm)
        model.head.apply(init_weights_vit_timm)
        return model
    if cfg.remedy == "widelast":
        return build_widelast(cfg, target_width=target, img_size=img_size, num_classes=num_classes)
    width = match_uniform_width(cfg, target_width=target, img_size=img_size, num_classes=num_classes)
    backbone = create_vit(
        cfg, width=width, depth=cfg.depth, heads=cfg.heads, img_size=img_size, num_classes=num_classes
    )
    return PlainStudent(backbone, tap_block)
