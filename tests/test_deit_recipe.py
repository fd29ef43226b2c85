"""The DeiT train transform (timm's ``rand-m9-mstd0.5-inc1``) on real JPEG bytes, under the installed Pillow.

Issue 13, part 0: timm's increasing posterize asks Pillow for 0 bits at the top magnitude and Pillow >= 13
refuses 0 bits, so about one train image in several hundred raised and no ImageNet epoch could finish.
Real timm, real Pillow, JPEGs encoded and decoded in memory; no mocks.
"""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from encmm.trainables.config import DataConfig
from encmm.trainables.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _augment_ops,
    build_deit_transforms,
    posterize_keeping_zero_bits,
)

TRANSFORMS = 20_000
IMG_SIZE = 32


def random_jpegs(count: int, size=(48, 40), seed: int = 0) -> list[bytes]:
    """``count`` JPEG files (bytes) of smooth random colour fields plus noise, so JPEG has work to do."""
    rng = np.random.default_rng(seed)
    files = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.BILINEAR)
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (size[1], size[0], 3))
        buffer = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=85)
        files.append(buffer.getvalue())
    return files


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def deit_config(root: str = "/unused") -> DataConfig:
    return DataConfig(name="imagefolder", root=root, img_size=IMG_SIZE, augment="deit")


def timm_deit_train_transform(cfg: DataConfig):
    """The same transform built by timm directly, without encmm's posterize fix."""
    from timm.data import create_transform

    return create_transform(
        cfg.img_size,
        is_training=True,
        auto_augment=cfg.auto_augment,
        color_jitter=cfg.color_jitter,
        re_prob=cfg.random_erasing,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def seed_everything(seed: int) -> None:
    # timm's AugmentOp draws from `random`, RandAugment picks ops with numpy, RandomErasing uses torch.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def posterize_ops(transform) -> list:
    return [op for op in _augment_ops(transform) if op.name.startswith("Posterize")]


# ------------------------------------------------------------------ the op itself
def test_pillow_refuses_zero_bits_and_encmm_posterize_gives_black():
    from timm.data.auto_augment import posterize as timm_posterize

    image = decode(random_jpegs(1)[0])
    try:
        timm_posterize(image, 0)
    except ValueError as exc:
        assert "bits" in str(exc)
    else:
        pytest.skip("this Pillow posterizes to 0 bits again: encmm's posterize_keeping_zero_bits is no longer needed")

    black = posterize_keeping_zero_bits(image, 0)
    assert black.mode == image.mode and black.size == image.size
    assert not np.asarray(black).any()
    for bits in range(1, 8):
        assert np.array_equal(
            np.asarray(posterize_keeping_zero_bits(image, bits)), np.asarray(ImageOps.posterize(image, bits))
        )
        assert np.array_equal(
            np.asarray(posterize_keeping_zero_bits(image, bits)), np.asarray(timm_posterize(image, bits))
        )
    assert posterize_keeping_zero_bits(image, 8) is image  # as timm: 8 bits or more is a no-op


def test_deit_transform_has_its_posterize_ops_fixed_and_still_pickles():
    train_tf, _ = build_deit_transforms(deit_config(), IMAGENET_MEAN, IMAGENET_STD)
    [op] = posterize_ops(train_tf)
    assert op.name == "PosterizeIncreasing" and op.aug_fn is posterize_keeping_zero_bits
    restored = pickle.loads(pickle.dumps(train_tf))  # DataLoader workers under spawn, Ray object store
    [op] = posterize_ops(restored)
    assert op.aug_fn is posterize_keeping_zero_bits
    assert not np.asarray(op.aug_fn(decode(random_jpegs(1)[0]), 0)).any()


def test_transform_without_auto_augment_has_no_posterize_and_is_unchanged():
    cfg = DataConfig(name="imagefolder", root="/unused", img_size=IMG_SIZE, augment="none")
    train_tf, eval_tf = build_deit_transforms(cfg, IMAGENET_MEAN, IMAGENET_STD)
    assert not posterize_ops(train_tf) and not posterize_ops(eval_tf)
    assert train_tf(decode(random_jpegs(1)[0])).shape == (3, IMG_SIZE, IMG_SIZE)


# ------------------------------------------------------------------ the full recipe, many times
def test_deit_train_transform_survives_20000_jpegs_and_hits_zero_bit_posterize():
    files = random_jpegs(40)
    train_tf, _ = build_deit_transforms(deit_config(), IMAGENET_MEAN, IMAGENET_STD)
    bits_seen: list[int] = []
    for op in posterize_ops(train_tf):
        assert op.aug_fn is posterize_keeping_zero_bits
        op.aug_fn = lambda image, bits, **kw: bits_seen.append(bits) or posterize_keeping_zero_bits(image, bits, **kw)

    seed_everything(0)
    for i in range(TRANSFORMS):
        out = train_tf(decode(files[i % len(files)]))
        assert out.shape == (3, IMG_SIZE, IMG_SIZE)
    zero_bit_hits = bits_seen.count(0)
    print(f"{TRANSFORMS} transforms, {len(bits_seen)} posterize calls, {zero_bit_hits} with 0 bits")
    assert zero_bit_hits >= 1, "posterize to 0 bits was never drawn: this test proves nothing"

    # timm's own transform, same seed and images, raises within the same number of transforms.
    unfixed = timm_deit_train_transform(deit_config())
    seed_everything(0)
    with pytest.raises(ValueError, match="bits"):
        for i in range(TRANSFORMS):
            unfixed(decode(files[i % len(files)]))
    print(f"timm's unfixed transform raised at transform {i}")


# ------------------------------------------------------------------ encmm train, end to end
def write_jpeg_folder(root, classes: int = 3, train: int = 24, val: int = 6) -> None:
    files = random_jpegs(classes * (train + val), size=(40, 40), seed=1)
    for c in range(classes):
        for split, count, start in (("train", train, 0), ("val", val, train)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i}.jpg").write_bytes(files[c * (train + val) + start + i])


@pytest.mark.ray
def test_encmm_train_with_deit_augment_on_a_jpeg_imagefolder_finishes(ray_cluster, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from encmm.orchestrator.cli import app

    write_jpeg_folder(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        "data.name=imagefolder",
        f"data.root={tmp_path / 'images'}",
        "data.augment=deit",
        "data.img_size=32",
        "data.batch_size=16",
        "student.width=32",
        "student.depth=2",
        "student.head_dim=16",
        "student.patch_size=8",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
        "resources.cpus_per_worker=0.5",
    ]
    result = CliRunner().invoke(app, ["train", "--tracking-uri", uri, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output[-3000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("encmm").experiment_id])
    assert run.info.status == "FINISHED"
    assert "val/acc1" in run.data.metrics
    assert run.data.params.get("data.augment") == "deit"
