"""Benchmark the memory and wall time of ``encmm diagnose`` as the image count grows (issue 14), and the streamed,
sharded path against the in-memory one it replaced, in the same run.

    python3 bench/bench_diagnose_scale.py                                # K = 10, 40, 160; baseline at K = 40
    python3 bench/bench_diagnose_scale.py --sizes 10 --baseline-sizes 10 # a quick check (~2 minutes on 2 cores)
    python3 bench/bench_diagnose_scale.py --sizes 10,160,200 --baseline-sizes '' --features-images 500
                                          # 1,600 images, the full digits set, a ViT-Large-shaped feature folder

(a) Streamed: for each K in ``--sizes``, ``encmm diagnose --model deit_tiny_patch16_224 --images-per-class K``
    (random init, the embedded digits: 10 K images, all 12 layers of 196 tokens x 192 channels, default
    options, ``--device`` and ``--workers`` as given here) as a fresh subprocess.
(b) In-memory baseline: for each K in ``--baseline-sizes``, a subprocess of this script doing what
    ``encmm diagnose`` did before issue 14: the same plan (``prepare_diagnose``), every image's features
    extracted in the driver process (``ModelFeatures.read`` batch by batch, concatenated to one ``[I, N, C]``
    tensor per layer and kept), each layer put in the object store once and diagnosed by one Ray task
    (``spectra.diagnose_layer``; the last layer's task also computes ``ray_tasks.per_image_arrays``; tasks take
    1 CPU, or a quarter GPU with ``--device cuda``, as the old fan-out did), then the same outputs
    (``write_outputs``: diagnostics.json, CSV tables, figures, MLflow).

Each child gets its own local Ray cluster (``RAY_TMPDIR`` of its own, no ``RAY_ADDRESS``) and a temp SQLite store.
Every ``--interval`` seconds the PSS of the child and all its descendants (Ray's GCS, raylet, dashboard, the worker
actors and tasks) is summed (``psutil.Process.memory_full_info().pss``; RSS would count the shared object store
once per process that maps it). Reported per run: peak PSS, wall time, wall per image; then
PSS(largest K) / PSS(smallest K) of (a) (target <= 1.25), and where a K is in both lists the wall ratio
in-memory / streamed (the streamed path "as fast" at >= 0.9) and the largest difference between the two
diagnostics.json (ranks must be identical). Runs alternate (a, b) per K.
(c) With ``--features-images M``: M synthetic float32 ``[L, N, C]`` arrays (``--features-shape``, default
    ViT-Large's 24 x 196 x 1024: ~19 MB each, ~9 GiB for 500) written to a folder, then ``encmm diagnose
    --features <folder>`` measured the same way (target: peak PSS <= 4 GiB).
Writes JSON to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MODEL = "deit_tiny_patch16_224"


# ------------------------------------------------------------------ (b): the in-memory child
def run_in_memory_child(per_class: int, out: str, uri: str, device: str) -> None:
    """The pre-issue-14 ``encmm diagnose``: extract everything here, then one Ray task per layer."""
    import ray
    import torch

    from encmm.analysis import spectra
    from encmm.analysis.ray_tasks import per_image_arrays
    from encmm.orchestrator import tracking
    from encmm.orchestrator.diagnose_command import (
        DiagnoseOptions,
        prepare_diagnose,
        select_sep_statistic,
        start_diagnose_run,
        write_outputs,
    )
    from encmm.orchestrator.ray_cluster import init_ray

    plan = prepare_diagnose(
        DiagnoseOptions(model=MODEL, images_per_class=per_class, device=device, out=out, tracking_uri=uri)
    )
    o = plan.options
    init_ray(None)
    run_id = start_diagnose_run(plan)
    reader = plan.reader.to(plan.device)
    batches = [range(a, min(a + o.batch_size, plan.num_images)) for a in range(0, plan.num_images, o.batch_size)]
    parts = [[f.cpu() for f in reader.read(positions)] for positions in batches]
    layers = [torch.cat(layer) for layer in zip(*parts)]  # [I, N, C] per layer, held to the end as before
    del parts
    use_gpu = plan.device.type == "cuda" and ray.cluster_resources().get("GPU", 0) >= 1

    options = {"center": o.center, "permutations": o.permutations, "num_pairs": o.pairs, "seed": o.seed}

    @ray.remote(num_gpus=0.25 if use_gpu else 0)
    def diagnose_task(features, thresholds, options: dict, with_arrays: bool):
        x = torch.from_numpy(features).to("cuda" if use_gpu else "cpu")  # read-only view: nothing writes to it
        result = spectra.diagnose_layer(x, thresholds, **options)
        args = (thresholds, options["center"], options["num_pairs"], options["seed"])
        return result, per_image_arrays(x.cpu(), *args) if with_arrays else None

    refs = [ray.put(layer.numpy()) for layer in layers]
    last = len(refs) - 1
    outcome = ray.get([diagnose_task.remote(r, plan.thresholds, options, i == last) for i, r in enumerate(refs)])
    results = [select_sep_statistic(result, o.sep_statistic) for result, _ in outcome]
    write_outputs(plan, run_id, results, outcome[-1][1])
    tracking.end_run(plan.uri, run_id, "FINISHED")


# ------------------------------------------------------------------ the parent
def process_label(cmdline: list[str]) -> str:
    """A short name: Ray's (``ray::ShardWorker.add``), the ``-m`` module, or the program's file name."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    if "-m" in cmdline[:-1]:
        return cmdline[cmdline.index("-m") + 1]
    script = next((word for word in cmdline[1:] if not word.startswith("-")), cmdline[0])
    return Path(script).name


