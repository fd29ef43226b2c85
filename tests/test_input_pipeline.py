"""``data.pipeline=fast`` keeps the DeiT recipe of ``standard`` (timm's create_transform): issue 17.

The fast path draws every random parameter with timm's own code in timm's order, decodes JPEGs at a reduced
DCT scale where the crop allows, and normalises and erases on the device. Real timm, real Pillow, real JPEGs.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from encmm.bench.bench_input import ensure_image_folder
from encmm.trainables.config import DataConfig, load_train_config
from encmm.trainables.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataBundle,
    DraftRandomResizedCrop,
    TensorImageDataset,
    _augment_ops,
    build_datasets,
    build_deit_transforms,
    build_loaders,
    crop_resized_uint8,
    decode_rgb,
    draft_scale,
    posterize_keeping_zero_bits,
    split_decode_stage,
)
from tests.conftest import TINY_STUDENT
from tests.test_deit_recipe import posterize_ops, random_jpegs, seed_everything, write_jpeg_folder

IMG_SIZE = 32
CPU = torch.device("cpu")
# Eval without draft: box resize and resize-then-crop give each output pixel the same centre and filter taps, so
# only float rounding differs (measured: max 1 level, PSNR >= 83 dB). With draft (1/4 here) the DCT-domain
# downscale replaces part of the bicubic one: measured 37-46 dB on these JPEGs; the crop box misplaced by one
# full-size pixel gives 18-20 dB, so 30 dB tells a right mapping from a wrong one.
EVAL_PSNR_NO_DRAFT, EVAL_PSNR_DRAFT = 60.0, 30.0


def deit_config(**fields) -> DataConfig:
    return DataConfig(**{"name": "imagefolder", "root": "/unused", "img_size": IMG_SIZE, "augment": "deit", **fields})


def fast_stages(cfg: DataConfig):
    """((train decode, train rest), (eval decode, eval rest)) of the fast path."""
    return [split_decode_stage(tf) for tf in build_deit_transforms(cfg, IMAGENET_MEAN, IMAGENET_STD, uint8=True)]


def opened(data: bytes) -> Image.Image:
    """A JPEG as ``Image.open`` gives it: header read, pixels not decoded yet."""
    return Image.open(io.BytesIO(data))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two 0-255 images."""
    mse = (a.double() - b.double()).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def to_levels(images: torch.Tensor) -> torch.Tensor:
    """Normalised ``[B, 3, S, S]`` back to 0-255."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return images * std + mean


# ------------------------------------------------------------------ parameters of each op, image by image
def record_random_ops(monkeypatch, *transforms) -> list:
    """Every crop (image size it was drawn on, params), flip and RandAugment op (name, level args) that the
    given transforms apply, in order, into the returned list."""
    import torchvision.transforms.functional as tvf
    from timm.data.transforms import RandomResizedCropAndInterpolation

    events: list = []
    draw = RandomResizedCropAndInterpolation.get_params

    def recorded_crop(image, scale, ratio):
        params = draw(image, scale, ratio)
        events.append(("crop", image.size, params))
        return params

    monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(recorded_crop))
    flip = tvf.hflip
    monkeypatch.setattr(tvf, "hflip", lambda image: events.append(("flip",)) or flip(image))
    for transform in transforms:
        for op in _augment_ops(transform):

            def recorded_op(image, *args, _op=op, _fn=op.aug_fn, **kwargs):
                events.append((_op.name, args))
                return _fn(image, *args, **kwargs)

            op.aug_fn = recorded_op
    return events


def test_fast_train_path_draws_timms_crops_flips_and_randaugment_ops(monkeypatch):
    files = random_jpegs(20, size=(200, 150), seed=3)
    cfg = deit_config()
    standard, _ = build_deit_transforms(cfg, IMAGENET_MEAN, IMAGENET_STD)
    (decode, rest), _ = fast_stages(cfg)
    events = record_random_ops(monkeypatch, standard, rest)
    per_path = []
    for transform in (lambda data: standard(decode_rgb(opened(data))), lambda data: rest(decode(opened(data)))):
        per_image = []
        for i in range(300):
            seed_everything(i)
            transform(files[i % len(files)])
            per_image.append(list(events))
            events.clear()
        per_path.append(per_image)
    timm_events, fast_events = per_path
    assert fast_events == timm_events  # same crops (drawn on the full-size image), flips, ops and magnitudes

    crops = [e for image in fast_events for e in image if e[0] == "crop"]
    assert all(size == (200, 150) for _, size, _ in crops)
    scales = Counter(draft_scale((w, h), (IMG_SIZE, IMG_SIZE)) for _, _, (_, _, h, w) in crops)
    assert scales[1] and scales[2] and scales[4], f"draft scales drawn: {scales}: some path is not exercised"
    areas = np.array([h * w / (200 * 150) for _, _, (_, _, h, w) in crops])
    assert 0.07 <= areas.min() and areas.max() <= 1.0  # scale (0.08, 1), up to the rounding of the sides
    flips = sum(any(e[0] == "flip" for e in image) for image in fast_events)
    assert abs(flips / 300 - 0.5) < 4 * math.sqrt(0.25 / 300)
    ops = Counter(e[0] for image in fast_events for e in image if e[0] not in ("crop", "flip"))
    assert ops == Counter(e[0] for image in timm_events for e in image if e[0] not in ("crop", "flip"))
    assert len(ops) >= 12, f"RandAugment ops seen: {sorted(ops)}"
    magnitudes = Counter((e[0], e[1]) for image in fast_events for e in image if e[0] not in ("crop", "flip"))
    assert magnitudes == Counter((e[0], e[1]) for image in timm_events for e in image if e[0] not in ("crop", "flip"))


def test_device_random_erasing_has_the_standard_rate_and_area():
    """Erasing moves from each worker's image to the device batch: same probability, same box areas."""
    from timm.data.random_erasing import RandomErasing

    count = 2000
    seed_everything(0)
    cfg = deit_config(batch_size=100)
    standard, _ = build_deit_transforms(cfg, IMAGENET_MEAN, IMAGENET_STD)
    [erase] = [op for op in standard.transforms if isinstance(op, RandomErasing)]
    blank = torch.zeros(3, IMG_SIZE, IMG_SIZE)  # a normalised image: any changed pixel was erased
    standard_masks = torch.stack([(erase(blank.clone()) != 0).any(0) for _ in range(count)])

    grey = torch.full((count, 3, IMG_SIZE, IMG_SIZE), 128, dtype=torch.uint8)
    bundle = DataBundle(
        TensorImageDataset(grey, torch.zeros(count, dtype=torch.long)),
        TensorImageDataset(grey[:100], torch.zeros(100, dtype=torch.long)),
        2,
        IMAGENET_MEAN,
        IMAGENET_STD,
        uint8=True,
    )
    train, _ = build_loaders(cfg, bundle, seed=0, device=CPU)
    train.sampler.set_epoch(0)
    constant = ((128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    fast_masks = torch.cat([(images - constant).abs().gt(1e-5).any(1) for images, _ in train])

    assert len(fast_masks) == count
    sigma = math.sqrt(0.25 * 0.75 / count)
    rates = [masks.any(-1).any(-1).float().mean().item() for masks in (standard_masks, fast_masks)]
    assert all(abs(rate - 0.25) < 4 * sigma for rate in rates), rates
    areas = [masks[masks.any(-1).any(-1)].float().mean().item() for masks in (standard_masks, fast_masks)]
    assert abs(areas[0] - areas[1]) < 0.02 and 0.1 < areas[1] < 0.25, areas  # U(0.02, 1/3) of the image


def test_fast_transform_keeps_the_zero_bit_posterize_fix_and_pickles():
    (_, rest), _ = fast_stages(deit_config())
    restored = pickle.loads(pickle.dumps(rest))  # loader workers under spawn, Ray object store
    for transform in (rest, restored):
        [op] = posterize_ops(transform)
        assert op.aug_fn is posterize_keeping_zero_bits
    image = decode_rgb(opened(random_jpegs(1)[0]))
    assert not np.asarray(posterize_ops(restored)[0].aug_fn(image, 0)).any()


# ------------------------------------------------------------------ pixels
@pytest.fixture
def decoded_sizes(monkeypatch) -> list:
    """The size each image file is decoded at (after any draft), in order."""
    sizes = []
    load = ImageFile.ImageFile.load

    def recorded_load(image):
        if image.tile:  # pixels not decoded yet
            sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recorded_load)
    return sizes


@pytest.mark.parametrize(
    ("size", "decoded", "threshold"),
    [((96, 64), (96, 64), EVAL_PSNR_NO_DRAFT), ((200, 150), (50, 38), EVAL_PSNR_DRAFT)],
)
def test_fast_eval_matches_timms_resize_and_centre_crop(size, decoded, threshold, decoded_sizes):
    """Resize to 36 px (32 / 0.875) + centre crop: 96x64 cannot be decoded smaller (64 / 2 < 36), 150 / 4 >= 36."""
    files = random_jpegs(12, size=size, seed=5)
    cfg = deit_config()
    _, timm_eval = build_deit_transforms(cfg, IMAGENET_MEAN, IMAGENET_STD, uint8=True)  # timm's, uint8 out
    _, (decode, rest) = fast_stages(cfg)
    for data in files:
        expected, got = timm_eval(decode_rgb(opened(data))), rest(decode(opened(data)))
        assert decoded_sizes[-2:] == [size, decoded]
        assert got.dtype == torch.uint8 and got.shape == expected.shape == (3, IMG_SIZE, IMG_SIZE)
        assert psnr(got, expected) >= threshold
        if decoded == size:
            assert (got.int() - expected.int()).abs().max() <= 1


def test_fast_crop_decodes_at_reduced_size_only_where_the_crop_allows(decoded_sizes):
    """Largest DCT scale at which the crop still covers the 32 px output: 1/4, 1/2, or full size."""
    data = random_jpegs(1, size=(200, 150), seed=7)[0]
    (decode, _), _ = fast_stages(deit_config())
    assert isinstance(decode, DraftRandomResizedCrop)
    for box, expected in (((0, 0, 200, 150), (50, 38)), ((10, 10, 80, 80), (100, 75)), ((5, 5, 40, 40), (200, 150))):
        left, top, right, bottom = box
        decode.crop.get_params = lambda *_, p=(top, left, bottom - top, right - left): p  # timm's (i, j, h, w)
        out = decode(opened(data))
        assert out.size == (IMG_SIZE, IMG_SIZE) and decoded_sizes.pop() == expected
        reference = decode_rgb(opened(data)).crop(box).resize((IMG_SIZE, IMG_SIZE), Image.BICUBIC)
        assert psnr(*(torch.from_numpy(np.array(image)) for image in (out, reference))) >= EVAL_PSNR_DRAFT


def random_boxes(count: int, size: tuple[int, int], seed: int):
    """``count`` random whole-pixel boxes (left, top, right, bottom) inside ``size`` (w, h), each with a random
    non-square output size (w, h): some upscale, some downscale, some one axis each way."""
    import random

    draw = random.Random(seed)
    for _ in range(count):
        width, height = draw.randint(4, size[0]), draw.randint(4, size[1])
        left, top = draw.randint(0, size[0] - width), draw.randint(0, size[1] - height)
        yield (left, top, left + width, top + height), (draw.randint(8, 48), draw.randint(8, 48))


def levels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).int()


