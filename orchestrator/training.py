"""``encmm train``: one run as a Ray Train job, tracked in MLflow.

Order matters: validate everything (config, data, models, teacher, tracking store) first; only then
create the MLflow run and the output folder, so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import threading
import time
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import yaml

from encmm.orchestrator import tracking
from encmm.orchestrator.experiments import DEFAULT_TRAIN, resolve_experiment
from encmm.orchestrator.interrupts import Interrupted
from encmm.orchestrator.ray_cluster import init_ray
from encmm.trainables import storage
from encmm.trainables.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    flatten,
    load_train_config,
    validate_model,
    with_absolute_paths,
)
from encmm.trainables.preflight import check_train_config

log = logging.getLogger(__name__)
PROGRESS_POLL_S = 2.0


def resolve_teacher_checkpoint(cfg: TrainConfig, uri: str, source: str) -> str | None:
    """For ``teacher.source=run``: the local copy of that run's best checkpoint (downloaded once)."""
    if cfg.teacher.source != "run" or not cfg.kd.uses_teacher:
        return None
    cache = Path(cfg.tracking.output_dir) / ".teachers" / cfg.teacher.run_id
    return str(tracking.fetch_best_checkpoint(uri, cfg.teacher.run_id, cache, f"{source}: teacher.run_id"))


def load_config(
    config: TrainConfig | Mapping[str, Any] | str | PathLike | None, overrides: list[str]
) -> tuple[TrainConfig, str]:
    """The training config ``config`` gives, with the dotted ``overrides`` applied, validated; and the
    source bad input is reported against. ``config``: a file, a shipped experiment's name, ``None`` (the
    shipped default), a plain dict (``<dict>`` in errors) or a :class:`TrainConfig` (``<TrainConfig>``)."""
    if isinstance(config, (TrainConfig, Mapping)):
        source = "<TrainConfig>" if isinstance(config, TrainConfig) else "<dict>"
        raw = config.model_dump(mode="json") if isinstance(config, TrainConfig) else copy.deepcopy(dict(config))
        return validate_model(TrainConfig, apply_overrides(raw, overrides), source), source
    file = resolve_experiment(config, DEFAULT_TRAIN)
    return load_train_config(file, overrides), str(config) if config else str(file)


def prepare_train(
    config_path: TrainConfig | Mapping[str, Any] | str | PathLike | None, overrides: list[str], tracking_uri: str | None
) -> tuple:
    """Everything that can fail on bad input, with no side effect but a teacher download cache.
    ``config_path`` is anything :func:`load_config` reads."""
    loaded, source = load_config(config_path, overrides)
    cfg = with_absolute_paths(loaded)
    uri = tracking.resolve_tracking_uri(tracking_uri, cfg.tracking.uri)
    tracking.check_tracking(uri)  # creates nothing; needed first when the teacher is an MLflow run
    teacher_checkpoint = resolve_teacher_checkpoint(cfg, uri, source)
    plan = check_train_config(cfg, source, teacher_checkpoint=teacher_checkpoint)
    return cfg, uri, teacher_checkpoint, plan


