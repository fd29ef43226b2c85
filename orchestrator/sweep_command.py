"""``encmm sweep``: validate, plan, train or reuse the teacher, run the Tune sweep, summarise.

Everything that can fail on bad input (the sweep file, every trial's config, the teacher, the tracking
store, the resource plan) is checked before the parent run or any folder is created.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from encmm.orchestrator import env_flag, tracking
from encmm.orchestrator.experiments import DEFAULT_SWEEP, resolve_experiment
from encmm.orchestrator.interrupts import Interrupted, graceful
from encmm.orchestrator.sweep_config import (
    SearchSpace,
    SweepConfig,
    bound_points,
    grid_axes,
    grid_points,
    load_sweep_config,
    sweep_source,
    trial_config_dict,
    validate_trials,
)
from encmm.orchestrator.sweep_plan import PLAN_FILE, RuntimePlan, new_sweep_dir
from encmm.orchestrator.sweep_results import summarize, write_summary
from encmm.orchestrator.training import resolve_teacher_checkpoint
from encmm.trainables.config import (
    ConfigError,
    TrainConfig,
    absolutize_paths,
    flatten,
    load_train_config,
    with_absolute_paths,
)
from encmm.trainables.execution import Execution, free_cpus_for_input
from encmm.trainables.preflight import check_train_config

log = logging.getLogger(__name__)

TEACHER_SUMMARY_WAIT_S = 60.0  # the longest the teacher's summary waits for Tune to start a trial


@dataclass
class SweepSetup:
    cfg: SweepConfig
    source: str
    uri: str
    trials: list[TrainConfig]  # one validated config per grid point (sampled axes at their bounds)
    teacher_cfg: TrainConfig | None  # the teacher encmm trains (or reuses) first
    per_trial: dict  # resources one trial holds


def teacher_hash(cfg: TrainConfig) -> str:
    """Identity of a teacher training spec: everything but the name and where results go."""
    tree = cfg.model_dump(mode="json")
    tree.pop("tracking")
    tree.pop("name")
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def trial_resources(trials: list[TrainConfig], driver_cpus: float) -> dict:
    """The most any one trial holds (its driver included), how the largest one executes, and the CPUs the
    cluster must keep free for the trials' Ray Data input tasks."""
    executions = [Execution.of(t.resources) for t in trials]
    totals = [e.total(driver_cpus) for e in executions]
    return {
        "CPU": max(t["CPU"] for t in totals),
        "GPU": max(t["GPU"] for t in totals),
        "workers": max(e.workers for e in executions),
        "execution": max(executions, key=lambda e: e.workers).describe(),
        "free_cpus": max(free_cpus_for_input(t) for t in trials),
    }


def concurrent_trials(per_trial: dict, cluster: dict, setting: int | None) -> int:
    fit = math.floor((cluster.get("CPU", 0) - per_trial.get("free_cpus", 0)) / per_trial["CPU"] + 1e-9)
    if per_trial["GPU"]:
        fit = min(fit, math.floor(cluster.get("GPU", 0) / per_trial["GPU"] + 1e-9))
    return min(fit, setting) if setting else fit


def trials_at_once(setup: SweepSetup, cluster: dict) -> int:
    """How many trials ``cluster`` runs at once; a ConfigError when not even one fits."""
    at_once = concurrent_trials(setup.per_trial, cluster, setup.cfg.max_concurrent_trials)
    if at_once < 1:
        free = setup.per_trial.get("free_cpus", 0)
        raise ConfigError(
            f"{setup.source}: resources: one trial needs {setup.per_trial['CPU']:g} CPU / "
            f"{setup.per_trial['GPU']:g} GPU"
            + (f" and {free:g} CPU left free for its Ray Data input tasks (data.loader=ray_data)" if free else "")
            + f"; the cluster has {cluster.get('CPU', 0):g} CPU / {cluster.get('GPU', 0):g} GPU"
        )
    return at_once


