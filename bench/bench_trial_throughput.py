"""Benchmark a trial's training throughput on a JPEG ImageFolder against the same trial on synthetic batches.

    python3 bench/bench_trial_throughput.py                                  # CPU: tiny224 preset, 1 loader worker
    python3 bench/bench_trial_throughput.py --device cuda --workers 8 --compile on   # GPU: CaiT-S24 -> DeiT-Tiny
    python3 bench/bench_trial_throughput.py --images 128 --epochs 2 --batch-size 16           # smoke test

The question (issue 17): how much of what the training step can do does the input pipeline deliver? Both sides
are the real training core (``trainables.engine``: ``setup_training`` from one ``TrainConfig`` with
``data.name=imagefolder``, then ``train_one_epoch``), the same models, optimiser and step; only the batches
differ:

- **jpeg**: the run's own train loader over a generated ImageFolder of ImageNet-like JPEGs (bench_input.py's
  generator, 500x375, ~80 KB), with the DeiT recipe (``augment: deit``), ``--workers`` loader worker processes
  and each ``data.pipeline`` in ``--pipelines`` (where the config has that field);
- **synthetic**: the same number of steps over pre-made, already normalised batches on the device (no
  decode, no augmentation, no host-to-device copy): the step's own rate.

Each side runs ``--epochs`` epochs; the first is a warm-up (loader workers start, compilation), the figure is
the median of the others' ``train/img_per_s`` (images / wall time of the epoch's train loop, loader waits
included; with ``--compile on`` the compilation falls in the synthetic side's warm-up). Per configuration the
synthetic side runs first, then the JPEG side, on the same state. Reported: img/s of both sides and their
ratio, the fraction of the step the pipeline delivers (target >= 0.9 with <= 8 CPU cores per GPU).

Presets: ``tiny224`` (CPU: a 4-block width-64 student from a width-128 encmm teacher, 224 px, 196 tokens, so
that a 2-core CPU step is in the loader's range) and bench_train_step.py's ``cait-deit`` (the paper's CaiT-S24 ->
DeiT-Tiny, random weights, 224 px, batch 256, bf16 on CUDA). Needs torch + timm + encmm (no Ray, no MLflow).
Writes JSON to --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_input import ensure_image_folder, image_files  # noqa: E402  (bench/, this folder)
from bench_train_step import (  # noqa: E402
    PRESETS,
    InMemoryLoader,
    Preset,
    device_name,
    make_batches,
    make_teacher_source,
    synchronize,
)

from encmm.trainables import engine  # noqa: E402
from encmm.trainables.config import DataConfig, TrainConfig  # noqa: E402

CPU_PRESET = Preset(
    "tiny224",
    student=dict(width=64, depth=4, head_dim=16, patch_size=16),
    teacher=dict(width=128, depth=4, head_dim=32, patch_size=16),
    img_size=224,
    batch_size=32,
    num_classes=10,
    kd=dict(alpha=0.9, beta=1.0),
)
ALL_PRESETS = {**PRESETS, CPU_PRESET.name: CPU_PRESET}


def trial_config(
    preset: Preset, teacher: dict, root: Path, workers: int, pipeline: str | None, device: str, compile_mode: str
):
    """The trial's TrainConfig: the preset's models on the JPEG ImageFolder with the DeiT recipe."""
    data = {
        "name": "imagefolder",
        "root": str(root),
        "img_size": preset.img_size,
        "batch_size": preset.batch_size,
        "num_workers": workers,
        "augment": "deit",
    }
    if pipeline is not None:
        data["pipeline"] = pipeline
    return TrainConfig.model_validate(
        {
            "name": "bench-trial",
            "seed": 0,
            "data": data,
            "student": {"model": "vit_tiny_patch16_224", **preset.student, "projector": preset.projector},
            "teacher": teacher,
            # A timm teacher keeps its 1,000-class head while the folder has 10 classes: its logits cannot
            # be distilled, so such a preset runs feature KD only (the KL term is a negligible part of a step).
            "kd": {**preset.kd, "alpha": 0.0} if "timm" in preset.teacher else preset.kd,
            "schedule": {"epochs": 300, "warmup_epochs": 5},
            "optim": {"lr": 5e-4, "lr_base_batch": 512},
            "resources": {"gpus_per_worker": 1 if device == "cuda" else 0, "compile": compile_mode},
        }
    )


def epoch_rates(state, epochs: int) -> list[float]:
    """``train/img_per_s`` of ``epochs`` calls of ``train_one_epoch`` on ``state``'s current train loader."""
    rates = []
    for epoch in range(epochs):
        synchronize(state.device)
        rates.append(engine.train_one_epoch(state, epoch)["train/img_per_s"])
    return rates


