"""MLflow conventions users expect of a training run: the trained network as an MLflow model (loadable,
registrable), system metrics, and the run's datasets as inputs. Real SQLite store, real torch/timm."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from encmm.orchestrator import tracking
from tests.conftest import TINY_DIGITS
from tests.test_engine import tiny_config

SYSTEM_KEYS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """best.pt of a 1-epoch digits student with drop-path 0.5: in train mode its output is random."""
    from encmm.trainables.engine import fit

    folder = tmp_path_factory.mktemp("student")
    fit(tiny_config("schedule.epochs=1", "student.drop_path=0.5"), checkpoint_dir=folder)
    return folder / "best.pt"


def digits_val_images(count: int) -> torch.Tensor:
    from encmm.trainables.config import DataConfig
    from encmm.trainables.data import build_digits

    val = build_digits(DataConfig(img_size=16)).val
    return torch.stack([val[i][0] for i in range(count)])


def checkpoint_logits(checkpoint, images: torch.Tensor) -> torch.Tensor:
    from encmm.trainables.teacher import load_checkpoint_file, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint_file(checkpoint))[0].eval()
    with torch.no_grad():
        return model(images)


def psutil_importable() -> None:
    import ray  # noqa: F401 - Ray ships psutil (ray/thirdparty_files) and puts it on sys.path


# ------------------------------------------------------------------ the trained network as an MLflow model
def test_logged_model_loads_from_the_run_in_eval_mode_and_gives_the_checkpoints_logits(checkpoint, tracking_uri):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    run_id = tracking.start_run(tracking_uri, "conventions", "student", params={"kd.alpha": 0.5})
    started = time.perf_counter()
    model_uri = tracking.log_trained_model(tracking_uri, run_id, checkpoint, digits_val_images(2))
    seconds = time.perf_counter() - started
    assert seconds < 10, f"logging the model took {seconds:.1f} s"  # ~1.5 s on 2 cores
    assert tracking.log_trained_model(tracking_uri, run_id, checkpoint, digits_val_images(2)) == model_uri

    images = digits_val_images(5)
    expected = checkpoint_logits(checkpoint, images)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        for uri in (f"runs:/{run_id}/{tracking.MODEL_NAME}", model_uri):
            loaded = mlflow.pytorch.load_model(uri)
            with torch.no_grad():
                logits = loaded(images)
            assert logits.shape == (5, 10)
            torch.testing.assert_close(logits, expected)  # and twice the same: no drop-path left
        info = mlflow.models.get_model_info(f"runs:/{run_id}/{tracking.MODEL_NAME}")
        [inputs], [outputs] = info.signature.inputs.inputs, info.signature.outputs.inputs
        assert (str(inputs.type), inputs.shape) == ("float32", (-1, 3, 16, 16))  # any batch size
        assert (str(outputs.type), outputs.shape) == ("float32", (-1, 10))
        version = mlflow.register_model(f"runs:/{run_id}/{tracking.MODEL_NAME}", "digits-student")
        with torch.no_grad():
            registered = mlflow.pytorch.load_model(f"models:/digits-student/{version.version}")(images)
        torch.testing.assert_close(registered, expected)
    finally:
        mlflow.set_tracking_uri(None)

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    [logged] = client.search_logged_models([run.info.experiment_id])  # one model, in the run's experiment
    assert [output.model_id for output in run.outputs.model_outputs] == [logged.model_id]
    assert logged.params["kd.alpha"] == "0.5" and run.info.status == "RUNNING"  # the run is left as it was


def test_logged_model_loads_with_neither_encmm_nor_timm_installed(checkpoint, tracking_uri, tmp_path):
    run_id = tracking.start_run(tracking_uri, "conventions", "portable")
    tracking.log_trained_model(tracking_uri, run_id, checkpoint, digits_val_images(2))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["encmm"] = sys.modules["timm"] = None  # importing either raises ImportError
        import mlflow, mlflow.pytorch, torch
        mlflow.set_tracking_uri({tracking_uri!r})
        model = mlflow.pytorch.load_model("runs:/{run_id}/{tracking.MODEL_NAME}")
        print(tuple(model(torch.zeros(3, 3, 16, 16)).shape))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(3, 10)"


# ------------------------------------------------------------------ datasets
def run_inputs(uri: str, run_id: str) -> dict[str, tuple[str, str, str]]:
    """context -> (name, digest, source) of a run's dataset inputs."""
    from mlflow.tracking import MlflowClient

    found = {}
    for item in MlflowClient(uri).get_run(run_id).inputs.dataset_inputs:
        context = {tag.key: tag.value for tag in item.tags}["mlflow.data.context"]
        found[context] = (item.dataset.name, item.dataset.digest, item.dataset.source)
    return found