def local_resources() -> dict:
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def prepare_sweep(
    path: str | PathLike | Mapping[str, Any] | SweepConfig | None, overrides: list[str], tracking_uri: str | None
) -> SweepSetup:
    """Validate the sweep and every trial it will run; no side effects. ``path``: a sweep file, a shipped
    sweep's name, ``None`` (the shipped default), or a dict / :class:`SweepConfig` (relative file
    references resolve against the current folder)."""
    given = path if isinstance(path, (Mapping, SweepConfig)) else resolve_experiment(path, DEFAULT_SWEEP)
    cfg, folder = load_sweep_config(given, overrides)
    source = sweep_source(given)
    cfg.base = absolutize_paths(cfg.base)
    teacher_cfg = None
    teacher_shape = None
    if cfg.teacher_training:
        teacher_file = (folder / cfg.teacher_training).resolve()
        teacher_cfg = with_absolute_paths(load_train_config(teacher_file))
        check_train_config(teacher_cfg, str(teacher_file))
        teacher_shape = teacher_cfg  # the students' teacher is this config's model
        cfg.base["teacher"] = {"source": "run", "run_id": "to-be-trained"}
    trials = validate_trials(cfg, source)
    uri = tracking.resolve_tracking_uri(tracking_uri, trials[0].tracking.uri)
    tracking.check_tracking(uri)
    for trial in trials:
        checkpoint = None if teacher_shape else resolve_teacher_checkpoint(trial, uri, source)
        check_train_config(trial, source, teacher_config=teacher_shape, teacher_checkpoint=checkpoint)
    return SweepSetup(cfg, source, uri, trials, teacher_cfg, trial_resources(trials, cfg.trial_driver_cpus))


def trial_count(cfg: SweepConfig) -> int:
    return len(grid_points(cfg.search)) * cfg.search.num_samples


def plan_text(setup: SweepSetup, address: str | None) -> str:
    """The dry-run plan of a prepared sweep, against this machine or (with an address) the Ray cluster."""
    cluster, where = local_resources(), "this machine"
    if address or os.environ.get("RAY_ADDRESS"):
        import ray

        from encmm.orchestrator.ray_cluster import init_ray

        init_ray(address)
        cluster, where = ray.cluster_resources(), "Ray cluster"
    return format_plan(setup, cluster, where)


def format_plan(setup: SweepSetup, cluster: dict, where: str) -> str:
    cfg = setup.cfg
    lines = [
        f"sweep {cfg.name}: {trial_count(cfg)} trials ({len(grid_points(cfg.search))} grid points x "
        f"{cfg.search.num_samples} samples)"
    ]
    axes = grid_axes(cfg.search)
    keys = list(axes) + list(cfg.search.sample)
    if keys:
        lines.append("  #  " + " | ".join(keys))
        index = 0
        for point in grid_points(cfg.search):
            for _ in range(cfg.search.num_samples):
                cells = [str(point[k]) for k in axes] + [
                    f"{a.distribution}({a.low}, {a.high})" if a.distribution != "choice" else f"choice{a.values}"
                    for a in cfg.search.sample.values()
                ]
                lines.append(f"  {index:<3d}" + " | ".join(cells))
                index += 1
    for name, overrides in cfg.search.arms.items():
        lines.append(f"  arm {name}: " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or "the base"))
    for claim in cfg.claims:
        lines.append(f"  claim: {claim.name}: {claim.a} {'>' if claim.expect == 'greater' else '<'} {claim.b}")
    per = setup.per_trial
    at_once = concurrent_trials(per, cluster, cfg.max_concurrent_trials)
    lines.append(
        f"resources per trial: {per['workers']} Train worker(s), {per['CPU']:g} CPU, {per['GPU']:g} GPU "
        f"(trial driver {cfg.trial_driver_cpus:g} CPU, {per['execution']})"
        + (f"; {per['free_cpus']:g} CPU of the cluster kept free for Ray Data input tasks" if per["free_cpus"] else "")
    )
    lines.append(
        f"cluster ({where}): {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU -> "
        f"{at_once} trial(s) at once" + ("" if at_once else "  [does not fit: needs a bigger cluster]")
    )
    epochs = max(t.schedule.epochs for t in setup.trials)
    lines.append(
        f"epochs per trial: {epochs}; early stopping: "
        + (
            f"ASHA on val/acc1 (grace {cfg.asha.grace_period}, factor {cfg.asha.reduction_factor:g})"
            if cfg.asha
            else "off"
        )
    )
    if setup.teacher_cfg is not None:
        lines.append(
            f"teacher: trained once from {cfg.teacher_training} (hash {teacher_hash(setup.teacher_cfg)}), "
            f"reused when a FINISHED run with that hash exists"
        )
    else:
        lines.append(f"teacher: {setup.trials[0].teacher.source} {setup.trials[0].teacher.model or ''}".rstrip())
    return "\n".join(lines)


