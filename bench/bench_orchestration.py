"""Benchmark the Ray orchestration overhead of one 1-worker CPU trial, same run.

    python3 bench/bench_orchestration.py                    # ~1 minute of digits KD training, 1 repeat
    python3 bench/bench_orchestration.py --repeats 2 --modes off,on
    python3 bench/bench_orchestration.py --modes on --baseline-tree /tmp/base   # + (b) of an older checkout

The same training (digits, a width-32 student distilled from a width-128 teacher checkpoint, 1 worker
with ``--cpus`` CPUs, ``--epochs`` epochs) runs

(a) in-process: a fresh Python process calling ``trainables.engine.fit`` (no Ray, no MLflow), with
    ``OMP_NUM_THREADS`` set to the threads Ray gives that worker (floor of its CPUs, at least 1);
(b) as ``encmm sweep`` of a generated 1-trial sweep file: a fresh process each time (so a fresh local Ray
    cluster), ``MLFLOW_TRACKING_URI`` on a temp SQLite store, once per ``--modes`` entry
    (``resources.local_mode``: ``off`` = a Train worker actor and controller, ``on`` = Train local mode).

Reported per run: the process wall time, for (b) the wall time of ``Tuner.fit`` (``time/tune_s`` on the
parent run: Tune's start-up, the trial's own process and imports, training, mismatch diagnostics,
teardown; what each further trial of a sweep costs, without the once-per-sweep driver start-up), and a
timeline from timestamps: trial start (the MLflow child run's start, the first thing a trial driver does)
-> first training step (the first epoch's metric timestamp minus that epoch's ``time/epoch_s`` and the val
pass) -> training end -> process exit. The ratio (b)/(a) is of the median process wall times. Runs
alternate (a, b-off, b-on, a, ...). Writes JSON to --json (default bench/results/orchestration.json).

``--baseline-tree DIR`` adds, per repeat and mode, (b) run from a checkout of an older commit (``git worktree
add DIR COMMIT``) on the same teacher and sweep file, so that before and after are measured in one run.
The fixed cost of a sweep process is its wall time minus (a)'s. A tree from before the ``encmm`` namespace
(top-level ``orchestrator`` package) runs as ``python -m orchestrator.cli`` with ``PYTHONPATH=DIR``; a newer
one needs its own install, so it is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "seed": 0,
    "data": {"name": "digits", "img_size": 16, "batch_size": 64, "augment": "shift"},
    "student": {"model": "vit_tiny_patch16_224", "width": 32, "depth": 4, "head_dim": 16, "patch_size": 4},
    "kd": {"alpha": 0.9, "beta": 1.0, "temperature": 1.0},
    "schedule": {"warmup_epochs": 1, "min_lr": 1.0e-5},
    "optim": {"lr": 2.0e-3, "lr_base_batch": 64},
    "resources": {"workers": 1},
}
TEACHER = {
    **BASE,
    "student": {**BASE["student"], "width": 128, "head_dim": 32},
    "kd": {},
    "schedule": {"epochs": 1, "warmup_epochs": 0},
}


# ------------------------------------------------------------------ (a): the in-process child


def run_in_process_child(config_file: str, out_file: str) -> None:
    """Child process of (a): ``fit`` on the config, timestamps of the first step and the end to JSON."""
    t_imported = time.time()
    from encmm.trainables.config import load_train_config
    from encmm.trainables.engine import fit

    cfg = load_train_config(config_file)
    logs = []
    t_fit = time.time()
    fit(
        cfg,
        log=lambda metrics, step: logs.append((time.time(), metrics)),
        checkpoint_dir=Path(out_file).parent / "checkpoints",
    )
    t_end = time.time()
    Path(out_file).write_text(
        json.dumps(
            {
                "t_imported": t_imported,
                "t_fit": t_fit,
                "t_end": t_end,
                "epochs": [{"t": t, "epoch_s": m["time/epoch_s"]} for t, m in logs],
            }
        )
    )


# ------------------------------------------------------------------ the parent


def make_teacher(folder: Path) -> Path:
    """A width-128 teacher checkpoint (1 epoch in-process: its quality does not matter for timing)."""
    from encmm.trainables.config import TrainConfig
    from encmm.trainables.engine import fit

    fit(TrainConfig.model_validate({**TEACHER, "name": "bench-teacher"}), checkpoint_dir=folder)
    return folder / "best.pt"


def train_tree(args, teacher: Path, local_mode: str = "auto") -> dict:
    tree = json.loads(json.dumps(BASE))
    tree["name"] = "bench-orchestration"
    tree["schedule"]["epochs"] = args.epochs
    tree["teacher"] = {"source": "checkpoint", "checkpoint": str(teacher)}
    tree["resources"].update({"cpus_per_worker": args.cpus, "local_mode": local_mode})
    return tree


def child_env(tree: Path = REPO, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_a(args, teacher: Path, folder: Path) -> dict:
    folder.mkdir(parents=True)
    config = folder / "train.yaml"
    config.write_text(yaml.safe_dump(train_tree(args, teacher)))
    out = folder / "timeline.json"
    threads = str(max(1, math.floor(args.cpus)))
    start = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--in-process-child", str(config), str(out)],
        cwd=folder,
        env=child_env(OMP_NUM_THREADS=threads),
        capture_output=True,
        text=True,
    )
    end = time.time()
    if proc.returncode:
        raise SystemExit(f"in-process run failed:\n{proc.stderr[-3000:]}")
    t = json.loads(out.read_text())
    first = t["epochs"][0]
    first_step = first["t"] - first["epoch_s"]
    training = sum(e["epoch_s"] for e in t["epochs"])
    return {
        "mode": "in-process",
        "wall_s": end - start,
        "threads": int(threads),
        "start_to_first_step_s": first_step - start,
        "setup_to_first_step_s": first_step - t["t_fit"],
        "train_s": training,
        "first_step_to_end_s": t["t_end"] - first_step,
        "after_training_s": end - t["epochs"][-1]["t"],
    }


def cli_module(tree: Path) -> str:
    """The module to run ``encmm`` from ``tree``: this checkout's, or an older tree's top-level one."""
    if tree == REPO:
        return "encmm.orchestrator.cli"
    if '"orchestrator.cli:main"' not in (tree / "pyproject.toml").read_text():
        raise SystemExit(f"--baseline-tree {tree}: not a checkout from before the encmm namespace (see --help)")
    return "orchestrator.cli"


def run_b(args, teacher: Path, folder: Path, local_mode: str, tree: Path = REPO) -> dict:
    from mlflow.tracking import MlflowClient

    folder.mkdir(parents=True)
    sweep = folder / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "bench-orchestration",
                "base": train_tree(args, teacher, local_mode),
                "search": {"grid": {"seed": [0]}},
                "mismatch_images": args.mismatch_images,
            }
        )
    )
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", cli_module(tree), "sweep", str(sweep)],
        cwd=folder,
        env=child_env(tree, MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
    )
    end = time.time()
    (folder / "sweep.log").write_text(proc.stdout + "\n---- stderr\n" + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"encmm sweep (local_mode={local_mode}) failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("encmm")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("encmm.kind") == "sweep")
    child = next(r for r in runs if r.data.tags.get("encmm.kind") == "trial")
    epoch_s = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "time/epoch_s")}
    stamps = {m.step: m.timestamp / 1000 for m in client.get_metric_history(child.info.run_id, "val/acc1")}
    first_step = stamps[0] - epoch_s[0]
    trial_start = child.info.start_time / 1000
    last = stamps[max(stamps)]
    return {
        "mode": f"sweep local_mode={local_mode}" + ("" if tree == REPO else " (baseline tree)"),
        "wall_s": end - start,
        "status": child.info.status,
        "start_to_parent_run_s": parent.info.start_time / 1000 - start,
        "start_to_trial_start_s": trial_start - start,
        "trial_start_to_first_step_s": first_step - trial_start,
        "start_to_first_step_s": first_step - start,
        "train_s": sum(epoch_s.values()),
        "first_step_to_last_epoch_s": last - first_step,
        "last_epoch_to_trial_end_s": child.info.end_time / 1000 - last,
        "trial_end_to_exit_s": end - child.info.end_time / 1000,
        "after_training_s": end - last,
        "tune_s": parent.data.metrics["time/tune_s"],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-process-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=28, help="digits epochs (~1 minute of training)")
    parser.add_argument("--cpus", type=float, default=1.0, help="resources.cpus_per_worker of the trial")
    parser.add_argument("--modes", default="off,on", help="resources.local_mode values for (b)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mismatch-images", type=int, default=200, help="sweep: the trial's diagnostics subset")
    parser.add_argument("--baseline-tree", type=Path, default=None, help="also run (b) from this older checkout")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs' folders here")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "orchestration.json")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.in_process_child:
        run_in_process_child(*args.in_process_child)
        return
    sys.path.insert(0, str(REPO))
    modes = [m for m in args.modes.split(",") if m]
    trees = [REPO] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
    for tree in trees:
        cli_module(tree)  # refuse a tree it cannot run before any work
    folder = Path(tempfile.mkdtemp(prefix="encmm-orch-", dir=args.keep))
    teacher = make_teacher(folder / "teacher")
    runs = []
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        runs.append(run_a(args, teacher, folder / f"a-{r}"))
        print(f"  in-process: {runs[-1]['wall_s']:.1f} s", flush=True)
        for mode in modes:
            for t, tree in enumerate(trees):
                runs.append(run_b(args, teacher, folder / f"b-{mode}-{r}-{t}", mode, tree))
                print(f"  {runs[-1]['mode']}: {runs[-1]['wall_s']:.1f} s", flush=True)
    base = statistics.median(x["wall_s"] for x in runs if x["mode"] == "in-process")
    summary = []
    arms = [f"sweep local_mode={m}" + suffix for m in modes for suffix in ("", " (baseline tree)")[: len(trees)]]
    for mode in ["in-process"] + arms:
        rows = [x for x in runs if x["mode"] == mode]
        med = {k: statistics.median(x[k] for x in rows) for k in rows[0] if isinstance(rows[0][k], (int, float))}
        med["mode"], med["ratio_vs_in_process"] = mode, med["wall_s"] / base
        med["fixed_cost_s"] = med["wall_s"] - base
        if "tune_s" in med:
            med["tune_ratio_vs_in_process"] = med["tune_s"] / base
        summary.append(med)
    print(
        "\n| run | process wall s | ratio vs in-process | fixed cost s (<= 16) | Tune wall s (the trial) "
        "| trial ratio vs in-process (<= 1.10) | start -> first step s | trial start -> first step s | training s "
        "| after training s |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for s in summary:
        trial = s.get("trial_start_to_first_step_s", s.get("setup_to_first_step_s"))
        tune = f"{s['tune_s']:.1f} | {s['tune_ratio_vs_in_process']:.3f}" if "tune_s" in s else "- | -"
        print(
            f"| {s['mode']} | {s['wall_s']:.1f} | {s['ratio_vs_in_process']:.3f} | {s['fixed_cost_s']:.1f} | {tune} "
            f"| {s['start_to_first_step_s']:.1f} | {trial:.1f} | {s['train_s']:.1f} | {s['after_training_s']:.1f} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "nproc": os.cpu_count(),
                "argv": sys.argv[1:],
                "epochs": args.epochs,
                "cpus_per_worker": args.cpus,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}" + (f"; runs kept in {folder}" if args.keep else ""))
    if not args.keep:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
