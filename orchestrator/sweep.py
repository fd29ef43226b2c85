"""The Ray Tune sweep (Train V2 pattern): a function trainable per trial launches a ``TorchTrainer``.

Tune's search-space types appear in this module only. Each trial:
1. re-attaches to (or creates) its MLflow child run, keyed by the sweep's parent run id and the Tune
   trial id, so a restarted trial never duplicates its run;
2. runs ``trainables.ray_worker.build_trainer(...).fit()`` with a run name derived from the trial id and
   a shared storage path (a retried trial resumes from its Train checkpoint), reporting per-epoch
   metrics to Tune through ``TuneReportCallback`` so ASHA sees them;
3. logs final metrics, the mismatch metrics of its student and the best checkpoint; FINISHED or FAILED.
   The Train loop's rank 0 (this process in local mode) adds the MLflow conventions of every training
   run: the datasets as inputs, ``system/*`` metrics and the best student as an MLflow model
   (``trainables.ray_worker``, ``tracking.RunLogger``).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import traceback
from typing import Any

import ray
from ray import tune

from encmm.orchestrator import tracking
from encmm.orchestrator.sweep_config import SearchSpace, grid_axes, trial_config_dict
from encmm.orchestrator.sweep_plan import RuntimePlan
from encmm.trainables import storage
from encmm.trainables.config import TrainConfig, flatten
from encmm.trainables.execution import Execution

log = logging.getLogger(__name__)

METRIC = "val/acc1"
# Set in the sweep's driver once Tune has started a trial's process (and when Tune is done): the driver's
# own background work waits for it, so that it does not slow down Tune's start on a small machine.
TRIAL_STARTED = threading.Event()


def param_space(search: SearchSpace) -> dict[str, Any]:
    """Grid axes -> ``tune.grid_search``; sampled axes -> Tune's distributions."""
    space: dict[str, Any] = {key: tune.grid_search(values) for key, values in grid_axes(search).items()}
    for key, axis in search.sample.items():
        if axis.distribution == "uniform":
            space[key] = tune.uniform(axis.low, axis.high)
        elif axis.distribution == "loguniform":
            space[key] = tune.loguniform(axis.low, axis.high)
        elif axis.distribution == "randint":
            space[key] = tune.randint(int(axis.low), int(axis.high))
        else:
            space[key] = tune.choice(axis.values)
    return space


def trial_train_config(plan: RuntimePlan, assignment: dict[str, Any], trial_id: str) -> TrainConfig:
    tree = trial_config_dict(plan.base, assignment, plan.search.arms)
    tree["name"] = f"{plan.name}-{trial_id}"[:100]
    return TrainConfig.model_validate(tree)


def trial_checkpoint_root(cfg: TrainConfig, plan: RuntimePlan):
    """Where the sweep's trials keep checkpoints: ``<sweep_dir>/trials``, or the same path under
    ``tracking.storage`` (a bucket, say) when it is set."""
    if cfg.tracking.storage is None:
        return plan.sweep_dir / "trials"
    return storage.child(storage.as_location(cfg.tracking.storage), "sweeps", plan.sweep_dir.name, "trials")


