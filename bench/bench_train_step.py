"""Benchmark encmm's distillation training step against a bare timm/PyTorch loop, same process.

    python3 bench/bench_train_step.py                                 # CPU: digits + mid presets
    python3 bench/bench_train_step.py --device cuda                   # CaiT-S24 -> DeiT-Tiny, 224 px, batch 256,
                                                                      # bf16, compile off and on
    python3 bench/bench_train_step.py --device cuda --compile off --steps 20   # quick check

encmm's side is the real training core: the state comes from ``trainables.engine.setup_training`` (the
dataset builder is swapped for an in-memory stand-in with the preset's classes) and each timed pass is
``trainables.engine.train_one_epoch`` over pre-made batches already on the device (teacher forward,
student forward/backward, KD losses, AdamW, LR schedule, on-device metric sums). The bare loop runs the
same models (deep copies, same init) with the same losses written inline, plain AdamW (fused on CUDA)
and no scheduler or metrics. Passes alternate (encmm, bare, bare, encmm, ...) so machine load hits both;
the ratio is the median of the ratios of neighbouring passes (img/s columns: medians of all passes).
FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` on one eager bare step (forward +
backward, the teacher forward included); on CUDA the fraction of peak is given against ``--peak-tflops``
(default 989, H100 SXM bf16 dense) and against a measured 8192^3 bf16 matmul.

Needs only torch + timm + the encmm package (no Ray, no MLflow). Prints a table; writes JSON to --json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from folded_attention import FoldedTalkingHeadAttn, fold_talking_heads  # noqa: E402  (bench/, this folder)
from timm.models.cait import TalkingHeadAttn  # noqa: E402

from encmm.trainables import engine  # noqa: E402
from encmm.trainables.config import TrainConfig  # noqa: E402
from encmm.trainables.data import IMAGENET_MEAN, IMAGENET_STD, DataBundle  # noqa: E402
from encmm.trainables.teacher import FusedTalkingHeadAttn  # noqa: E402

# --teacher-attention -> the encmm teacher's ``fused_attention`` setting ("folded": timm's blocks, then swapped)
TEACHER_ATTENTION = {"auto": "auto", "fused": "on", "timm": "off", "folded": "off"}

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM5 datasheet, bf16 dense (no sparsity); H200: same chip, same figure


@dataclass
class Preset:
    name: str
    student: dict
    teacher: dict  # either {"timm": name} or an encmm student geometry trained as the teacher
    img_size: int
    batch_size: int
    num_classes: int
    kd: dict
    projector: str = "linear"
    steps: int = 30  # per timed pass, unless --steps
    compile_mode: str = "default"  # resources.compile_mode (both sides' torch.compile mode)
    teacher_dtype: str = "float32"  # teacher.dtype (both sides' frozen teacher weights)


PRESETS = {
    # The embedded default sweep's geometry (experiments/digits.yaml, digits-teacher.yaml).
    "digits": Preset(
        "digits",
        student=dict(width=32, depth=4, head_dim=16, patch_size=4),
        teacher=dict(width=128, depth=4, head_dim=32, patch_size=4),
        img_size=16,
        batch_size=64,
        num_classes=10,
        kd=dict(alpha=0.9, beta=1.0),
    ),
    # Four times the tokens, twice the widths, 1.5x the depth (~20x the FLOPs per image): where per-step
    # Python overhead matters less.
    "mid": Preset(
        "mid",
        student=dict(width=64, depth=6, head_dim=16, patch_size=4),
        teacher=dict(width=256, depth=6, head_dim=32, patch_size=4),
        img_size=32,
        batch_size=64,
        num_classes=100,
        kd=dict(alpha=0.9, beta=1.0),
        steps=10,
    ),
    # The paper's pairing (experiments/imagenet-cait-s24-deit-tiny.yaml) with random weights.
    "cait-deit": Preset(
        "cait-deit",
        student=dict(model="deit_tiny_patch16_224", width=192, depth=12, head_dim=64, patch_size=16),
        teacher=dict(timm="cait_s24_224"),
        img_size=224,
        batch_size=256,
        num_classes=1000,
        kd=dict(alpha=0.9, beta=0.2),
        projector="avgpool",
        steps=50,
    ),
}


class ZerosDataset(Dataset):
    """Stand-in for the preset's dataset: only its length and classes matter (batches are pre-made)."""

    def __init__(self, length: int, img_size: int):
        self.length, self.shape = length, (3, img_size, img_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return torch.zeros(self.shape), 0


class Sampler:
    def set_epoch(self, epoch: int) -> None:
        pass


class InMemoryLoader:
    """What ``train_one_epoch`` needs of a loader: ``sampler.set_epoch``, ``dataset``, ``len`` and iteration."""

    def __init__(self, batches: list, steps: int):
        self.batches, self.steps, self.sampler, self.dataset = batches, steps, Sampler(), None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for step in range(self.steps):
            yield self.batches[step % len(self.batches)]


def stand_in_dataset(length: int, img_size: int, num_classes: int, mean, std) -> DataBundle:
    """All-zero images for ``setup_training(data=...)``: the batches are replaced by in-memory ones."""
    data = ZerosDataset(length, img_size)
    return DataBundle(data, data, num_classes, tuple(mean), tuple(std))


def train_config(
    preset: Preset, *, teacher: dict, kd: dict, device: str, compile_mode: str, precision: str, name: str = "bench"
) -> TrainConfig:
    student = {"model": "vit_tiny_patch16_224", **preset.student}
    return TrainConfig.model_validate(
        {
            "name": name,
            "seed": 0,
            "data": {"name": "synthetic", "img_size": preset.img_size, "batch_size": preset.batch_size},
            "student": {**student, "projector": preset.projector},
            "teacher": {**teacher, "dtype": preset.teacher_dtype},
            "kd": kd,
            "schedule": {"epochs": 300, "warmup_epochs": 5},
            "optim": {"lr": 5e-4, "lr_base_batch": 512},
            "resources": {
                "gpus_per_worker": 1 if device == "cuda" else 0,
                "precision": precision,
                "compile": compile_mode,
                "compile_mode": preset.compile_mode,
            },
        }
    )


def make_teacher_source(preset: Preset, folder: Path, device: torch.device, fused_attention: str = "auto") -> dict:
    """``teacher`` section for the preset: a timm name, or an encmm checkpoint of the teacher geometry."""
    if "timm" in preset.teacher:
        return {
            "source": "timm",
            "model": preset.teacher["timm"],
            "pretrained": False,
            "fused_attention": fused_attention,
        }
    geometry = Preset(
        preset.name,
        student=preset.teacher,
        teacher={},
        img_size=preset.img_size,
        batch_size=preset.batch_size,
        num_classes=preset.num_classes,
        kd={},
    )
    cfg = train_config(
        geometry,
        teacher={"source": "none"},
        kd={},
        device="cpu",
        compile_mode="off",
        precision="fp32",
        name="bench-teacher",
    )
    data = stand_in_dataset(preset.batch_size, preset.img_size, preset.num_classes, (0.5,) * 3, (0.5,) * 3)
    state = engine.setup_training(cfg, device=torch.device("cpu"), data=data)
    path = folder / "teacher.pt"
    engine.save_checkpoint(engine.checkpoint_state(state, 0, {}), path)
    return {"source": "checkpoint", "checkpoint": str(path)}


def build_encmm_state(
    preset: Preset,
    device: torch.device,
    compile_on: bool,
    precision: str,
    folder: Path,
    steps: int,
    fused_attention: str = "auto",
):
    teacher = make_teacher_source(preset, folder, device, fused_attention)
    cfg = train_config(
        preset,
        teacher=teacher,
        kd=preset.kd,
        device=device.type,
        compile_mode="on" if compile_on else "off",
        precision=precision,
    )
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if "timm" in preset.teacher else ((0.5,) * 3, (0.5,) * 3)
    data = stand_in_dataset(preset.batch_size * steps, preset.img_size, preset.num_classes, mean, std)
    return engine.setup_training(cfg, device=device, data=data)


def bare_parts(state, device: torch.device):
    """Deep copies of the timm modules inside encmm's state: same geometry, same initial weights."""
    student = state.core.student
    if not hasattr(student, "backbone"):
        raise SystemExit("the bare loop covers remedy none (a plain timm ViT student)")
    student = copy.deepcopy(student.backbone).train()
    projector = copy.deepcopy(state.core.projector) if state.core.projector is not None else None
    teacher = state.teacher.model
    teacher = copy.deepcopy(getattr(teacher, "backbone", teacher)).eval().requires_grad_(False)
    for module in teacher.modules():  # the baseline is timm's own attention, whatever encmm's teacher runs
        if isinstance(module, TalkingHeadAttn):
            module.__class__ = TalkingHeadAttn
    teacher.to(state.teacher.weight_dtype)  # teacher.dtype: the same weights as encmm's side
    params = list(student.parameters()) + (list(projector.parameters()) if projector is not None else [])
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **fused)
    return student, projector, teacher, optimizer


