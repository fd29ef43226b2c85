"""The embedded digits sweep run once per test session by a user's script through the Python API (cut to
two arms, one epoch, a 2-epoch teacher): ``test_api`` checks what the script got back, ``test_report``
reports on the sweep it left in its MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = '''\
"""A user's script: the embedded digits sweep, cut to two arms and one epoch, from Python."""
import json, shutil, sys
from pathlib import Path

import yaml

import encmm
from encmm.orchestrator.experiments import shipped_experiments

uri, address = sys.argv[1], sys.argv[2]
shipped = shipped_experiments()
sweep = yaml.safe_load(shipped["digits"].read_text())
sweep["search"]["arms"] = {name: sweep["search"]["arms"][name] for name in ("none", "lift")}
sweep["claims"] = [claim for claim in sweep["claims"] if {claim["a"], claim["b"]} <= {"none", "lift"}]
sweep["mismatch_images"] = 32
shutil.copy(shipped[sweep["base"].removesuffix(".yaml")], sweep["base"])  # a relative base: ./digits-student.yaml
teacher = yaml.safe_load(shipped["digits-teacher"].read_text())
teacher["schedule"].update(epochs=2, warmup_epochs=0)
Path("teacher.yaml").write_text(yaml.safe_dump(teacher))
sweep["teacher_training"] = "teacher.yaml"

result = encmm.sweep(sweep, overrides=["schedule.epochs=1", "schedule.warmup_epochs=0"], tracking_uri=uri,
                     address=address)
report = encmm.report(result.name, tracking_uri=uri)
Path("result.json").write_text(json.dumps({
    "type": type(result).__name__, "name": result.name, "parent_run_id": result.parent_run_id,
    "status": result.status, "rows": result.rows, "best": result.best, "total": result.total_trials,
    "report_type": type(report).__name__, "report_rows": report.rows, "report_out": str(report.out)}))
'''


def run_digits_script(folder: Path, address: str) -> dict:
    """Run the script in ``folder`` against the Ray cluster at ``address``; the store is ``folder/mlflow.db``."""
    (folder / "script.py").write_text(SCRIPT)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # That cluster listens on 127.0.0.1 only (orchestrator/ray_cluster.py): keep the joining driver's node IP
    # on loopback too, as init_ray does for the node it starts, or Ray swaps in the routable IP and never connects.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    done = subprocess.run(
        [sys.executable, "script.py", uri, address], cwd=folder, env=env, capture_output=True, text=True, timeout=480
    )
    return {"process": done, "folder": folder, "uri": uri}