def find_teacher(setup: SweepSetup) -> str | None:
    """Run id of a FINISHED teacher run trained from ``setup.teacher_cfg`` (by config hash), if any."""
    cfg = setup.teacher_cfg
    digest = teacher_hash(cfg)
    found = tracking.find_runs(
        setup.uri, cfg.tracking.experiment, {"encmm.config_hash": digest}, statuses=("FINISHED",)
    )
    if not found:
        return None
    log.info(f"[sweep] reusing teacher run {found[0].info.run_id} (hash {digest})")
    return found[0].info.run_id


def train_teacher(setup: SweepSetup, address: str | None) -> str:
    """Train ``setup.teacher_cfg`` now (tagged with its config hash); returns the FINISHED run's id."""
    from encmm.orchestrator.training import run_train

    digest = teacher_hash(setup.teacher_cfg)
    log.info(f"[sweep] training the teacher (hash {digest}) before the students")
    tags = {"encmm.config_hash": digest}
    done = run_train(setup.teacher_cfg, setup.uri, address=address, tags=tags, progress_label="[sweep] teacher")
    return done["run_id"]


def ensure_teacher(setup: SweepSetup, address: str | None) -> str:
    """Run id of a FINISHED teacher run for ``setup.teacher_cfg``: reused by hash, else trained now."""
    return find_teacher(setup) or train_teacher(setup, address)


def finish_sweep(plan: RuntimePlan, interrupted: bool) -> tuple[list[dict], dict | None]:
    """Summary table and best trial onto the parent run, then close it (and any child left RUNNING).

    A sweep that stopped before every trial ended (Ctrl-C) is KILLED and resumable with ``--resume``.
    """
    rows, best = summarize(plan.uri, plan.experiment, plan.parent_run_id, [*plan.search.grid, *plan.search.sample])
    ended = [r for r in rows if r["status"] in ("FINISHED", "FAILED")]
    interrupted = interrupted or len(ended) < plan.total_trials
    for row in rows:
        if row["status"] == "RUNNING":
            tracking.end_run(plan.uri, row["run_id"], "KILLED", error="sweep interrupted; resume re-attaches")
            row["status"] = "KILLED"
    folder = plan.sweep_dir
    for path in write_summary(rows, folder):
        tracking.log_artifact(plan.uri, plan.parent_run_id, path)
    if best:
        tracking.set_tags(
            plan.uri, plan.parent_run_id, {"encmm.best_trial": best["trial"], "encmm.best_run_id": best["run_id"]}
        )
        tracking.log_metrics(plan.uri, plan.parent_run_id, {"best/val/acc1": best["best/val/acc1"]})
    finished = sum(1 for r in rows if r["status"] == "FINISHED")
    tracking.log_metrics(
        plan.uri,
        plan.parent_run_id,
        {"trials/finished": finished, "trials/failed": sum(1 for r in rows if r["status"] == "FAILED")},
    )
    if interrupted:
        tracking.end_run(
            plan.uri,
            plan.parent_run_id,
            "KILLED",
            error=f"interrupted; resume with: encmm sweep --resume {plan.name}",
        )
    else:
        tracking.end_run(plan.uri, plan.parent_run_id, "FINISHED" if finished else "FAILED")
    return rows, best


