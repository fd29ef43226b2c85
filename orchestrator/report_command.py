"""``encmm report``: the evidence one sweep gives, read back from MLflow only.

It writes to ``--out`` (and logs to the parent run under ``report/``): one table row per arm (n finished
trials, best and last-epoch val top-1 as mean and 95% Student-t interval over seeds, parameters and
GFLOPs at inference, the logged ``diag/*`` mismatch metrics), the claims between arms (Welch difference
of best top-1, 95% interval, p, verdict), Spearman correlations of mismatch metrics against top-1, and
the figures. Trials that failed or still run are named and left out; throughput belongs to bench/.

This module is the command: reading the sweep through ``orchestrator.tracking`` and wiring the parts,
``report_tables`` (grouping, claims, text and CSV), ``report_models`` (checkpoints, FLOPs, SEP curves)
and ``report_figures`` (matplotlib).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from encmm.orchestrator import tracking
from encmm.orchestrator.outputs import check_out_folder
from encmm.orchestrator.report_figures import group_styles, write_figures
from encmm.orchestrator.report_models import (
    count_gflops,
    load_student,
    mean_sep_curve,
    parse_param,
    section_from_params,
    val_images,
)
from encmm.orchestrator.report_tables import (
    CLAIM_COLUMNS,
    GROUP_KEYS,
    Group,
    best_trial,
    default_claims,
    describe_unreported,
    evaluate_claims,
    fmt,
    format_claims,
    format_correlations,
    format_markdown,
    group_trials,
    mismatch_correlations,
    read_arm_order,
    read_claims,
    table_row,
    write_csv,
)
from encmm.orchestrator.sweep_results import summarize
from encmm.trainables.config import TeacherConfig

if TYPE_CHECKING:
    import torch


@dataclass
class SweepRecord:
    uri: str
    name: str
    parent: object  # mlflow Run
    children: list
    rows: list[dict]  # one per child run (sweep_results.summarize)
    checkpoints: dict = field(default_factory=dict)  # run id -> local best.pt


@dataclass
class ReportResult:
    text: str
    rows: list[dict]
    out: Path
    files: list[Path]
    not_reported: list[dict]
    claims: list[dict] = field(default_factory=list)
    correlations: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- reading
def load_sweep(uri: str, name_or_id: str) -> SweepRecord:
    tracking.check_tracking(uri)
    parent = tracking.find_sweep_run(uri, name_or_id)
    children = tracking.list_child_runs(uri, parent.info.run_id)
    rows = summarize(uri, tracking.experiment_name(uri, parent.info.experiment_id), parent.info.run_id)[0]
    by_id = {r["run_id"]: r for r in rows}
    for child in children:  # children found by mlflow.parentRunId only: summarise them too
        if child.info.run_id not in by_id:
            rows.append(
                {
                    "trial": child.data.tags.get("encmm.trial_id", child.info.run_name),
                    "status": child.info.status,
                    "run_id": child.info.run_id,
                }
            )
    params = {c.info.run_id: c.data.params for c in children}
    for row in rows:
        row["seed"] = row.get("seed") or params.get(row["run_id"], {}).get("seed")
    name = parent.data.tags.get("encmm.sweep_name", parent.info.run_name)
    return SweepRecord(uri, name, parent, children, rows)


def by_run(runs: list, run_id: str):
    return next(r for r in runs if r.info.run_id == run_id)


def checkpoint_of(record: SweepRecord, run_id: str, folder: Path) -> Path:
    if run_id not in record.checkpoints:
        record.checkpoints[run_id] = tracking.fetch_best_checkpoint(
            record.uri, run_id, folder / run_id, f"run {run_id}"
        )
    return record.checkpoints[run_id]


def teacher_model(record: SweepRecord, params: dict, data, folder: Path):
    from encmm.trainables.teacher import build_teacher

    cfg = TeacherConfig.model_validate(section_from_params(params, "teacher"))
    if cfg.source == "none":
        return None
    path = checkpoint_of(record, cfg.run_id, folder) if cfg.source == "run" else None
    return build_teacher(
        cfg,
        student_mean=data.mean,
        student_std=data.std,
        checkpoint_path=path,
        img_size=parse_param(params.get("data.img_size", "None")),
    )


# ------------------------------------------------------------------------------------------------ main
def write_plots(
    record: SweepRecord,
    groups: list[Group],
    table: list[dict],
    correlations: list[dict],
    images: torch.Tensor,
    teacher,
    out: Path,
    work: Path,
) -> list[Path]:
    """The figures (``report_figures``); SEP curves recomputed for the teacher and each arm's best trial."""
    styles = group_styles(groups)
    curves, ranks = {}, {}
    if teacher is not None:
        pm = record.parent.data.metrics
        curves["teacher"] = mean_sep_curve(teacher, images)
        ranks["teacher"] = (pm.get("teacher/svd_rank_p99/0.99"), pm.get("teacher/pca_rank_p99/0.99"))
    legend_styles = {}
    for g in groups:
        row = best_trial(g)
        curves[g.legend] = mean_sep_curve(load_student(checkpoint_of(record, row["run_id"], work)), images)
        ranks[g.legend] = (row.get("diag/svd_rank_p99/0.99"), row.get("diag/pca_rank_p99/0.99"))
        legend_styles[g.legend] = styles[g.label]
    histories = {
        f"{g.legend} ({best_trial(g)['trial']})": (
            tracking.metric_history(record.uri, best_trial(g)["run_id"], "val/acc1"),
            styles[g.label],
        )
        for g in groups
    }
    (out / "sep_curves.json").write_text(json.dumps(curves))
    return write_figures(groups, table, correlations, curves, ranks, legend_styles, histories, out) + [
        out / "sep_curves.json"
    ]