def test_digits_splits_are_two_datasets_with_training_and_validation_contexts(tracking_uri):
    from encmm.trainables.config import DataConfig

    data = DataConfig(name="digits").model_dump(mode="json")
    run_id = tracking.start_run(tracking_uri, "conventions", "digits")
    tracking.log_datasets(tracking_uri, run_id, data)
    tracking.log_datasets(tracking_uri, run_id, data)  # a restarted worker: nothing added
    inputs = run_inputs(tracking_uri, run_id)
    assert set(inputs) == {"training", "validation"}
    (train_name, train_digest, source), (val_name, val_digest, _) = inputs["training"], inputs["validation"]
    assert train_name == val_name == "digits" and "digits.csv.gz" in source
    assert len(train_digest) == 16 and train_digest != val_digest
    # Stable for the same data and split, different for another split.
    again = {context: d.digest for d, context in tracking.describe_datasets(data)}
    assert again == {"training": train_digest, "validation": val_digest}
    other = tracking.describe_datasets({**data, "split_seed": 1})
    assert other[0][0].digest != train_digest


def test_image_folder_digest_follows_its_file_list_and_sizes(tmp_path):
    root = tmp_path / "pets"
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            (root / split / label / "0.png").write_bytes(b"x" * 10)
    data = {"name": "imagefolder", "root": str(root)}

    def digests() -> dict[str, str]:
        described = tracking.describe_datasets(data)
        assert {d.name for d, _ in described} == {"pets"}
        assert {context: d.source.uri for d, context in described} == {
            "training": str(root / "train"),
            "validation": str(root / "val"),
        }
        return {context: d.digest for d, context in described}

    first = digests()
    assert first["training"] != first["validation"]  # same listing, yet two datasets: both contexts stay
    (root / "train" / "cat" / "0.png").touch()  # a new mtime is the same data
    assert digests() == first
    (root / "train" / "cat" / "0.png").write_bytes(b"x" * 11)
    changed = digests()
    assert changed["training"] != first["training"] and changed["validation"] == first["validation"]
    (root / "val" / "dog" / "1.png").write_bytes(b"x")
    assert digests()["validation"] != first["validation"]


# ------------------------------------------------------------------ system metrics
def test_system_metrics_of_a_run_shorter_than_one_sampling_interval_are_logged(tracking_uri):
    from mlflow.tracking import MlflowClient

    psutil_importable()
    run_id = tracking.start_run(tracking_uri, "conventions", "short")
    monitor = tracking.start_system_metrics(tracking_uri, run_id, interval_s=60)
    time.sleep(0.5)
    monitor.finish()
    metrics = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    assert set(SYSTEM_KEYS) <= metrics.keys(), sorted(metrics)
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_training_that_fails_still_has_its_datasets_and_system_metrics_and_stops_sampling(tracking_uri):
    from mlflow.tracking import MlflowClient

    from encmm.trainables.config import DataConfig

    psutil_importable()
    run_id = tracking.start_run(tracking_uri, "conventions", "failing")
    logger = tracking.RunLogger(tracking_uri, run_id)
    with pytest.raises(RuntimeError, match="diverged"):
        with logger.track_training(DataConfig(name="digits").model_dump(mode="json")):
            time.sleep(1.0)
            raise RuntimeError("diverged")
    assert set(run_inputs(tracking_uri, run_id)) == {"training", "validation"}
    assert set(SYSTEM_KEYS) <= MlflowClient(tracking_uri).get_run(run_id).data.metrics.keys()
    assert not [t for t in threading.enumerate() if t.name in ("SystemMetricsMonitor", "encmm-telemetry")]


