"""Mismatch metrics of a trained student: did the remedy remove the encoding mismatch?

On a fixed val subset (the first ``num_images`` val images), the student's distilled map (the tapped
block for ``none``, the lifted map for Lift, the wide block for WideLast) goes through the diagnostics
math: last-layer per-image SVD rank p99 and shared-PCA rank p99 at 0.95/0.99, SEP bandwidth d/D at 90%,
and the feature-alignment MSE to the teacher (after the trained projector or the channel pooling).
"""

from __future__ import annotations

import torch

from encmm.analysis.spectra import diagnose_layer
from encmm.trainables.config import TrainConfig
from encmm.trainables.data import build_datasets
from encmm.trainables.losses import pool_teacher_channels
from encmm.trainables.teacher import build_teacher, load_checkpoint_file, model_from_checkpoint

MISMATCH_THRESHOLDS = (0.95, 0.99)


def val_subset(cfg: TrainConfig, num_images: int) -> tuple[torch.Tensor, object]:
    """The first ``num_images`` val images (a fixed subset, the same for every trial of a sweep)."""
    data = build_datasets(cfg.data)
    count = min(num_images, len(data.val))
    images = data.normalise(torch.stack([data.val[i][0] for i in range(count)]))  # uint8 ones: data.pipeline=fast
    return images, data


@torch.no_grad()
def distilled_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[I, N, C]`` distilled maps of ``model`` (an encmm student or a FrozenTeacher)."""
    model.eval()
    outs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        result = model.forward_distill(batch) if hasattr(model, "forward_distill") else model(batch)
        outs.append(result[1].float())
    return torch.cat(outs)


def frozen_teacher(cfg: TrainConfig, data, teacher_checkpoint: str | None):
    """The run's teacher, normalised for ``data`` (the student's pipeline)."""
    return build_teacher(
        cfg.teacher,
        student_mean=data.mean,
        student_std=data.std,
        checkpoint_path=teacher_checkpoint,
        img_size=cfg.data.img_size,
    )


def layer_summary(features: torch.Tensor, prefix: str) -> dict[str, float]:
    diag = diagnose_layer(features, thresholds=MISMATCH_THRESHOLDS, num_pairs=0)
    metrics = {}
    for p in ("0.95", "0.99"):
        metrics[f"{prefix}/svd_rank_p99/{p}"] = diag["svd_rank"][p]["p99"]
        metrics[f"{prefix}/pca_rank_p99/{p}"] = diag["pca_rank"][p]["p99"]
    metrics[f"{prefix}/sep_ratio_90"] = diag["sep"]["bandwidth"]["0.9"]["ratio"]
    metrics[f"{prefix}/channels"] = diag["channels"]
    return metrics


def measure_mismatch(
    cfg: TrainConfig, checkpoint_path: str, *, teacher_checkpoint: str | None = None, num_images: int = 200
) -> dict[str, float]:
    """``diag/*`` metrics of the student in ``checkpoint_path`` (and ``diag/feat_mse`` when it had a teacher)."""
    ckpt = load_checkpoint_file(checkpoint_path)
    student, _ = model_from_checkpoint(ckpt)
    images, data = val_subset(cfg, num_images)
    feat_s = distilled_features(student, images)
    metrics = layer_summary(feat_s, "diag")
    if cfg.kd.uses_teacher:
        feat_t = distilled_features(frozen_teacher(cfg, data, teacher_checkpoint), images)
        aligned = feat_s
        if feat_s.shape[-1] != feat_t.shape[-1]:
            projector = ckpt.get("projector")
            if projector is not None:
                aligned = feat_s @ projector["weight"].T + projector["bias"]
            else:
                feat_t = pool_teacher_channels(feat_t, feat_s.shape[-1])
        metrics["diag/feat_mse"] = torch.nn.functional.mse_loss(aligned, feat_t).item()
    return metrics


def teacher_summary(cfg: TrainConfig, teacher_checkpoint: str | None, num_images: int = 200) -> dict[str, float]:
    """The same metrics for the teacher itself (logged on the sweep's parent run for comparison)."""
    images, data = val_subset(cfg, num_images)
    return layer_summary(distilled_features(frozen_teacher(cfg, data, teacher_checkpoint), images), "teacher")
