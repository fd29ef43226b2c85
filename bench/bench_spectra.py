"""Benchmark per-image SVD ranks: numpy loop vs encmm's `svd_rank` vs batched torch SVDs, same run.

    python3 bench/bench_spectra.py                       # 2,400 matrices of 64x192 on the CPU
    python3 bench/bench_spectra.py --full --device cuda  # 1,000 images x 24 layers of 196x384

Every method's ranks (p = 0.8, 0.9, 0.95, 0.99) are compared with the float64 reference, a per-image
`np.linalg.svd` loop that is also the baseline timing, on the timed features and on an untimed
"hard set" whose energies sit exactly on the thresholds. encmm's certified methods (`certified_svd_rank`)
also report how many images the float64 re-check recomputed ("rechecked") and how many the fast spectrum
refused (cuSOLVER's gesvda on rank-deficient matrices). Prints a table; writes JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encmm.analysis.certified_ranks import (  # noqa: E402
    CertifiedRanks,
    certified_svd_rank,
    device_fast_spectrum,
    gram_spectrum,
)
from encmm.analysis.spectra import (  # noqa: E402
    RANK_TOLERANCE,
    cumulative_energy,
    energy_spectrum,
    required_rank,
    svd_rank,
)

THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def make_layer(images: int, tokens: int, channels: int, seed: int, device: torch.device) -> torch.Tensor:
    """Realistic-ish float32 features `[I, N, C]`: a shared low-rank part, a per-image low-rank part
    with a decaying spectrum, and noise, so that ranks spread over a range as in real ViT layers."""
    g = torch.Generator(device=device).manual_seed(seed)
    rank = min(48, tokens, channels)
    weights = torch.arange(1, rank + 1, device=device, dtype=torch.float32) ** -1.0
    shared = torch.randn(rank, channels, generator=g, device=device)
    own = 0.7 * torch.randn(images, rank, channels, generator=g, device=device)
    coefficients = torch.randn(images, tokens, rank, generator=g, device=device) * weights
    noise = 0.02 * torch.randn(images, tokens, channels, generator=g, device=device)
    return coefficients @ (shared + own) + noise


def make_hard_set(images: int, tokens: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Float32 matrices whose ranks sit on a knife edge: flat spectra of rank 5, 10 or 20, where
    E_k = k / r equals p exactly (0.8, 0.9, 0.95), and log-spaced spectra down to 1e-6."""
    g = torch.Generator().manual_seed(seed)
    k = min(tokens, channels)
    spectra = [torch.ones(5), torch.ones(10), torch.ones(20), torch.logspace(0, -6, k)]
    out = []
    for index in range(images):
        s = spectra[index % len(spectra)][:k].double()
        left = torch.linalg.qr(torch.randn(tokens, s.numel(), generator=g, dtype=torch.float64))[0]
        right = torch.linalg.qr(torch.randn(channels, s.numel(), generator=g, dtype=torch.float64))[0]
        out.append((left * s) @ right.T)
    return torch.stack(out).float()


def ranks_from_energies(energies: np.ndarray) -> np.ndarray:
    """`[I, K]` descending squared singular values -> `[I, P]` d_p, as analysis.spectra defines them."""
    cumulative = np.cumsum(energies, axis=-1) / np.sum(energies, axis=-1, keepdims=True)
    p = np.asarray(THRESHOLDS) - RANK_TOLERANCE
    return (cumulative[:, None, :] < p[None, :, None]).sum(-1) + 1


def numpy_loop(x: np.ndarray) -> np.ndarray:
    """The baseline and float64 reference: one np.linalg.svd per image."""
    energies = np.stack([np.linalg.svd(xi.astype(np.float64), compute_uv=False) ** 2 for xi in x])
    return ranks_from_energies(energies)


def torch_svdvals(dtype: torch.dtype, driver: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        kwargs = {"driver": driver} if driver else {}
        values = torch.linalg.svdvals(x.to(dtype), **kwargs)
        return torch.from_numpy(ranks_from_energies(values.double().square().cpu().numpy()))

    return run


def float32_gram(x: torch.Tensor) -> torch.Tensor:
    """The issue's 4.4x method, for comparison: float32 Gram of the smaller side + eigvalsh."""
    gram = x @ x.mT if x.shape[1] <= x.shape[2] else x.mT @ x
    values = torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)
    return torch.from_numpy(ranks_from_energies(values.double().cpu().numpy()))


