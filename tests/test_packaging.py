"""encmm as an installed package: one import name, shipped experiments by name from any folder, typo hints.
(The built wheel in a fresh venv is checked by .ci/check_wheel.sh.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from encmm.orchestrator.cli import app
from encmm.orchestrator.experiments import (
    is_sweep_file,
    resolve_experiment,
    resolve_model_list,
    shipped_experiments,
    shipped_model_lists,
)
from encmm.trainables.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_installs_one_import_name_and_ships_every_experiment():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in tool["packages"]} == {"encmm"}
    assert tool["package-data"]["encmm.experiments"] == ["*.yaml", "models/*.yaml"]
    assert set(shipped_experiments()) == {p.stem for p in (ROOT / "experiments").glob("*.yaml")}
    assert set(shipped_model_lists()) == {p.stem for p in (ROOT / "experiments" / "models").glob("*.yaml")}


def test_the_shipped_model_list_is_found_by_name_from_any_folder_and_names_timm_models(tmp_path, monkeypatch):
    import timm
    import yaml

    monkeypatch.chdir(tmp_path)
    path = resolve_model_list("diagnose-sep-models")
    assert path == shipped_model_lists()["diagnose-sep-models"] == resolve_model_list("diagnose-sep-models.yaml")
    names = yaml.safe_load(path.read_text())
    assert len(names) == 6 and all(timm.is_model(name) for name in names)  # the paper's SEP figure
    with pytest.raises(ConfigError, match="nor a shipped model list: diagnose-sep-models"):
        resolve_model_list("no-such-list")


@pytest.mark.parametrize("ref", ["digits-widths", "digits-widths.yaml", "experiments/digits-widths.yaml"])
def test_shipped_sweeps_are_found_by_name_from_any_folder(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_experiment(ref, "digits") == shipped_experiments()["digits-widths"]
    result = CliRunner().invoke(app, ["sweep", ref, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sweep digits-widths: 12 trials" in result.output
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "encmm-runs").exists()


def test_a_file_in_the_working_folder_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits.yaml").write_text("name: mine\nsearch: {grid: {seed: [0, 1]}}\n")
    assert resolve_experiment("digits.yaml", "digits") == Path("digits.yaml")


def test_an_unknown_config_name_is_one_line_listing_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_experiment("digits-clams", "digits")
    assert "digits-clams: config file not found (nor a shipped experiment: " in str(err.value)
    assert "digits-claims" in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["sweep", "digits-clams"])
    assert result.exit_code == 2 and result.output.startswith("encmm: error: digits-clams: config file not found")


def test_sweep_list_shows_every_shipped_sweep_and_no_training_config():
    result = CliRunner().invoke(app, ["sweep", "--list"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    assert listed == {name for name, path in shipped_experiments().items() if is_sweep_file(path)}
    assert {"digits", "digits-claims", "imagenet-released-runs"} <= listed and "digits-teacher" not in listed


def test_a_config_key_typo_gets_a_did_you_mean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.yaml").write_text(
        "name: s\nmax_concurent_trials: 2\nbase: {kd: {alpah: 0.5}}\nsearch: {grid: {seed: [0]}}\n"
    )
    result = CliRunner().invoke(app, ["sweep", "s.yaml", "--dry-run"])
    assert result.exit_code == 2
    assert "max_concurent_trials: Extra inputs are not permitted (did you mean max_concurrent_trials?)" in result.output
    (tmp_path / "s.yaml").write_text("name: s\nbase: {kd: {alpah: 0.5}}\nsearch: {grid: {seed: [0]}}\n")
    result = CliRunner().invoke(app, ["sweep", "s.yaml", "--dry-run"])
    assert result.exit_code == 2 and "kd.alpah: Extra inputs are not permitted (did you mean alpha?)" in result.output


def test_a_users_own_analysis_py_changes_nothing(tmp_path):
    for name in ("analysis", "orchestrator", "trainables"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s {name}.py was imported')\n")
    out = subprocess.run(
        [sys.executable, "-m", "encmm.orchestrator.cli", "sweep", "digits", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sweep digits: 4 trials" in out.stdout