def measure_trial(cfg: TrainConfig, device: torch.device, epochs: int) -> dict:
    """Both sides on one state: the JPEG loader's epochs, then as many on-device synthetic batches per epoch."""
    state = engine.setup_training(cfg, device=device)
    jpeg_loader = state.train_loader
    steps = len(jpeg_loader)
    synthetic = make_batches(
        dataclasses.replace(CPU_PRESET, batch_size=cfg.data.batch_size, img_size=cfg.data.img_size, num_classes=10),
        device,
        count=min(steps, 8),
        channels_last=False,
    )
    result = {"steps_per_epoch": steps}
    for side in ("synthetic", "jpeg"):
        state.train_loader = InMemoryLoader(synthetic, steps) if side == "synthetic" else jpeg_loader
        rates = epoch_rates(state, epochs)
        result[f"{side}_epochs_img_s"] = rates
        result[f"{side}_img_s"] = statistics.median(rates[1:])
    del jpeg_loader, state
    result["fraction"] = result["jpeg_img_s"] / result["synthetic_img_s"]
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(ALL_PRESETS), default=None, help="default: tiny224 / cait-deit")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="loader worker processes per run")
    parser.add_argument(
        "--pipelines", default=None, help="comma list of data.pipeline values (default: every one the config has)"
    )
    parser.add_argument("--images", type=int, default=None, help="train JPEGs (default: 6 batches, >= 400)")
    parser.add_argument("--epochs", type=int, default=4, help="per side; the first is a warm-up")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch")
    parser.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="resources.compile (auto: on with CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the step (cpu default: cores - 1)")
    parser.add_argument("--folder", type=Path, default=None, help="ImageFolder root (default: in the temp dir)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "trial_throughput.json")
    args = parser.parse_args()
    args.preset = ALL_PRESETS[args.preset or ("cait-deit" if args.device == "cuda" else "tiny224")]
    if args.batch_size:
        args.preset = dataclasses.replace(args.preset, batch_size=args.batch_size)
    args.images = args.images or max(400, 6 * args.preset.batch_size)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first is a warm-up)")
    field = DataConfig.model_fields.get("pipeline")
    known = list(field.annotation.__args__) if field is not None else [None]
    args.pipelines = args.pipelines.split(",") if args.pipelines else known
    if any(p not in known for p in args.pipelines):
        parser.error(f"--pipelines: this encmm knows {known}")
    args.folder = args.folder or Path(tempfile.gettempdir()) / f"encmm-bench-trial-n{args.images}-s0"
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    elif args.threads:
        torch.set_num_threads(args.threads)
    root = ensure_image_folder(args.folder, args.images, max(10, args.images // 10), seed=0)
    print(f"{root}: {len(image_files(root))} JPEGs; {device_name(device)}; preset {args.preset.name}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher_source(args.preset, Path(tmp), device)
        for workers in args.workers:
            for pipeline in args.pipelines:
                cfg = trial_config(args.preset, teacher, root, workers, pipeline, args.device, args.compile)
                started = time.perf_counter()
                row = {"workers": workers, "pipeline": pipeline, **measure_trial(cfg, device, args.epochs)}
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                print(
                    f"  {workers} worker(s), pipeline {pipeline}: jpeg {row['jpeg_img_s']:.1f} img/s, synthetic "
                    f"{row['synthetic_img_s']:.1f} img/s -> {row['fraction']:.3f} of the step",
                    flush=True,
                )
    header = f"{'loader workers':>14} {'pipeline':>10} {'jpeg img/s':>11} {'synthetic img/s':>16} {'fraction':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['workers']:>14} {str(r['pipeline']):>10} {r['jpeg_img_s']:>11.1f} {r['synthetic_img_s']:>16.1f} "
            f"{r['fraction']:>9.3f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv[1:],
                "device": device_name(device),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "preset": dataclasses.asdict(args.preset),
                "train_images": args.images,
                "epochs": args.epochs,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