def build_plan(
    setup: SweepSetup,
    *,
    teacher_run_id: str | None,
    teacher_checkpoint: str | None,
    parent_run_id: str,
    sweep_dir: Path,
    max_concurrent: int,
) -> RuntimePlan:
    cfg = setup.cfg
    base = dict(cfg.base)
    if teacher_run_id:
        base["teacher"] = {"source": "run", "run_id": teacher_run_id}
    return RuntimePlan(
        name=sweep_dir.name,
        sweep_dir=sweep_dir,
        uri=setup.uri,
        experiment=setup.trials[0].tracking.experiment,
        parent_run_id=parent_run_id,
        base=base,
        teacher_checkpoint=teacher_checkpoint,
        search=cfg.search,
        asha=cfg.asha,
        epochs=max(t.schedule.epochs for t in setup.trials),
        max_concurrent_trials=max_concurrent,
        trial_driver_cpus=cfg.trial_driver_cpus,
        max_trial_failures=cfg.max_trial_failures,
        mismatch_images=cfg.mismatch_images,
        total_trials=trial_count(cfg),
    )


@dataclass
class SweepRun:
    parent_run_id: str
    sweep_dir: Path
    teacher_run_id: str | None
    teacher_checkpoint: str | None


def open_sweep_run(setup: SweepSetup, teacher_run_id: str | None) -> SweepRun:
    """The parent run (params, tags); the teacher's own mismatch metrics follow in :func:`run_sweep`."""
    probe = next((trial for trial in setup.trials if trial.kd.uses_teacher), setup.trials[0])
    if teacher_run_id:
        probe = TrainConfig.model_validate(
            {**probe.model_dump(mode="json"), "teacher": {"source": "run", "run_id": teacher_run_id}}
        )
    teacher_checkpoint = resolve_teacher_checkpoint(probe, setup.uri, setup.source)
    sweep_dir = new_sweep_dir(Path(probe.tracking.output_dir) / "sweeps", setup.cfg.name)
    parent_run_id = tracking.start_run(
        setup.uri,
        probe.tracking.experiment,
        sweep_dir.name,
        params={
            **{
                f"sweep.{k}": v
                for k, v in flatten(setup.cfg.model_dump(mode="json", exclude={"base", "claims"})).items()
            },
            **flatten(setup.cfg.base),
        },
        tags={
            "encmm.kind": "sweep",
            "encmm.sweep_name": sweep_dir.name,
            "encmm.sweep_dir": str(sweep_dir),
            "encmm.code_version": code_version(),
            **({"encmm.arms": json.dumps(list(setup.cfg.search.arms))} if setup.cfg.search.arms else {}),
            **({"encmm.claims": json.dumps([c.model_dump() for c in setup.cfg.claims])} if setup.cfg.claims else {}),
        },
    )
    tracking.close_runs_if_process_dies(setup.uri, [parent_run_id], children_of=[parent_run_id])
    return SweepRun(parent_run_id, sweep_dir, teacher_run_id, teacher_checkpoint)


