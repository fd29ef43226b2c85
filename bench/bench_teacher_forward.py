"""The frozen CaiT teacher's forward alone, with each talking-heads attention variant, same process.

    python3 bench/bench_teacher_forward.py --device cuda      # CaiT-S24, 224 px, batch 256, bf16, eager + compiled
    python3 bench/bench_teacher_forward.py                    # CPU smoke size (cait_xxs24 at 64 px, batch 8)

On a GPU the teacher's forward is most of a CaiT -> DeiT KD step (BENCHMARKS.md, section 5), so this is where
that step's speed is decided. Variants, all with the same weights:
- ``timm``: timm's ``TalkingHeadAttn`` (the baseline);
- ``fused``: encmm's ``FusedTalkingHeadAttn`` (trainables/teacher.py; what ``teacher.fused_attention``
  switches on): both head mixings folded into one ``scaled_dot_product_attention`` per block;
- ``fused-expanded``: the same fold with the mixed queries as H heads and K, V expanded to them (the
  first layout tried; bench/folded_attention.py);
- ``folded``: the bench experiment in bench/folded_attention.py (the mixings folded into two plain matmuls,
  the attention maps still materialised).
Each runs inside encmm's ``FrozenTeacher`` (``forward_intermediates`` + head, ``no_grad``) under bf16
autocast on CUDA, compiled in place the way the engine does it (``--compile on``). Passes rotate through the
variants; img/s are medians, the ratio is against ``timm`` in the same mode. Every variant is also checked
against timm's block on random tokens with the head-mixing weights drawn at full scale: in fp32, under bf16
autocast, and both against timm in fp32 (how much of the bf16 error is timm's own). Writes JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from timm.models.cait import TalkingHeadAttn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from folded_attention import ExpandedSdpaTalkingHeadAttn, FoldedTalkingHeadAttn  # noqa: E402  (bench/)

from encmm.trainables.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from encmm.trainables.teacher import FrozenTeacher, FusedTalkingHeadAttn, fuse_talking_heads  # noqa: E402

SWAPPED_CLASS = {
    "fused": FusedTalkingHeadAttn,
    "fused-expanded": ExpandedSdpaTalkingHeadAttn,
    "folded": FoldedTalkingHeadAttn,
}
VARIANTS = ["timm", *SWAPPED_CLASS]


def make_teacher(name: str, img_size: int, device: torch.device, variant: str) -> FrozenTeacher:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=img_size)
    swapped = fuse_talking_heads(model.eval(), SWAPPED_CLASS[variant]) if variant != "timm" else 0
    if variant != "timm" and swapped == 0:
        raise SystemExit(f"{name} has no talking-heads attention to swap")
    return FrozenTeacher(
        model,
        -1,
        student_mean=IMAGENET_MEAN,
        student_std=IMAGENET_STD,
        teacher_mean=IMAGENET_MEAN,
        teacher_std=IMAGENET_STD,
    ).to(device)


def block_relative_errors(variant: str, dim: int, heads: int, tokens: int, device: torch.device) -> dict:
    """The variant's block against timm's forward (same parameters), fp32 and bf16 autocast; mixing and
    projection weights at full scale (timm's CaiT init keeps them near identity / tiny)."""
    torch.manual_seed(1)
    block = TalkingHeadAttn(dim, num_heads=heads, qkv_bias=True).to(device).eval()
    for layer in (block.proj_l, block.proj_w):
        torch.nn.init.normal_(layer.weight, std=heads**-0.5)
        torch.nn.init.normal_(layer.bias, std=0.5)
    block.__class__ = SWAPPED_CLASS[variant]
    x = torch.randn(4, tokens, dim, device=device)
    errors, outputs = {}, {}
    for label, autocast in (
        ("fp32", torch.autocast(device.type, enabled=False)),
        ("bf16", torch.autocast(device.type, dtype=torch.bfloat16)),
    ):
        with torch.no_grad(), autocast:
            outputs[label] = block(x).double(), TalkingHeadAttn.forward(block, x).double()  # (variant, timm)
        ours, reference = outputs[label]
        errors[label] = float((ours - reference).norm() / reference.norm())
    exact = outputs["fp32"][1]  # timm in fp32: how far bf16 takes each from it
    errors["bf16_vs_fp32"] = float((outputs["bf16"][0] - exact).norm() / exact.norm())
    errors["timm_bf16_vs_fp32"] = float((outputs["bf16"][1] - exact).norm() / exact.norm())
    return errors


def attention_kernels(teacher: FrozenTeacher, x: torch.Tensor, autocast) -> list[str]:
    """CUDA kernels whose name says attention (which SDPA backend ran), from one eager forward."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad(), autocast:
        teacher(x[:8])
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if any(s in n.lower() for s in ("fmha", "flash", "attention", "cudnn")))


def time_forward(teacher, batch: torch.Tensor, steps: int, autocast, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        for _ in range(steps):
            teacher(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def count_forward_flops(teacher, batch: torch.Tensor, autocast) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
        teacher(batch)
    return float(counter.get_total_flops())


def bench_mode(args, device: torch.device, compile_on: bool, batch: torch.Tensor, autocast) -> list[dict]:
    teachers, warmup_s = {}, {}
    for variant in args.variants:
        teacher = make_teacher(args.model, args.img_size, device, variant)
        if compile_on:
            teacher.compile(mode=args.compile_mode)
        t0 = time.perf_counter()
        time_forward(teacher, batch, args.warmup, autocast, device)
        warmup_s[variant] = time.perf_counter() - t0
        teachers[variant] = teacher
    rates = {v: [] for v in args.variants}
    for r in range(args.repeats):
        order = args.variants[r % len(args.variants) :] + args.variants[: r % len(args.variants)]
        for variant in order:
            rates[variant].append(
                args.steps * len(batch) / time_forward(teachers[variant], batch, args.steps, autocast, device)
            )
    rows = []
    for variant in args.variants:
        row = {
            "variant": variant,
            "compile": compile_on,
            "img_s": statistics.median(rates[variant]),
            "img_s_all": rates[variant],
            "warmup_s": warmup_s[variant],
        }
        if "timm" in rates:
            row["ratio_vs_timm"] = row["img_s"] / statistics.median(rates["timm"])
        if device.type == "cuda" and variant == "fused" and not compile_on:
            row["attention_kernels"] = attention_kernels(teachers[variant], batch, autocast)
        rows.append(row)
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--model", default=None, help="timm CaiT name (default cait_s24_224 on cuda, cait_xxs24_224 on cpu)"
    )
    parser.add_argument("--img-size", type=int, default=None, help="default 224 on cuda, 64 on cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 256 on cuda, 8 on cpu")
    parser.add_argument("--variants", default="timm,fused,fused-expanded,folded")
    parser.add_argument(
        "--compile", choices=["off", "on", "both"], default=None, help="default both on cuda, off on cpu"
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's; the engine's)")
    parser.add_argument("--steps", type=int, default=20, help="forwards per timed pass")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant, rotating the order")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "teacher_forward.json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.model = args.model or ("cait_s24_224" if cuda else "cait_xxs24_224")
    args.img_size = args.img_size or (224 if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 8)
    args.compile = args.compile or ("both" if cuda else "off")
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    batch = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    probe = make_teacher(args.model, args.img_size, device, "timm")
    attn = next(m for m in probe.modules() if isinstance(m, TalkingHeadAttn))
    dim, heads, tokens = attn.qkv.in_features, attn.num_heads, probe.model.patch_embed.num_patches + 1
    flops = count_forward_flops(probe, batch, autocast)  # timm's forward: the model's own FLOPs
    del probe
    errors = {v: block_relative_errors(v, dim, heads, tokens, device) for v in args.variants if v != "timm"}
    rows = []
    for compile_on in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        for row in bench_mode(args, device, compile_on, batch, autocast):
            row["tflops"] = flops / len(batch) * row["img_s"] / 1e12
            row.update({f"block_rel_error_{k}": e for k, e in errors.get(row["variant"], {}).items()})
            rows.append(row)
            print(
                f"  {row['variant']:>6} compile={'on' if compile_on else 'off'}: {row['img_s']:,.0f} img/s"
                f" (x{row.get('ratio_vs_timm', 1):.3f} timm), warm-up {row['warmup_s']:.1f} s"
                + (f", kernels {row['attention_kernels']}" if "attention_kernels" in row else ""),
                flush=True,
            )
    print(
        f"\n{args.model}, {args.img_size} px, batch {args.batch_size}, {device.type}"
        f"{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
        f"{flops / len(batch) / 1e9:.2f} GFLOP/img (timm's forward)"
    )
    print(
        "| variant | compile | img/s | vs timm | TFLOP/s (model FLOPs) | block rel. error vs timm: fp32 / bf16 | "
        "bf16 vs timm fp32: variant / timm |\n|---|---|--:|--:|--:|---|---|"
    )
    for r in rows:
        err = (
            f"{r['block_rel_error_fp32']:.1e} / {r['block_rel_error_bf16']:.1e} | "
            f"{r['block_rel_error_bf16_vs_fp32']:.1e} / {r['block_rel_error_timm_bf16_vs_fp32']:.1e}"
            if "block_rel_error_fp32" in r
            else "(reference) |"
        )
        print(
            f"| {r['variant']} | {'on' if r['compile'] else 'off'} | {r['img_s']:,.0f} | "
            f"{r.get('ratio_vs_timm', 1):.3f} | {r['tflops']:.1f} | {err} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "model": args.model,
                "img_size": args.img_size,
                "batch_size": args.batch_size,
                "device": device.type,
                "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__,
                "timm": timm.__version__,
                "flops_per_image": flops / len(batch),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv[1:],
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
