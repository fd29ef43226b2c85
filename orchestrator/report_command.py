"""``encmm report``: the paper-style table and plots of one sweep, read back from MLflow only.

One row per (remedy, KD setting, width), aggregated over seeds: val top-1 (best and last epoch,
mean +- sample std, seed count), parameters at inference, inference GFLOPs per image (the student rebuilt
from its best checkpoint artifact, counted by ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add
is 2 FLOPs), CPU eval throughput, and the mismatch metrics each trial logged (``diag/*``).
Trials that failed or still run are named and left out of the table.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from orchestrator import tracking
from orchestrator.diagnose_command import check_out_folder
from orchestrator.sweep_command import summarize
from trainables.config import ConfigError, DataConfig, TeacherConfig

GROUP_KEYS = ("student.remedy", "kd.alpha", "kd.beta", "student.width")
MISMATCH_KEYS = ("diag/svd_rank_p99/0.99", "diag/pca_rank_p99/0.99", "diag/sep_ratio_90", "diag/feat_mse")
SEP_IMAGES = 64  # the fixed val subset (first images) the SEP curves are recomputed on
THROUGHPUT_BATCH, THROUGHPUT_BATCHES = 32, 3


@dataclass
class SweepRecord:
    uri: str
    name: str
    parent: object  # mlflow Run
    children: list
    rows: list[dict]  # one per child run (sweep_command.summarize)
    checkpoints: dict = field(default_factory=dict)  # run id -> local best.pt


@dataclass
class ReportResult:
    text: str
    rows: list[dict]
    out: Path
    files: list[Path]
    not_reported: list[dict]


# --------------------------------------------------------------------------------------------- reading
def load_sweep(uri: str, name_or_id: str) -> SweepRecord:
    tracking.check_tracking(uri)
    parent = tracking.find_sweep_run(uri, name_or_id)
    children = tracking.list_child_runs(uri, parent.info.run_id)
    plan = {"uri": uri, "experiment": tracking.experiment_name(uri, parent.info.experiment_id),
            "parent_run_id": parent.info.run_id, "search": {"grid": {}}}
    rows = summarize(plan)[0]
    by_id = {r["run_id"]: r for r in rows}
    for child in children:  # children found by mlflow.parentRunId only: summarise them too
        if child.info.run_id not in by_id:
            rows.append({"trial": child.data.tags.get("encmm.trial_id", child.info.run_name),
                         "status": child.info.status, "run_id": child.info.run_id})
    params = {c.info.run_id: c.data.params for c in children}
    for row in rows:
        row["seed"] = row.get("seed") or params.get(row["run_id"], {}).get("seed")
    name = parent.data.tags.get("encmm.sweep_name", parent.info.run_name)
    return SweepRecord(uri, name, parent, children, rows)


def by_run(runs: list, run_id: str):
    return next(r for r in runs if r.info.run_id == run_id)


def parse_param(text: str):
    return None if text == "None" else yaml.safe_load(text)


def section_from_params(params: dict, section: str) -> dict:
    prefix = section + "."
    return {k.removeprefix(prefix): parse_param(v) for k, v in params.items() if k.startswith(prefix)}


def checkpoint_of(record: SweepRecord, run_id: str, folder: Path) -> Path:
    if run_id not in record.checkpoints:
        record.checkpoints[run_id] = tracking.fetch_best_checkpoint(record.uri, run_id, folder / run_id,
                                                                    f"run {run_id}")
    return record.checkpoints[run_id]


# ------------------------------------------------------------------------------------------- measuring
def load_student(path: Path) -> torch.nn.Module:
    from trainables.teacher import load_checkpoint_file, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint_file(path))[0].eval()


@torch.no_grad()
def measure_cost(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Inference GFLOPs per image (one ``[1, 3, H, W]`` forward) and CPU eval throughput (img/s)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(images[:1])
    batch = images[:THROUGHPUT_BATCH].repeat(math.ceil(THROUGHPUT_BATCH / len(images)), 1, 1, 1)[:THROUGHPUT_BATCH]
    model(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(THROUGHPUT_BATCHES):
        model(batch)
    seconds = time.perf_counter() - start
    return {"gflops": counter.get_total_flops() / 1e9, "img_per_s": THROUGHPUT_BATCHES * len(batch) / seconds}


def val_images(record: SweepRecord, params: dict) -> tuple[torch.Tensor, object]:
    """The first ``SEP_IMAGES`` val images of the trials' data config (from the child's flat params)."""
    from orchestrator.mismatch import val_subset

    try:
        data = DataConfig.model_validate(section_from_params(params, "data"))
    except Exception as exc:  # noqa: BLE001 - a sweep logged by another encmm version
        raise ConfigError(f"sweep {record.name}: cannot rebuild data config from the run params: {exc}") from None
    return val_subset(SimpleNamespace(data=data), SEP_IMAGES)


def teacher_model(record: SweepRecord, params: dict, data, folder: Path):
    from trainables.teacher import build_teacher

    cfg = TeacherConfig.model_validate(section_from_params(params, "teacher"))
    if cfg.source == "none":
        return None
    path = checkpoint_of(record, cfg.run_id, folder) if cfg.source == "run" else None
    return build_teacher(cfg, student_mean=data.mean, student_std=data.std, checkpoint_path=path,
                         img_size=parse_param(params.get("data.img_size", "None")))


def mean_sep_curve(model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    """Mean SEP curve ``[D]`` of the distilled (last-layer) map over every token of ``images``."""
    from analysis.spectra import sep_curves
    from orchestrator.mismatch import distilled_features

    feats = distilled_features(model, images)
    return sep_curves(feats.reshape(-1, feats.shape[-1]))[0].tolist()


# ----------------------------------------------------------------------------------------- aggregating
def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k)) for k in GROUP_KEYS), []).append(row)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], _number(kv[0][3]))))


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def table_row(key: tuple, trials: list[dict], cost: dict) -> dict:
    best_mean, best_std = mean_std([t.get("best/val/acc1") for t in trials])
    last_mean, last_std = mean_std([t.get("val/acc1") for t in trials])
    row = dict(zip(("remedy", "kd.alpha", "kd.beta", "width"), key))
    row.update({"seeds": len({str(t.get("seed")) for t in trials}), "trials": len(trials),
                "top1_best_mean": best_mean, "top1_best_std": best_std,
                "top1_last_mean": last_mean, "top1_last_std": last_std,
                "params_inference": trials[0].get("params_inference"),
                "gflops": cost.get("gflops"), "img_per_s": cost.get("img_per_s")})
    for metric in MISMATCH_KEYS:
        row[metric.removeprefix("diag/")] = mean_std([t.get(metric) for t in trials])[0]
    return row


def fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_markdown(rows: list[dict], title: str) -> str:
    head = ["remedy", "kd.alpha", "kd.beta", "width", "top-1 best", "top-1 last", "seeds", "params (inf.)",
            "GFLOPs/img", "img/s (CPU)", "SVD rank p99", "PCA rank p99", "SEP d/D 90%", "feat MSE"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["remedy"], r["kd.alpha"], r["kd.beta"], r["width"],
                 f"{fmt(r['top1_best_mean'])} ± {fmt(r['top1_best_std'])}",
                 f"{fmt(r['top1_last_mean'])} ± {fmt(r['top1_last_std'])}", str(r["seeds"]),
                 fmt(r["params_inference"]), fmt(r["gflops"], 4), fmt(r["img_per_s"], 0),
                 fmt(r["svd_rank_p99/0.99"], 1), fmt(r["pca_rank_p99/0.99"], 1), fmt(r["sep_ratio_90"], 3),
                 fmt(r["feat_mse"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(GROUP_KEYS))
        writer.writeheader()
        writer.writerows(rows)
    return path


# -------------------------------------------------------------------------------------------- plotting
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _figure().close(fig)
    return path


def plot_top1(rows: list[dict], x_key: str, xlabel: str, path: Path, log_x: bool = False) -> Path:
    """Best val top-1 (mean +- std over seeds) against ``x_key``, one line per remedy."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for remedy in sorted({r["remedy"] for r in rows}):
        points = sorted((_number(r[x_key]), r["top1_best_mean"], r["top1_best_std"]) for r in rows
                        if r["remedy"] == remedy and r["top1_best_mean"] is not None and r[x_key] is not None)
        if points:
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=remedy)
    ax.set(xlabel=xlabel, ylabel="best val top-1 (%)")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(title="remedy")
    return _save(fig, path)