class TreeSampler:
    """Peak of the PSS summed over a process and all its descendants, sampled on a thread."""

    def __init__(self, pid: int, interval: float):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak, self.samples, self.seen = 0, 0, {}
        self.at_peak: list[tuple[int, str]] = []  # (PSS, process) of the sample with the peak, largest first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            snapshot = []
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for proc in tree:
                try:
                    snapshot.append((proc.memory_full_info().pss, process_label(proc.cmdline())))
                    self.seen.setdefault(proc.pid, proc.create_time())
                except psutil.Error:
                    pass  # exited between the listing and the read
            total = sum(pss for pss, _ in snapshot)
            if total > self.peak:
                self.peak, self.at_peak = total, sorted(snapshot, reverse=True)
            self.samples += 1
            self._stop.wait(self.interval)

    def survivors(self) -> list[psutil.Process]:
        """Processes of the tree still alive after the child exited (same pid and start time)."""
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                pass
        return alive


def child_env(ray_tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["RAY_TMPDIR"] = str(ray_tmp)  # a cluster of its own, whatever else runs on the machine
    return env


def measure(kind: str, command: list[str], folder: Path, images: int, interval: float) -> dict:
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    start = time.time()
    proc = subprocess.Popen(
        command, cwd=folder, env=child_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    with TreeSampler(proc.pid, interval) as sampler:
        stdout, stderr = proc.communicate()
    wall = time.time() - start
    time.sleep(2)  # Ray's own processes exit just after the driver
    left = sampler.survivors()
    for survivor in left:  # started by this run's child: ended by pid, nothing else
        survivor.terminate()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    (folder / f"{kind}.log").write_text(stdout + "\n---- stderr\n" + stderr)
    if proc.returncode:
        raise SystemExit(f"{kind} run failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "kind": kind,
        "images": images,
        "wall_s": wall,
        "wall_per_image_s": wall / images,
        "peak_pss_gib": sampler.peak / 2**30,
        "at_peak_gib": [[round(pss / 2**30, 3), name] for pss, name in sampler.at_peak[:8]],
        "samples": sampler.samples,
        "processes": len(sampler.seen),
        "survivors_terminated": len(left),
    }


def digits_images(per_class: int) -> int:
    """How many images ``--images-per-class K`` takes from the embedded digits: K per class, or all a class
    has (178-183; K >= 183 is the full set of 1,797)."""
    import numpy as np
    from sklearn.datasets import load_digits

    return int(np.minimum(np.bincount(load_digits().target), per_class).sum())


def run_streamed(args, per_class: int, folder: Path) -> dict:
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "encmm.orchestrator.cli", "diagnose", "--model", MODEL]
    command += ["--images-per-class", str(per_class), "--device", args.device]
    command += ["--out", str(folder / "out"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    if args.workers:
        command += ["--workers", str(args.workers)]
    return measure("streamed", command, folder, digits_images(per_class), args.interval)


def run_in_memory(args, per_class: int, folder: Path) -> dict:
    folder.mkdir(parents=True)
    command = [sys.executable, __file__, "--in-memory-child", str(per_class), str(folder / "out")]
    command += [f"sqlite:///{folder / 'mlflow.db'}", args.device]
    return measure("in-memory", command, folder, digits_images(per_class), args.interval)


def write_feature_folder(folder: Path, images: int, shape: tuple[int, int, int], seed: int = 0) -> float:
    """One float32 ``[L, N, C]`` .npy per image: per layer a shared low-rank channel mixing (rank C/16, decaying
    scales) plus white noise, so ranks lie inside (1, N). Returns the folder's size in GiB."""
    import numpy as np

    layers, tokens, channels = shape
    rng = np.random.default_rng(seed)
    rank = max(1, channels // 16)
    mixing = rng.standard_normal((layers, rank, channels), dtype=np.float32)
    mixing *= (1.0 / np.arange(1, rank + 1, dtype=np.float32))[None, :, None]
    folder.mkdir(parents=True)
    for image in range(images):
        codes = rng.standard_normal((layers, tokens, rank), dtype=np.float32)
        x = codes @ mixing + 0.05 * rng.standard_normal((layers, tokens, channels), dtype=np.float32)
        np.save(folder / f"{image:06d}.npy", x)
    return sum(path.stat().st_size for path in folder.iterdir()) / 2**30


def run_feature_folder(args, folder: Path) -> dict:
    """``encmm diagnose --features <folder>`` over ``args.features_images`` synthetic per-image arrays."""
    shape = tuple(int(v) for v in args.features_shape.split(","))
    started = time.time()
    size = write_feature_folder(folder / "features", args.features_images, shape)
    print(f"wrote {args.features_images} arrays {shape} float32: {size:.2f} GiB in {time.time() - started:.0f} s")
    command = [sys.executable, "-m", "encmm.orchestrator.cli", "diagnose", "--features", str(folder / "features")]
    command += ["--out", str(folder / "out"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    if args.workers:
        command += ["--workers", str(args.workers)]
    result = measure("features", command, folder, args.features_images, args.interval)
    return {**result, "shape": shape, "folder_gib": size}


def compare_reports(streamed: Path, in_memory: Path) -> dict:
    """Largest |difference| over the numbers of two diagnostics.json (and where), the same without the angles
    (arccos amplifies round-off near 0 degrees: ~1e-16 in a cosine is ~1e-6 degrees), and whether the ranks
    are identical."""
    a, b = (json.loads((folder / "out" / "diagnostics.json").read_text()) for folder in (streamed, in_memory))

    def walk(x, y, path: str) -> list[tuple[float, str]]:
        if isinstance(x, dict):
            return [d for k in x for d in walk(x[k], y[k], f"{path}/{k}")]
        if isinstance(x, list):
            return [d for i, (p, q) in enumerate(zip(x, y)) for d in walk(p, q, f"{path}[{i}]")]
        return [(abs(x - y), path)] if isinstance(x, (int, float)) and not isinstance(x, bool) else []

    diffs = walk(a, b, "") or [(0.0, "")]
    worst, where = max(diffs)
    no_angles = max([d for d, path in diffs if "angle" not in path] or [0.0])
    ranks = all(
        la[key] == lb[key] and la["sep"]["bandwidth"] == lb["sep"]["bandwidth"]
        for la, lb in zip(a["layers"], b["layers"])
        for key in ("svd_rank", "pca_rank")
    )
    return {
        "max_abs_difference": worst,
        "at": where,
        "max_abs_difference_no_angles": no_angles,
        "ranks_identical": ranks,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-memory-child", nargs=4, metavar=("K", "OUT", "URI", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="10,40,160", help="images per class K of the streamed runs (10 K images)")
    parser.add_argument("--baseline-sizes", default="40", help="K of the in-memory baseline runs ('' for none)")
    parser.add_argument("--device", default="cpu", help="--device of both paths")
    parser.add_argument("--workers", type=int, default=None, help="--workers of the streamed runs (default: theirs)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between PSS samples")
    parser.add_argument(
        "--features-images", type=int, default=0, help="also diagnose a synthetic --features folder of this many images"
    )
    parser.add_argument("--features-shape", default="24,196,1024", help="L,N,C of each image (default: ViT-Large)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' folders here")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "diagnose_scale.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.in_memory_child:
        per_class, out, uri, device = args.in_memory_child
        run_in_memory_child(int(per_class), out, uri, device)
        return
    sizes = [int(k) for k in args.sizes.split(",") if k.strip()]
    baseline = [int(k) for k in args.baseline_sizes.split(",") if k.strip()]
    folder = args.keep or Path(tempfile.mkdtemp(prefix="encmm-bench-diagnose-"))
    runs, comparisons = [], []
    for k in sorted(set(sizes) | set(baseline)):
        for kind, run in (("streamed", run_streamed), ("in-memory", run_in_memory)):
            if k in (sizes if kind == "streamed" else baseline):
                runs.append({"K": k, **run(args, k, folder / f"{kind}-{k}")})
                r = runs[-1]
                print(
                    f"K={k:>4} ({r['images']:>5} images) {kind:>9}: peak PSS {r['peak_pss_gib']:6.2f} GiB, "
                    f"wall {r['wall_s']:7.1f} s ({1000 * r['wall_per_image_s']:.0f} ms/image)",
                    flush=True,
                )
        if k in sizes and k in baseline:
            wall = {r["kind"]: r["wall_s"] for r in runs if r["K"] == k}
            comparisons.append(
                {
                    "K": k,
                    "speed_ratio": wall["in-memory"] / wall["streamed"],
                    **compare_reports(folder / f"streamed-{k}", folder / f"in-memory-{k}"),
                }
            )
    streamed = sorted((r for r in runs if r["kind"] == "streamed"), key=lambda r: r["K"])
    summary: dict = {"comparisons": comparisons}
    if len(streamed) >= 2:
        low, high = streamed[0], streamed[-1]
        summary["pss_ratio"] = high["peak_pss_gib"] / low["peak_pss_gib"]
        print(
            f"\nstreamed peak PSS({high['images']}) / PSS({low['images']}) = {summary['pss_ratio']:.3f} "
            f"(target <= 1.25)"
        )
    for c in comparisons:
        print(
            f"K={c['K']}: in-memory wall / streamed wall = {c['speed_ratio']:.2f} (streamed as fast at >= 0.9); "
            f"diagnostics.json max |diff| {c['max_abs_difference']:.2e} at {c['at']} "
            f"({c['max_abs_difference_no_angles']:.2e} without angles), ranks identical: {c['ranks_identical']}"
        )
    if args.features_images:
        features = run_feature_folder(args, folder / "feature-folder")
        summary["feature_folder"] = features
        print(
            f"--features folder, {features['images']} images of {features['shape']} "
            f"({features['folder_gib']:.1f} GiB): "
            f"peak PSS {features['peak_pss_gib']:.2f} GiB (target <= 4), wall {features['wall_s']:.0f} s; at the "
            f"peak: " + ", ".join(f"{name} {gib:.2f}" for gib, name in features["at_peak_gib"][:5])
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": MODEL, "device": args.device, "runs": runs, **summary}, indent=1))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nwrote {args.json}" + (f"; runs kept in {folder}" if args.keep else ""))


if __name__ == "__main__":
    main()
