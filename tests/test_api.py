"""The Python API (issue 15): ``encmm.train`` / ``sweep`` / ``diagnose`` / ``report`` from a notebook or a
script, on the CLI's own validation and run path, and ``fit`` on a user's own dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import encmm
from encmm.orchestrator.cli import app

TINY = {
    "data": {"name": "digits", "img_size": 16, "batch_size": 16},
    "student": {"model": "vit_tiny_patch16_224", "width": 32, "depth": 2, "head_dim": 16, "patch_size": 4},
    "schedule": {"epochs": 1, "warmup_epochs": 0},
}


def test_import_encmm_loads_neither_torch_nor_ray_nor_mlflow():
    code = "import encmm, sys; assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    code += "; assert 'mlflow' not in sys.modules; print(encmm.sweep.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "sweep"


def test_api_names_are_documented_and_config_error_is_the_trainables_one():
    from encmm.trainables.config import ConfigError

    assert encmm.ConfigError is ConfigError
    for name in [
        "train",
        "sweep",
        "diagnose",
        "report",
        "TrainResult",
        "SweepResult",
        "SweepPlan",
        "DiagnoseResult",
        "SweepReport",
    ]:
        assert name in encmm.__all__ and len(getattr(encmm, name).__doc__ or "") > 200, f"encmm.{name}: no docs"


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda uri: encmm.train({**TINY, "kd": {"alpha": 2}}, tracking_uri=uri),
            "<dict>: kd.alpha: Input should be less than or equal to 1 (got 2)",
        ),
        (
            lambda uri: encmm.train(TINY, overrides={"student.widht": 48}, tracking_uri=uri),
            "<dict>: student.widht: Extra inputs are not permitted (did you mean width?)",
        ),
        (
            lambda uri: encmm.sweep(
                {"name": "bad", "base": TINY, "search": {"grid": {"kd.alpha": [0.0, 1.5]}}}, tracking_uri=uri
            ),
            "<dict> [trial kd.alpha=1.5]: kd.alpha: Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            lambda uri: encmm.train(encmm.TrainConfig.model_validate(TINY), overrides=["kd.beta=-1"], tracking_uri=uri),
            "<TrainConfig>: kd.beta: Input should be greater than or equal to 0 (got -1)",
        ),
        (
            lambda uri: encmm.sweep({"name": "bad", "base": "missing.yaml"}, tracking_uri=uri),
            "missing.yaml: config file not found",
        ),
        (
            lambda uri: encmm.diagnose(model="test_vit", thresholds=(0.9, 1.5), tracking_uri=uri),
            "--thresholds: thresholds must lie in (0, 1), got [0.9, 1.5]",
        ),
    ],
    ids=["train-field", "train-override", "sweep-trial", "train-config-object", "sweep-relative-base", "diagnose"],
)
def test_bad_dict_config_raises_config_error_naming_the_field_and_creates_nothing(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(encmm.ConfigError) as caught:
        call(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(caught.value).endswith(message) and "\n" not in str(caught.value)
    if message.startswith("missing.yaml"):  # a dict's relative `base` resolves against the current folder
        assert str(caught.value) == f"{tmp_path.resolve() / message}"
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no encmm-runs


def test_bad_file_raises_the_one_line_the_cli_prints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text(json.dumps({**TINY, "kd": {"alpha": 2}}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli = CliRunner().invoke(app, ["train", "exp.yaml", "--tracking-uri", uri])
    with pytest.raises(encmm.ConfigError) as caught:
        encmm.train("exp.yaml", tracking_uri=uri)
    assert cli.exit_code == 2
    assert cli.output.strip() == f"encmm: error: {caught.value}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.yaml"]


def test_dry_run_of_the_shipped_digits_sweep_returns_its_plan_with_four_arms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = encmm.sweep("digits", dry_run=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert isinstance(plan, encmm.SweepPlan) and plan.name == "digits" and plan.total_trials == 4
    assert str(plan) == plan.text and plan.text.startswith("sweep digits: 4 trials")
    arms = [line.split(":")[0].strip() for line in plan.text.splitlines() if line.strip().startswith("arm ")]
    assert arms == ["arm none", "arm lift", "arm widelast", "arm uniformwide"]
    assert "teacher: trained once from digits-teacher.yaml" in plan.text
    assert list(tmp_path.iterdir()) == []


def channel_coded_images(count: int, num_classes: int, img_size: int, seed: int):
    """``[count, 3, S, S]`` noise with channel ``k % 3`` brightened for class k (separable at a glance)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % num_classes
    images = 0.3 * torch.randn(count, 3, img_size, img_size, generator=generator)
    for index, label in enumerate(labels.tolist()):
        images[index, label % 3] += 2.0
    return images, labels


