"""Benchmark image input pipelines on CPU: encmm's ImageFolder loaders against timm's and a bare DataLoader.

    python3 bench/bench_input.py                        # 400 train / 100 val JPEGs, 20 s each, 1 and 2 workers
    python3 bench/bench_input.py --images 2000 --seconds 60 --workers 1 2 4 --folder /data/bench-jpegs
    python3 bench/bench_input.py --images 80 --seconds 3 --workers 1 --json /tmp/input_smoke.json  # smoke test
    python3 bench/bench_input.py --image-size 1000x750   # larger JPEGs: crops >= 2x the output decode at 1/2 or less

Data: an ImageFolder of ImageNet-like JPEGs (``root/train/<class>/<i>.jpg``, ``root/val/<class>/<i>.jpg``),
10 classes, 500x375 RGB (``--image-size``), quality 90, about 80 KB each; smooth colour gradients, a few
ellipses and rectangles, multi-scale texture and mild noise, deterministic from ``--seed``. Written once into
``--folder`` (default: a folder in the system temp dir named for the image count, seed and a non-default size)
and reused while its spec.json matches.

Measured, each at every loader ``num_workers`` in ``--workers`` (batch 64, 224 px): images per second delivered
by the loader over about ``--seconds`` seconds after one warm-up batch (worker start-up is in the warm-up; epoch
restarts are in the figure; the clock stops at the last batch delivered). Pipelines:

- encmm train: ``build_datasets`` + ``build_loaders`` for ``DataConfig(name="imagefolder", augment="deit")``
  (DeiT recipe: RandAugment, colour jitter, random erasing, bicubic random-resized crop; DistributedSampler).
- encmm eval: the val loader of the same call (resize + centre crop), cycled.
- encmm train / eval, fast pipeline: the same with ``data.pipeline=fast`` (JPEG decoded at a reduced DCT scale
  where the crop allows, uint8 out of the workers, normalisation and random erasing in the main process).
- encmm train, Ray Data loader: the encmm train loader with ``data.loader=ray_data``: read, decode and augment
  in Ray Data tasks of a local Ray cluster the bench starts with as many CPUs as loader workers (this process
  iterates, as a Train worker would); also given against the in-worker DataLoader ("encmm train") of this run.
- timm create_loader: ``timm.data.ImageDataset`` + ``create_loader`` with the same recipe, prefetcher on and
  ``device=cpu`` (uint8 collation in the workers; normalisation and random erasing in the main process). If
  the prefetcher fails on CPU it is measured without it and the label says so. Its posterize ops get encmm's
  ``fix_zero_bit_posterize``: Pillow >= 13 refuses timm's 0-bit posterize, which would end the run.
- bare DataLoader: ``torchvision.datasets.ImageFolder`` with encmm's exact train transform and a plain
  shuffled ``DataLoader`` (drop_last, persistent workers).
- decode only (reference): PIL open + ``convert("RGB")`` of every file in turn, single process.

Reported: images/s, images/s per loader worker ("per core"; the main process, which collates and for timm and the
fast pipeline normalises and erases, work a GPU does in training, is not counted as a core), each pipeline
against bare DataLoader at the same worker count, and each worker count against the smallest one for the same
pipeline. All ratios come from measurements of this run.
Take figures on an otherwise idle machine with at least max(--workers) + 1 free cores: loader workers compete
with anything else running. Prints a table; writes JSON (with machine info) to --json.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import PIL
import timm
import timm.data
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from encmm.trainables.config import DataConfig
from encmm.trainables.data import build_datasets, build_deit_transforms, build_loaders, fix_zero_bit_posterize

CLASSES = 10
IMAGE_SIZE = (500, 375)  # (width, height) of the generated JPEGs unless --image-size
JPEG_QUALITY = 90
BATCH_SIZE = 64
IMG_SIZE = 224
# (grid divisor, amplitude) of the luminance texture octaves, and the per-pixel noise sigma: ~80 KB at quality 90
TEXTURE_OCTAVES = ((32, 30.0), (8, 20.0), (2, 12.0), (1, 8.0))
PIXEL_NOISE = 4.0
BARE_LABEL = "bare DataLoader"
MIN_IMAGES = max(BATCH_SIZE, 4 * CLASSES)

# One epoch's batches for a given epoch number.
EpochBatches = Callable[[int], Iterable]


def texture_octave(rng: np.random.Generator, divisor: int, size: tuple[int, int]) -> np.ndarray:
    """Gaussian noise on a grid ``divisor`` times coarser than the image, bicubic-upsampled: ``[H, W]``."""
    width, height = size
    grid = rng.normal(0.0, 1.0, (max(2, height // divisor), max(2, width // divisor))).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize(size, Image.BICUBIC))


def natural_like_image(rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """Smooth colour gradients, a few filled ellipses/rectangles, multi-scale texture and mild noise; ``size``
    is (width, height). Shapes keep their 500x375 pixel sizes at any image size."""
    width, height = size
    corners = rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)
    image = Image.fromarray(corners, "RGB").resize(size, Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x0, y0 = rng.uniform(-50, width), rng.uniform(-50, height)
        box = [x0, y0, x0 + rng.uniform(20, 250), y0 + rng.uniform(20, 200)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)
    octaves = (amplitude * texture_octave(rng, divisor, size) for divisor, amplitude in TEXTURE_OCTAVES)
    pixels += sum(octaves)[..., None]
    pixels += rng.normal(0.0, PIXEL_NOISE, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def image_folder_spec(train_images: int, val_images: int, seed: int, size: tuple[int, int]) -> dict:
    return dict(
        classes=CLASSES,
        train_per_class=train_images // CLASSES,
        val_per_class=val_images // CLASSES,
        size=list(size),
        quality=JPEG_QUALITY,
        octaves=TEXTURE_OCTAVES,
        noise=PIXEL_NOISE,
        seed=seed,
    )


def ensure_image_folder(
    root: Path, train_images: int, val_images: int, seed: int, size: tuple[int, int] = IMAGE_SIZE
) -> Path:
    """Write the ImageFolder of ``size`` (w, h) JPEGs under ``root`` unless its spec.json already matches;
    returns ``root``."""
    spec = json.loads(json.dumps(image_folder_spec(train_images, val_images, seed, size)))
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    if marker.exists():
        marker.unlink()
        for split in ("train", "val"):
            shutil.rmtree(root / split, ignore_errors=True)
    elif (root / "train").exists() or (root / "val").exists():
        raise SystemExit(f"{root} holds train/ or val/ not written by this script; pick another --folder")
    started = time.perf_counter()
    splits = (("train", spec["train_per_class"]), ("val", spec["val_per_class"]))
    for split_index, (split, per_class) in enumerate(splits):
        for label in range(CLASSES):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, split_index, label, i])
                natural_like_image(rng, size).save(folder / f"{i}.jpg", "JPEG", quality=JPEG_QUALITY)
    marker.write_text(json.dumps(spec))
    print(f"wrote {root} in {time.perf_counter() - started:.1f} s")
    return root


def image_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.jpg"))


def endless_batches(epoch_batches: EpochBatches) -> Iterator:
    """The batches of epoch 0, 1, 2, ... in turn."""
    for epoch in itertools.count():
        yield from epoch_batches(epoch)


def epochs_of(loader) -> EpochBatches:
    """Epoch ``e`` of ``loader``, after ``sampler.set_epoch(e)`` where the sampler has it (DistributedSampler)."""

    def epoch_batches(epoch: int) -> Iterable:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        return loader

    return epoch_batches


def measure_loader(epoch_batches: EpochBatches, seconds: float) -> dict:
    """Images/s after one warm-up batch, over about ``seconds`` of batches (epochs cycled)."""
    batches = endless_batches(epoch_batches)
    next(batches)
    images, start = 0, time.perf_counter()
    end = start
    while end - start < seconds:
        images += len(next(batches)[0])
        end = time.perf_counter()
    batches.close()
    return dict(images=images, seconds=end - start, images_per_s=images / (end - start))


def measure_decode(files: list[Path], seconds: float) -> dict:
    """Images/s of PIL open + convert("RGB"), file after file (cycled), in this process."""
    images, start = 0, time.perf_counter()
    end = start
    for path in itertools.cycle(files):
        with Image.open(path) as image:
            image.convert("RGB")
        images += 1
        end = time.perf_counter()
        if end - start >= seconds:
            break
    return dict(images=images, seconds=end - start, images_per_s=images / (end - start))


def encmm_config(root: Path, workers: int, pipeline: str = "standard") -> DataConfig:
    return DataConfig(
        name="imagefolder",
        root=str(root),
        img_size=IMG_SIZE,
        batch_size=BATCH_SIZE,
        num_workers=workers,
        augment="deit",
        pipeline=pipeline,
    )


def measure_encmm(root: Path, workers: int, seconds: float, pipeline: str) -> dict[str, dict]:
    """encmm's train and val loaders for one ``data.pipeline``, from one ``build_loaders`` call (device: CPU)."""
    cfg = encmm_config(root, workers, pipeline)
    train, val = build_loaders(cfg, build_datasets(cfg), seed=0, device=torch.device("cpu"))
    train_result = measure_loader(epochs_of(train), seconds)
    del train  # its worker processes stop before the val loader is timed
    gc.collect()
    suffix = "" if pipeline == "standard" else f", {pipeline} pipeline"
    return {f"encmm train{suffix}": train_result, f"encmm eval{suffix}": measure_loader(epochs_of(val), seconds)}


