"""``encmm diagnose`` end to end: saved features, timm models, encmm checkpoints and runs, bad input.

Runs the real Typer app in-process on the session's local Ray cluster, with a real SQLite MLflow
store in a temp folder. The streamed, sharded path (one to two worker actors) is checked against today's
in-memory numbers (every feature extracted, then `spectra.diagnose_layer` per layer). Feature collection
for CaiT and Swin and the encmm students' distilled maps are checked without Ray.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from encmm.analysis import features as feats
from encmm.analysis.spectra import SEP_STATISTIC_DEFINITIONS, diagnose_layer
from encmm.orchestrator import tracking
from encmm.orchestrator.cli import app
from encmm.orchestrator.diagnose_command import select_sep_statistic
from tests.conftest import TINY_DIGITS

LAYER_KEYS = {"index", "tokens", "channels", "svd_rank", "pca_rank", "sep", "rotation"}
STAT_KEYS = {"p99", "mean", "median", "std", "q25", "q75"}
THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
RANKS = [2, 3, 4, 4, 5, 3]  # rank of each image's matrix in the known-structure features


def low_rank_features(seed: int = 0) -> np.ndarray:
    """`[L=2, I=6, N=24, C=16]` float64: X_i = U_i V_i^T with r_i equal singular values in a random
    r_i-dim channel subspace of its own, so d_p(X_i) = ceil(p * r_i); layer 1 = layer 0 rotated by an
    orthogonal channel matrix (same per-image ranks)."""
    rng = np.random.default_rng(seed)
    images = []
    for r in RANKS:
        u = np.linalg.qr(rng.standard_normal((24, r)))[0]
        v = np.linalg.qr(rng.standard_normal((16, r)))[0]
        images.append(3.0 * u @ v.T)
    layer0 = np.stack(images)
    rotation = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    return np.stack([layer0, layer0 @ rotation])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def diagnose(args: list[str], store: str, out: Path):
    result = CliRunner().invoke(app, ["diagnose", *args, "--tracking-uri", store, "--out", str(out)])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads((out / "diagnostics.json").read_text()), result


def assert_matches_direct_call(layer: dict, features: np.ndarray, sep_statistic: str = "per-image", **kwargs) -> None:
    direct = diagnose_layer(torch.from_numpy(features), THRESHOLDS, **kwargs)
    for key in ("tokens", "channels", "svd_rank", "pca_rank"):
        assert layer[key] == direct[key], key  # integer ranks and their statistics: exact
    assert_sep_matches(layer, direct, sep_statistic)
    for reference in ("to_shared", "pairwise"):
        for p, stats in direct["rotation"][reference].items():
            assert layer["rotation"][reference][p] == pytest.approx(stats, rel=1e-9, abs=1e-12)


def assert_sep_matches(layer: dict, direct: dict, sep_statistic: str) -> None:
    """diagnostics.json's "sep" = diagnose_layer's, with the chosen permutation statistic's block."""
    assert layer["sep"]["bandwidth"] == direct["sep"]["bandwidth"]
    for t, stats in direct["sep"]["image_bandwidth"].items():
        assert layer["sep"]["image_bandwidth"][t] == pytest.approx(stats)
    blocks = direct["sep"].get("permutation_statistics")
    assert ("permutation" in layer["sep"]) == (blocks is not None)
    if blocks is not None:
        permutation = blocks[sep_statistic]
        for key in ("statistic", "definition", "num_permutations", "num_images"):
            assert layer["sep"]["permutation"][key] == permutation[key], key
        for t, stats in permutation["bandwidth"].items():
            assert layer["sep"]["permutation"]["bandwidth"][t] == pytest.approx(stats)


