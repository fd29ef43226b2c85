"""The sweep's runtime plan is typed: saved as sweep.json, read back validated."""

from __future__ import annotations

import json

import pytest

from encmm.orchestrator.sweep_config import AshaConfig, SearchSpace
from encmm.orchestrator.sweep_plan import PLAN_FILE, RuntimePlan
from encmm.trainables.config import ConfigError


def a_plan(tmp_path) -> RuntimePlan:
    return RuntimePlan(
        name="digits-20261202-130000",
        sweep_dir=tmp_path / "sweeps" / "digits-20261202-130000",
        uri="sqlite:///mlflow.db",
        experiment="encmm",
        parent_run_id="0123456789abcdef",
        base={"student": {"width": 32}, "teacher": {"source": "run", "run_id": "feed"}},
        teacher_checkpoint=None,
        search=SearchSpace(grid={"seed": [0, 1]}, arms={"lift": {"student.remedy": "lift"}}),
        asha=AshaConfig(grace_period=2),
        epochs=20,
        max_concurrent_trials=2,
        trial_driver_cpus=0.01,
        max_trial_failures=1,
        mismatch_images=200,
        total_trials=2,
    )


def test_a_saved_plan_reads_back_equal_and_typed(tmp_path):
    plan = a_plan(tmp_path)
    path = plan.save()
    assert path == plan.sweep_dir / PLAN_FILE
    loaded = RuntimePlan.load(plan.sweep_dir)
    assert loaded == plan
    assert loaded.search.arms == {"lift": {"student.remedy": "lift"}} and loaded.asha.grace_period == 2


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda tree: tree.pop("parent_run_id"), "parent_run_id: Field required"),
        (lambda tree: tree.update(max_concurrent_trials=0), "max_concurrent_trials"),
        (lambda tree: tree.update(total_trial=3), "did you mean total_trials?"),
        (lambda tree: tree["search"].update(grid={"seed": []}), "grid axis seed has no values"),
    ],
)
def test_a_plan_that_does_not_validate_is_refused_in_one_line_naming_the_file(tmp_path, edit, expected):
    plan = a_plan(tmp_path)
    path = plan.save()
    tree = json.loads(path.read_text())
    edit(tree)
    path.write_text(json.dumps(tree))
    with pytest.raises(ConfigError) as raised:
        RuntimePlan.load(plan.sweep_dir)
    message = str(raised.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_a_truncated_plan_is_refused_too(tmp_path):
    plan = a_plan(tmp_path)
    path = plan.save()
    path.write_text(path.read_text()[:40])
    with pytest.raises(ConfigError, match="not a sweep plan"):
        RuntimePlan.load(plan.sweep_dir)


def test_sweeps_started_in_the_same_second_from_one_folder_get_folders_and_names_of_their_own(tmp_path):
    from encmm.orchestrator.sweep_plan import new_sweep_dir

    folders = [new_sweep_dir(tmp_path / "sweeps", "digits") for _ in range(3)]
    assert len({folder.name for folder in folders}) == 3
    assert all(folder.is_dir() and folder.parent == tmp_path / "sweeps" for folder in folders)


def test_a_report_on_a_sweep_name_two_sweeps_share_refuses_and_lists_both(tmp_path):
    """Two sweeps that chose the same name (started in other folders, tracked in one store)."""
    from typer.testing import CliRunner

    from encmm.orchestrator import tracking
    from encmm.orchestrator.cli import app

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"encmm.kind": "sweep", "encmm.sweep_name": "digits-20261202-130000"}
    ids = [tracking.start_run(uri, "encmm", "digits-20261202-130000", tags=tags) for _ in range(2)]
    for run_id in ids:
        tracking.end_run(uri, run_id, "FINISHED")
    result = CliRunner().invoke(app, ["report", "digits-20261202-130000", "--tracking-uri", uri])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "ambiguous" in line and all(run_id in line for run_id in ids) and "\n" not in line
    assert not (tmp_path / "reports").exists()