RAY_DATA_LABEL = "encmm train, Ray Data loader"


def measure_ray_data(root: Path, workers: int, seconds: float) -> dict:
    """encmm's train loader with ``data.loader=ray_data`` on a local Ray cluster of ``workers`` CPUs (one Ray
    Data task per CPU at a time, as ``workers`` loader processes), started for this measurement and stopped."""
    import logging

    import ray
    import ray.data  # configures its loggers on import: quieten them after

    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no line per epoch (80 images: one per batch)
    try:
        cfg = encmm_config(root, workers).model_copy(update={"loader": "ray_data"})
        train, _ = build_loaders(cfg, build_datasets(cfg), seed=0)
        return measure_loader(epochs_of(train), seconds)
    finally:
        ray.shutdown()


def timm_loader(root: Path, workers: int, use_prefetcher: bool):
    """timm's ImageDataset + create_loader with the DeiT recipe, on CPU; posterize fixed for Pillow >= 13."""
    loader = timm.data.create_loader(
        timm.data.ImageDataset(str(root / "train")),
        input_size=(3, IMG_SIZE, IMG_SIZE),
        batch_size=BATCH_SIZE,
        is_training=True,
        use_prefetcher=use_prefetcher,
        auto_augment="rand-m9-mstd0.5-inc1",
        color_jitter=0.4,
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        num_workers=workers,
        device=torch.device("cpu"),
    )
    fix_zero_bit_posterize(loader.dataset.transform)
    return loader


