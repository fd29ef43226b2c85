"""Datasets and loaders: embedded digits, ImageFolder/timm datasets (DeiT recipe), synthetic.

Digits is scikit-learn's 8x8 digits (1,797 real images, 10 classes), which ships inside the
installed scikit-learn package: no download. Images are upsampled once to ``img_size`` and
repeated to 3 channels so any timm model takes them.

An ImageFolder has two input paths with one recipe (``data.pipeline``): ``standard`` runs timm's
``create_transform`` in the loader workers; ``fast`` decodes each JPEG at a reduced DCT scale where
the crop allows, resizes a full-size crop with torch's uint8 kernels, ships uint8 images and normalises
and erases on the training device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from encmm.trainables.config import DataConfig

if TYPE_CHECKING:
    import PIL.Image

log = logging.getLogger(__name__)

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    """Train and val datasets of ``[3, S, S]`` images: float32 normalised with ``mean``/``std``, or with
    ``uint8`` set, 0-255 uint8 that the loaders of :func:`build_loaders` normalise on the device."""

    train: Dataset
    val: Dataset
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    uint8: bool = False

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` images of these datasets -> float32 normalised with ``mean``/``std``."""
        return normalise_images(images, self.mean, self.std)


def normalise_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``[B, 3, S, S]`` images as the model takes them: uint8 0-255 ones (``data.pipeline=fast`` datasets) are
    scaled to [0, 1] and normalised with ``mean``/``std``; float ones are taken to be normalised already."""
    if images.is_floating_point():
        return images
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class TensorImageDataset(Dataset):
    """Normalised images ``[M, 3, S, S]`` and labels ``[M]``; optional random shift (pad + crop).

    ``fill`` is the normalised value of a blank pixel, used for the padding.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shift: int = 0, fill: float = 0.0):
        self.images, self.labels, self.shift, self.fill = images, labels, shift, fill

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.shift:
            s = self.shift
            padded = F.pad(image, (s, s, s, s), value=self.fill)
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
        return image, self.labels[index]


