"""A sweep's runtime plan: what every trial of one sweep shares, saved as ``<sweep_dir>/sweep.json``.

Built once the teacher is known and the parent run is open; ``--resume`` reads it back, validated.
Ray-free on purpose: ``encmm sweep`` validates and opens the sweep with it, and imports Ray Tune
(``orchestrator.sweep``, ~1.5 s) only while the Ray cluster starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from encmm.orchestrator.sweep_config import AshaConfig, SearchSpace
from encmm.trainables.config import ConfigError, _Strict, format_validation_error

PLAN_FILE = "sweep.json"


class RuntimePlan(_Strict):
    """One sweep, as its trials, its progress callback, the summary and ``--resume`` see it."""

    name: str = Field(description="the sweep's unique name (the config's name + a timestamp)")
    sweep_dir: Path = Field(description="Tune's experiment folder; trials' checkpoints under trials/")
    uri: str = Field(description="MLflow tracking URI")
    experiment: str = Field(description="MLflow experiment of the parent run and its trials")
    parent_run_id: str
    base: dict[str, Any] = Field(description="the trials' shared TrainConfig tree, its teacher pinned to a run")
    teacher_checkpoint: str | None = Field(None, description="local copy of the teacher's best checkpoint")
    search: SearchSpace
    asha: AshaConfig | None = None
    epochs: int = Field(ge=1, description="the longest trial's epochs (ASHA's max_t)")
    max_concurrent_trials: int = Field(ge=1)
    trial_driver_cpus: float = Field(gt=0)
    max_trial_failures: int = Field(ge=0)
    mismatch_images: int = Field(ge=2)
    total_trials: int = Field(ge=1)

    def save(self) -> Path:
        path = self.sweep_dir / PLAN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, sweep_dir: Path) -> RuntimePlan:
        """The plan saved in ``sweep_dir``; a :class:`ConfigError` naming the file when it is not one."""
        path = Path(sweep_dir) / PLAN_FILE
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(f"{path} (not a sweep plan)", exc, cls)) from exc
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the sweep plan: {exc.strerror or exc}") from exc


def new_sweep_dir(root: Path, name: str) -> Path:
    """A folder of its own for a new sweep: ``<root>/<name>-<YYYYmmdd-HHMMSS>``, made here, atomically; a
    sweep started in the same second from the same folder gets ``-2``, ``-3``, ... (its name is the folder's)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        folder = root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"{root}: 999 sweeps named {stamp} already; wait a second")