def measure_timm(root: Path, workers: int, seconds: float) -> tuple[str, dict]:
    """timm create_loader with its prefetcher on CPU, or without it (and so labelled) if that fails."""
    try:
        loader = timm_loader(root, workers, use_prefetcher=True)
        return "timm create_loader (prefetcher, cpu)", measure_loader(epochs_of(loader), seconds)
    except Exception as exc:  # the prefetcher is written for CUDA; any failure on CPU means measuring without it
        print(f"timm prefetcher failed on CPU ({type(exc).__name__}: {exc}); measuring use_prefetcher=False")
    loader = timm_loader(root, workers, use_prefetcher=False)
    return "timm create_loader (NO prefetcher: fails on cpu)", measure_loader(epochs_of(loader), seconds)


def measure_bare(root: Path, workers: int, seconds: float) -> dict:
    """torchvision ImageFolder with encmm's exact train transform, plain shuffled DataLoader."""
    transform = build_deit_transforms(encmm_config(root, workers), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0]
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=transform)
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True
    )
    return measure_loader(epochs_of(loader), seconds)


def measure_pipelines(root: Path, workers: int, seconds: float) -> list[dict]:
    """Every loader pipeline at one worker count; loaders (and their worker processes) are freed after each."""
    rows = []
    for pipeline in ("standard", "fast"):
        rows += [
            dict(pipeline=name, **result) for name, result in measure_encmm(root, workers, seconds, pipeline).items()
        ]
        gc.collect()
    rows.append(dict(pipeline=RAY_DATA_LABEL, **measure_ray_data(root, workers, seconds)))
    in_worker = next(row["images_per_s"] for row in rows if row["pipeline"] == "encmm train")
    rows[-1]["vs_dataloader"] = rows[-1]["images_per_s"] / in_worker
    print(f"  {RAY_DATA_LABEL} / in-worker DataLoader, {workers} workers: {rows[-1]['vs_dataloader']:.2f}x")
    gc.collect()
    timm_label, timm_result = measure_timm(root, workers, seconds)
    rows.append(dict(pipeline=timm_label, **timm_result))
    gc.collect()
    rows.append(dict(pipeline=BARE_LABEL, **measure_bare(root, workers, seconds)))
    gc.collect()
    for row in rows:
        row["workers"] = workers
        row["images_per_s_per_worker"] = row["images_per_s"] / workers
        print(f"  {row['pipeline']:<48} {workers} workers: {row['images_per_s']:8.1f} img/s", flush=True)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``vs_bare``: against bare DataLoader at the same worker count; ``vs_min_workers``: against the smallest
    worker count of the same pipeline."""
    bare = {r["workers"]: r["images_per_s"] for r in rows if r["pipeline"] == BARE_LABEL}
    least = min(r["workers"] for r in rows)
    base = {r["pipeline"]: r["images_per_s"] for r in rows if r["workers"] == least}
    for row in rows:
        row["vs_bare"] = row["images_per_s"] / bare[row["workers"]]
        row["vs_min_workers"] = row["images_per_s"] / base[row["pipeline"]] if row["pipeline"] in base else None


def print_table(rows: list[dict], decode: dict, least_workers: int) -> None:
    scaling_head = f"vs {least_workers}w"
    header = f"{'pipeline':<48} {'workers':>7} {'img/s':>8} {'img/s/worker':>12} {'vs bare':>8} {scaling_head:>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        scaling = f"{r['vs_min_workers']:.2f}x" if r["vs_min_workers"] is not None else "-"
        print(
            f"{r['pipeline']:<48} {r['workers']:>7} {r['images_per_s']:>8.1f} {r['images_per_s_per_worker']:>12.1f} "
            f"{r['vs_bare']:>7.2f}x {scaling:>7}"
        )
    rate = decode["images_per_s"]
    print(f"{'decode only (PIL open + RGB)':<48} {'main':>7} {rate:>8.1f} {rate:>12.1f} {'-':>8} {'-':>7}")


def machine_info() -> dict:
    cpu_model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu_model = models[0] if models else cpu_model
    return dict(
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        cpu_model=cpu_model,
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        timm=timm.__version__,
        pillow=PIL.__version__,
        numpy=np.__version__,
        torch_threads=torch.get_num_threads(),
    )


def image_size(text: str) -> tuple[int, int]:
    """``"1000x750"`` -> (1000, 750): width x height of the generated JPEGs."""
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1000x750")
    return int(width), int(height)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=400, help="train images (val: a quarter as many)")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per pipeline and worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader num_workers to measure")
    parser.add_argument("--folder", type=Path, default=None, help="ImageFolder root (default: in the temp dir)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument(
        "--image-size", type=image_size, default=IMAGE_SIZE, help="WxH of the generated JPEGs (default 500x375)"
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "input.json")
    args = parser.parse_args()
    if args.images < MIN_IMAGES:
        parser.error(f"--images must be at least {MIN_IMAGES}: one train batch, one val image per class")
    if min(args.workers) < 1:
        parser.error("--workers must be >= 1 (persistent workers)")
    args.workers = sorted(set(args.workers))
    width, height = args.image_size
    name = f"encmm-bench-input-n{args.images}-s{args.seed}" + (
        "" if args.image_size == IMAGE_SIZE else f"-{width}x{height}"
    )
    args.folder = args.folder or Path(tempfile.gettempdir()) / name
    return args


def main() -> None:
    args = parse_args()
    root = ensure_image_folder(args.folder, args.images, args.images // 4, args.seed, args.image_size)
    files = image_files(root)
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1000
    print(f"{root}: {len(files)} JPEGs, {mean_kb:.1f} KB mean; {args.seconds:g} s per measurement", flush=True)
    decode = measure_decode(files, args.seconds)
    print(f"  decode only: {decode['images_per_s']:.1f} img/s", flush=True)
    rows = [row for workers in args.workers for row in measure_pipelines(root, workers, args.seconds)]
    add_ratios(rows)
    print_table(rows, decode, args.workers[0])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": machine_info(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv[1:],
                "folder": str(root),
                "train_images": len(list((root / "train").glob("*/*.jpg"))),
                "val_images": len(list((root / "val").glob("*/*.jpg"))),
                "mean_file_kb": mean_kb,
                "seconds": args.seconds,
                "batch_size": BATCH_SIZE,
                "img_size": IMG_SIZE,
                "image_size": list(args.image_size),
                "workers": args.workers,
                "decode_only": decode,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