def make_bare_step(state, device: torch.device, compile_on: bool, channels_last: bool):
    """One KD step written against timm directly (the baseline)."""
    cfg = state.cfg.kd
    student, projector, teacher, optimizer = bare_parts(state, device)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    width = student.embed_dim
    pool = cfg.beta > 0 and projector is None and teacher.embed_dim != width
    dtype = state.autocast_dtype

    weight_dtype = state.teacher.weight_dtype

    def teacher_forward(x):
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight_dtype)  # bf16 teacher weights without autocast (CPU): as encmm's FrozenTeacher does
        with torch.no_grad():
            final, taps = teacher.forward_intermediates(
                x, indices=[-1], norm=False, output_fmt="NLC", intermediates_only=False
            )
            return teacher.forward_head(final), taps[0]

    def student_forward(x):
        final, taps = student.forward_intermediates(
            x, indices=[-1], norm=False, output_fmt="NLC", intermediates_only=False
        )
        feat = taps[0] if projector is None else projector(taps[0])
        return student.forward_head(final), feat

    if compile_on:
        mode = None if state.cfg.resources.compile_mode == "default" else state.cfg.resources.compile_mode
        teacher_forward = torch.compile(teacher_forward, mode=mode)
        student_forward = torch.compile(student_forward, mode=mode)

    def step(x, y):
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
        with autocast:
            t_logits, t_feat = teacher_forward(x)
            logits, feat = student_forward(x)
            if pool:
                b, n, c = t_feat.shape
                t_feat = t_feat.reshape(b, n, width, c // width).mean(-1)
            ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss = (1 - cfg.alpha) * ce
            if cfg.beta > 0:
                loss = loss + cfg.beta * F.mse_loss(feat.float(), t_feat.float())
            if cfg.alpha > 0:
                t = cfg.temperature
                kl = (
                    F.kl_div(
                        F.log_softmax(logits.float() / t, -1),
                        F.log_softmax(t_logits.float() / t, -1),
                        reduction="batchmean",
                        log_target=True,
                    )
                    * t
                    * t
                )
                loss = loss + cfg.alpha * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(preset: Preset, device: torch.device, count: int, channels_last: bool) -> list:
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        x = torch.randn(preset.batch_size, 3, preset.img_size, preset.img_size, generator=g)
        y = torch.randint(0, preset.num_classes, (preset.batch_size,), generator=g)
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, y.to(device)))
    return batches


