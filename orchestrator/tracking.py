"""The one module that speaks MLflow.

encmm owns its runs (no Ray MLflow callbacks: they duplicate runs on trial restarts). The driver
creates a run, hands a picklable :class:`RunLogger` (URI + run id) to the Ray Train rank-0 worker,
and ends the run FINISHED or FAILED. Params are flat (``kd.alpha``) so the UI's parallel-coordinates
chart works; per-epoch metrics use ``step=epoch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "encmm"
SPOOL_FILE = "mlflow-pending.jsonl"  # per run folder: metrics waiting for an unreachable store
MODEL_NAME = "model"  # the trained network as an MLflow model: runs:/<run id>/model
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL wins when set


class TrackingError(RuntimeError):
    """The tracking store cannot be used (one-line message)."""


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > config > ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Ray workers chdir into their own folders: make relative SQLite paths absolute.
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


_READY_SQLITE_STORES: set[str] = set()  # created (or found) by this process, under the lock


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and uri not in _READY_SQLITE_STORES:
        _open_sqlite_store_once(uri)
    return MlflowClient(tracking_uri=uri)


def _open_sqlite_store_once(uri: str) -> None:
    """Open a SQLite store while holding an exclusive lock on it. MLflow creates a new store's tables on first
    use (its schema migrations); two processes doing that at once, say two ``encmm sweep`` started together
    in one folder, fail with ``duplicate column name``. The lock file is in the temp folder (one per database
    path), so the store's folder holds only what MLflow writes."""
    import fcntl
    import tempfile

    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///")).resolve()
    key = hashlib.sha1(str(db).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"encmm-sqlite-{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates and migrates the tables
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_SQLITE_STORES.add(uri)


def artifact_location_for(uri: str, experiment: str) -> str | None:
    """A SQLite store keeps artifacts in an absolute folder beside the database; a server decides itself."""
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / safe_name(experiment)
        return root.resolve().as_uri()
    return None


def check_tracking(uri: str) -> None:
    """Fail fast, before any work, when the store cannot be reached or opened. Creates nothing:
    a SQLite store that does not exist yet only needs a writable folder."""
    try:
        if uri.startswith("sqlite:///"):
            db = Path(uri.removeprefix("sqlite:///"))
            if not db.parent.is_dir():
                raise TrackingError(f"MLflow store folder {db.parent} does not exist")
            if not os.access(db.parent, os.W_OK):
                raise TrackingError(f"MLflow store folder {db.parent} is not writable")
            if db.exists():
                _client(uri).search_experiments(max_results=1)
        elif uri.startswith(("http://", "https://")):
            import urllib.request

            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered {response.status}")
        else:
            _client(uri).search_experiments(max_results=1)
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "unusable"; say so in one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise TrackingError(
            f"MLflow tracking store {uri} is not reachable: {exc.__class__.__name__}: {detail}"
        ) from None


def store_exists(uri: str) -> bool:
    """False for a SQLite store not created yet (it holds no runs; opening it would create it)."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).is_file()


def fetch_best_checkpoint(uri: str, run_id: str, dest: str | Path, label: str) -> Path:
    """Local copy of a FINISHED encmm run's ``checkpoints/best.pt`` (kept in ``dest``, fetched once).

    Raises :class:`TrackingError` with one line starting with ``label`` when the run cannot serve one;
    never creates a store that does not exist.
    """
    if not store_exists(uri):
        raise TrackingError(f"{label}: no MLflow run {run_id!r}: the store {uri} does not exist")
    try:
        run = get_run(uri, run_id)
    except Exception:  # noqa: BLE001 - MLflow raises several types for a missing run
        raise TrackingError(f"{label}: no MLflow run {run_id!r} in {uri}") from None
    if run.info.status != "FINISHED":
        raise TrackingError(f"{label}: run {run_id} is {run.info.status}, not FINISHED")
    local = Path(dest) / "best.pt"
    if local.is_file():
        return local
    try:
        return download_artifact(uri, run_id, "checkpoints/best.pt", dest)
    except Exception:  # noqa: BLE001
        raise TrackingError(f"{label}: run {run_id} has no checkpoints/best.pt artifact") from None


def ensure_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location_for(uri, name))
    except Exception:  # noqa: BLE001 - another process created it since (MLflow: RESOURCE_ALREADY_EXISTS)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def safe_name(text: str, limit: int = 100, empty: str = "run") -> str:
    """One folder name from any text: never a path, never ``.`` or ``..``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).lstrip(".")[:limit] or empty


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    params: dict | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a RUNNING run with flat params and tags; returns its id."""
    client = _client(uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name, tags=all_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(key, _param_value(value)) for key, value in params.items()]
    client = _client(uri)
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=items[start : start + 100])


def end_run(uri: str, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    client = _client(uri)
    if error:
        client.set_tag(run_id, "encmm.error", error[:5000])
    client.set_terminated(run_id, status=status)


@contextmanager
def ending_run(uri: str, run_id: str):
    """The run ends FINISHED when the block completes; FAILED (KILLED on Ctrl-C) with the error in the
    ``encmm.error`` tag if it raises (the exception goes on)."""
    import traceback

    try:
        yield
        end_run(uri, run_id, "FINISHED")
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        end_run(uri, run_id, status, error="".join(traceback.format_exception_only(type(exc), exc)))
        raise


def close_runs_if_process_dies(uri: str, run_ids: list[str], children_of: list[str] | None = None) -> None:
    """Start a watchdog (``orchestrator.watchdog``) that ends these runs FAILED if this process dies
    with them still RUNNING (SIGKILL, OOM): no run is left RUNNING by a crash nothing could catch."""
    import atexit
    import subprocess
    import sys

    command = [sys.executable, "-m", "encmm.orchestrator.watchdog", "--pid", str(os.getpid()), "--uri", uri]
    for run_id in run_ids:
        command += ["--run", run_id]
    for run_id in children_of or []:
        command += ["--children-of", run_id]
    watchdog = subprocess.Popen(
        command, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # A process that exits on its own has closed its runs (finally/except blocks): no need to watch them.
    # Only a death that skips atexit (SIGKILL, OOM) leaves the watchdog to act.
    atexit.register(watchdog.kill)


def get_run(uri: str, run_id: str):
    return _client(uri).get_run(run_id)


def download_artifact(uri: str, run_id: str, path: str, dest: str | Path) -> Path:
    """Fetch one artifact file of a run into ``dest`` (a folder); returns the local file. No progress bar:
    a CLI error after a failed download stays one line."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    Path(dest).mkdir(parents=True, exist_ok=True)
    return Path(_client(uri).download_artifacts(run_id, path, str(dest)))