def start_sweep(setup: SweepSetup, address: str | None) -> RuntimePlan:
    """Train or reuse the teacher, open the parent run, save the plan; returns the plan.

    The MLflow side (the store, the parent run), then the import of Ray Tune, run in a thread while this
    thread starts the Ray cluster: ``ray.init`` stays on the main thread, because Ray ties the lifetime of
    the processes it starts to the thread that starts them, and it mostly waits for them.
    """
    import ray

    from encmm.orchestrator.ray_cluster import init_ray

    teacher_run_id = find_teacher(setup) if setup.teacher_cfg is not None else None
    if setup.teacher_cfg is not None and teacher_run_id is None:
        init_ray(address)
        trials_at_once(setup, ray.cluster_resources())
        teacher_run_id = train_teacher(setup, address)
    with ThreadPoolExecutor(max_workers=1) as pool:
        opening = pool.submit(open_sweep_run, setup, teacher_run_id)
        pool.submit(import_tune_side)
        try:
            init_ray(address)
            at_once = trials_at_once(setup, ray.cluster_resources())
        except BaseException as exc:
            if opening.exception() is None:
                tracking.end_run(
                    setup.uri, opening.result().parent_run_id, "FAILED", error=f"{exc.__class__.__name__}: {exc}"
                )
            raise
        opened = opening.result()
    try:
        plan = build_plan(
            setup,
            teacher_run_id=opened.teacher_run_id,
            teacher_checkpoint=opened.teacher_checkpoint,
            parent_run_id=opened.parent_run_id,
            sweep_dir=opened.sweep_dir,
            max_concurrent=at_once,
        )
        tracking.log_artifact(setup.uri, opened.parent_run_id, plan.save())
    except BaseException as exc:
        tracking.end_run(setup.uri, opened.parent_run_id, "FAILED", error=f"{exc.__class__.__name__}: {exc}")
        raise
    return plan


def begin_sweep(setup: SweepSetup, resume: str | None, address: str | None) -> RuntimePlan:
    """The plan to run: the saved one of sweep ``resume``, or a new sweep started now (teacher, parent run).
    With no cluster address, a local machine too small for one trial is refused before Ray starts."""
    if resume:
        return find_sweep(resume, setup.trials[0].tracking.output_dir, setup.uri)
    if not (address or os.environ.get("RAY_ADDRESS")):
        trials_at_once(setup, local_resources())
    return start_sweep(setup, address)


def import_tune_side() -> None:
    """Import Ray Tune (``orchestrator.sweep``, ~1.5 s of CPU) while ``ray.init`` waits on the processes it
    starts, instead of before validation ends; should this fail, ``run_sweep`` imports it again and says why."""
    import encmm.orchestrator.sweep  # noqa: F401


def teacher_trial_config(base: dict, search: SearchSpace) -> TrainConfig:
    """The sweep's first trial config that uses the teacher (grid order, sampled axes at their first bound),
    or the first trial's when none does (a CE-only arm may come first), from the plan's base and search."""
    configs = (
        TrainConfig.model_validate(trial_config_dict(base, point, search.arms)) for point in bound_points(search)
    )
    first = next(configs)
    return first if first.kd.uses_teacher else next((c for c in configs if c.kd.uses_teacher), first)


def log_teacher_summary(plan: RuntimePlan, resume: bool) -> None:
    """The teacher's own mismatch metrics (``teacher/*``) on the parent run, to compare with the trials'.

    Runs in a thread of the sweep's driver, from when Tune has started the first trial's process (whose
    imports take a core for seconds) to before the summary table, instead of holding up the start of the
    sweep. A failure costs only these metrics: it is printed and tagged on the parent run
    (``encmm.teacher_summary_error``), and the sweep goes on.
    """
    from encmm.orchestrator.sweep import TRIAL_STARTED
    from encmm.trainables.mismatch import teacher_summary

    TRIAL_STARTED.wait(timeout=TEACHER_SUMMARY_WAIT_S)
    try:
        probe = teacher_trial_config(plan.base, plan.search)
        if not probe.kd.uses_teacher or (resume and has_teacher_summary(plan)):
            return
        tracking.log_metrics(
            plan.uri,
            plan.parent_run_id,
            teacher_summary(probe, plan.teacher_checkpoint, plan.mismatch_images),
        )
    except Exception as exc:  # noqa: BLE001 - the trials do not depend on it: say why, keep the sweep going
        error = f"{exc.__class__.__name__}: {exc}"
        log.warning(f"encmm: warning: the teacher's mismatch metrics (teacher/*) were not logged: {error}")
        tracking.set_tags(plan.uri, plan.parent_run_id, {"encmm.teacher_summary_error": error[:5000]})


def has_teacher_summary(plan: RuntimePlan) -> bool:
    """Whether the parent run has the ``teacher/*`` metrics already (a resumed sweep that logged them)."""
    metrics = tracking.get_run(plan.uri, plan.parent_run_id).data.metrics
    return any(key.startswith("teacher/") for key in metrics)


