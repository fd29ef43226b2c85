"""A sweep's saved plan (``<sweep_dir>/sweep.json``), which ``--resume`` reads back.

Ray-free on purpose: ``encmm sweep`` validates and opens the sweep with these, and imports Ray Tune
(``orchestrator.sweep``, ~1.5 s) only while the Ray cluster starts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

PLAN_FILE = "sweep.json"


def save_plan(plan: dict) -> Path:
    path = Path(plan["sweep_dir"]) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2, sort_keys=True))
    return path


def load_plan(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / PLAN_FILE).read_text())


def timestamped(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