def plot_mismatch(curves: dict[str, list[float]], ranks: dict[str, tuple], path: Path) -> Path:
    """Left: last-layer SEP mean curves against j/D; right: SVD-vs-PCA rank p99 (0.99) bars."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        d = len(curve)
        left.plot([(j + 1) / d for j in range(d)], curve, label=f"{label} (D={d})")
    left.axhline(90, color="grey", lw=0.8, ls="--")
    left.set(xlabel="channel frequency j / D", ylabel="cumulative spectral energy (%)",
             title="last-layer SEP (mean over tokens)")
    left.legend(fontsize=8)
    labels = list(ranks)
    xs = range(len(labels))
    right.bar([x - 0.2 for x in xs], [ranks[k][0] or 0 for k in labels], 0.4, label="per-image SVD rank p99")
    right.bar([x + 0.2 for x in xs], [ranks[k][1] or 0 for k in labels], 0.4, label="shared PCA rank p99")
    right.set_xticks(list(xs), labels, rotation=20)
    right.set(ylabel="rank at 99% energy", title="SVD vs PCA rank (mismatch = PCA >> SVD)")
    right.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(histories: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, history in histories.items():
        if history:
            steps, values = zip(*history)
            ax.plot(steps, values, marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="best trial per remedy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ main
def describe_unreported(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Trials left out of the table (not FINISHED, or FINISHED without final metrics), one line each."""
    left_out = [r for r in rows if r["status"] != "FINISHED" or r.get("best/val/acc1") is None]
    lines = []
    for r in left_out:
        state = {"RUNNING": "still running", "FINISHED": "finished but logged no final metrics"}.get(
            r["status"], r["status"].lower())
        lines.append(f"trial {r['trial']} ({r['run_id'][:8]}) is {state}: not in the table")
    return left_out, lines