@contextmanager
def _fail_fast():
    """MLflow's HTTP client retries a failed call for minutes by default; a training loop must not wait:
    one quick try, and the caller keeps what did not get through."""
    saved = {key: os.environ.get(key) for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def loggable_metrics(metrics: dict) -> dict[str, float]:
    """The entries of a training loop's metrics dict that :class:`RunLogger` sends: numbers, not ``epoch``
    (the step says which epoch)."""
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and key != "epoch"}


def _spool_lines(metrics: list) -> str:
    return "".join(
        json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n" for m in metrics
    )


RESUMED_TAG = "encmm.resumed"  # "epoch E from <checkpoint>": set each time a restarted worker resumes


@dataclass(frozen=True)
class RunLogger:
    """Picklable handle that rank 0 of a Ray Train job uses to log into the driver's run.

    With a ``spool`` file, metrics the store cannot take (server down, network cut) are appended to it
    and training goes on; every later call sends the spool first, and the driver's :meth:`flush` at the
    end of the run sends what is left (with MLflow's own retries), so no metric is lost.
    """

    uri: str
    run_id: str
    spool: str | None = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in loggable_metrics(metrics).items()]
        if self.spool is None:
            _client(self.uri).log_batch(self.run_id, metrics=items)
            return
        try:
            with _fail_fast():
                self.flush()
                _client(self.uri).log_batch(self.run_id, metrics=items)
        except Exception as exc:  # noqa: BLE001 - any store failure: keep the metrics, keep training
            spool = Path(self.spool)
            spool.parent.mkdir(parents=True, exist_ok=True)
            with spool.open("a") as handle:
                handle.write(_spool_lines(items))
            log.warning(
                f"encmm: warning: MLflow store {self.uri} did not take the metrics of step {step} "
                f"({exc.__class__.__name__}); kept in {spool}, sent when it is back",
            )

    def note_resume(self, epoch: int, source: object) -> None:
        """Tag the run with where a restarted worker resumed (:data:`RESUMED_TAG`: the driver's progress
        lines show it); best effort, like every progress line."""
        try:
            with _fail_fast():
                set_tags(self.uri, self.run_id, {RESUMED_TAG: f"epoch {epoch} from {source}"})
        except Exception:  # noqa: BLE001 - the store is unreachable: the worker's own log line remains
            pass

    def log_metrics_if_missing(self, metrics: dict, step: int) -> None:
        """:meth:`log_metrics`, unless the store already holds ``step`` of these metrics: a resumed worker
        logs its checkpoint's epoch this way, in case the lost worker had committed it but not logged it."""
        keys = sorted(loggable_metrics(metrics))
        if not keys:
            return
        try:
            with _fail_fast():
                logged = any(m.step == step for m in _client(self.uri).get_metric_history(self.run_id, keys[0]))
        except Exception:  # noqa: BLE001 - the store is unreachable: log_metrics spools them
            logged = False
        if not logged:
            self.log_metrics(metrics, step)

    def flush(self) -> int:
        """Send the spooled metrics (oldest first); returns how many. Raises if the store still refuses."""
        from mlflow.entities import Metric

        spool = Path(self.spool) if self.spool else None
        if spool is None or not spool.is_file():
            return 0
        pending = [Metric(**json.loads(line)) for line in spool.read_text().splitlines() if line.strip()]
        for start in range(0, len(pending), 1000):  # MLflow's batch limit
            _client(self.uri).log_batch(self.run_id, metrics=pending[start : start + 1000])
            rest = pending[start + 1000 :]  # rewrite what is left: a failure later never re-sends a batch
            spool.write_text(_spool_lines(rest))
        spool.unlink(missing_ok=True)
        return len(pending)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _client(self.uri).log_artifact(self.run_id, str(path), artifact_path)

    def set_tag(self, key: str, value: str) -> None:
        _client(self.uri).set_tag(self.run_id, key, value)

    def __call__(self, metrics: dict, step: int) -> None:
        self.log_metrics(metrics, step)

    @contextmanager
    def track_training(self, data: dict):
        """Around the epochs of rank 0: names the run's data (:func:`log_datasets`) and samples system
        metrics (:func:`start_system_metrics`) until the loop ends, also when it fails. Both start in a
        background thread: a long file listing or a slow store never delays training."""
        telemetry = _TrainingTelemetry(self.uri, self.run_id, data)
        telemetry.start()
        try:
            yield
        finally:
            telemetry.stop()

    def log_trained_model(self, checkpoint: str | Path, example) -> str | None:
        """:func:`log_trained_model` on this run; never raises (a warning says what failed)."""
        try:
            return log_trained_model(self.uri, self.run_id, checkpoint, example)
        except Exception as exc:  # noqa: BLE001 - best.pt is logged anyway: the run must not fail here
            log.warning(
                f"encmm: warning: the trained model of run {self.run_id} was not logged as an MLflow model "
                f"({exc.__class__.__name__}: {_first_line(exc)})",
            )
            return None