def time_encmm(state, batches, steps: int, epoch: int) -> float:
    state.train_loader = InMemoryLoader(batches, steps)
    synchronize(state.device)
    start = time.perf_counter()
    engine.train_one_epoch(state, epoch)  # ends with a host read of the metric sums (a sync)
    synchronize(state.device)
    return time.perf_counter() - start


def time_bare(step, batches, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step(x, y)`` over ``batches``, device work included."""
    synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        step(x, y)
    synchronize(device)
    return time.perf_counter() - start


def count_step_flops(state, batches, device: torch.device) -> float:
    """FLOPs of one eager KD step (forward + backward + teacher forward), via FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    step = make_bare_step(state, device, compile_on=False, channels_last=False)
    x, y = batches[0]
    with FlopCounterMode(display=False) as counter:
        step(x, y)
    synchronize(device)
    return float(counter.get_total_flops())


def measure_matmul_peak(device: torch.device, dtype=torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul TFLOP/s (the practical peak the step's fraction is also given against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def teacher_attention_check(state) -> tuple[int, float]:
    """How many of the encmm teacher's talking-heads blocks run something other than timm's forward (fused
    or folded), and the first one's relative error against timm's forward on random tokens under the run's
    autocast. Returns (blocks, relative error); (0, 0.0) when the teacher runs timm's blocks."""
    swapped = [m for m in state.teacher.modules() if type(m) in (FusedTalkingHeadAttn, FoldedTalkingHeadAttn)]
    if not swapped:
        return 0, 0.0
    first = swapped[0]
    tokens = torch.randn(8, 197, first.qkv.in_features, device=state.device)
    with torch.no_grad(), engine._autocast(state):
        swapped_out = first(tokens).float()
        timm_out = TalkingHeadAttn.forward(first, tokens).float()  # timm's own forward, same parameters
    return len(swapped), float((swapped_out - timm_out).norm() / timm_out.norm())


def prepare_sides(
    preset: Preset,
    device: torch.device,
    *,
    compile_on: bool,
    precision: str,
    steps: int,
    channels_last: bool,
    teacher_attention: str,
):
    """encmm's state, the pre-made batches and the bare step (always timm's attention). The encmm teacher
    runs what ``teacher_attention`` says (``TEACHER_ATTENTION``; "folded" swaps its blocks for the bench
    experiment before the first, compiling, call). Returns (state, batches, bare step,
    (swapped blocks, first swapped block's relative error))."""
    with tempfile.TemporaryDirectory() as tmp:
        state = build_encmm_state(
            preset,
            device,
            compile_on,
            precision,
            Path(tmp),
            steps,
            fused_attention=TEACHER_ATTENTION[teacher_attention],
        )
    batches = make_batches(preset, device, 4, channels_last)
    bare = make_bare_step(state, device, compile_on, channels_last)
    if teacher_attention == "folded":
        fold_talking_heads(state.teacher)
    return state, batches, bare, teacher_attention_check(state)


def bench_case(
    preset: Preset,
    device: torch.device,
    *,
    compile_on: bool,
    precision: str,
    steps: int,
    warmup: int,
    repeats: int,
    channels_last: bool,
    teacher_attention: str = "auto",
) -> dict:
    state, batches, bare, (swapped_blocks, swapped_error) = prepare_sides(
        preset,
        device,
        compile_on=compile_on,
        precision=precision,
        steps=steps,
        channels_last=channels_last,
        teacher_attention=teacher_attention,
    )
    flops = count_step_flops(state, batches, device)  # a fresh eager bare step: timm's blocks
    if channels_last:
        state.core.to(memory_format=torch.channels_last)
        state.teacher.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    time_encmm(state, batches, warmup, epoch=0)  # compile (if on) + allocator / thread-pool warm-up
    encmm_warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    time_bare(bare, batches, warmup, device)
    bare_warmup_s = time.perf_counter() - t0
    encmm_rates, bare_rates = [], []
    images = steps * preset.batch_size
    for r in range(repeats):
        # Alternate the order too, so neither side always runs right after the other's allocations.
        order = ("encmm", "bare") if r % 2 == 0 else ("bare", "encmm")
        for side in order:
            if side == "encmm":
                encmm_rates.append(images / time_encmm(state, batches, steps, epoch=r + 1))
            else:
                bare_rates.append(images / time_bare(bare, batches, steps, device))
    encmm_ips, bare_ips = statistics.median(encmm_rates), statistics.median(bare_rates)
    # Each encmm pass is paired with the bare pass next to it in time: the median of those ratios is
    # robust to load that drifts during the run (other jobs on a shared machine).
    pair_ratios = [e / b for e, b in zip(encmm_rates, bare_rates)]
    return {
        "preset": preset.name,
        "device": device.type,
        "compile": compile_on,
        "compile_mode": state.cfg.resources.compile_mode,
        "teacher_dtype": state.cfg.teacher.dtype,
        "precision": precision,
        "autocast_dtype": str(state.autocast_dtype) if state.autocast_dtype else "fp32",
        "channels_last": channels_last,
        "batch_size": preset.batch_size,
        "img_size": preset.img_size,
        "teacher_attention": teacher_attention,
        "swapped_attention_blocks": swapped_blocks,
        "swapped_block_relative_error": swapped_error,
        "steps_per_pass": steps,
        "repeats": repeats,
        "encmm_img_s": encmm_ips,
        "bare_img_s": bare_ips,
        "ratio": statistics.median(pair_ratios),
        "ratio_of_medians": encmm_ips / bare_ips,
        "encmm_img_s_all": encmm_rates,
        "bare_img_s_all": bare_rates,
        "pair_ratios": pair_ratios,
        "encmm_warmup_s": encmm_warmup_s,
        "bare_warmup_s": bare_warmup_s,
        "flops_per_step": flops,
        "flops_per_image": flops / preset.batch_size,
        "encmm_tflops": flops / preset.batch_size * encmm_ips / 1e12,
        "bare_tflops": flops / preset.batch_size * bare_ips / 1e12,
    }


def profile_case(
    preset: Preset,
    device: torch.device,
    *,
    compile_on: bool,
    precision: str,
    steps: int,
    warmup: int,
    path: Path,
    teacher_attention: str = "auto",
) -> None:
    """torch.profiler over ``steps`` encmm steps after ``warmup``: the top kernels by device time, and
    the same for the bare loop, written to ``path`` (where a KD step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    state, batches, bare, _ = prepare_sides(
        preset,
        device,
        compile_on=compile_on,
        precision=precision,
        steps=steps,
        channels_last=False,
        teacher_attention=teacher_attention,
    )
    time_encmm(state, batches, warmup, epoch=0)
    time_bare(bare, batches, warmup, device)
    tables = []
    for side, run in (
        ("encmm", lambda: time_encmm(state, batches, steps, epoch=1)),
        ("bare", lambda: time_bare(bare, batches, steps, device)),
    ):
        with profile(activities=activities) as prof:
            seconds = run()
        table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        tables.append(
            f"== {side}, compile={'on' if compile_on else 'off'}: {steps} steps in {seconds:.3f} s "
            f"({steps * preset.batch_size / seconds:,.0f} img/s under the profiler)\n{table}"
        )
    tables.append(time_teacher_alone(state, batches, steps, compile_on))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tables))
    print(tables[-1])
    print(f"wrote {path}")


def time_teacher_alone(state, batches, steps: int, compile_on: bool) -> str:
    """The frozen teacher's forward alone: under the run's autocast (as encmm runs it), and with its
    weights and input cast to bf16 outside autocast (softmax and norms then read/write bf16)."""
    device = state.device
    teacher_bf16 = copy.deepcopy(state.teacher).to(torch.bfloat16)
    if compile_on:
        teacher_bf16.compile()
    lines = []
    for label, module, cast in (("autocast", state.teacher, None), ("bf16 weights", teacher_bf16, torch.bfloat16)):

        def forward(x, _labels=None):  # the (x, y) step shape ``time_bare`` calls
            if cast is None:
                with engine._autocast(state):  # the engine's own autocast for this state
                    return module(x)
            with torch.autocast(device.type, enabled=False):
                return module(x.to(cast))

        time_bare(forward, batches, 5, device)  # warm-up (compiles the bf16 copy)
        seconds = time_bare(forward, batches, steps, device)
        lines.append(f"teacher forward alone, {label}: {steps * len(batches[0][0]) / seconds:,.0f} img/s")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--presets", default=None, help="comma list; default digits,mid on cpu, cait-deit on cuda")
    parser.add_argument(
        "--compile", choices=["off", "on", "both"], default=None, help="default: off on cpu, both on cuda"
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast on cuda, fp32 on cpu (encmm's resources.precision)",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels-last input and models (both sides)")
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
        help="torch.compile mode, both sides (encmm's resources.compile_mode); reduce-overhead = CUDA graphs",
    )
    parser.add_argument(
        "--teacher-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the frozen teacher's weights, both sides (encmm's teacher.dtype)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="override the presets' batch (smoke tests)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per timed pass (default: 30 digits, 10 mid, 50 cait-deit)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 cpu, 15 cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per side, interleaved")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"nominal peak for the fraction; default {H100_BF16_DENSE_TFLOPS:g} (H100 bf16 dense) "
        "on cuda, none on cpu",
    )
    parser.add_argument("--no-measure-peak", action="store_true", help="cuda: skip the 8192^3 bf16 matmul peak")
    parser.add_argument(
        "--teacher-attention",
        choices=list(TEACHER_ATTENTION),
        default="auto",
        help="encmm side only (the bare loop keeps timm's blocks): its teacher.fused_attention "
        "setting (auto = fused on cuda; 'fused', 'timm'), or 'folded' for the experiment in "
        "bench/folded_attention.py",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="instead of timing: write torch.profiler's top kernels for each preset/mode here",
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "train_step.json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.presets = (args.presets or ("cait-deit" if cuda else "digits,mid")).split(",")
    args.compile = args.compile or ("both" if cuda else "off")
    args.warmup = args.warmup or (15 if cuda else 5)
    if args.peak_tflops is None and cuda:
        args.peak_tflops = H100_BF16_DENSE_TFLOPS
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    measured_peak = None
    if device.type == "cuda" and not args.no_measure_peak:
        measured_peak = measure_matmul_peak(device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = []
    for name in args.presets:
        preset = dataclasses.replace(PRESETS[name], compile_mode=args.compile_mode, teacher_dtype=args.teacher_dtype)
        if args.batch_size:
            preset = dataclasses.replace(preset, batch_size=args.batch_size)
        for compile_on in modes:
            if args.profile:
                profile_case(
                    preset,
                    device,
                    compile_on=compile_on,
                    precision=args.precision,
                    steps=args.steps or preset.steps,
                    warmup=args.warmup,
                    teacher_attention=args.teacher_attention,
                    path=args.profile.with_name(
                        f"{args.profile.stem}-{name}-{'compiled' if compile_on else 'eager'}.txt"
                    ),
                )
                continue
            row = bench_case(
                preset,
                device,
                compile_on=compile_on,
                precision=args.precision,
                steps=args.steps or preset.steps,
                warmup=args.warmup,
                repeats=args.repeats,
                channels_last=args.channels_last,
                teacher_attention=args.teacher_attention,
            )
            if args.peak_tflops:
                row["encmm_peak_fraction"] = row["encmm_tflops"] / args.peak_tflops
            if measured_peak:
                row["encmm_measured_peak_fraction"] = row["encmm_tflops"] / measured_peak
            results.append(row)
            folded = (
                f" (encmm teacher: {row['swapped_attention_blocks']} {args.teacher_attention} attention "
                f"blocks, block rel. error {row['swapped_block_relative_error']:.1e})"
                if row["swapped_attention_blocks"]
                else ""
            )
            print(
                f"  {name} compile={'on' if compile_on else 'off'}"
                + (f" ({args.compile_mode})" if compile_on and args.compile_mode != "default" else "")
                + (f", teacher {args.teacher_dtype}" if args.teacher_dtype != "float32" else "")
                + f": encmm {row['encmm_img_s']:,.0f} img/s, "
                f"bare {row['bare_img_s']:,.0f} img/s, ratio {row['ratio']:.3f}{folded}",
                flush=True,
            )
    if args.profile:
        return
    header = [
        "preset",
        "device",
        "compile",
        "dtype",
        "batch",
        "encmm img/s",
        "bare img/s",
        "ratio (>=1.0)",
        "pair ratios min-max",
        "GFLOP/img",
        "encmm TFLOP/s",
    ]
    if args.peak_tflops:
        header.append(f"of {args.peak_tflops:g} peak")
    if measured_peak:
        header.append(f"of measured {measured_peak:.0f}")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        cells = [
            r["preset"],
            r["device"],
            "on" if r["compile"] else "off",
            r["autocast_dtype"].replace("torch.", ""),
            str(r["batch_size"]),
            f"{r['encmm_img_s']:,.1f}",
            f"{r['bare_img_s']:,.1f}",
            f"{r['ratio']:.3f}",
            f"{min(r['pair_ratios']):.3f}-{max(r['pair_ratios']):.3f}",
            f"{r['flops_per_image'] / 1e9:.3f}",
            f"{r['encmm_tflops']:.4f}",
        ]
        if args.peak_tflops:
            cells.append(f"{r['encmm_peak_fraction']:.1%}")
        if measured_peak:
            cells.append(f"{r['encmm_measured_peak_fraction']:.1%}")
        print("| " + " | ".join(cells) + " |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "device": device.type,
                "device_name": device_name(device),
                "torch": torch.__version__,
                "timm": __import__("timm").__version__,
                "torch_threads": torch.get_num_threads(),
                "peak_tflops_nominal": args.peak_tflops,
                "peak_tflops_measured": measured_peak,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": sys.argv[1:],
                "results": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