def best_per_remedy(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for row in rows:
        remedy = str(row.get("student.remedy"))
        if remedy not in best or row["best/val/acc1"] > best[remedy]["best/val/acc1"]:
            best[remedy] = row
    return best


def write_plots(record: SweepRecord, table: list[dict], done: list[dict], images: torch.Tensor, teacher,
                out: Path, work: Path) -> list[Path]:
    """The four figures; SEP curves recomputed for the teacher and each remedy's best trial."""
    winners = best_per_remedy(done)
    curves, ranks = {}, {}
    if teacher is not None:
        pm = record.parent.data.metrics
        curves["teacher"] = mean_sep_curve(teacher, images)
        ranks["teacher"] = (pm.get("teacher/svd_rank_p99/0.99"), pm.get("teacher/pca_rank_p99/0.99"))
    for remedy, row in winners.items():
        curves[remedy] = mean_sep_curve(load_student(checkpoint_of(record, row["run_id"], work)), images)
        ranks[remedy] = (row.get("diag/svd_rank_p99/0.99"), row.get("diag/pca_rank_p99/0.99"))
    histories = {f"{remedy} ({row['trial']})": tracking.metric_history(record.uri, row["run_id"], "val/acc1")
                 for remedy, row in winners.items()}
    (out / "sep_curves.json").write_text(json.dumps(curves))
    return [plot_top1(table, "params_inference", "parameters at inference", out / "top1_vs_params.png", True),
            plot_top1(table, "width", "student width", out / "top1_vs_width.png"),
            plot_mismatch(curves, ranks, out / "mismatch_sep_rank.png"),
            plot_curves(histories, out / "training_curves.png"), out / "sep_curves.json"]


def format_report(record: SweepRecord, table: list[dict], notes: list[str], any_done: bool) -> str:
    counts = {s: sum(r["status"] == s for r in record.rows) for s in ("FINISHED", "RUNNING", "FAILED", "KILLED")}
    title = (f"sweep {record.name} (parent run {record.parent.info.run_id}, {record.parent.info.status}): "
             f"{len(record.rows)} trials, " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n))
    text = format_markdown(table, title)
    pm = record.parent.data.metrics
    if pm.get("teacher/svd_rank_p99/0.99") is not None:
        text += (f"\nteacher: SVD rank p99 {fmt(pm.get('teacher/svd_rank_p99/0.99'), 1)}, PCA rank p99 "
                 f"{fmt(pm.get('teacher/pca_rank_p99/0.99'), 1)}, "
                 f"SEP d/D 90% {fmt(pm.get('teacher/sep_ratio_90'), 3)}\n")
    text += "".join(f"\n- {line}" for line in notes) + ("\n" if notes else "")
    return text if any_done else text + "\nno finished trial to report yet\n"


def build_report(record: SweepRecord, out: Path, work: Path) -> ReportResult:
    left_out, notes = describe_unreported(record.rows)
    done = [r for r in record.rows if r not in left_out]
    table, plots = [], []
    out.mkdir(parents=True, exist_ok=True)
    if done:
        params = by_run(record.children, done[0]["run_id"]).data.params
        images, data = val_images(record, params)
        for key, trials in group_rows(done).items():
            best = max(trials, key=lambda t: t["best/val/acc1"])
            cost = measure_cost(load_student(checkpoint_of(record, best["run_id"], work)), images)
            table.append(table_row(key, trials, cost))
        teacher = teacher_model(record, params, data, work)
        plots = write_plots(record, table, done, images, teacher, out, work)
    text = format_report(record, table, notes, bool(done))
    (out / "report.md").write_text(text)
    files = [write_csv(table, out / "report.csv"), out / "report.md", *plots]
    return ReportResult(text, table, out, files, left_out)


def run_report(name_or_id: str, out: str | None, tracking_uri: str | None) -> ReportResult:
    """Read the sweep from MLflow, write table + plots to ``out``, log them to the parent run under ``report/``."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    record = load_sweep(uri, name_or_id)
    # the default folder is one plain name under ./reports, whatever the sweep's tag says ('/', '..' -> '_')
    folder = Path(out) if out else Path("reports") / tracking.safe_name(record.name)
    check_out_folder(folder)
    with tempfile.TemporaryDirectory(prefix="encmm-report-") as work:
        result = build_report(record, folder.resolve(), Path(work))
    tracking.log_artifacts(uri, record.parent.info.run_id, result.out, "report")
    return result
