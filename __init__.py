"""encmm: experiment orchestrator for encoding mismatch in ViT feature distillation (arXiv 2511.15572).

The Python API, for notebooks and scripts (each is its ``encmm`` command's twin; see ``help(encmm.sweep)``):

    import encmm

    plan = encmm.sweep("digits", dry_run=True)           # what would run; creates nothing
    result = encmm.sweep("digits")                        # teacher, then every trial; returns the rows
    table = encmm.report(result.name)                     # the paper-style table, claims and plots
    run = encmm.train("digits-teacher", overrides={"schedule.epochs": 5})
    diag = encmm.diagnose(checkpoint=run.checkpoint)      # spectral diagnostics of any model

- :func:`train` -> :class:`TrainResult`, :func:`sweep` -> :class:`SweepResult` (:class:`SweepPlan` with
  ``dry_run=True``), :func:`diagnose` -> :class:`DiagnoseResult`, :func:`report` -> :class:`SweepReport`.
- A config is a :class:`TrainConfig` / :class:`SweepConfig`, a plain dict, a YAML file or the name of a shipped
  experiment (``encmm sweep --list``); ``None`` is the shipped default.
- Bad input raises :class:`ConfigError` (one line naming the source and the field) before anything is created;
  an unusable MLflow store raises :class:`TrackingError`.

The repository's folders are this package's subpackages: ``encmm.trainables`` (configs, students,
teachers, losses, the training loop), ``encmm.analysis`` (the spectral diagnostics), ``encmm.orchestrator``
(the CLI, Ray Tune sweeps, MLflow) and ``encmm.experiments`` (the shipped YAML files).

``import encmm`` imports neither torch, Ray nor MLflow; the functions import them when called.
"""

from __future__ import annotations

import importlib

from encmm.orchestrator.api import (
    DiagnoseResult,
    SweepPlan,
    SweepReport,
    SweepResult,
    TrainResult,
    diagnose,
    report,
    sweep,
    train,
)

__version__ = "0.1.0"

# Imported on first use, so that `import encmm` stays cheap (pydantic for the configs).
_LAZY = {
    "ConfigError": "encmm.trainables.config",
    "TrainConfig": "encmm.trainables.config",
    "SweepConfig": "encmm.orchestrator.sweep_config",
    "TrackingError": "encmm.orchestrator.tracking",
}

__all__ = [
    "train",
    "sweep",
    "diagnose",
    "report",
    "TrainResult",
    "SweepResult",
    "SweepPlan",
    "DiagnoseResult",
    "SweepReport",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'encmm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