def find_runs(uri: str, experiment: str, tags: dict[str, str], statuses: tuple[str, ...] | None = None) -> list:
    """Runs of ``experiment`` carrying all ``tags`` (newest first), optionally filtered by status."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs(
        [exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1000
    )
    return [r for r in runs if statuses is None or r.info.status in statuses]


def attach_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    key_tags: dict[str, str],
    params: dict | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
) -> str:
    """The run identified by ``key_tags`` (set back to RUNNING), or a new one: never a duplicate."""
    existing = find_runs(uri, experiment, key_tags)
    if existing:
        run_id = existing[0].info.run_id
        set_status(uri, run_id, "RUNNING")
        return run_id
    return start_run(
        uri, experiment, run_name, params=params, tags={**(tags or {}), **key_tags}, parent_run_id=parent_run_id
    )


def log_metrics(uri: str, run_id: str, metrics: dict, step: int = 0) -> None:
    RunLogger(uri, run_id).log_metrics(metrics, step)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def set_status(uri: str, run_id: str, status: str) -> None:
    """Re-open (RUNNING) a run that is resumed; use :func:`end_run` to close one."""
    _client(uri).update_run(run_id, status=status)


# ------------------------------------------------------------------ reading a sweep back (encmm report / ui)
def find_sweep_run(uri: str, name_or_id: str):
    """The parent run of a sweep, by its name (tag ``encmm.sweep_name``) or its run id.

    Searches every experiment of the store; raises :class:`TrackingError` (one line) when none matches.
    """
    if not store_exists(uri):
        raise TrackingError(f"no sweep {name_or_id!r}: the MLflow store {uri} does not exist")
    client = _client(uri)
    if re.fullmatch(r"[0-9a-f]{32}", name_or_id):
        try:
            run = client.get_run(name_or_id)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing run
            run = None
        if run is not None:
            if run.data.tags.get("encmm.kind") != "sweep":
                raise TrackingError(
                    f"run {name_or_id} is not an encmm sweep (tag encmm.kind is {run.data.tags.get('encmm.kind')!r})"
                )
            return run
    experiment_ids = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    safe = name_or_id.replace("'", "")
    runs = (
        client.search_runs(
            experiment_ids,
            filter_string=f"tags.`encmm.kind` = 'sweep' and tags.`encmm.sweep_name` = '{safe}'",
            order_by=["attributes.start_time DESC"],
            max_results=10,
        )
        if experiment_ids
        else []
    )
    if not runs:
        raise TrackingError(f"no sweep named {name_or_id!r} (and no sweep run with that id) in {uri}")
    if len(runs) > 1:  # two sweeps that chose the same name (other folders, one store): never pick one
        ids = ", ".join(run.info.run_id for run in runs)
        raise TrackingError(
            f"sweep name {name_or_id!r} is ambiguous in {uri}: {len(runs)} sweep runs have it ({ids}); give a run id"
        )
    return runs[0]


def list_child_runs(uri: str, parent_run_id: str) -> list:
    """Every run whose ``mlflow.parentRunId`` is ``parent_run_id`` (any status), oldest first."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )


def experiment_name(uri: str, experiment_id: str) -> str:
    return _client(uri).get_experiment(experiment_id).name


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(_client(uri).get_run(run_id).data.tags)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value), ...]`` of one metric of a run, by step (the last value logged per step)."""
    by_step = {}
    for metric in sorted(_client(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp):
        by_step[metric.step] = metric.value
    return sorted(by_step.items())


def log_artifacts(uri: str, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
    """Every file of ``folder`` onto a run (under ``artifact_path``)."""
    _client(uri).log_artifacts(run_id, str(folder), artifact_path)


def list_artifact_paths(uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in _client(uri).list_artifacts(run_id, path)]


def experiment_id(uri: str, name: str) -> str | None:
    experiment = _client(uri).get_experiment_by_name(name)
    return None if experiment is None else experiment.experiment_id


# ------------------------------------------------------------------ MLflow conventions: data, system metrics, model
def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else ""


def _digest(*parts: bytes | str) -> str:
    """16 hex digits of sha256 over ``parts`` (MLflow keeps a dataset digest in 36 characters)."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def folder_listing(folder: str | Path) -> bytes:
    """Every file under ``folder`` as ``relative/path<TAB>size`` lines, sorted: what identifies a folder of
    images, read from the directory entries without opening a file."""
    lines, pending = [], [""]
    while pending:  # os.scandir, not os.walk + Path: ~4 us a file here (ImageNet: ~5 s, in a thread)
        relative = pending.pop()
        with os.scandir(os.path.join(folder, relative)) as entries:
            for entry in entries:
                path = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    pending.append(path)
                elif entry.is_file():
                    lines.append(f"{path}\t{entry.stat().st_size}")
    return "\n".join(sorted(lines)).encode()


