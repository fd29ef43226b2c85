"""The report's model side (torch): a trial's student checkpoint loaded, inference FLOPs counted with
attention included, the fixed val images rebuilt from a trial's logged params, and SEP curves.

Fetching checkpoints from MLflow is the command's job (``report_command``); this module gets local paths.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from encmm.trainables.config import ConfigError, DataConfig

SEP_IMAGES = 64  # the fixed val subset (first images) the SEP curves are recomputed on


def parse_param(text: str):
    return None if text == "None" else yaml.safe_load(text)


def section_from_params(params: dict, section: str) -> dict:
    prefix = section + "."
    return {k.removeprefix(prefix): parse_param(v) for k, v in params.items() if k.startswith(prefix)}


def load_student(path: Path) -> torch.nn.Module:
    from encmm.trainables.teacher import load_checkpoint_file, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint_file(path))[0].eval()


@contextmanager
def explicit_attention(model: torch.nn.Module):
    """Every module with timm's ``fused_attn`` switch set to False inside the block, restored after.

    ``F.scaled_dot_product_attention`` counts as 0 FLOPs under ``FlopCounterMode`` on the CPU; timm's
    unfused path computes the same attention as explicit ``q @ k^T`` and ``attn @ v`` matmuls, which count.
    """
    switches = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for module, _ in switches:
            module.fused_attn = False
        yield model
    finally:
        for module, fused in switches:
            module.fused_attn = fused


@torch.no_grad()
def count_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """Inference GFLOPs of one ``[1, 3, H, W]`` forward, attention included (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with explicit_attention(model), counter:
        model(image[:1])
    return counter.get_total_flops() / 1e9


def val_images(record, params: dict) -> tuple[torch.Tensor, object]:
    """The first ``SEP_IMAGES`` val images of the trials' data config (from the child's flat params).

    ``record`` is the sweep (``report_command.SweepRecord``); only its ``name`` is read, for the error.
    """
    from encmm.trainables.mismatch import val_subset

    try:
        data = DataConfig.model_validate(section_from_params(params, "data"))
    except Exception as exc:  # noqa: BLE001 - a sweep logged by another encmm version
        raise ConfigError(f"sweep {record.name}: cannot rebuild data config from the run params: {exc}") from None
    return val_subset(SimpleNamespace(data=data), SEP_IMAGES)


def mean_sep_curve(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """Mean SEP curve ``[D]`` of the distilled (last-layer) map over every token of ``images``."""
    from encmm.analysis.spectra import sep_curves
    from encmm.trainables.mismatch import distilled_features

    feats = distilled_features(model, images)
    return sep_curves(feats.reshape(-1, feats.shape[-1]))[0].tolist()