def gesvda_vectors(x: torch.Tensor) -> torch.Tensor:
    """The certified path's cuSOLVER call alone (float64, singular vectors too), for the cost split."""
    values = torch.linalg.svd(x.double(), full_matrices=False, driver="gesvda").S
    return torch.from_numpy(ranks_from_energies(values.square().cpu().numpy()))


def certified_gesvda(x: torch.Tensor) -> CertifiedRanks:
    fast = device_fast_spectrum(x.device)
    if fast is None:
        raise SystemExit(f"encmm-certified-gesvda needs CUDA with cuSOLVER, not {x.device}")
    return certified_svd_rank(x, THRESHOLDS, fast)


REFERENCE = "numpy-loop-f64"
ENCMM_REFERENCE = "encmm-reference"  # the float64 Gram + eigvalsh method that the certified ranks must equal
METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor | CertifiedRanks]] = {
    "encmm-svd_rank": lambda x: svd_rank(x, THRESHOLDS),  # what encmm runs on x's device (CUDA: certified gesvda)
    ENCMM_REFERENCE: lambda x: required_rank(cumulative_energy(energy_spectrum(x)), THRESHOLDS),  # f64 Gram+eigvalsh
    "encmm-certified-gesvda": certified_gesvda,  # CUDA only: = encmm-svd_rank there, with its re-check counts
    "encmm-certified-f32gram": lambda x: certified_svd_rank(x, THRESHOLDS, gram_spectrum),  # float32 + re-check
    "svd-gesvda-f64": gesvda_vectors,  # CUDA only
    "svdvals-f32": torch_svdvals(torch.float32),
    "svdvals-f64": torch_svdvals(torch.float64),
    "gram-f32-eigvalsh": float32_gram,
    "svdvals-gesvda-f32": torch_svdvals(torch.float32, "gesvda"),  # CUDA only
    "svdvals-gesvda-f64": torch_svdvals(torch.float64, "gesvda"),  # CUDA only
}


def on_host(result) -> np.ndarray:
    """A method's ranks as a numpy array, wherever they were computed."""
    ranks = result.ranks if isinstance(result, CertifiedRanks) else result
    return ranks.cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)


def recheck_counts(result) -> tuple[int, int] | None:
    """(images re-checked by the float64 reference, of which refused by the fast spectrum), for a certified method."""
    if not isinstance(result, CertifiedRanks):
        return None
    return int(result.rechecked.sum()), int(result.refused.sum())