def test_fit_trains_and_evaluates_on_a_users_own_data_bundle(tmp_path, monkeypatch):
    from encmm.trainables import engine
    from encmm.trainables.config import TrainConfig
    from encmm.trainables.data import DataBundle, TensorImageDataset

    def no_build(cfg):
        raise AssertionError("build_datasets was called although a DataBundle was given")

    monkeypatch.setattr(engine, "build_datasets", no_build)
    train = TensorImageDataset(*channel_coded_images(96, 3, 16, seed=0))
    val = TensorImageDataset(*channel_coded_images(30, 3, 16, seed=1))
    bundle = DataBundle(train, val, num_classes=3, mean=(0.0,) * 3, std=(1.0,) * 3)
    cfg = TrainConfig.model_validate(
        {**TINY, "schedule": {"epochs": 3, "warmup_epochs": 0}, "optim": {"lr": 3e-3, "lr_base_batch": 16}}
    )
    history = []
    final = engine.fit(
        cfg,
        data=bundle,
        checkpoint_dir=tmp_path,
        device=torch.device("cpu"),
        log=lambda metrics, epoch: history.append(metrics),
    )
    assert [m["epoch"] for m in history] == [0, 1, 2]
    assert all(m["val/acc1"] * 30 / 100 == pytest.approx(round(m["val/acc1"] * 30 / 100)) for m in history)
    assert final["best/val/acc1"] > 100 / 3 + 20  # learned the three classes, well above chance
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["spec"]["num_classes"] == 3
    head = [v for k, v in ckpt["model"].items() if k.endswith("head.weight")]
    assert head and head[0].shape[0] == 3


@pytest.mark.ray
def test_script_runs_the_digits_sweep_through_the_api_and_reports_it(digits_script_sweep):
    from mlflow.tracking import MlflowClient

    done, tmp_path = digits_script_sweep["process"], digits_script_sweep["folder"]
    uri = digits_script_sweep["uri"]
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["type"] == "SweepResult" and result["total"] == 2 and result["status"] == "FINISHED"
    assert sorted(row["arm"] for row in result["rows"]) == ["lift", "none"]
    assert all(row["status"] == "FINISHED" and row["best/val/acc1"] is not None for row in result["rows"])
    assert result["best"]["run_id"] in {row["run_id"] for row in result["rows"]}

    client = MlflowClient(uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["encmm.sweep_name"] == result["name"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]

    assert result["report_type"] == "SweepReport"
    assert sorted(row["arm"] for row in result["report_rows"]) == ["lift", "none"]
    assert Path(result["report_out"]) == tmp_path.resolve() / "reports" / result["name"]
    assert "report" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.ray
def test_train_returns_its_run_and_checkpoint_and_diagnose_reads_that_checkpoint(ray_cluster, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = encmm.train({**TINY, "name": "api-train"}, overrides={"data.batch_size": 64}, tracking_uri=uri)
    assert isinstance(run, encmm.TrainResult) and run.tracking_uri == uri
    assert run.run_dir.parent == tmp_path.resolve() / "encmm-runs" and run.run_dir.name.startswith("api-train-")
    assert run.checkpoint.is_file() and run.metrics["epoch"] == 0
    assert 0 <= run.metrics["best/val/acc1"] <= 100 and "run_id" not in run.metrics
    stored = MlflowClient(uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.data.params["data.batch_size"] == "64"

    diag = encmm.diagnose(checkpoint=run.checkpoint, layers=[-1], pairs=10, out=tmp_path / "diag", tracking_uri=uri)
    assert isinstance(diag, encmm.DiagnoseResult) and diag.out == tmp_path / "diag"
    assert diag.diagnostics == json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    assert [layer["index"] for layer in diag.diagnostics["layers"]] == [1]  # depth 2: -1 is block 1
    assert diag.diagnostics["num_images"] == 10 and diag.diagnostics["layers"][0]["channels"] == 32
    assert MlflowClient(uri).get_run(diag.run_id).info.status == "FINISHED"