def test_full_size_crops_are_pillows_filter_applied_horizontally_then_vertically():
    """A crop no draft applies to goes through torch's antialiased uint8 interpolation, not Pillow's resize:
    Pillow's filter (bicubic or bilinear, widened when downscaling), crop first like timm, the horizontal pass
    first. On hard-edged noise, where bicubic overshoots and is clipped between the passes, it equals Pillow's
    own two passes taken in that order within fixed-point rounding (measured: at most 1-2 levels), for boxes
    that upsample, downsample or both, and non-square outputs (a swapped w / h or a shifted box fails)."""
    noise = Image.fromarray((np.random.default_rng(0).random((150, 200, 3)) > 0.5).astype(np.uint8) * 255)
    for box, size in random_boxes(80, noise.size, seed=0):
        crop = noise.crop(box)
        for resample in (Image.BICUBIC, Image.BILINEAR):
            horizontal_then_vertical = crop.resize((size[0], crop.height), resample).resize(size, resample)
            got = crop_resized_uint8(noise, box, size, resample)
            assert got.mode == "RGB" and got.size == size
            assert (levels(got) - levels(horizontal_then_vertical)).abs().max() <= 2, (box, size, resample)


def test_full_size_crops_stay_close_to_pillows_resize_on_photographic_jpegs():
    """Pillow 13 takes some shapes vertically first (python-pillow/Pillow PR 9549); on hard-edged noise that
    differs from Pillow's own resize by up to 26 levels, on JPEGs of smooth colour fields and noise by a level
    at most and a twentieth of a level on average (measured on these boxes: max 1, mean 0.05, worst box 0.25)."""
    data = random_jpegs(1, size=(200, 150), seed=11)[0]
    decoded = decode_rgb(opened(data))
    means = []
    for box, size in random_boxes(60, decoded.size, seed=1):
        for resample in (Image.BICUBIC, Image.BILINEAR):
            difference = (
                levels(crop_resized_uint8(decoded, box, size, resample))
                - levels(decoded.crop(box).resize(size, resample))
            ).abs()
            assert difference.max() <= 4, (box, size, resample)
            means.append(difference.float().mean().item())
    assert np.mean(means) <= 0.2 and max(means) <= 0.5, (np.mean(means), max(means))
    # the fast train path takes it for a full-size crop: same pixels as calling it on the decoded image
    (decode, _), _ = fast_stages(deit_config())
    decode.crop.get_params = lambda *_: (5, 10, 30, 40)  # timm's (top, left, height, width): no draft
    expected = crop_resized_uint8(decoded, (10, 5, 50, 35), (IMG_SIZE, IMG_SIZE), Image.BICUBIC)
    assert np.array_equal(np.array(decode(opened(data))), np.array(expected))


