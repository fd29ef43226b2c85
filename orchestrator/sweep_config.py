"""Typed sweep configuration: a base training config plus a search space (no Ray types here).

name: digits
teacher_training: digits-teacher.yaml   # optional: trained once, reused by config hash
base: {...}                             # a TrainConfig (trainables/config.py), inline or a file path
search:
  grid:                                 # every combination runs
    student.remedy: [none, lift, widelast]
    kd:                                 # a section axis: each value is merged into `kd`
      - {alpha: 0.0, beta: 1.0}
      - {alpha: 0.9, beta: 1.0}
  sample:                               # drawn num_samples times per grid point
    kd.temperature: {distribution: uniform, low: 1.0, high: 4.0}
  num_samples: 1
  arms:                                 # named arms, crossed with the grid: each is a set of overrides
    ce: {kd.alpha: 0.0, kd.beta: 0.0}
    lift: {student.remedy: lift}
claims:                                 # what `encmm report` tests: mean(a) - mean(b) > 0 (or < 0)
  - {name: Lift beats CE only, a: lift, b: ce, expect: greater}
asha: {grace_period: 2, reduction_factor: 2}   # optional early stopping on val/acc1
max_concurrent_trials: null             # default: what the cluster's CPUs/GPUs fit
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from encmm.trainables.config import ConfigError, TrainConfig, _Strict, apply_overrides, read_yaml, validate_model


class SampledAxis(_Strict):
    distribution: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SampledAxis:
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty values list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.distribution} needs low < high")
        elif self.distribution == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def extremes(self) -> list[Any]:
        """Values that bound the axis, for validating trial configs before the sweep starts."""
        if self.distribution == "choice":
            return list(self.values)
        if self.distribution == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]


ARM = "arm"  # the axis a sweep's named arms run on


class SearchSpace(_Strict):
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    sample: dict[str, SampledAxis] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    arms: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="named sets of dotted overrides, crossed with the grid (axis `arm`)"
    )

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid axis {key} has no values")
        if ARM in self.grid or ARM in self.sample:
            raise ValueError(f"`{ARM}` is the axis of search.arms; name the grid axis differently")
        for name, overrides in self.arms.items():
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", name):
                raise ValueError(f"arm name {name!r}: letters, digits, _ . - only")
            clash = set(overrides) & (set(self.grid) | set(self.sample))
            if clash:
                raise ValueError(f"arm {name} sets {sorted(clash)[0]}, which is also a search axis")
        both = set(self.grid) & set(self.sample)
        if both:
            raise ValueError(f"axis {sorted(both)[0]} is both a grid and a sampled axis")
        return self


class Claim(_Strict):
    """One comparison `encmm report` tests: is mean(a) - mean(b) of best val top-1 > 0 (or < 0)?"""

    name: str = Field(min_length=1, max_length=120)
    a: str
    b: str
    expect: Literal["greater", "less"] = "greater"


class AshaConfig(_Strict):
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(_Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
    teacher_training: str | None = Field(None, description="YAML of a teacher to train once and reuse")
    base: dict[str, Any] = Field(default_factory=dict)
    search: SearchSpace = SearchSpace()
    asha: AshaConfig | None = None
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_trial_failures: int = Field(1, ge=0, description="Tune retries of a failed trial driver")
    trial_driver_cpus: float = Field(0.01, gt=0, description="CPU share of each trial's driver (fractional)")
    mismatch_images: int = Field(200, ge=2, description="val images used for each trial's mismatch metrics")
    claims: list[Claim] = Field(default_factory=list, description="comparisons of arms that `encmm report` tests")

    @model_validator(mode="after")
    def _check_claims(self) -> SweepConfig:
        for claim in self.claims:
            for arm in (claim.a, claim.b):
                if arm not in self.search.arms:
                    known = ", ".join(self.search.arms) or "none: the sweep has no search.arms"
                    raise ValueError(f"claim {claim.name!r}: unknown arm {arm!r} (arms: {known})")
        return self


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; a dict value for a section key is merged, not replaced.
    Raises ValueError when a part of the path holds a value, not a section."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1], 1):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {'.'.join(parts[:depth])} is not a section (it is {node!r})")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]].update(copy.deepcopy(value))
    else:
        node[parts[-1]] = copy.deepcopy(value)


def trial_config_dict(base: dict, assignment: dict[str, Any], arms: dict[str, dict] | None = None) -> dict:
    """Base config dict with one trial's axis values applied; an ``arm`` value stands for its overrides
    (applied first, so a grid axis such as ``seed`` still holds)."""
    tree = copy.deepcopy(base)
    if ARM in assignment:
        for key, value in (arms or {})[assignment[ARM]].items():
            set_dotted(tree, key, value)
    for key, value in assignment.items():
        if key != ARM:
            set_dotted(tree, key, value)
    return tree


def grid_axes(space: SearchSpace) -> dict[str, list[Any]]:
    """The grid Tune runs: the arms (when there are any) as the first axis, then the grid's own."""
    return {ARM: list(space.arms), **space.grid} if space.arms else dict(space.grid)


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    axes = grid_axes(space)
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] or [{}]