def format_report(
    record: SweepRecord,
    table: list[dict],
    claims: list[dict],
    claim_source: str,
    correlations: list[dict],
    notes: list[str],
    any_done: bool,
) -> str:
    counts = {s: sum(r["status"] == s for r in record.rows) for s in ("FINISHED", "RUNNING", "FAILED", "KILLED")}
    title = (
        f"sweep {record.name} (parent run {record.parent.info.run_id}, {record.parent.info.status}): "
        f"{len(record.rows)} trials, " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    )
    text = format_markdown(table, title)
    pm = record.parent.data.metrics
    if pm.get("teacher/svd_rank_p99/0.99") is not None:
        text += (
            f"\nteacher: SVD rank p99 {fmt(pm.get('teacher/svd_rank_p99/0.99'), 1)}, PCA rank p99 "
            f"{fmt(pm.get('teacher/pca_rank_p99/0.99'), 1)}, "
            f"SEP d/D 90% {fmt(pm.get('teacher/sep_ratio_90'), 3)}\n"
        )
    text += "\n" + format_claims(claims, claim_source) + "\n" + format_correlations(correlations)
    text += "".join(f"\n- {line}" for line in notes) + ("\n" if notes else "")
    return text if any_done else text + "\nno finished trial to report yet\n"


def build_report(record: SweepRecord, out: Path, work: Path) -> ReportResult:
    left_out, notes = describe_unreported(record.rows)
    done = [r for r in record.rows if r not in left_out]
    tags = record.parent.data.tags
    groups = group_trials(done, read_arm_order(tags))
    tagged = read_claims(tags, record.name)
    claims = evaluate_claims(default_claims(groups) if tagged is None else tagged, groups)
    correlations = mismatch_correlations(done)
    table, plots = [], []
    out.mkdir(parents=True, exist_ok=True)
    if done:
        params = by_run(record.children, done[0]["run_id"]).data.params
        images, data = val_images(record, params)
        for g in groups:
            student = load_student(checkpoint_of(record, best_trial(g)["run_id"], work))
            table.append(table_row(g, count_gflops(student, images)))
        teacher = teacher_model(record, params, data, work)
        plots = write_plots(record, groups, table, correlations, images, teacher, out, work)
    source = "default: lift / widelast > none, widelast > uniformwide" if tagged is None else "tag encmm.claims"
    text = format_report(record, table, claims, source, correlations, notes, bool(done))
    (out / "report.md").write_text(text)
    files = [
        write_csv(table, out / "report.csv", ("arm", *GROUP_KEYS)),
        write_csv(claims, out / "claims.csv", CLAIM_COLUMNS),
        write_csv(correlations, out / "mismatch_vs_top1.csv", ("metric", "n", "spearman_rho", "p")),
        out / "report.md",
        *plots,
    ]
    return ReportResult(text, table, out, files, left_out, claims, correlations)


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