def code_version() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def find_sweep(name: str, output_dir: str, uri: str) -> RuntimePlan:
    """The saved plan of sweep ``name`` (a folder directly under ``<output_dir>/sweeps``; a name is never a path)."""
    import re

    root = Path(output_dir).resolve() / "sweeps"
    folder = root / name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or folder.resolve().parent != root:
        raise ConfigError(
            f"--resume: {name!r} is not a sweep name (letters, digits, '_', '.', '-'; a folder directly under {root})"
        )
    if not (folder / PLAN_FILE).is_file():
        raise ConfigError(f"--resume: no sweep named {name!r} under {folder.parent}")
    plan = RuntimePlan.load(folder)
    if plan.uri != uri:
        raise ConfigError(f"--resume: sweep {name} is tracked in {plan.uri}, not {uri}")
    return plan


def run_sweep(plan: RuntimePlan, *, resume: bool, address: str | None) -> tuple[list[dict], dict | None]:
    """Run (or resume) the Tune sweep for ``plan``; the parent run always ends closed."""
    from encmm.orchestrator.ray_cluster import init_ray

    init_ray(address)
    if resume:
        tracking.set_tags(plan.uri, plan.parent_run_id, {"encmm.resumed": "true"})
        tracking.set_status(plan.uri, plan.parent_run_id, "RUNNING")
        tracking.close_runs_if_process_dies(plan.uri, [plan.parent_run_id], children_of=[plan.parent_run_id])
    interrupted: KeyboardInterrupt | None = None
    try:
        from encmm.orchestrator.sweep import TRIAL_STARTED

        TRIAL_STARTED.clear()
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(log_teacher_summary, plan, resume)  # alongside Tune; joined before the summary table
            try:
                fit_tuner(plan, resume)
            finally:
                TRIAL_STARTED.set()  # no trial left to start (all done on resume, or Tune stopped): go now
    except KeyboardInterrupt as exc:
        interrupted = exc
    except BaseException as exc:
        tracking.end_run(plan.uri, plan.parent_run_id, "FAILED", error=f"{exc.__class__.__name__}: {exc}")
        raise
    done = finish_sweep(plan, interrupted is not None)
    if interrupted is not None:  # every run closed KILLED and the summary written: now stop as asked
        raise interrupted
    return done


def fit_tuner(plan: RuntimePlan, resume: bool) -> None:
    """Build and fit the Tuner, then log Tune's own wall time (start-up, every trial's process, training,
    teardown) on the parent run: the bench's per-trial figure."""
    from encmm.orchestrator.sweep import build_tuner

    if not env_flag("ENCMM_VERBOSE"):
        # Tune's console output engine prints its experiment box, results folder and a TensorBoard hint
        # even at verbose=0; its legacy engine (Ray's documented switch) prints nothing at verbose=0.
        # encmm's own SweepProgress line says what the sweep is doing.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # On an interrupt Tune warns and suggests ``Tuner.restore(...)``; encmm says how to resume instead.
        logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # Ctrl-C goes to stop_tune, as SIGTERM and SIGHUP do
    started = time.time()
    with graceful(stop_tune) as received:
        build_tuner(plan, restore=resume).fit()
    if received.signum is not None:
        raise Interrupted(received.signum)
    tracking.log_metrics(plan.uri, plan.parent_run_id, {"time/tune_s": time.time() - started})


def stop_tune(signum: int) -> None:
    """Ask a running ``Tuner.fit()`` to stop as on its own Ctrl-C: it stops the trials, saves the experiment
    state and returns. Tune listens on SIGUSR1 for that (and on SIGINT unless TUNE_DISABLE_SIGINT_HANDLER,
    which encmm sets so that SIGINT, SIGTERM and SIGHUP all come here). Before Tune listens: raise."""
    if not callable(signal.getsignal(signal.SIGUSR1)):
        raise Interrupted(signum)
    signal.raise_signal(signal.SIGUSR1)
