"""Named arms and claims in sweep files: how they expand into trials, and the bad input they refuse.
Pure config: no Ray, no MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from encmm.orchestrator.cli import app
from encmm.orchestrator.sweep_command import teacher_trial_config
from encmm.orchestrator.sweep_config import grid_points, load_sweep_config, trial_config_dict, validate_trials
from encmm.trainables.config import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_claims_sweep_crosses_every_arm_with_three_seeds():
    cfg, _ = load_sweep_config(EXPERIMENTS / "digits-claims.yaml")
    cfg.base["teacher"] = {"source": "run", "run_id": "the-trained-teacher"}  # what `encmm sweep` fills in
    trials = validate_trials(cfg, "digits-claims.yaml")
    points = grid_points(cfg.search)
    assert len(trials) == len(points) == 9 * 3
    by_arm: dict[str, list] = {}
    for point, trial in zip(points, trials):
        by_arm.setdefault(point["arm"], []).append(trial)
    assert list(by_arm) == [
        "ce",
        "logit_kd",
        "feat_proj",
        "feat_pool",
        "lift",
        "widelast",
        "uniformwide",
        "feat_equal",
        "logit_equal",
    ]
    assert all(sorted(t.seed for t in arm) == [0, 1, 2] for arm in by_arm.values())
    ce, logit, proj, pool = (by_arm[a][0] for a in ("ce", "logit_kd", "feat_proj", "feat_pool"))
    assert (ce.kd.alpha, ce.kd.beta, ce.kd.uses_teacher) == (0.0, 0.0, False)
    assert (logit.kd.alpha, logit.kd.beta) == (0.9, 0.0)
    assert (proj.student.projector, pool.student.projector) == ("linear", "avgpool")
    assert {by_arm[a][0].student.remedy for a in ("lift", "widelast", "uniformwide")} == {
        "lift",
        "widelast",
        "uniformwide",
    }
    equal = by_arm["feat_equal"][0]
    assert equal.student.width == 64 and equal.student.heads == 2 and equal.kd.beta == 1.0
    assert {c.a for c in cfg.claims} | {c.b for c in cfg.claims} <= set(by_arm)


def test_released_runs_sweep_reproduces_the_authors_four_scripts(tmp_path):
    cfg, _ = load_sweep_config(EXPERIMENTS / "imagenet-released-runs.yaml", [f"data.root={tmp_path}"])
    got = {point["arm"]: trial_config_dict(cfg.base, point, cfg.search.arms) for point in grid_points(cfg.search)}
    expected = {
        "lift-softkd-spectralkd": ("lift", 0.9, "fft"),
        "lift-mse-only": ("lift", 0.0, "mse"),
        "widelast-softkd-mse": ("widelast", 0.9, "mse"),
        "widelast-spectralkd-only": ("widelast", 0.0, "fft"),
    }
    assert {
        arm: (t["student"]["remedy"], t["kd"]["alpha"], t["kd"]["feature_loss"]) for arm, t in got.items()
    } == expected
    for tree in got.values():  # the scripts' --w-fft 0.2, 300 epochs, the DeiT per-epoch schedule
        assert (tree["kd"]["beta"], tree["schedule"]["epochs"], tree["schedule"]["step_on"]) == (0.2, 300, "epoch")


def test_a_grid_axis_still_applies_on_top_of_an_arm():
    tree = trial_config_dict({"kd": {"alpha": 0.5}}, {"arm": "x", "seed": 3}, {"x": {"kd.alpha": 0.0, "seed": 1}})
    assert tree == {"kd": {"alpha": 0.0}, "seed": 3}


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "search: {arms: {a: {kd.alpha: 0.0}}, grid: {kd.alpha: [0.1]}}",
            "arm a sets kd.alpha, which is also a search axis",
        ),
        ("search: {grid: {arm: [1, 2]}}", "`arm` is the axis of search.arms"),
        ("search: {arms: {'bad name': {}}}", "arm name 'bad name'"),
        ("search: {arms: {a: {}}}\nclaims: [{name: c, a: a, b: nope}]", "claim 'c': unknown arm 'nope' (arms: a)"),
        ("search: {grid: {seed: [0]}}\nclaims: [{name: c, a: a, b: b}]", "unknown arm 'a' (arms: none"),
        ("search: {arms: {a: {}, b: {}}}\nclaims: [{name: c, a: a, b: b, expect: bigger}]", "claims.0.expect"),
    ],
)
def test_bad_arms_and_claims_are_one_line_errors(tmp_path, body, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\n{body}\n")
    with pytest.raises(ConfigError) as err:
        load_sweep_config(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_teacher_is_looked_up_through_the_first_arm_that_uses_it():
    cfg, _ = load_sweep_config(EXPERIMENTS / "digits-claims.yaml")
    probe = teacher_trial_config({**cfg.base, "teacher": {"source": "run", "run_id": "r"}}, cfg.search)
    assert probe.kd.uses_teacher and probe.kd.beta == 0.0  # logit_kd: the CE-only arm comes first


def test_dry_run_lists_the_arms_and_the_claims(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["sweep", str(EXPERIMENTS / "digits-claims.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "27 trials" in result.output and "  #  arm | seed" in result.output
    assert "arm ce: kd.alpha=0.0, kd.beta=0.0" in result.output
    assert "claim: WideLast beats UniformWide at equal parameters: widelast > uniformwide" in result.output