def hard_set_mismatches(
    method: Callable[[torch.Tensor], torch.Tensor], hard: torch.Tensor, reference: np.ndarray
) -> tuple[int | str, tuple[int, int] | None]:
    """Images of the hard set whose ranks differ from the reference, or why the method gave none
    (cuSOLVER's gesvda refuses rank-deficient batches: "failed to converge"); and `recheck_counts`."""
    try:
        result = method(hard)
    except torch.linalg.LinAlgError as exc:
        return "error: " + str(exc).split("): ", 1)[-1].split(" because")[0], None  # "The algorithm failed to converge"
    return int((on_host(result) != reference).any(-1).sum()), recheck_counts(result)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of one run; CUDA work is synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def measure_layer(x: torch.Tensor, numpy_images: int, methods: dict, repeats: int) -> dict[str, tuple]:
    """Best time of each method over `repeats` rounds, interleaved so that load from other processes
    hits every method alike; the number of images whose ranks differ from the numpy reference, and from
    encmm's float64 reference method on every image (None unless "encmm-reference" runs); and `recheck_counts`
    of the last round."""
    host = x[:numpy_images].cpu().numpy()
    runs = {REFERENCE: lambda: numpy_loop(host)}
    runs.update({name: (lambda method=method: method(x)) for name, method in methods.items()})
    best = {name: float("inf") for name in runs}
    outputs = {}
    for _ in range(repeats):
        for name, run in runs.items():
            device = torch.device("cpu") if name == REFERENCE else x.device
            seconds, outputs[name] = timed(run, device)
            best[name] = min(best[name], seconds)
    reference = outputs[REFERENCE]
    differ = {name: int((on_host(outputs[name])[:numpy_images] != reference).any(-1).sum()) for name in runs}
    exact = on_host(outputs[ENCMM_REFERENCE]) if ENCMM_REFERENCE in outputs else None
    versus = {name: None if exact is None else int((on_host(outputs[name]) != exact).any(-1).sum()) for name in runs}
    versus[REFERENCE] = None
    return {name: (best[name], differ[name], versus[name], recheck_counts(outputs[name])) for name in runs}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--channels", type=int, default=192)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--numpy-images",
        type=int,
        default=None,
        help="run the numpy loop on the first K images of each layer only; its time is scaled up",
    )
    parser.add_argument(
        "--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)} (default: all the device runs)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="1,000 images x 24 layers of 196x384 (GPU target); numpy loop on 50 images a layer",
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "spectra.json")
    args = parser.parse_args()
    if args.full:
        args.images, args.tokens, args.channels, args.layers = 1000, 196, 384, 24
        args.repeats = min(args.repeats, 1)
        args.numpy_images = args.numpy_images or 50
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    chosen = (
        args.methods.split(",") if args.methods else [m for m in METHODS if "gesvda" not in m or device.type == "cuda"]
    )
    unknown = set(chosen) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    methods = {name: METHODS[name] for name in chosen}

    numpy_images = min(args.numpy_images or args.images, args.images)
    totals = {name: 0.0 for name in [REFERENCE, *methods]}
    mismatched = {name: 0 for name in totals}
    rechecked: dict[str, list[int] | None] = {name: None for name in totals}
    versus_encmm: dict[str, int | None] = {name: None for name in totals}
    for layer in range(args.layers):
        x = make_layer(args.images, args.tokens, args.channels, seed=layer, device=device)
        if layer == 0:  # warm-up: first calls pay for library start-up and CUDA kernel loading
            numpy_loop(x[:8].cpu().numpy())
            for method in methods.values():
                method(x[:8])
        for name, (seconds, differ, versus, counts) in measure_layer(x, numpy_images, methods, args.repeats).items():
            scale = args.images / numpy_images if name == REFERENCE else 1.0
            totals[name] += seconds * scale
            mismatched[name] += differ
            if versus is not None:
                versus_encmm[name] = (versus_encmm[name] or 0) + versus
            if counts is not None:
                rechecked[name] = [a + b for a, b in zip(rechecked[name] or [0, 0], counts)]
        print(f"layer {layer + 1}/{args.layers} done", file=sys.stderr)

    hard = make_hard_set(min(args.images, 400), args.tokens, args.channels).to(device)
    hard_reference = numpy_loop(hard.cpu().numpy())
    hard_results = {name: hard_set_mismatches(method, hard, hard_reference) for name, method in methods.items()}
    hard_results[REFERENCE] = (0, None)

    baseline = totals[REFERENCE]
    rows = [
        {
            "method": name,
            "seconds": totals[name],
            "speedup": baseline / totals[name],
            "mismatched_images": mismatched[name],
            "hard_mismatched_images": hard_results[name][0],
            "images_differing_from_encmm_reference": versus_encmm[name],
            "rechecked_images": None if rechecked[name] is None else rechecked[name][0],
            "refused_images": None if rechecked[name] is None else rechecked[name][1],
            "hard_rechecked_images": None if hard_results[name][1] is None else hard_results[name][1][0],
            "hard_refused_images": None if hard_results[name][1] is None else hard_results[name][1][1],
        }
        for name in totals
    ]
    checked = numpy_images * args.layers
    print(
        f"\n{args.layers} x {args.images} matrices of {args.tokens}x{args.channels} float32 on {device}, "
        f"{torch.get_num_threads()} torch threads; ranks checked on {checked} matrices"
    )
    if numpy_images < args.images:
        print(f"numpy loop time scaled up from {numpy_images} images per layer")
    print(f"hard set: {hard.shape[0]} knife-edge matrices (flat spectra with E_k = p exactly, log spectra)")
    timed = args.images * args.layers
    print(f"{'method':24s} {'seconds':>9s} {'vs numpy':>9s}  {'images with ranks != f64 reference':>36s}  all images")
    for row in rows:
        differ = f"{row['mismatched_images']} of {checked}, hard set {row['hard_mismatched_images']}"
        notes = []
        if row["images_differing_from_encmm_reference"] is not None:
            notes.append(f"!= {ENCMM_REFERENCE}: {row['images_differing_from_encmm_reference']} of {timed}")
        if row["rechecked_images"] is not None:
            notes.append(f"rechecked {row['rechecked_images']} ({row['refused_images']} refused)")
        if row["hard_rechecked_images"] is not None:
            notes.append(f"hard set rechecked {row['hard_rechecked_images']} ({row['hard_refused_images']} refused)")
        recheck = "; ".join(notes)
        print(f"{row['method']:24s} {row['seconds']:9.3f} {row['speedup']:8.1f}x  {differ:>36s}  {recheck}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "images": args.images,
                "tokens": args.tokens,
                "channels": args.channels,
                "layers": args.layers,
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "numpy_images": numpy_images,
                "repeats": args.repeats,
                "thresholds": list(THRESHOLDS),
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