def _stratified_split(labels, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    indices = list(range(len(labels)))
    return train_test_split(indices, test_size=fraction, random_state=seed, stratify=labels)


def load_digits_tensors(img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as normalised ``[M, 3, img_size, img_size]`` float32 and labels ``[M]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div_(16.0).unsqueeze(1)  # [M,1,8,8] in [0,1]
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    mean = torch.tensor(DIGITS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.from_numpy(digits.target).long()


def build_digits(cfg: DataConfig) -> DataBundle:
    images, labels = load_digits_tensors(cfg.img_size)
    train_idx, val_idx = _stratified_split(labels.numpy(), cfg.val_fraction, cfg.split_seed)
    shift = max(1, cfg.img_size // 16) if cfg.augment in ("shift", "deit") else 0
    blank = -DIGITS_MEAN[0] / DIGITS_STD[0]
    train = TensorImageDataset(images[train_idx], labels[train_idx], shift=shift, fill=blank)
    val = TensorImageDataset(images[val_idx], labels[val_idx])
    return DataBundle(train, val, 10, DIGITS_MEAN, DIGITS_STD)


def build_synthetic(cfg: DataConfig) -> DataBundle:
    """Seeded class-dependent patterns plus noise: learnable, for tests only."""
    g = torch.Generator().manual_seed(cfg.split_seed)
    k, m, s = cfg.synthetic_classes, cfg.synthetic_samples, cfg.img_size
    prototypes = torch.randn(k, 3, s, s, generator=g)
    labels = torch.arange(m) % k
    images = prototypes[labels] + 0.5 * torch.randn(m, 3, s, s, generator=g)
    train_idx, val_idx = _stratified_split(labels.numpy(), cfg.val_fraction, cfg.split_seed)
    return DataBundle(
        TensorImageDataset(images[train_idx], labels[train_idx]),
        TensorImageDataset(images[val_idx], labels[val_idx]),
        k,
        (0.0,) * 3,
        (1.0,) * 3,
    )


def posterize_keeping_zero_bits(image: PIL.Image.Image, bits_to_keep: int, **_) -> PIL.Image.Image:
    """timm's ``posterize`` op, with 0 bits kept meaning an all-black image, as it did before Pillow 13.

    Posterizing keeps the ``bits_to_keep`` most significant bits of each channel (pixel & ~(2**(8-bits)-1)),
    so 0 bits gives 0 everywhere. Pillow >= 13 refuses ``ImageOps.posterize(image, 0)`` with a ValueError,
    and timm's increasing posterize (``inc1`` in ``rand-m9-mstd0.5-inc1``, the DeiT recipe) asks for 0 bits
    at the top magnitude: about 1 train image in 500-800 would raise and end the epoch. Like timm, 8 bits or
    more returns the image unchanged. Module-level so the transform pickles (loader workers, Ray).
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _augment_ops(transform):
    """Every timm ``AugmentOp`` in a built transform: Compose ``.transforms``, RandAugment/AugMix ``.ops``,
    AutoAugment ``.policy`` (a list of sub-policies)."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(transform, AugmentOp):
        yield transform
        return
    children = []
    for attr in ("transforms", "ops", "policy"):
        value = getattr(transform, attr, None)
        if isinstance(value, (list, tuple)):
            children.extend(value)
    if isinstance(transform, (list, tuple)):
        children.extend(transform)
    for child in children:
        yield from _augment_ops(child)


def fix_zero_bit_posterize(transform: Callable) -> Callable:
    """Give every posterize op of a built timm transform ``posterize_keeping_zero_bits``; returns it.

    Only this transform changes (timm's op table stays as it is). A transform without posterize (no
    auto-augment) is returned untouched.
    """
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize_keeping_zero_bits
    return transform


RANDOM_ERASING_MODE = "pixel"  # DeiT: per-pixel normal noise in normalised space, one box
RANDOM_ERASING_COUNT = 1


def random_erasing_probability(cfg: DataConfig) -> float:
    return cfg.random_erasing if cfg.augment == "deit" else 0.0


def build_deit_transforms(cfg: DataConfig, mean, std, *, uint8: bool = False):
    """DeiT recipe through timm: RandAugment, colour jitter, random erasing, bicubic RRC; eval resize+crop.

    ``uint8``: timm's prefetcher form of the same transforms, ending in a ``[3, S, S]`` uint8 tensor; the
    loader normalises and erases on the device (:func:`build_loaders`). timm's posterize ops are swapped for
    ``posterize_keeping_zero_bits`` (Pillow >= 13 refuses 0 bits).
    """
    from timm.data import create_transform

    train_tf = create_transform(
        cfg.img_size,
        is_training=True,
        auto_augment=cfg.auto_augment if cfg.augment == "deit" else None,
        color_jitter=cfg.color_jitter if cfg.augment == "deit" else None,
        re_prob=random_erasing_probability(cfg),
        re_mode=RANDOM_ERASING_MODE,
        re_count=RANDOM_ERASING_COUNT,
        interpolation="bicubic",
        mean=mean,
        std=std,
        use_prefetcher=uint8,
    )
    eval_tf = create_transform(
        cfg.img_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=cfg.crop_pct,
        mean=mean,
        std=std,
        use_prefetcher=uint8,
    )
    return fix_zero_bit_posterize(train_tf), eval_tf


def decode_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The standard path's decode: the whole image at full size, as RGB."""
    return image.convert("RGB")


# Pillow filter -> the mode of torch's antialiased uint8 interpolation computing the same filter
UINT8_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling.BILINEAR, BICUBIC


def draft_scale(region: tuple[float, float], size: tuple[int, int]) -> int:
    """Largest JPEG DCT scale denominator (8, 4, 2; else 1) at which a ``region`` (w, h) of the full-size
    image still covers the output ``size`` (w, h) on both sides: the reduced decode then only does part of a
    downsampling the resize does anyway, and upsamples nothing the full-size path would not."""
    for scale in (8, 4, 2):
        if region[0] / scale >= size[0] and region[1] / scale >= size[1]:
            return scale
    return 1


def decode_region_resized(
    image: PIL.Image.Image,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    resample: int,
    *,
    crop_first: bool = False,
) -> PIL.Image.Image:
    """The region ``box`` (left, top, right, bottom; full-size pixels) of ``image`` resized to ``size`` (w, h), RGB.

    ``image`` straight from ``Image.open`` is not decoded yet: a JPEG is then decoded at the reduced scale of
    :func:`draft_scale` (``Image.draft``) and ``box`` mapped onto the reduced image. ``resize(box=...)``
    reads the region in place instead of copying a crop first; its filter may read up to a filter radius
    past the box edge, where a crop-then-resize clamps (a few boundary pixels differ by a few levels).
    ``crop_first`` (timm's random-resized crop, which crops and then resizes): a box of whole pixels at full
    size (every train crop no draft applies to: most crops of ImageNet-sized JPEGs) is cropped and resized by
    :func:`crop_resized_uint8` instead. Not for resize-then-crop (eval): its edge pixels see their neighbours.
    """
    width = image.width
    scale = draft_scale((box[2] - box[0], box[3] - box[1]), size)
    if scale > 1:
        drafted = image.draft(image.mode, (image.width // scale, image.height // scale))
        # draft picks the scale itself (None: not a JPEG, or already decoded): read it off its box
        scale = width / drafted[1][2] if drafted else 1
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    box = tuple(edge / scale for edge in box)
    if crop_first and resample in UINT8_RESAMPLE and all(float(edge).is_integer() for edge in box):
        return crop_resized_uint8(rgb, tuple(int(edge) for edge in box), size, resample)
    return rgb.resize(size, resample, box=box)


def crop_resized_uint8(
    image: PIL.Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], resample: int
) -> PIL.Image.Image:
    """timm's crop-then-resize of an RGB ``image`` (``box`` in whole pixels; ``size`` (w, h)) through torch's
    antialiased uint8 interpolation: Pillow's filters (bicubic a = -0.5, support widened by the downscale
    factor) in vectorised fixed point, about 4x Pillow's ``resize`` on one core. It equals Pillow's two passes
    taken horizontally first (within fixed-point rounding), the only order Pillow took until python-pillow/Pillow
    PR 9549 (in Pillow 13.0.0); since then Pillow takes some shapes vertically first, and as bicubic clips
    between the passes, hard edges then differ by up to ~30 levels (tests/test_input_pipeline.py bounds both).
    """
    import numpy as np
    from PIL import Image

    region = torch.from_numpy(np.array(image.crop(box))).permute(2, 0, 1).unsqueeze(0)  # channels-last view
    resized = F.interpolate(region, size=(size[1], size[0]), mode=UINT8_RESAMPLE[resample], antialias=True)
    return Image.fromarray(resized[0].permute(1, 2, 0).contiguous().numpy())


class DraftRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` on a not-yet-decoded image, decoding at reduced size.

    The crop is drawn by timm's own ``get_params`` on the full-size image (its size is known before
    decoding), with the same random calls in the same order, so the crop distribution and the random
    streams of every later op are timm's; only the resampling path differs (:func:`decode_region_resized`).
    """

    def __init__(self, crop):
        self.crop = crop  # timm RandomResizedCropAndInterpolation: size (h, w), scale, ratio, interpolation

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        import random

        from torchvision.transforms.functional import pil_modes_mapping

        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        out_h, out_w = self.crop.size
        box = (left, top, left + width, top + height)
        return decode_region_resized(image, box, (out_w, out_h), pil_modes_mapping[interpolation], crop_first=True)


class DraftResizeCenterCrop:
    """torchvision ``Resize(shorter side)`` + ``CenterCrop`` as one resize of the centre region, decoding at
    reduced size where the reduced image is still >= the resize target.

    The resized size and crop offsets are torchvision's formulas (long side ``int(size * long / short)``,
    offset ``int(round((resized - crop) / 2))``); the region maps them back to full-size pixels, so each
    output pixel has the same centre and filter support as in resize-then-crop.
    """

    def __init__(self, resize, crop):
        sizes = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        if len(sizes) != 1 or resize.max_size is not None:
            raise ValueError(f"{resize}: only a resize of the shorter side is decoded at reduced size")
        self.resize_to = sizes[0]
        self.interpolation = resize.interpolation
        self.crop_h, self.crop_w = crop.size

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        from torchvision.transforms.functional import pil_modes_mapping

        width, height = image.size
        long_side = int(self.resize_to * max(width, height) / min(width, height))
        new_w, new_h = (self.resize_to, long_side) if width <= height else (long_side, self.resize_to)
        top = int(round((new_h - self.crop_h) / 2.0))
        left = int(round((new_w - self.crop_w) / 2.0))
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + self.crop_w) * sx, (top + self.crop_h) * sy)
        return decode_region_resized(image, box, (self.crop_w, self.crop_h), pil_modes_mapping[self.interpolation])


def split_decode_stage(transform) -> tuple[Callable, Callable]:
    """A timm train or eval Compose -> (decode stage for a not-yet-decoded image, the remaining ops).

    Train: its ``RandomResizedCropAndInterpolation`` becomes :class:`DraftRandomResizedCrop`; eval: its
    ``Resize`` + ``CenterCrop`` become :class:`DraftResizeCenterCrop`. Every later op is timm's, unchanged.
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms

    ops = list(transform.transforms)
    if isinstance(ops[0], RandomResizedCropAndInterpolation):
        return DraftRandomResizedCrop(ops[0]), transforms.Compose(ops[1:])
    if isinstance(ops[0], transforms.Resize) and isinstance(ops[1], transforms.CenterCrop):
        return DraftResizeCenterCrop(ops[0], ops[1]), transforms.Compose(ops[2:])
    raise ValueError(f"no crop stage to decode at reduced size in {transform}")


class BadImageError(RuntimeError):
    """An image file of an ImageFolder cannot be decoded (``data.on_bad_image=error``)."""


def _checked_image_dataset():
    """timm's ``ImageDataset`` over an ImageFolder, with a stated policy for files PIL cannot decode.

    timm retries the next sample and only logs a warning; encmm either stops with an error naming the
    file (``error``) or skips it and counts it (``skip``; the count is shared with loader worker processes
    and reported per epoch as ``data/skipped_images``). ``decode`` turns the opened, not yet decoded file
    into the image ``transform`` takes (:func:`decode_rgb`, or a reduced-size decode stage of
    :func:`split_decode_stage`); the policy covers it. Defined lazily: importing timm costs seconds.
    """
    import multiprocessing

    from PIL import Image
    from timm.data import ImageDataset

    class CheckedImageDataset(ImageDataset):
        def __init__(self, root: str, *, on_bad_image: str, transform=None, decode: Callable = decode_rgb):
            super().__init__(root, transform=transform)
            self.on_bad_image = on_bad_image
            self.decode = decode
            self._skipped = multiprocessing.Value("i", 0)

        def _load(self, index: int):
            path, target = self.reader.samples[index]
            try:
                with Image.open(path) as image:
                    return self.decode(image), target
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                if self.on_bad_image == "error":
                    raise BadImageError(
                        f"cannot decode image {path}: {exc}; set data.on_bad_image=skip to skip and count such files"
                    ) from None
                log.warning("encmm: warning: skipped image %s: %s", path, exc)
                with self._skipped.get_lock():
                    self._skipped.value += 1
                return None

        def __getitem__(self, index: int):
            for offset in range(len(self)):
                loaded = self._load((index + offset) % len(self))
                if loaded is not None:
                    image, target = loaded
                    return (self.transform(image) if self.transform is not None else image), target
            raise BadImageError(f"no image of {self.reader.root} can be decoded")

        def skipped_images(self) -> int:
            """Files skipped since the last call (the engine reports it once per epoch)."""
            with self._skipped.get_lock():
                count, self._skipped.value = self._skipped.value, 0
            return count

    return CheckedImageDataset


def build_timm_dataset(cfg: DataConfig) -> DataBundle:
    """ImageFolder layout (``root/train``, ``root/val``) or any timm ``create_dataset`` name."""
    from timm.data import create_dataset

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    fast = cfg.name == "imagefolder" and cfg.pipeline == "fast"
    train_tf, eval_tf = build_deit_transforms(cfg, mean, std, uint8=fast)
    if cfg.name == "imagefolder":
        checked = _checked_image_dataset()
        split = [split_decode_stage(tf) if fast else (decode_rgb, tf) for tf in (train_tf, eval_tf)]
        train, val = (
            checked(str(Path(cfg.root) / folder), on_bad_image=cfg.on_bad_image, transform=tf, decode=decode)
            for folder, (decode, tf) in zip(("train", "val"), split)
        )
        return DataBundle(train, val, count_classes(train), mean, std, uint8=fast)
    root = cfg.root or str(Path.cwd() / "data")
    train = create_dataset(
        cfg.dataset, root=root, split="train", is_training=True, download=cfg.download, transform=train_tf
    )
    val = create_dataset(
        cfg.dataset,
        root=root,
        split="validation" if cfg.dataset.startswith("hfds") else "val",
        is_training=False,
        download=cfg.download,
        transform=eval_tf,
    )
    return DataBundle(train, val, count_classes(train), mean, std)


def count_classes(dataset) -> int:
    reader = getattr(dataset, "reader", None)
    mapping = getattr(reader, "class_to_idx", None)
    if mapping:
        return len(mapping)
    classes = getattr(dataset, "classes", None) or getattr(getattr(dataset, "parser", None), "classes", None)
    if classes:
        return len(classes)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return int(max(targets)) + 1
    raise ValueError("cannot tell the number of classes of this dataset")


def build_datasets(cfg: DataConfig) -> DataBundle:
    if cfg.name == "digits":
        return build_digits(cfg)
    if cfg.name == "synthetic":
        return build_synthetic(cfg)
    return build_timm_dataset(cfg)


def build_loaders(
    cfg: DataConfig,
    bundle: DataBundle,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    device: torch.device | None = None,
):
    """Train loader reshuffles per epoch from (seed, epoch) only, so a resumed run sees the same order.

    Call ``train_loader.sampler.set_epoch(epoch)`` before each epoch. A ``uint8`` bundle's loaders are
    timm ``PrefetchLoader``s: uint8 ``[B, 3, S, S]`` batches are moved to ``device`` (default CPU) and
    normalised there, the train ones randomly erased there too; they keep ``sampler``, ``dataset``, ``len``.
    """
    if cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        train_sampler = RepeatAugSampler(bundle.train, num_replicas=world_size, rank=rank, shuffle=True)
    else:
        train_sampler = DistributedSampler(
            bundle.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    # Strided shards without padding: every val image is counted exactly once across ranks.
    val_sampler = range(rank, len(bundle.val), world_size)
    workers = cfg.num_workers
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    if bundle.uint8:
        from timm.data.loader import fast_collate

        common["collate_fn"] = fast_collate
    train = DataLoader(bundle.train, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(bundle.val, batch_size=cfg.eval_batch_size or cfg.batch_size, sampler=val_sampler, **common)
    if cfg.loader == "ray_data":  # same samplers and datasets; batches made in Ray Data tasks, not loader workers
        from encmm.trainables.ray_data_input import ray_data_loaders

        train, val = ray_data_loaders(train, val, seed=seed)
    if not bundle.uint8:
        return train, val
    from timm.data.loader import PrefetchLoader

    on_device = dict(mean=bundle.mean, std=bundle.std, device=device or torch.device("cpu"))
    erasing = dict(re_prob=random_erasing_probability(cfg), re_mode=RANDOM_ERASING_MODE, re_count=RANDOM_ERASING_COUNT)
    return PrefetchLoader(train, **on_device, **erasing), PrefetchLoader(val, **on_device)
