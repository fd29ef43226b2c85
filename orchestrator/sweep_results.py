"""A sweep's results as MLflow holds them: one row per child run, and the summary table files.

Read by ``encmm sweep`` (the summary it prints and logs at the end) and ``encmm report``; MLflow, not a
local file, is the source of truth.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from encmm.orchestrator import tracking
from encmm.orchestrator.sweep_config import ARM


def summarize(
    uri: str, experiment: str, parent_run_id: str, axes: Iterable[str] = ()
) -> tuple[list[dict], dict | None]:
    """One row per child run of ``parent_run_id`` (from MLflow, the source of truth), with a column per
    search axis in ``axes``; the best FINISHED row by best val/acc1."""
    runs = tracking.find_runs(uri, experiment, {"encmm.parent_run_id": parent_run_id})
    rows = []
    assignment_of = lambda run: json.loads(run.data.tags.get("encmm.assignment", "{}"))  # noqa: E731
    for run in sorted(runs, key=lambda r: r.data.tags.get("encmm.trial_id", "")):
        m, p = run.data.metrics, run.data.params
        row = {"trial": run.data.tags.get("encmm.trial_id"), "status": run.info.status, "run_id": run.info.run_id}
        row["arm"] = assignment_of(run).get(ARM)
        row.update(
            {
                f"{k}": p.get(k, assignment_of(run).get(k))
                for k in ["student.remedy", "student.width", "kd.alpha", "kd.beta", "seed", *axes]
                if k not in row
            }
        )
        for key in (
            "final/best/val/acc1",
            "final/val/acc1",
            "params_inference",
            "diag/svd_rank_p99/0.99",
            "diag/pca_rank_p99/0.99",
            "diag/sep_ratio_90",
            "diag/feat_mse",
        ):
            value = m.get(key)
            if key == "params_inference" and value is not None:
                value = int(value)
            row[key.removeprefix("final/")] = round(value, 4) if isinstance(value, float) else value
        rows.append(row)
    finished = [r for r in rows if r["status"] == "FINISHED" and r.get("best/val/acc1") is not None]
    best = max(finished, key=lambda r: r["best/val/acc1"]) if finished else None
    return rows, best


def write_summary(rows: list[dict], folder: Path) -> tuple[Path, Path]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    csv_path, md_path = folder / "summary.csv", folder / "summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = [c for c in columns if c != "run_id"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in shown) + " |" for row in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