def sweep_source(config: str | Path | Mapping[str, Any] | SweepConfig) -> str:
    """What errors about ``config`` name: the file, or ``<dict>`` / ``<SweepConfig>``."""
    if isinstance(config, SweepConfig):
        return "<SweepConfig>"
    return "<dict>" if isinstance(config, Mapping) else str(Path(config))


def load_sweep_config(
    path: str | Path | Mapping[str, Any] | SweepConfig, overrides: list[str] | None = None
) -> tuple[SweepConfig, Path]:
    """Read and validate a sweep file; ``--set`` overrides address the base (``kd.alpha=..``) or the sweep
    (``sweep.name=..``). Returns the config and the folder relative paths resolve against.

    ``path`` may also be the file's contents as a dict, or a :class:`SweepConfig`: its relative file
    references (``base: file.yaml``, ``teacher_training``) then resolve against the current folder."""
    source = sweep_source(path)
    if isinstance(path, (Mapping, SweepConfig)):
        raw = path.model_dump(mode="json") if isinstance(path, SweepConfig) else copy.deepcopy(dict(path))
        folder = Path.cwd()
    else:
        raw, folder = read_yaml(path), Path(path).parent
    base_ref = raw.get("base")
    if isinstance(base_ref, str):
        raw["base"] = read_yaml((folder / base_ref).resolve())
    if not isinstance(raw.setdefault("base", {}), dict):
        raise ConfigError(
            f"{source}: base: must be a training config (a mapping) or its YAML file name, got {raw['base']!r}"
        )
    sweep_overrides = [o for o in overrides or [] if o.startswith("sweep.")]
    base_overrides = [o for o in overrides or [] if not o.startswith("sweep.")]
    apply_overrides({"sweep": raw}, sweep_overrides)  # errors quote the override as given
    apply_overrides(raw["base"], base_overrides)
    cfg = validate_model(SweepConfig, raw, source)
    return cfg, folder.resolve()


def bound_points(search: SearchSpace) -> list[dict]:
    """Every grid point with the sampled axes at each combination of their bounds: the trials to check."""
    bounds = [
        dict(zip(search.sample, values))
        for values in itertools.product(*(axis.extremes() for axis in search.sample.values()))
    ] or [{}]
    return [{**point, **extreme} for point in grid_points(search) for extreme in bounds]


def validate_trials(cfg: SweepConfig, source: str) -> list[TrainConfig]:
    """Every grid point (sampled axes at their bounds) must be a valid TrainConfig: fail before any work."""
    configs = []
    for point in bound_points(cfg.search):
        try:
            tree = trial_config_dict(cfg.base, point, cfg.search.arms)
        except ValueError as exc:
            raise ConfigError(f"{source}: search: axis {exc}") from None
        label = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
        configs.append(validate_model(TrainConfig, tree, f"{source} [trial {label}]"))
    return configs