def test_fast_eval_resizes_then_crops_even_where_its_box_is_whole_pixels():
    """72 px resized to 36 then centre-cropped to 32: the region is (4, 4, 68, 68) in whole pixels, yet eval keeps
    Pillow's box resize, whose edge pixels see their neighbours as resize-then-crop's do (a crop first made
    the outer ring up to ~19 levels off on noise). PNG, so no draft."""
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(3).random((72, 72, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    cfg = deit_config()
    _, timm_eval = build_deit_transforms(cfg, IMAGENET_MEAN, IMAGENET_STD, uint8=True)
    _, (decode, rest) = fast_stages(cfg)
    expected, got = timm_eval(decode_rgb(opened(buffer.getvalue()))), rest(decode(opened(buffer.getvalue())))
    assert (got.int() - expected.int()).abs().max() <= 1


# ------------------------------------------------------------------ loaders
def epoch_of(loader, epoch: int):
    """All batches of ``epoch``: images ``[N, 3, S, S]``, labels ``[N]`` and the batch count, every RNG seeded.
    The val sampler (a fixed range) has no epochs."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    seed_everything(epoch)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]), len(batches)


def both_pipelines(root, **fields) -> dict:
    """{pipeline: (train loader, val loader)} for ``standard`` and ``fast`` on the ImageFolder ``root``."""
    loaders = {}
    for pipeline in ("standard", "fast"):
        cfg = deit_config(root=str(root), pipeline=pipeline, **fields)
        bundle = build_datasets(cfg)
        assert bundle.uint8 == (pipeline == "fast")
        loaders[pipeline] = build_loaders(cfg, bundle, seed=0, device=CPU)
    return loaders


def test_fast_loaders_give_normalised_float_batches_in_the_standard_order(tmp_path):
    """Same sampler and seed: same labels in the same order; no erasing, so one RNG stream drives both paths."""
    root = ensure_image_folder(tmp_path, 40, 10, seed=0, size=(200, 150))
    epochs = {
        pipeline: (epoch_of(train, 1), epoch_of(val, 0))
        for pipeline, (train, val) in both_pipelines(root, batch_size=8, random_erasing=0.0).items()
    }
    (st_train, st_val), (fa_train, fa_val) = epochs["standard"], epochs["fast"]
    for fast, standard in ((fa_train, st_train), (fa_val, st_val)):
        assert torch.equal(fast[1], standard[1]) and fast[2] == standard[2]
        images, reference = fast[0], standard[0]
        assert images.dtype == torch.float32 and images.device == CPU and images.shape == reference.shape
        # per-channel statistics of the epoch, in normalised units (1 unit is about 57 levels)
        assert torch.allclose(images.mean((0, 2, 3)), reference.mean((0, 2, 3)), atol=0.05)
        assert torch.allclose(images.std((0, 2, 3)), reference.std((0, 2, 3)), rtol=0.05)
    assert fa_train[0].shape == (40, 3, IMG_SIZE, IMG_SIZE) and fa_train[2] == 5
    val_psnr = [psnr(a, b) for a, b in zip(to_levels(fa_val[0]), to_levels(st_val[0]))]
    assert min(val_psnr) >= EVAL_PSNR_DRAFT, val_psnr
    # Same crops, flips and ops; only resampling differs, which RandAugment's thresholds (solarize,
    # posterize) and histogram ops (equalize, autocontrast) amplify on some images (measured: 19-60 dB).
    train_psnr = [psnr(a, b) for a, b in zip(to_levels(fa_train[0]), to_levels(st_train[0]))]
    assert np.median(train_psnr) >= 35, sorted(train_psnr)


def test_fast_loader_skips_and_counts_undecodable_files_like_the_standard_one(tmp_path):
    """Truncated JPEGs: the header opens, the (reduced) decode fails inside the bad-image policy."""
    write_jpeg_folder(tmp_path, classes=3, train=10, val=2)
    whole = (tmp_path / "train" / "class0" / "0.jpg").read_bytes()
    for name in ("class1", "class2"):
        (tmp_path / "train" / name / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    labels = {}
    for pipeline, (train, _) in both_pipelines(tmp_path, batch_size=8, on_bad_image="skip").items():
        assert len(train) == 32 // 8
        for epoch in (0, 1):
            _, labels[pipeline, epoch], batches = epoch_of(train, epoch)
            assert batches == len(train) and train.dataset.skipped_images() == 2, pipeline
    assert all(torch.equal(labels["fast", e], labels["standard", e]) for e in (0, 1))
    assert not torch.equal(labels["fast", 0], labels["fast", 1])  # set_epoch reshuffles


def test_bundle_normalise_gives_what_the_fast_val_loader_yields(tmp_path):
    """Direct readers of a uint8 bundle's datasets (one val image at a time) normalise as the loader does."""
    write_jpeg_folder(tmp_path)
    cfg = deit_config(root=str(tmp_path), pipeline="fast", batch_size=6)
    bundle = build_datasets(cfg)
    _, val = build_loaders(cfg, bundle, seed=0, device=CPU)
    images, _ = next(iter(val))
    direct = torch.stack([bundle.val[i][0] for i in range(len(images))])
    assert direct.dtype == torch.uint8
    assert torch.allclose(bundle.normalise(direct), images, atol=1e-5)


def test_sweep_mismatch_subset_and_model_example_are_normalised_with_the_fast_pipeline(tmp_path):
    """The two readers of single val images outside the loaders: a trial's mismatch subset
    (``mismatch.val_subset``) and the logged model's input example (``ray_worker.example_images``) get what the
    model takes, float32 normalised, not the fast datasets' uint8."""
    pytest.importorskip("ray")
    from encmm.trainables.mismatch import val_subset
    from encmm.trainables.ray_worker import example_images

    write_jpeg_folder(tmp_path)
    common = ["data.name=imagefolder", f"data.root={tmp_path}", f"data.img_size={IMG_SIZE}", *TINY_STUDENT]
    subsets = {p: val_subset(load_train_config(None, [*common, f"data.pipeline={p}"]), 6) for p in ("standard", "fast")}
    (standard, _), (fast, bundle) = subsets["standard"], subsets["fast"]
    assert fast.dtype == torch.float32 and fast.shape == standard.shape
    assert min(psnr(a, b) for a, b in zip(to_levels(fast), to_levels(standard))) >= EVAL_PSNR_DRAFT
    example = example_images(bundle.val, bundle.mean, bundle.std)
    assert example.dtype == torch.float32 and torch.allclose(example, fast[:2], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_loaders_normalise_and_erase_on_the_cuda_device(tmp_path):
    write_jpeg_folder(tmp_path)
    device = torch.device("cuda")
    cfg = deit_config(root=str(tmp_path), pipeline="fast", batch_size=8, random_erasing=1.0)
    train, val = build_loaders(cfg, build_datasets(cfg), seed=0, pin_memory=True, device=device)
    for loader in (train, val):
        images, labels = next(iter(loader))
        assert images.device.type == labels.device.type == "cuda" and images.dtype == torch.float32
        assert images.shape == (8, 3, IMG_SIZE, IMG_SIZE) and images.abs().max() < 10


# ------------------------------------------------------------------ encmm training, in-process
def test_fit_finishes_on_a_jpeg_imagefolder_with_the_fast_pipeline(tmp_path):
    from encmm.trainables.engine import fit

    write_jpeg_folder(tmp_path / "images")
    cfg = load_train_config(
        None,
        [
            "data.name=imagefolder",
            f"data.root={tmp_path / 'images'}",
            "data.augment=deit",
            "data.pipeline=fast",
            f"data.img_size={IMG_SIZE}",
            "data.batch_size=16",
            *TINY_STUDENT,
            "schedule.epochs=1",
            "schedule.warmup_epochs=0",
        ],
    )
    history = []
    final = fit(cfg, log=lambda metrics, step: history.append(metrics))
    [metrics] = history
    assert math.isfinite(metrics["train/loss"]) and metrics["data/skipped_images"] == 0
    assert 0 <= final["val/acc1"] <= 100
