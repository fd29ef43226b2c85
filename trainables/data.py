"""Datasets and loaders: embedded digits, ImageFolder/timm datasets (DeiT recipe), synthetic.

Digits is scikit-learn's 8x8 digits (1,797 real images, 10 classes), which ships inside the
installed scikit-learn package: no download. Images are upsampled once to ``img_size`` and
repeated to 3 channels so any timm model takes them.
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
    train: Dataset
    val: Dataset
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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


def build_deit_transforms(cfg: DataConfig, mean, std):
    """DeiT recipe through timm: RandAugment, colour jitter, random erasing, bicubic RRC; eval resize+crop.

    timm's posterize ops are swapped for ``posterize_keeping_zero_bits`` (Pillow >= 13 refuses 0 bits).
    """
    from timm.data import create_transform

    train_tf = create_transform(
        cfg.img_size,
        is_training=True,
        auto_augment=cfg.auto_augment if cfg.augment == "deit" else None,
        color_jitter=cfg.color_jitter if cfg.augment == "deit" else None,
        re_prob=cfg.random_erasing if cfg.augment == "deit" else 0.0,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        mean=mean,
        std=std,
    )
    eval_tf = create_transform(
        cfg.img_size, is_training=False, interpolation="bicubic", crop_pct=cfg.crop_pct, mean=mean, std=std
    )
    return fix_zero_bit_posterize(train_tf), eval_tf


class BadImageError(RuntimeError):
    """An image file of an ImageFolder cannot be decoded (``data.on_bad_image=error``)."""


def _checked_image_dataset():
    """timm's ``ImageDataset`` over an ImageFolder, with a stated policy for files PIL cannot decode.

    timm retries the next sample and only logs a warning; encmm either stops with an error naming the
    file (``error``) or skips it and counts it (``skip``; the count is shared with loader worker processes
    and reported per epoch as ``data/skipped_images``). Defined lazily: importing timm costs seconds.
    """
    import multiprocessing

    from PIL import Image
    from timm.data import ImageDataset

    class CheckedImageDataset(ImageDataset):
        def __init__(self, root: str, *, on_bad_image: str, transform=None):
            super().__init__(root, transform=transform)
            self.on_bad_image = on_bad_image
            self._skipped = multiprocessing.Value("i", 0)

        def _load(self, index: int):
            path, target = self.reader.samples[index]
            try:
                with Image.open(path) as image:
                    return image.convert("RGB"), target
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
    train_tf, eval_tf = build_deit_transforms(cfg, mean, std)
    if cfg.name == "imagefolder":
        checked = _checked_image_dataset()
        train = checked(str(Path(cfg.root) / "train"), on_bad_image=cfg.on_bad_image, transform=train_tf)
        val = checked(str(Path(cfg.root) / "val"), on_bad_image=cfg.on_bad_image, transform=eval_tf)
        return DataBundle(train, val, count_classes(train), mean, std)
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
    cfg: DataConfig, bundle: DataBundle, *, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Train loader reshuffles per epoch from (seed, epoch) only, so a resumed run sees the same order.

    Call ``train_loader.sampler.set_epoch(epoch)`` before each epoch.
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
    train = DataLoader(bundle.train, batch_size=cfg.batch_size, sampler=train_sampler, drop_last=True, **common)
    val = DataLoader(bundle.val, batch_size=cfg.eval_batch_size or cfg.batch_size, sampler=val_sampler, **common)
    return train, val