def write_resolved_config(cfg: TrainConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


@contextlib.contextmanager
def epoch_progress(uri: str, run_id: str, label: str, epochs: int, poll_s: float = PROGRESS_POLL_S):
    """While the body runs, one ``label: epoch k/N, val/acc1 ...`` line per epoch the run has logged, and
    one ``label: workers restarted; resumed at epoch E from ...`` line each time Train restarted its workers.

    The epochs run on a Train worker (its own process, possibly another node), which logs each epoch's
    metrics to the run: this thread reads them back from MLflow, the one channel both sides share."""
    stop = threading.Event()

    def watch() -> None:
        shown, resumed = -1, None
        while True:
            stopped = stop.wait(poll_s)
            try:
                history = tracking.metric_history(uri, run_id, "val/acc1")
                note = tracking.run_tags(uri, run_id).get(tracking.RESUMED_TAG)
            except Exception:  # noqa: BLE001 - progress lines are best effort; the run's own errors surface
                history, note = [], resumed
            if note != resumed:  # the workers were restarted (a lost worker or node) and resumed
                log.warning(f"{label}: workers restarted; resumed at {note}")
                resumed = note
            for step, value in history:
                if step > shown:
                    log.info(f"{label}: epoch {step + 1}/{epochs}, val/acc1 {value:.2f}")
                    shown = step
            if stopped:
                return

    thread = threading.Thread(target=watch, name="encmm-epoch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def fit_and_release(trainer) -> object:
    """``trainer.fit()``, then give back the SIGINT handler Train installs on the main thread: its closure
    holds the Train controller's actor handle, which would keep that actor (~0.7 GB) alive for the rest
    of this process (e.g. the whole sweep after its teacher run).

    On Ctrl-C that handler aborts the controller and ends ``fit()`` with ``sys.exit(0)`` (Ray 2.60,
    ``DataParallelTrainer._register_sigint_handler``); that is the user's interrupt, raised as one.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit as exc:
        raise Interrupted(signal.SIGINT) from exc
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def check_room_for_input_tasks(cfg: TrainConfig, cluster: dict) -> None:
    """A ``data.loader=ray_data`` run must leave the cluster CPUs for its Ray Data input tasks (scheduled
    outside its workers' bundles): refused in one line before any run is created, where it would wait forever."""
    from encmm.trainables.execution import Execution, free_cpus_for_input

    needed = free_cpus_for_input(cfg)
    held = Execution.of(cfg.resources, lone_run=True).total(0.0)["CPU"]
    left = cluster.get("CPU", 0.0) - held
    if needed and left < needed - 1e-9:
        raise ConfigError(
            f"data.loader: ray_data needs {needed:g} CPU of the cluster free for its input tasks; the run's workers "
            f"hold {held:g} of its {cluster.get('CPU', 0.0):g} CPU: lower resources.cpus_per_worker or "
            "resources.workers, or add a node"
        )


def run_train(
    cfg: TrainConfig,
    uri: str,
    *,
    teacher_checkpoint: str | None = None,
    address: str | None = None,
    tags: dict | None = None,
    progress_label: str | None = None,
) -> dict:
    """Run one validated config on Ray Train; returns the final metrics. Ends the MLflow run in all cases."""
    import ray

    from encmm.trainables.execution import Execution
    from encmm.trainables.ray_worker import BEST_FILE, build_trainer, final_metrics

    init_ray(address)
    check_room_for_input_tasks(cfg, ray.cluster_resources())
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.tracking.output_dir) / run_name  # config, metric spool, best.pt: local files
    checkpoints = storage.as_location(cfg.tracking.checkpoint_root())  # Ray's storage_path: maybe a bucket
    run_id = tracking.start_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        params=flatten(cfg.model_dump(mode="json")),
        tags={
            "encmm.kind": "train",
            "encmm.run_dir": str(run_dir),
            "encmm.checkpoint_dir": str(storage.child(checkpoints, run_name)),
            **(tags or {}),
        },
    )
    tracking.close_runs_if_process_dies(uri, [run_id])
    logger = tracking.RunLogger(uri, run_id, spool=str(run_dir / tracking.SPOOL_FILE))
    with tracking.ending_run(uri, run_id):
        logger.log_artifact(write_resolved_config(cfg, run_dir))
        trainer = build_trainer(
            cfg,
            run_name=run_name,
            storage_path=str(checkpoints),
            log=logger,
            teacher_checkpoint=teacher_checkpoint,
            execution=Execution.of(cfg.resources, lone_run=True),  # no Tune retry: Ray Train restarts workers
        )
        with epoch_progress(uri, run_id, progress_label or f"[{cfg.name}]", cfg.schedule.epochs):
            final = final_metrics(fit_and_release(trainer))
        logger.flush()  # metrics spooled while the store was unreachable, with MLflow's own retries
        best = storage.child(checkpoints, run_name, BEST_FILE)
        if storage.exists(best):
            logger.log_artifact(storage.local_copy(best, run_dir), "checkpoints")
        summary = {k: v for k, v in final.items() if k.startswith(("val/", "best/", "train/"))}
        logger.log_metrics({f"final/{k}": v for k, v in summary.items()}, step=int(final.get("epoch", 0)))
    return {"run_id": run_id, "run_dir": str(run_dir), **final}