def run_trial(config: dict[str, Any], plan: RuntimePlan) -> None:
    """Tune function trainable: one trial = one Ray Train job + its MLflow child run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from encmm.trainables.engine import NonFiniteLossError
    from encmm.trainables.mismatch import measure_mismatch
    from encmm.trainables.ray_worker import BEST_FILE, build_trainer, final_metrics

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_train_config(plan, config, trial_id)
    uri = plan.uri
    key_tags = {"encmm.parent_run_id": plan.parent_run_id, "encmm.trial_id": trial_id}
    done = tracking.find_runs(uri, plan.experiment, key_tags, statuses=("FINISHED",))
    if done:  # the sweep driver died after this trial finished, before Tune saved that: do not re-run it
        final = {k.removeprefix("final/"): v for k, v in done[0].data.metrics.items() if k.startswith("final/")}
        tune.report(final)
        return
    run_id = tracking.attach_run(
        uri,
        plan.experiment,
        f"{plan.name}/{trial_id}",
        key_tags=key_tags,
        params=flatten(cfg.model_dump(mode="json")),
        tags={
            "encmm.kind": "trial",
            "encmm.sweep_name": plan.name,
            "encmm.assignment": json.dumps(config, sort_keys=True, default=str),
            **({"encmm.arm": str(config["arm"])} if "arm" in config else {}),
        },
        parent_run_id=plan.parent_run_id,
    )
    # Where this attempt runs (a retry after a lost node runs elsewhere): the node a user looks up in Ray.
    tracking.set_tags(uri, run_id, {"encmm.node_id": ray.get_runtime_context().get_node_id()})
    local = plan.sweep_dir / "trials"  # the metric spool and a local best.pt
    checkpoints = trial_checkpoint_root(cfg, plan)
    logger = tracking.RunLogger(uri, run_id, spool=str(local / trial_id / tracking.SPOOL_FILE))
    try:
        # In local mode the Train loop runs in this process and reports to Tune itself (building a
        # TuneReportCallback would start a queue actor for nothing).
        execution = Execution.of(cfg.resources)
        callbacks = execution.reports_through_callbacks
        trainer = build_trainer(
            cfg,
            run_name=trial_id,
            storage_path=str(checkpoints),
            log=logger,
            teacher_checkpoint=plan.teacher_checkpoint,
            callbacks=[TuneReportCallback()] if callbacks else None,
            report_fn=None if callbacks else tune.report,
            execution=execution,
        )
        final = final_metrics(trainer.fit())
        logger.flush()
        epoch = int(final.get("epoch", 0))
        best = storage.child(checkpoints, trial_id, BEST_FILE)
        summary = {f"final/{k}": v for k, v in final.items() if k.startswith(("val/", "train/", "best/"))}
        if storage.exists(best):
            best = storage.local_copy(best, local / trial_id)
            logger.log_artifact(best, "checkpoints")
            from encmm.trainables.teacher import load_checkpoint_file

            summary["params_inference"] = load_checkpoint_file(best)["spec"]["params_inference"]
            summary.update(
                measure_mismatch(
                    cfg,
                    str(best),
                    teacher_checkpoint=plan.teacher_checkpoint,
                    num_images=plan.mismatch_images,
                )
            )
        logger.log_metrics(summary, step=epoch)
        tracking.end_run(uri, run_id, "FINISHED")
    except NonFiniteLossError as exc:
        # Deterministic: a retry would diverge again. The run is FAILED with the reason; the sweep goes on.
        tracking.end_run(uri, run_id, "FAILED", error=f"NonFiniteLossError: {exc}")
    except (KeyboardInterrupt, SystemExit):
        # Tune stopping this trial (the sweep was interrupted, or ASHA stopped it): the sweep's driver knows
        # which, and closes the run (KILLED, or FINISHED stopped early); a retry re-attaches to it.
        raise
    except BaseException as exc:
        tracking.end_run(uri, run_id, "FAILED", error="".join(traceback.format_exception_only(type(exc), exc)))
        raise


class SweepProgress(tune.Callback):
    """One status line whenever a trial changes state: done / running / pending / failed, best val/acc1.

    Also the safety net for MLflow: a trial that ends without closing its run (stopped early by ASHA,
    or its driver died) gets its child run closed here, never left RUNNING.
    """

    def __init__(self, plan: RuntimePlan, total: int):
        self.plan, self.total = plan, total
        self.state: dict[str, str] = {}
        self.best: tuple[float, str] | None = None

    def _print(self) -> None:
        counts = {s: sum(1 for v in self.state.values() if v == s) for s in ("done", "running", "failed")}
        pending = max(0, self.total - len(self.state))
        best = f"{self.best[0]:.2f} ({self.best[1]})" if self.best else "-"
        log.info(
            f"[sweep {self.plan.name}] {counts['done']}/{self.total} done, {counts['running']} running, "
            f"{pending} pending, {counts['failed']} failed | best {METRIC} {best}",
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        TRIAL_STARTED.set()
        self.state[trial.trial_id] = "running"
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(METRIC)
        if isinstance(value, (int, float)) and not math.isnan(value) and (self.best is None or value > self.best[0]):
            self.best = (float(value), trial.trial_id)
            self._print()

    def _close_child(self, trial_id: str, status: str) -> None:
        runs = tracking.find_runs(
            self.plan.uri,
            self.plan.experiment,
            {"encmm.parent_run_id": self.plan.parent_run_id, "encmm.trial_id": trial_id},
            statuses=("RUNNING",),
        )
        for run in runs:
            if status == "FINISHED":
                tracking.set_tags(self.plan.uri, run.info.run_id, {"encmm.stopped_early": "true"})
            tracking.end_run(
                self.plan.uri,
                run.info.run_id,
                status,
                error=None if status == "FINISHED" else "trial ended without closing its run",
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.state[trial.trial_id] = "done"
        self._close_child(trial.trial_id, "FINISHED")
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.state[trial.trial_id] = "failed"
        self._close_child(trial.trial_id, "FAILED")
        self._print()


def trial_driver_resources(plan: RuntimePlan, config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """What a trial's driver actor holds: ``trial_driver_cpus``, plus the worker's share when the
    trial trains in Train local mode (``trainables.execution``)."""
    execution = Execution.of(trial_train_config(plan, config, "resources").resources)
    return tune.PlacementGroupFactory([execution.caller_bundle(plan.trial_driver_cpus)])


def build_tuner(plan: RuntimePlan, *, restore: bool = False) -> tune.Tuner:
    """The Tuner for ``plan`` (a fresh sweep, or ``Tuner.restore`` of an interrupted one)."""
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan), lambda config: trial_driver_resources(plan, config)
    )
    if restore:
        return tune.Tuner.restore(str(plan.sweep_dir), trainable=trainable, resume_errored=True)
    scheduler = None
    if plan.asha:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=plan.epochs,
            grace_period=plan.asha.grace_period,
            reduction_factor=plan.asha.reduction_factor,
        )
    sweep_dir = plan.sweep_dir
    return tune.Tuner(
        trainable,
        param_space=param_space(plan.search),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            num_samples=plan.search.num_samples,
            max_concurrent_trials=plan.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=str(sweep_dir.parent),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=plan.max_trial_failures),
            callbacks=[SweepProgress(plan, plan.total_trials)],
        ),
    )
