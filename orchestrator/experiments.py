"""The experiments encmm ships (``experiments/*.yaml``, installed as ``encmm/experiments``), by name.

``encmm sweep digits-claims`` works from any folder: a config argument is a file when one exists at that
path, else the name of a shipped experiment (with or without ``.yaml`` and a leading ``experiments/``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

import encmm
from encmm.trainables.config import ConfigError

SHIPPED_DIR = Path(encmm.__file__).resolve().parent / "experiments"
DEFAULT_SWEEP = "digits"
DEFAULT_TRAIN = "digits-teacher"


def shipped_experiments() -> dict[str, Path]:
    """Every shipped experiment file by name (file name without ``.yaml``), sorted."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.yaml"))}


def is_sweep_file(path: Path) -> bool:
    return "search" in (yaml.safe_load(path.read_text()) or {})


def summary_line(path: Path) -> str:
    """The first line of a shipped file's leading comment: what it runs."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def resolve_experiment(ref: str | Path | None, default: str) -> Path:
    """The config file ``ref`` names: an existing file, or a shipped experiment; ``None`` is ``default``."""
    if ref is None:
        return shipped_experiments()[default]
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent in (Path("."), Path("experiments")) and name in shipped_experiments():
        return shipped_experiments()[name]
    known = ", ".join(shipped_experiments())
    raise ConfigError(f"{ref}: config file not found (nor a shipped experiment: {known})")


def shipped_model_lists() -> dict[str, Path]:
    """The model lists encmm ships for ``encmm diagnose --models NAME`` (``experiments/models/*.yaml``)."""
    return {path.stem: path for path in sorted((SHIPPED_DIR / "models").glob("*.yaml"))}


def resolve_model_list(ref: str | Path) -> Path:
    """The ``--models`` file ``ref`` names: an existing file, or a shipped model list."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and name in shipped_model_lists():
        return shipped_model_lists()[name]
    raise ConfigError(f"{ref}: file not found (nor a shipped model list: {', '.join(shipped_model_lists())})")


def format_listing(sweeps: bool = True) -> str:
    """``encmm sweep --list``: each shipped sweep (or training config) with its one-line summary."""
    rows = [(name, summary_line(path)) for name, path in shipped_experiments().items() if is_sweep_file(path) == sweeps]
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)