@pytest.mark.ray
def test_saved_array_report_equals_direct_math_and_is_logged_to_mlflow(ray_cluster, store, tmp_path):
    features = low_rank_features()
    np.save(tmp_path / "features.npy", features)
    out = tmp_path / "out"
    report, result = diagnose(
        ["--features", str(tmp_path / "features.npy"), "--model", "my_vit", "--permutations", "3", "--pairs", "20"],
        store,
        out,
    )

    assert set(report) == {"model", "num_images", "thresholds", "layers"}
    assert report["model"] == "my_vit" and report["num_images"] == 6 and report["thresholds"] == list(THRESHOLDS)
    assert [layer["index"] for layer in report["layers"]] == [0, 1]
    for layer, array in zip(report["layers"], features):
        assert set(layer) == LAYER_KEYS
        assert set(layer["svd_rank"]) == {"0.8", "0.9", "0.95", "0.99"}
        assert set(layer["svd_rank"]["0.99"]) == STAT_KEYS
        assert set(layer["sep"]["bandwidth"]) == {"0.5", "0.6", "0.7", "0.8", "0.9"}
        assert_matches_direct_call(layer, array, permutations=3, num_pairs=20)
        assert layer["sep"]["permutation"]["statistic"] == "per-image"  # the default: the authors' definition
        # Known answers: d_p = ceil(p r_i) per image; images in different subspaces need more shared dims.
        for p in THRESHOLDS:
            expected = np.ceil(np.array(RANKS) * p - 1e-9)
            assert layer["svd_rank"][str(p)]["mean"] == pytest.approx(expected.mean())
            assert layer["svd_rank"][str(p)]["p99"] == pytest.approx(np.percentile(expected, 99))
        assert layer["pca_rank"]["0.99"]["mean"] > layer["svd_rank"]["0.99"]["mean"]
    assert report["layers"][0]["svd_rank"] == report["layers"][1]["svd_rank"]  # rotation-invariant
    assert "SVD p99" in result.stdout and "SEP d/D at 90%" in result.stdout

    csvs = ["ranks.csv", "sep.csv", "rotation.csv", "sep_curves.csv", "pca_curves.csv", "last_layer_images.csv"]
    pngs = [
        "rank_by_layer.png",
        "rank_histograms.png",
        "pca_energy.png",
        "sep_curves.png",
        "sep_permutation.png",
        "rotation.png",
    ]
    assert all((out / name).stat().st_size > 0 for name in csvs)
    assert all((out / "figures" / name).stat().st_size > 0 for name in pngs)
    assert len((out / "ranks.csv").read_text().splitlines()) == 1 + 2 * 2 * len(THRESHOLDS)

    run_id = result.stdout.rsplit("MLflow run ", 1)[1].strip(" )\n")
    run = tracking.get_run(store, run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "my_vit" and run.data.params["thresholds"] == "0.8,0.9,0.95,0.99"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    history = client.get_metric_history(run_id, "diag/svd_rank_p99/0.99")
    assert sorted((m.step, m.value) for m in history) == [
        (i, report["layers"][i]["svd_rank"]["0.99"]["p99"]) for i in (0, 1)
    ]
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "figures")
    }
    assert {"diagnostics.json", *csvs, *(f"figures/{name}" for name in pngs)} <= artifacts


def flat_and_white_features(seed: int = 0) -> np.ndarray:
    """`[L=1, I=6, N=32, C=16]`: three images of constant tokens (SEP bandwidth 1/C at every threshold)
    and three of white noise (~t): per-image and pooled statistics differ by far."""
    rng = np.random.default_rng(seed)
    flat = np.ones((3, 32, 16)) * rng.uniform(1, 2, (3, 32, 1))
    return np.concatenate([flat, rng.standard_normal((3, 32, 16))])[None]