def describe_datasets(data: dict) -> list[tuple[Any, str]]:
    """``[(dataset, context), ...]``: the training and validation splits of a ``DataConfig`` (json dump) as
    MLflow ``MetaDataset``s, contexts ``training`` / ``validation``.

    Each split is its own dataset (MLflow keeps one input per run and dataset, whatever its context):
    - digits: name ``digits``, source scikit-learn's ``digits.csv.gz``, digest of the image and label arrays
      with the split (``val_fraction``, ``split_seed``, train or val);
    - imagefolder: name = the root folder's name, source ``<root>/train`` and ``<root>/val``, digest of the
      split and its folder's :func:`folder_listing`;
    - timm: name = the timm dataset name (``torch/cifar10``), source its root, digest of the name, the split
      and the root's listing;
    - synthetic: name ``synthetic``, a code source, digest of its generator settings.
    """
    from importlib.resources import files

    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import CodeDatasetSource, LocalArtifactDatasetSource

    splits = (("train", "training"), ("val", "validation"))
    name = data["name"]
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        arrays = _digest(digits.images.tobytes(), digits.target.tobytes())
        split = f"val_fraction={data['val_fraction']};split_seed={data['split_seed']}"
        source = LocalArtifactDatasetSource(str(files("sklearn.datasets.data") / "digits.csv.gz"))
        return [
            (MetaDataset(source, name="digits", digest=_digest(arrays, split, part)), context)
            for part, context in splits
        ]
    if name == "imagefolder":
        root = Path(data["root"])
        return [
            (
                MetaDataset(
                    LocalArtifactDatasetSource(str(root / part)),
                    name=root.name,
                    digest=_digest(part, folder_listing(root / part)),
                ),
                context,
            )
            for part, context in splits
        ]
    if name == "timm":
        root = Path(data["root"] or Path.cwd() / "data")  # trainables.data's default root
        listing = folder_listing(root) if root.is_dir() else b""
        return [
            (
                MetaDataset(
                    LocalArtifactDatasetSource(str(root)),
                    name=data["dataset"],
                    digest=_digest(data["dataset"], part, listing),
                ),
                context,
            )
            for part, context in splits
        ]
    settings = {
        key: data[key] for key in ("synthetic_samples", "synthetic_classes", "img_size", "val_fraction", "split_seed")
    }
    source = CodeDatasetSource({"encmm.generator": "encmm.trainables.data.build_synthetic", **settings})
    return [
        (MetaDataset(source, name=name, digest=_digest(json.dumps(settings, sort_keys=True), part)), context)
        for part, context in splits
    ]


def log_datasets(uri: str, run_id: str, data: dict) -> list[tuple[str, str, str]]:
    """Log the run's data as MLflow dataset inputs (what ``mlflow.log_input`` does, on a run by id);
    returns ``[(name, digest, context), ...]``. Logging the same datasets again adds nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    described = describe_datasets(data)
    _client(uri).log_inputs(
        run_id,
        [
            DatasetInput(Dataset(**dataset.to_dict()), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
            for dataset, context in described
        ],
    )
    return [(dataset.name, dataset.digest, context) for dataset, context in described]


def start_system_metrics(uri: str, run_id: str, interval_s: float = SYSTEM_METRICS_INTERVAL_S):
    """Start MLflow's system-metrics monitor on a run by id (no active run needed): ``system/*`` metrics
    (CPU, memory, disk, network; GPU where ``nvidia-ml-py`` is installed and finds one), one aggregated
    sample every ``interval_s``, steps continuing those already logged (a restarted worker). Returns the
    monitor; ``monitor.finish()`` stops it and logs one last sample, so a run shorter than one interval has
    its metrics too. The monitor also stops by itself once the run is no longer RUNNING."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class FinalSampleMonitor(SystemMetricsMonitor):
        def finish(self):
            started = self._process is not None
            super().finish()  # MLflow's own loop drops the samples of an unfinished interval
            if started:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()

    monitor = FinalSampleMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def _import_mlflow_modules_of_telemetry() -> None:
    """Import, in the calling thread, the MLflow modules that the telemetry thread and the training loop's
    first :meth:`RunLogger.log_metrics` both import. MLflow's modules import each other: two threads
    importing them at once can each be handed the other's half-initialised module (seen in fresh Ray Train
    workers as an ImportError, then AttributeErrors on every later step, so metrics were spooled until the
    run ended instead of being live)."""
    import mlflow  # noqa: F401
    import mlflow.data.meta_dataset  # noqa: F401
    import mlflow.data.sources  # noqa: F401
    import mlflow.entities  # noqa: F401
    import mlflow.system_metrics.system_metrics_monitor  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import mlflow.utils.mlflow_tags  # noqa: F401


