"""Closes the MLflow runs of an encmm process that died without closing them (SIGKILL, OOM killer).

An ``encmm train`` / ``sweep`` / ``diagnose`` process starts one watchdog per run it opens
(:func:`orchestrator.tracking.close_runs_if_process_dies`). The watchdog runs in its own session (a
``kill`` of the encmm process group spares it), polls the process once per second, and once the process
is gone ends every run it watches that is still RUNNING (and, for a sweep, the sweep's trial runs) as
FAILED with the reason. A process that ends normally has closed its runs already: the watchdog then
only exits. ``encmm sweep --resume`` re-opens the runs it continues.

    python -m encmm.orchestrator.watchdog --pid PID --uri URI --run RUN_ID [--run ...] [--children-of RUN_ID]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

POLL_S = 1.0


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill said it exists
    return state not in ("Z", "X")


def close_orphaned_runs(uri: str, run_ids: list[str], children_of: list[str], pid: int) -> list[str]:
    """End the watched runs (and the trial runs of ``children_of``) still RUNNING as FAILED; returns their ids."""
    from encmm.orchestrator import tracking

    reason = (
        f"the encmm process {pid} that owned this run died without closing it (killed?); "
        f"a sweep continues with: encmm sweep --resume NAME"
    )
    closed = []
    candidates = list(run_ids)
    for parent in children_of:
        candidates += [run.info.run_id for run in tracking.list_child_runs(uri, parent)]
    for run_id in dict.fromkeys(candidates):
        if tracking.get_run(uri, run_id).info.status == "RUNNING":
            tracking.end_run(uri, run_id, "FAILED", error=reason)
            closed.append(run_id)
    return closed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--run", action="append", default=[])
    parser.add_argument("--children-of", action="append", default=[])
    args = parser.parse_args(argv)
    while process_alive(args.pid):
        time.sleep(POLL_S)
    closed = close_orphaned_runs(args.uri, args.run, args.children_of, args.pid)
    if closed:
        print(f"encmm watchdog: process {args.pid} died; marked FAILED: {', '.join(closed)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