@pytest.mark.ray
@pytest.mark.parametrize("statistic", ["per-image", "pooled"])
def test_diagnostics_json_states_the_chosen_sep_statistic_and_its_definition(ray_cluster, store, tmp_path, statistic):
    features = flat_and_white_features()
    np.save(tmp_path / "features.npy", features)
    out = tmp_path / "out"
    report, result = diagnose(
        [
            "--features",
            str(tmp_path / "features.npy"),
            "--permutations",
            "5",
            "--pairs",
            "5",
            "--sep-statistic",
            statistic,
        ],
        store,
        out,
    )
    layer = report["layers"][0]
    permutation = layer["sep"]["permutation"]
    assert permutation["statistic"] == statistic and permutation["definition"] == SEP_STATISTIC_DEFINITIONS[statistic]
    assert permutation["num_permutations"] == 5 and list(permutation["bandwidth"]) == list(layer["sep"]["bandwidth"])
    stats = permutation["bandwidth"]["0.9"]
    assert {
        "mean",
        "ci_low",
        "ci_high",
        "original_mean",
        "std_over_permutations",
        "delta_mean",
        "delta_ci_low",
        "delta_ci_high",
    } <= set(stats)
    # (Not the rotation: a constant-token image's top singular vector is the shared one, where the angle's
    # arccos amplifies round-off past any fixed tolerance.)
    assert_sep_matches(layer, diagnose_layer(torch.from_numpy(features[0]), permutations=5, num_pairs=5), statistic)
    # Natural order: the mean of per-image bandwidths is ~(1/16 + 0.9) / 2, the pooled curve's ~0.8.
    expected = (
        layer["sep"]["image_bandwidth"]["0.9"]["mean"]
        if statistic == "per-image"
        else layer["sep"]["bandwidth"]["0.9"]["ratio"]
    )
    assert stats["original_mean"] == expected
    assert stats["mean"] == pytest.approx(0.48 if statistic == "per-image" else 0.8, abs=0.08)
    with (out / "sep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["perm_statistic"] for row in rows} == {statistic}
    row = next(r for r in rows if r["threshold"] == "0.9")
    assert float(row["perm_mean"]) == pytest.approx(stats["mean"])
    assert float(row["perm_delta_ci_low"]) == pytest.approx(stats["delta_ci_low"])
    assert float(row["image_ratio_mean"]) == pytest.approx(layer["sep"]["image_bandwidth"]["0.9"]["mean"])
    run_id = result.stdout.rsplit("MLflow run ", 1)[1].strip(" )\n")
    assert tracking.get_run(store, run_id).data.params["sep_statistic"] == statistic


@pytest.mark.ray
def test_folder_of_per_image_arrays_is_read_in_file_order(ray_cluster, store, tmp_path):
    features = low_rank_features(seed=1).astype(np.float32)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(features.shape[1]):
        torch.save(torch.from_numpy(features[:, i].copy()), folder / f"img_{i:03d}.pt")  # [L, N, C] each
    report, _ = diagnose(["--features", str(folder), "--layers", "-1", "--pairs", "10"], store, tmp_path / "out")
    assert report["num_images"] == 6 and [layer["index"] for layer in report["layers"]] == [1]
    assert_matches_direct_call(report["layers"][0], features[1], num_pairs=10)


TOLERANCE = 1e-9
TINY_TIMM_VIT = ["vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}]  # 3 layers of 16 x 192


def assert_same_numbers(actual, expected, path: str = "") -> None:
    """Same keys; ints, strings and bools equal; floats within TOLERANCE (absolute or relative)."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_numbers(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for position, (a, e) in enumerate(zip(actual, expected)):
            assert_same_numbers(a, e, f"{path}[{position}]")
    elif isinstance(expected, float) and not isinstance(actual, bool):
        assert abs(actual - expected) <= TOLERANCE * max(1.0, abs(expected)), f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def assert_layer_is_in_memory_result(layer: dict, expected: dict) -> None:
    """One layer of diagnostics.json against `diagnose_layer`'s dict (with the SEP statistic chosen): the
    integer ranks and everything drawn from them identical, every float within TOLERANCE."""
    for key in ("tokens", "channels", "svd_rank", "pca_rank"):
        assert layer[key] == expected[key], key
    assert layer["sep"]["bandwidth"] == expected["sep"]["bandwidth"]
    sep = {
        key: expected["sep"][key] for key in ("bandwidth", "image_bandwidth", "permutation") if key in expected["sep"]
    }
    assert_same_numbers(layer["sep"], sep, "sep")
    assert_same_numbers(layer["rotation"], expected["rotation"], "rotation")


def in_memory_digits_features(name: str, model_args: dict, per_class: int, batch_size: int) -> list[torch.Tensor]:
    """Today's in-memory extraction: the model built as `encmm diagnose --model` builds it, every chosen digit
    resized and re-normalised up front, every layer's `[I, N, C]` features kept."""
    import timm

    from encmm.trainables.data import DIGITS_MEAN, DIGITS_STD, load_digits_tensors

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **model_args).eval()
    spec = feats.timm_input_spec(model)
    images, labels = load_digits_tensors(8)
    chosen = feats.first_per_class(labels.tolist(), per_class)
    x = feats.renormalise(feats.resize_images(images[chosen], spec.size), DIGITS_MEAN, DIGITS_STD, spec.mean, spec.std)
    with torch.no_grad():
        per_batch = [feats.layers_of(model, batch, None) for batch in x.split(batch_size)]
    return [torch.cat(parts) for parts in zip(*per_batch)]


@pytest.mark.ray
def test_one_or_two_workers_give_the_in_memory_numbers(ray_cluster, store, tmp_path):
    name, model_args = TINY_TIMM_VIT
    args = ["--model", name, *(f"--model-arg={k}={v}" for k, v in model_args.items())]
    args += ["--images-per-class", "3", "--batch-size", "8", "--pairs", "40", "--permutations", "2"]
    reports = {n: diagnose([*args, "--workers", str(n)], store, tmp_path / f"workers-{n}")[0] for n in (1, 2)}

    layers = in_memory_digits_features(name, model_args, per_class=3, batch_size=8)
    assert reports[1]["num_images"] == 30 and [layer["index"] for layer in reports[1]["layers"]] == [0, 1, 2]
    for features, *streamed in zip(layers, reports[1]["layers"], reports[2]["layers"]):
        expected = select_sep_statistic(diagnose_layer(features, THRESHOLDS, permutations=2, num_pairs=40), "per-image")
        for layer in streamed:
            assert_layer_is_in_memory_result(layer, expected)
    assert_same_numbers(reports[2], reports[1])


@pytest.mark.ray
def test_folder_of_per_image_arrays_gives_the_numbers_of_the_same_features_as_one_npy(ray_cluster, store, tmp_path):
    features = low_rank_features(seed=2)  # [L, I, N, C] float64
    np.save(tmp_path / "features.npy", features)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(features.shape[1]):
        np.save(folder / f"img_{i:03d}.npy", features[:, i])
    args = ["--batch-size", "4", "--workers", "2", "--pairs", "12", "--permutations", "2"]
    from_array, _ = diagnose(["--features", str(tmp_path / "features.npy"), *args], store, tmp_path / "array")
    from_folder, _ = diagnose(["--features", str(folder), *args], store, tmp_path / "folder")
    assert from_folder["num_images"] == from_array["num_images"] == 6
    assert_same_numbers(from_folder["layers"], from_array["layers"])
    for layer, array in zip(from_folder["layers"], features):
        assert_matches_direct_call(layer, array, permutations=2, num_pairs=12)


@pytest.mark.ray
def test_random_init_timm_model_on_digits_runs_offline(ray_cluster, store, tmp_path):
    report, result = diagnose(
        ["--model", "test_vit", "--data", "digits", "--images-per-class", "2", "--layers", "0,-1", "--pairs", "10"],
        store,
        tmp_path / "out",
    )
    assert report["model"] == "test_vit" and report["num_images"] == 20
    assert [(layer["index"], layer["tokens"], layer["channels"]) for layer in report["layers"]] == [
        (0, 100, 64),
        (5, 100, 64),
    ]  # 160 px / patch 16 -> 10 x 10 patch tokens, CLS removed
    svd = report["layers"][-1]["svd_rank"]["0.99"]
    assert 1 <= svd["p99"] <= 64 and svd["q25"] <= svd["median"] <= svd["q75"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny plain teacher (width 32) and a Lift student (lifted to 48), one epoch each."""
    from encmm.trainables.config import load_train_config
    from encmm.trainables.engine import fit

    paths = {}
    for name, extra in (("plain", []), ("lift", ["student.remedy=lift", "student.target_width=48"])):
        folder = tmp_path_factory.mktemp(name)
        cfg = load_train_config(None, [*TINY_DIGITS, "schedule.epochs=1", "schedule.warmup_epochs=0", *extra])
        fit(cfg, checkpoint_dir=folder)
        paths[name] = folder / "best.pt"
    return paths


@pytest.mark.ray
def test_lift_checkpoint_reports_the_lifted_map_as_its_last_layer(ray_cluster, store, tmp_path, trained):
    report, _ = diagnose(["--checkpoint", str(trained["lift"]), "--pairs", "10"], store, tmp_path / "out")
    assert report["model"] == "deit_tiny_patch16_224+lift" and report["num_images"] == 10
    assert [(layer["tokens"], layer["channels"]) for layer in report["layers"]] == [(16, 32), (16, 48)]


@pytest.mark.ray
def test_teacher_run_is_diagnosed_from_its_mlflow_checkpoint(ray_cluster, store, tmp_path, trained):
    run_id = tracking.start_run(store, "encmm", "teacher", tags={"encmm.kind": "train"})
    tracking.log_artifact(store, run_id, trained["plain"], "checkpoints")
    tracking.end_run(store, run_id, "FINISHED")
    report, result = diagnose(["--run", run_id, "--data", "digits", "--pairs", "10"], store, tmp_path / "out")
    assert report["model"] == "deit_tiny_patch16_224+none"
    assert [(layer["index"], layer["tokens"], layer["channels"]) for layer in report["layers"]] == [
        (0, 16, 32),
        (1, 16, 32),
    ]
    diag_run = result.stdout.rsplit("MLflow run ", 1)[1].strip(" )\n")
    assert tracking.get_run(store, diag_run).data.tags["encmm.source_run_id"] == run_id


@pytest.mark.ray
def test_crash_after_start_ends_the_run_failed(ray_cluster, store, tmp_path, monkeypatch):
    from encmm.analysis import plots

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "write_figures", broken)
    np.save(tmp_path / "f.npy", low_rank_features())
    result = CliRunner().invoke(
        app,
        [
            "diagnose",
            "--features",
            str(tmp_path / "f.npy"),
            "--pairs",
            "5",
            "--tracking-uri",
            store,
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1 and "disk full" in result.stderr
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(store).search_runs(
        [tracking.ensure_experiment(store, "encmm")], filter_string=f"tags.`encmm.out` = '{tmp_path / 'out'}'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "disk full" in runs[0].data.tags["encmm.error"]


# ----------------------------------------------------------------------------- feature collection
def read_features(model, images: torch.Tensor, layers=None, batch_size: int = 64) -> list[torch.Tensor]:
    """`[I, N_l, C_l]` per layer, read batch by batch through a `ModelFeatures` of already-normalised images."""
    spec = feats.InputSpec(size=tuple(images.shape[-2:]), mean=(0.0,) * 3, std=(1.0,) * 3)
    reader = feats.ModelFeatures(model, feats.ResizedImages(images, spec, spec.mean, spec.std), layers)
    parts = [reader.read(range(a, min(a + batch_size, len(reader)))) for a in range(0, len(reader), batch_size)]
    return [torch.cat(layer) for layer in zip(*parts)]


def test_lift_and_widelast_last_layers_are_their_distilled_maps():
    from encmm.trainables.config import StudentConfig
    from encmm.trainables.models import build_student

    x = torch.randn(3, 3, 16, 16)
    for remedy, layers in (("none", 3), ("lift", 3), ("widelast", 3)):
        cfg = StudentConfig(width=32, depth=3, head_dim=16, patch_size=4, remedy=remedy, target_width=48, wide_blocks=1)
        model = build_student(cfg, num_classes=10, img_size=16).eval()
        collected = read_features(model, x, batch_size=2)
        assert len(collected) == layers and feats.probe_layers(model, (16, 16))[-1] == tuple(collected[-1].shape[1:])
        with torch.no_grad():
            distilled = model.forward_distill(x)[1]
        torch.testing.assert_close(collected[-1], distilled)
        assert collected[-1].shape == (3, 16, 32 if remedy == "none" else 48)


def test_cait_gives_its_self_attention_blocks_and_swin_its_stages():
    import timm

    cait = timm.create_model(
        "cait_xxs24_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2
    )
    assert feats.probe_layers(cait, (32, 32)) == [(16, 32)] * 3  # 3 SA blocks; the 2 class-attention blocks excluded
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        patch_size=2,
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 1),
        num_heads=(1, 2, 4),
    )
    layers = read_features(swin, torch.randn(2, 3, 32, 32), layers=[0, 2])
    assert [tuple(f.shape) for f in layers] == [(2, 256, 16), (2, 16, 64)]  # NHWC stages -> [B, H*W, C]


def test_digits_selection_takes_the_first_images_of_each_class_at_the_model_size():
    from encmm.trainables.data import load_digits_tensors

    images, labels = load_digits_tensors(8)
    chosen = feats.first_per_class(labels.tolist(), 2)
    assert len(chosen) == 20 and [int(labels[i]) for i in chosen] == [c for c in range(10) for _ in range(2)]
    assert chosen[:2] == [i for i in range(len(labels)) if labels[i] == 0][:2]
    torch.testing.assert_close(feats.resize_images(images[chosen], (24, 24)), load_digits_tensors(24)[0][chosen])


def test_image_folder_takes_the_first_sorted_files_per_class(tmp_path):
    from PIL import Image

    for cls in ("b", "a"):
        (tmp_path / cls).mkdir()
        for name in ("z.png", "m.jpg", "c.png", "notes.txt"):
            if name.endswith("txt"):
                (tmp_path / cls / name).write_text("x")
            else:
                Image.new("RGB", (20, 20)).save(tmp_path / cls / name)
    files = feats.image_folder_files(tmp_path, 2)
    assert [f"{f.parent.name}/{f.name}" for f in files] == ["a/c.png", "a/m.jpg", "b/c.png", "b/m.jpg"]
    spec = feats.InputSpec(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    source = pickle.loads(pickle.dumps(feats.ImageFiles(files, spec)))  # as a Ray worker receives it
    assert len(source) == 4 and tuple(source.images([0, 1, 2]).shape) == (3, 3, 16, 16)
    torch.testing.assert_close(source.images([3, 1])[1], source.images([1])[0])


# ---------------------------------------------------------------------------------- bad input
def _write(folder: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "good":
        np.save(folder / "f.npy", rng.standard_normal((2, 3, 4, 5)))
    elif kind == "rank3":
        np.save(folder / "f.npy", rng.standard_normal((3, 4, 5)))
    elif kind == "nan":
        array = rng.standard_normal((2, 3, 4, 5))
        array[1, 2, 0, 0] = np.nan
        np.save(folder / "f.npy", array)
    elif kind == "empty":
        (folder / "d").mkdir()
    elif kind == "ragged":
        (folder / "d").mkdir()
        np.save(folder / "d" / "a.npy", rng.standard_normal((2, 4, 5)))
        np.save(folder / "d" / "b.npy", rng.standard_normal((2, 4, 6)))


BAD = [
    ("wrong-rank", "rank3", ["--features", "f.npy"], "4-D"),
    ("nan", "nan", ["--features", "f.npy"], "NaN"),
    ("threshold-1.5", "good", ["--features", "f.npy", "--thresholds", "0.5,1.5"], "(0, 1)"),
    ("threshold-text", "good", ["--features", "f.npy", "--thresholds", "high"], "--thresholds"),
    ("empty-folder", "empty", ["--features", "d"], "empty folder"),
    ("ragged-folder", "ragged", ["--features", "d"], "differs"),
    ("layer-out-of-range", "good", ["--features", "f.npy", "--layers", "2"], "--layers"),
    ("missing-features", None, ["--features", "nope.npy"], "no such file"),
    ("missing-checkpoint", None, ["--checkpoint", "nope.pt"], "no such file"),
    ("unknown-model", None, ["--model", "no_such_vit_at_all"], "unknown timm model"),
    (
        "model-without-blocks",
        None,
        ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=0", "--model-arg", "img_size=32"],
        "no blocks",
    ),
    ("missing-data-folder", None, ["--model", "test_vit", "--data", "no/such/folder"], "--data"),
    ("empty-image-folder", "empty", ["--model", "test_vit", "--data", "d"], "no class folders"),
    ("two-sources", "good", ["--features", "f.npy", "--checkpoint", "x.pt"], "exactly one"),
    ("model-and-run", None, ["--model", "test_vit", "--run", "abc"], "exactly one"),
    ("no-source", None, [], "exactly one"),
    ("unknown-run", None, ["--run", "0123abcd"], "no MLflow run"),
    ("negative-pairs", "good", ["--features", "f.npy", "--pairs", "-1"], "--pairs"),
    ("zero-workers", "good", ["--features", "f.npy", "--workers", "0"], "--workers: must be >= 1"),
    (
        "unknown-sep-statistic",
        "good",
        ["--features", "f.npy", "--permutations", "5", "--sep-statistic", "median"],
        "--sep-statistic: 'median' is not one of per-image, pooled",
    ),
]


@pytest.mark.parametrize("files,args,expect", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(tmp_path, monkeypatch, files, args, expect):
    monkeypatch.chdir(tmp_path)
    if files:
        _write(tmp_path, files)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["diagnose", *args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("encmm: error:") and expect in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no store, no output folder


def test_feature_collection_plots_and_saved_features_import_without_ray_or_mlflow():
    import subprocess
    import sys

    code = (
        'import sys; sys.modules["ray"] = None; sys.modules["mlflow"] = None\n'
        'import analysis.features, analysis.saved_features, analysis.plots, analysis.spectra; print("ok")'
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    speaking_ray = [
        p.name
        for p in Path(feats.__file__).parent.glob("*.py")
        if "import ray" in p.read_text() or "from ray" in p.read_text()
    ]
    assert speaking_ray == ["ray_tasks.py"]