class _TrainingTelemetry:
    """Datasets, then system metrics, started in a daemon thread; :meth:`stop` ends both."""

    def __init__(self, uri: str, run_id: str, data: dict):
        self.uri, self.run_id, self.data = uri, run_id, data
        self.lock = threading.Lock()
        self.stopped = False
        self.monitor = None
        self.thread = threading.Thread(target=self._begin, name="encmm-telemetry", daemon=True)

    def start(self) -> None:
        _import_mlflow_modules_of_telemetry()
        self.thread.start()

    def _begin(self) -> None:
        try:
            log_datasets(self.uri, self.run_id, self.data)
        except Exception as exc:  # noqa: BLE001 - lineage is best effort: training goes on without it
            log.warning(
                f"encmm: warning: the datasets of run {self.run_id} were not logged "
                f"({exc.__class__.__name__}: {_first_line(exc)})",
            )
        with self.lock:
            if self.stopped:
                return
            try:
                self.monitor = start_system_metrics(self.uri, self.run_id)
            except Exception as exc:  # noqa: BLE001 - e.g. psutil missing
                log.warning(
                    f"encmm: warning: no system metrics for run {self.run_id} "
                    f"({exc.__class__.__name__}: {_first_line(exc)})",
                )

    def stop(self, timeout_s: float = 60.0) -> None:
        self.thread.join(timeout_s)  # a listing still running after that is left to finish on its own
        if not self.lock.acquire(timeout=timeout_s):
            return
        try:
            self.stopped = True
            if self.monitor is not None:
                self.monitor.finish()
        finally:
            self.lock.release()


@contextmanager
def _fluent_tracking_uri(uri: str):
    """``mlflow.<flavor>.log_model`` reads the process-wide tracking URI: point it at ``uri`` meanwhile."""
    import mlflow
    from mlflow.tracking import is_tracking_uri_set

    previous = mlflow.get_tracking_uri() if is_tracking_uri_set() else None  # None: back to unset
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_trained_model(uri: str, run_id: str, checkpoint: str | Path, example, *, name: str = MODEL_NAME) -> str:
    """Log the network an encmm checkpoint holds as an MLflow model of the run; returns its ``models:/`` URI.

    The model is the inference network :func:`trainables.teacher.model_from_checkpoint` rebuilds (never the
    projector), in eval mode, saved with ``torch.export`` (MLflow's ``pt2`` format): loading it needs torch
    only, neither encmm nor pickle. ``example``: images ``[B, 3, S, S]`` float32 with B >= 2 (torch.export
    makes a batch size of 1 static); they give the signature (tensor in, logits ``[B, K]`` out) and the
    input example. ``mlflow.pytorch.load_model(f"runs:/{run_id}/{name}")`` loads it, ``mlflow.register_model``
    registers it. The logged model is created in the run's experiment (MLflow's default would be the active
    experiment) and linked to the run at the best epoch, with the run's params. Idempotent: a run that
    already has a READY model of that name (a retried trial) keeps it.
    """
    import importlib.metadata

    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import infer_signature

    from encmm.trainables.teacher import load_checkpoint_file, model_from_checkpoint

    client = _client(uri)
    run = client.get_run(run_id)
    experiment = run.info.experiment_id
    for found in client.search_logged_models(
        [experiment], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'"
    ):
        if found.status == LoggedModelStatus.READY:
            return f"models:/{found.model_id}"
        client.delete_logged_model(found.model_id)  # left PENDING/FAILED by a crash: runs:/ must not find it
    ckpt = load_checkpoint_file(checkpoint)
    model = model_from_checkpoint(ckpt)[0].eval()
    images = np.ascontiguousarray(np.asarray(example, dtype=np.float32))
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    logged = client.create_logged_model(
        experiment,
        name=name,
        source_run_id=run_id,
        params=run.data.params,
        tags={"encmm.checkpoint": "checkpoints/best.pt", "encmm.best_epoch": str(ckpt.get("epoch"))},
    )
    try:
        with _fluent_tracking_uri(uri):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=logged.model_id,
                run_id=run_id,
                step=int(ckpt.get("epoch") or 0),
                signature=infer_signature(images, logits),
                input_example=images,
                serialization_format="pt2",
                # Explicit: MLflow's requirement inference re-loads the model in a subprocess (seconds).
                pip_requirements=[f"torch=={importlib.metadata.version('torch')}"],
            )
    except BaseException:
        with suppress(Exception):  # FAILED, without artifacts: runs:/ must not find it
            client.delete_logged_model(logged.model_id)
        raise
    return info.model_uri