# ------------------------------------------------------------------ end to end: `encmm train`
@pytest.mark.ray
def test_encmm_train_run_has_a_loadable_model_system_metrics_and_its_datasets(ray_cluster, tmp_path, monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from encmm.orchestrator.cli import app

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*TINY_DIGITS, "schedule.epochs=1", "schedule.warmup_epochs=0", "resources.cpus_per_worker=0.5"]
    result = CliRunner().invoke(app, ["train", "--tracking-uri", uri, *[x for s in sets for x in ("--set", s)]])
    assert result.exit_code == 0, result.output[-3000:]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("encmm").experiment_id])
    assert run.info.status == "FINISHED"

    images = digits_val_images(4)
    expected = checkpoint_logits(f"{run.data.tags['encmm.run_dir']}/best.pt", images)
    mlflow.set_tracking_uri(uri)
    try:
        with torch.no_grad():
            logits = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/{tracking.MODEL_NAME}")(images)
    finally:
        mlflow.set_tracking_uri(None)
    assert logits.shape == (4, 10)
    torch.testing.assert_close(logits, expected)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.pt"]

    assert set(SYSTEM_KEYS) <= run.data.metrics.keys(), sorted(run.data.metrics)
    inputs = run_inputs(uri, run.info.run_id)
    assert set(inputs) == {"training", "validation"}
    assert all(name == "digits" and len(digest) == 16 for name, digest, _ in inputs.values())


def test_metrics_logged_while_telemetry_starts_reach_the_store_at_once(tracking_uri, tmp_path):
    """A fresh Train worker has not imported MLflow yet: its first log_metrics and the telemetry thread's
    first MLflow calls run together. Each step's metrics must be in the store right away, not spooled."""
    run_id = tracking.start_run(tracking_uri, "conventions", "fresh-worker")
    spool = tmp_path / "spool.jsonl"
    script = textwrap.dedent(f"""
        from encmm.orchestrator import tracking
        logger = tracking.RunLogger({tracking_uri!r}, {run_id!r}, spool={str(spool)!r})
        data = {{"name": "synthetic", "synthetic_samples": 8, "synthetic_classes": 2, "img_size": 8,
                 "val_fraction": 0.5, "split_seed": 0}}
        with logger.track_training(data):
            for step in range(3):
                logger.log_metrics({{"train/loss": 1.0 / (step + 1)}}, step)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "did not take the metrics" not in out.stderr, out.stderr[-3000:]
    assert not spool.exists()
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]


def test_a_resumed_worker_logs_its_checkpoint_epoch_only_when_the_store_lacks_it(tracking_uri):
    """The lost worker may have committed epoch 3's checkpoint and died before logging it, or after."""
    from mlflow.tracking import MlflowClient

    run_id = tracking.start_run(tracking_uri, "conventions", "resumed")
    logger = tracking.RunLogger(tracking_uri, run_id)
    logger.log_metrics({"val/acc1": 50.0, "epoch": 2}, 2)
    logger.log_metrics_if_missing({"val/acc1": 50.0, "epoch": 2}, 2)  # logged before the loss: kept once
    logger.log_metrics_if_missing({"val/acc1": 60.0, "epoch": 3}, 3)  # committed, never logged: logged now
    history = MlflowClient(tracking_uri).get_metric_history(run_id, "val/acc1")
    assert sorted((m.step, m.value) for m in history) == [(2, 50.0), (3, 60.0)]


def test_processes_opening_one_new_sqlite_store_at_once_all_get_its_experiment(tmp_path):
    """Two `encmm sweep` started together in a new folder both create mlflow.db: MLflow's table creation
    is not safe against itself (one fails with "duplicate column name"). Four processes, released together."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    go = time.time() + 8  # every process imported MLflow by then
    code = textwrap.dedent(
        f"""
        import time
        from encmm.orchestrator import tracking
        time.sleep(max(0.0, {go} - time.time()))
        print(tracking.ensure_experiment({uri!r}, "encmm"))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(proc.wait(120), *proc.communicate()) for proc in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-800:] for rc, _, err in results if rc]
    ids = {out.strip() for _, out, _ in results}
    assert len(ids) == 1, ids  # one experiment, whoever created it
    assert ids == {tracking.ensure_experiment(uri, "encmm")}
