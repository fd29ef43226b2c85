"""``encmm diagnose`` with several models (issue 14, "many models, one comparison").

Real parts only: tiny random-init timm models of three families (ViT, CaiT, Swin) on the embedded digits,
the session's local Ray cluster, a SQLite MLflow store in a temp folder, the Typer app in-process. One
three-model comparison is run once for the module and read by several tests.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import encmm
from encmm.orchestrator import tracking
from encmm.orchestrator.api import DiagnoseComparison
from encmm.orchestrator.cli import app
from encmm.orchestrator.diagnose_command import ComparisonPlan, DiagnoseOptions, DiagnosePlan, prepare_diagnose_models
from tests.test_diagnose import assert_same_numbers

# Three families, each a few blocks at 32 px: (model, its timm.create_model overrides, layers diagnosed).
FAMILIES = [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, 2),
    ("cait_xxs24_224", {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, 2),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [1] * 3, "num_heads": [1, 2, 4]},
        3,  # stage outputs
    ),
]
MODELS = [name for name, _, _ in FAMILIES]
THRESHOLDS = ["0.8", "0.9", "0.95", "0.99"]
# Two plain ViTs sharing one set of --model-arg (the repeated --model form).
PAIR = ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]
PAIR_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 1}
PAIR_ARGS = [f"{key}={value}" for key, value in PAIR_KWARGS.items()]
CHILD_ARTIFACTS = {
    "diagnostics.json",
    "ranks.csv",
    "sep.csv",
    "rotation.csv",
    "sep_curves.csv",
    "pca_curves.csv",
    "last_layer_images.csv",
    *(f"figures/{name}.png" for name in ("rank_by_layer", "rank_histograms", "pca_energy", "sep_curves", "rotation")),
}
COMPARISON_FILES = {"comparison.csv", "sep_overlay.png", "rank_vs_depth.png"}


def family_entries() -> list[dict]:
    return [{"model": name, "model_args": args} for name, args, _ in FAMILIES]


def artifact_paths(client: MlflowClient, run_id: str) -> set[str]:
    top = client.list_artifacts(run_id)
    return {a.path for a in top if not a.is_dir} | {
        f.path for a in top if a.is_dir for f in client.list_artifacts(run_id, a.path)
    }


def invoke(args: list[str], store: str, out: Path):
    return CliRunner().invoke(app, ["diagnose", *args, "--tracking-uri", store, "--out", str(out)])


@pytest.fixture(scope="module")
def compared(ray_cluster, tmp_path_factory) -> dict:
    """`encmm diagnose --models models.yaml` (the mapping form: per-model args) over the three families."""
    folder = tmp_path_factory.mktemp("compare")
    (folder / "models.yaml").write_text(yaml.safe_dump(family_entries()))
    store = f"sqlite:///{folder / 'mlflow.db'}"
    out = folder / "out"
    result = invoke(["--models", str(folder / "models.yaml"), "--pairs", "10", "--workers", "1"], store, out)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    parent = result.stdout.rsplit("MLflow parent run ", 1)[1].strip(" )\n")
    return {"result": result, "store": store, "out": out, "parent": parent, "folder": folder}


@pytest.mark.ray
def test_three_models_give_a_finished_parent_run_with_one_finished_child_per_model(compared):
    store, out, parent_id = compared["store"], compared["out"], compared["parent"]
    client = MlflowClient(store)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["encmm.kind"] == "diagnose-comparison" and parent.data.tags["encmm.out"] == str(out)
    assert parent.data.params["models"] == ",".join(MODELS) and parent.data.params["num_models"] == "3"
    assert artifact_paths(client, parent_id) == COMPARISON_FILES

    children = {run.data.params["model"]: run for run in tracking.list_child_runs(store, parent_id)}
    assert sorted(children) == sorted(MODELS)
    for name, _, layers in FAMILIES:
        child = children[name]
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["encmm.kind"] == "diagnose" and child.data.tags["encmm.out"] == str(out / name)
        assert artifact_paths(client, child.info.run_id) == CHILD_ARTIFACTS  # what a one-model run logs
        report = json.loads((out / name / "diagnostics.json").read_text())
        assert report["model"] == name and len(report["layers"]) == layers and report["num_images"] == 10
        history = client.get_metric_history(child.info.run_id, "diag/svd_rank_p99/0.99")
        assert sorted(m.step for m in history) == [layer["index"] for layer in report["layers"]]
    experiment = tracking.ensure_experiment(store, "encmm")
    assert {run.info.status for run in client.search_runs([experiment])} == {"FINISHED"}  # 4 runs, none RUNNING
    assert len(client.search_runs([experiment])) == 4


@pytest.mark.ray
def test_comparison_csv_holds_each_childs_diagnostics_json_numbers(compared):
    out = compared["out"]
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["model"] for row in rows] == MODELS
    for row in rows:
        report = json.loads((out / row["model"] / "diagnostics.json").read_text())
        layers, last = report["layers"], report["layers"][-1]
        assert int(row["num_images"]) == report["num_images"] and int(row["layers"]) == len(layers)
        assert (int(row["layer"]), int(row["tokens"]), int(row["channels"])) == (
            last["index"],
            last["tokens"],
            last["channels"],
        )
        for p in THRESHOLDS:
            for kind in ("svd", "pca"):
                assert float(row[f"{kind}_p99_{p}"]) == last[f"{kind}_rank"][p]["p99"]
                mean = sum(layer[f"{kind}_rank"][p]["p99"] for layer in layers) / len(layers)
                assert float(row[f"{kind}_p99_{p}_layer_mean"]) == pytest.approx(mean, rel=1e-12)
        band = last["sep"]["bandwidth"]["0.9"]
        assert int(row["sep_d_0.9"]) == band["d"] and float(row["sep_ratio_0.9"]) == band["ratio"]
    for name in ("sep_overlay.png", "rank_vs_depth.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = compared["result"].stdout
    assert stdout.count("SEP d/D at 90%") == 3 and "3 models, last diagnosed layer" in stdout


@pytest.mark.ray
def test_a_child_holds_what_a_one_model_diagnose_of_that_model_writes(compared):
    name, args, _ = FAMILIES[1]
    single = compared["folder"] / "single"
    result = invoke(
        ["--model", name, *(f"--model-arg={k}={json.dumps(v)}" for k, v in args.items()), "--pairs", "10"],
        compared["store"],
        single,
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "comparison" not in result.stdout and not (single / "comparison.csv").exists()
    assert sorted(p.name for p in single.iterdir()) == sorted(p.name for p in (compared["out"] / name).iterdir())
    assert_same_numbers(
        json.loads((compared["out"] / name / "diagnostics.json").read_text()),
        json.loads((single / "diagnostics.json").read_text()),
    )


def bad_models_file(folder: Path) -> None:
    (folder / "m.yaml").write_text(
        yaml.safe_dump(
            [
                {"model": "vit_tiny_patch16_224", "model_args": {"img_size": 32, "depth": 1}},
                {"model": "deit_tiny_patch16_224", "model_args": {"img_size": 32, "depth": 0}},
            ]
        )
    )


BAD = [
    (
        "unknown-model-among-good-ones",
        None,
        ["--model", PAIR[0], "--model", "no_such_vit_at_all", "--model", PAIR[1], "--model-arg", "img_size=32"],
        ["--model", "no_such_vit_at_all", "unknown timm model"],
    ),
    ("bad-model-args-of-the-second", bad_models_file, ["--models", "m.yaml"], ["deit_tiny_patch16_224", "no blocks"]),
    ("duplicate-model", None, ["--model", PAIR[0], "--model", PAIR[0]], [PAIR[0], "given twice"]),
    (
        "duplicate-across-model-and-file",
        lambda folder: (folder / "m.yaml").write_text(f"- {PAIR[1]}\n- {PAIR[0]}\n"),
        ["--model", PAIR[0], "--models", "m.yaml"],
        [PAIR[0], "given twice"],
    ),
    (
        "several-models-and-features",
        None,
        ["--model", PAIR[0], "--model", PAIR[1], "--features", "f.npy"],
        ["--features: one source only"],
    ),
    (
        "file-not-a-list",
        lambda folder: (folder / "m.yaml").write_text("model: vit_tiny_patch16_224\n"),
        ["--models", "m.yaml"],
        ["--models m.yaml", "non-empty YAML list"],
    ),
    (
        "entry-key-typo",
        lambda folder: (folder / "m.yaml").write_text(f"- {{model: {PAIR[0]}, model_arg: {{depth: 1}}}}\n"),
        ["--models", "m.yaml"],
        ["--models m.yaml [entry 1]", "model_arg", "did you mean model_args?"],
    ),
    ("missing-file", None, ["--models", "nope.yaml"], ["--models", "nope.yaml", "not found"]),
]


@pytest.mark.parametrize("files,args,expect", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_models_exit_2_with_one_line_before_anything_is_created(tmp_path, monkeypatch, files, args, expect):
    monkeypatch.chdir(tmp_path)
    if files:
        files(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = invoke(args, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out")
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encmm: error:"), lines
    assert all(text in lines[0] for text in expect), lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no store, no out folder


def plan_of(tmp_path: Path, models: list, models_file: Path | None, model_args: list[str]):
    options = DiagnoseOptions(
        model_args=model_args, out=str(tmp_path / "out"), tracking_uri=f"sqlite:///{tmp_path}/m.db"
    )
    return prepare_diagnose_models(options, models, None if models_file is None else str(models_file))


def test_models_file_gives_the_same_models_as_repeated_model_options(tmp_path):
    (tmp_path / "names.yaml").write_text("".join(f"- {name}\n" for name in PAIR))
    (tmp_path / "second.yaml").write_text(f"- {PAIR[1]}\n")
    (tmp_path / "mappings.yaml").write_text(yaml.safe_dump([{"model": n, "model_args": PAIR_KWARGS} for n in PAIR]))
    plans = {
        "repeated": plan_of(tmp_path, PAIR, None, PAIR_ARGS),
        "names": plan_of(tmp_path, [], tmp_path / "names.yaml", PAIR_ARGS),
        "mixed": plan_of(tmp_path, PAIR[:1], tmp_path / "second.yaml", PAIR_ARGS),
        "mappings": plan_of(tmp_path, [], tmp_path / "mappings.yaml", []),
    }
    reference = plans["repeated"]
    assert isinstance(reference, ComparisonPlan) and [p.label for p in reference.plans] == PAIR
    assert [p.out for p in reference.plans] == [(tmp_path / "out" / name).resolve() for name in PAIR]
    assert reference.params["models"] == ",".join(PAIR)
    for form, plan in plans.items():
        assert [p.label for p in plan.plans] == PAIR, form
        assert [p.params for p in plan.plans] == [p.params for p in reference.plans], form
        assert [p.layer_shapes for p in plan.plans] == [[(16, 192)]] * 2, form
        assert plan.params == reference.params and plan.out == reference.out, form
        weights = plan.plans[1].reader.model.state_dict()
        expected = reference.plans[1].reader.model.state_dict()
        assert all((weights[k] == expected[k]).all() for k in expected), form  # the same seeded random init
    one = plan_of(tmp_path, [], tmp_path / "second.yaml", PAIR_ARGS)
    assert isinstance(one, DiagnosePlan) and one.label == PAIR[1] and one.out == (tmp_path / "out").resolve()


@pytest.mark.ray
def test_python_api_returns_every_childs_result_and_the_comparison(ray_cluster, tmp_path):
    done = encmm.diagnose(
        models=[PAIR[0], {"model": PAIR[1], "model_args": {"depth": 2}}],
        model_args=PAIR_KWARGS,
        layers=[-1],
        pairs=5,
        workers=1,
        out=tmp_path / "out",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert isinstance(done, DiagnoseComparison)
    assert [result.diagnostics["model"] for result in done.models] == PAIR
    assert [result.out for result in done.models] == [tmp_path / "out" / name for name in PAIR]
    assert [result.diagnostics["layers"][0]["index"] for result in done.models] == [0, 1]  # depth 1, then 2
    assert {path.name for path in done.files} == COMPARISON_FILES and all(path.is_file() for path in done.files)
    assert [row["svd_p99_0.99"] for row in done.rows] == [
        result.diagnostics["layers"][-1]["svd_rank"]["0.99"]["p99"] for result in done.models
    ]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert {run.info.run_id for run in tracking.list_child_runs(uri, done.run_id)} == {r.run_id for r in done.models}


@pytest.mark.ray
def test_a_crash_in_the_second_model_ends_it_and_the_parent_failed(ray_cluster, tmp_path, monkeypatch):
    from encmm.analysis import plots

    real, calls = plots.write_figures, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(plots, "write_figures", second_fails)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--model", PAIR[0], "--model", PAIR[1], *(f"--model-arg={a}" for a in PAIR_ARGS), "--pairs", "5"]
    result = invoke([*args, "--workers", "1"], store, tmp_path / "out")
    assert result.exit_code == 1 and "disk full" in result.stderr, (result.stdout, result.stderr)
    client = MlflowClient(store)
    runs = client.search_runs([tracking.ensure_experiment(store, "encmm")])
    parent = next(run for run in runs if run.data.tags["encmm.kind"] == "diagnose-comparison")
    children = tracking.list_child_runs(store, parent.info.run_id)
    children = {run.data.params["model"]: run.info.status for run in children}
    assert parent.info.status == "FAILED" and "disk full" in parent.data.tags["encmm.error"]
    assert children == {PAIR[0]: "FINISHED", PAIR[1]: "FAILED"} and len(runs) == 3
    assert not (tmp_path / "out" / "comparison.csv").exists()
