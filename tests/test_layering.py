"""The training core, the spectra math (in memory and streamed) and the report's tables / figures / model code
run with Ray and MLflow unavailable."""

import subprocess
import sys

BLOCKED = """
import sys
sys.modules["ray"] = None      # any `import ray...` now raises ImportError
sys.modules["mlflow"] = None
import encmm.trainables.config, encmm.trainables.data, encmm.trainables.models, encmm.trainables.losses
import encmm.trainables.teacher, encmm.trainables.engine, encmm.trainables.preflight, encmm.trainables.execution
import encmm.orchestrator.sweep_config, encmm.orchestrator.sweep_plan
import encmm.orchestrator.report_tables, encmm.orchestrator.report_figures, encmm.orchestrator.report_models
import encmm.analysis.spectra, encmm.analysis.streaming, encmm.analysis.features, encmm.analysis.plots
import encmm.analysis.certified_ranks
print("ok")
"""


def test_training_core_and_spectra_import_without_ray_or_mlflow():
    out = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
