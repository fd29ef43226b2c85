"""The Python API: ``encmm.train``, ``encmm.sweep``, ``encmm.diagnose``, ``encmm.report`` (for notebooks).

Each function is its command line's twin: the same ``prepare_*`` (every check, nothing created) and then
the same ``run_*`` as ``orchestrator/cli.py``, so bad input raises :class:`~encmm.ConfigError` with the
one line the CLI prints (after ``encmm: error:``) before any MLflow run, folder or Ray cluster exists.
Instead of printing, each returns a frozen, typed result.

Importing this module is cheap: torch, Ray and MLflow are imported inside the functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union, overload

if TYPE_CHECKING:
    from encmm.orchestrator.sweep_config import SweepConfig
    from encmm.trainables.config import TrainConfig

Overrides = Union[Sequence[str], Mapping[str, Any]]
"""Dotted overrides: ``["kd.alpha=0.9", "schedule.epochs=1"]`` (as ``--set``) or ``{"kd.alpha": 0.9}``."""


# ------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TrainResult:
    """A FINISHED training run (:func:`train`).

    Attributes:
        run_id: the MLflow run id (``mlflow.get_run(run_id)``; ``teacher.source=run`` and
            ``encmm.diagnose(run=...)`` take it).
        run_dir: ``<tracking.output_dir>/<name>-<timestamp>``: ``config.yaml``, ``best.pt``, Ray's checkpoints.
        metrics: the final metrics, e.g. ``val/acc1``, ``val/acc5``, ``best/val/acc1``, ``best/epoch``,
            ``train/loss``, ``epoch`` (also logged to the run as ``final/...``).
        tracking_uri: the MLflow store the run is in.
    """

    run_id: str
    run_dir: Path
    metrics: dict[str, float]
    tracking_uri: str

    @property
    def checkpoint(self) -> Path:
        """The best checkpoint (``run_dir/best.pt``; ``encmm.diagnose(checkpoint=...)`` reads it)."""
        return self.run_dir / "best.pt"


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep would run (:func:`sweep` with ``dry_run=True``); nothing was trained or created.

    Attributes:
        name: the sweep's ``name``.
        total_trials: grid points x ``search.num_samples``.
        text: the plan ``encmm sweep --dry-run`` prints (trials, arms, claims, resources, teacher);
            ``print(plan)`` shows it.
    """

    name: str
    total_trials: int
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class SweepResult:
    """A sweep that ran (:func:`sweep`). A trial that failed does not raise: look at ``status`` and ``rows``.

    Attributes:
        name: the sweep's run name (``<name>-<timestamp>``): ``encmm.report(name)`` and ``resume=name`` take it.
        parent_run_id: the MLflow parent run; every trial is a child run of it.
        status: how the parent run ended: ``FINISHED`` (at least one trial finished), ``FAILED`` (none did)
            or ``KILLED`` (trials left unfinished: finish them with ``resume=name``).
        rows: one dict per trial (``sweep_results.summarize``): ``trial``, ``status``, ``run_id``, ``arm``,
            ``student.remedy``, ``student.width``, ``kd.alpha``, ``kd.beta``, ``seed``, the search axes,
            ``best/val/acc1``, ``val/acc1``, ``params_inference`` and the ``diag/*`` mismatch metrics.
            ``pandas.DataFrame(result.rows)`` makes it a table.
        best: the FINISHED row with the highest ``best/val/acc1`` (``None`` when no trial finished).
        total_trials: how many trials the sweep has.
        sweep_dir: ``<tracking.output_dir>/sweeps/<name>``: ``sweep.json`` (the saved plan), ``summary.csv``,
            ``summary.md``.
        tracking_uri: the MLflow store of the sweep.
    """

    name: str
    parent_run_id: str
    status: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    total_trials: int
    sweep_dir: Path
    tracking_uri: str

    @property
    def finished(self) -> list[dict[str, Any]]:
        """The rows of the trials that FINISHED."""
        return [row for row in self.rows if row["status"] == "FINISHED"]


@dataclass(frozen=True)
class DiagnoseResult:
    """A FINISHED diagnostics run (:func:`diagnose`).

    Attributes:
        run_id: the MLflow run holding every output as an artifact and the per-layer ``diag/*`` metrics.
        out: the output folder: ``diagnostics.json``, the CSV tables and ``figures/``.
        diagnostics: ``out/diagnostics.json``, parsed: ``{"model", "num_images", "thresholds", "layers":
            [{"index", "tokens", "channels", "svd_rank", "pca_rank", "sep", "rotation"}, ...]}`` with
            threshold keys written ``"0.8"``, ``"0.99"`` (README, ``encmm diagnose``).
        summary: the last-layer summary ``encmm diagnose`` prints.
    """

    run_id: str
    out: Path
    diagnostics: dict[str, Any]
    summary: str


@dataclass(frozen=True)
class DiagnoseComparison:
    """Several models diagnosed and compared (:func:`diagnose` with ``models``).

    Attributes:
        run_id: the MLflow parent run (tag ``encmm.kind`` = ``diagnose-comparison``): the comparison's files
            as artifacts; every model's run is a child run of it (tag ``mlflow.parentRunId``).
        out: the output folder: ``comparison.csv``, ``sep_overlay.png``, ``rank_vs_depth.png`` and one folder
            per model (``out/<model>/``, what a one-model diagnose writes).
        models: one :class:`DiagnoseResult` per model, in order (``models[0].run_id`` is a child run).
        rows: ``comparison.csv``, one dict per model: ``model``, ``num_images``, ``layer`` (the last diagnosed
            layer), ``layers``, ``tokens``, ``channels``, ``svd_p99_<p>`` / ``pca_p99_<p>`` (that layer's p99 over
            images of the per-image SVD rank / shared-PCA rank at energy p), ``sep_d_0.9`` / ``sep_ratio_0.9``
            (SEP bandwidth d and d/D at 90%), ``svd_p99_<p>_layer_mean`` / ``pca_p99_<p>_layer_mean`` (averaged
            over the diagnosed layers). ``pandas.DataFrame(result.rows)`` makes it a table.
        files: ``comparison.csv``, ``sep_overlay.png``, ``rank_vs_depth.png``.
        summary: the comparison ``encmm diagnose`` prints after the models' own summaries.
    """

    run_id: str
    out: Path
    models: list[DiagnoseResult]
    rows: list[dict[str, Any]]
    files: list[Path]
    summary: str


@dataclass(frozen=True)
class SweepReport:
    """The report of one sweep (:func:`report`), as ``encmm report`` writes it.

    Attributes:
        text: the Markdown it prints: the per-arm table, the claims, the mismatch correlations.
        rows: one dict per arm of the table (n, best / last val top-1 mean and 95% CI, parameters, GFLOPs,
            mismatch metrics).
        claims: one dict per claim (``a``, ``b``, ``diff``, its Welch CI, ``p``, ``verdict``).
        correlations: each mismatch metric against best top-1 (Spearman rho and p).
        not_reported: the trials left out (failed, killed, still running), with why.
        out: the folder it wrote (also logged to the parent run under ``report/``).
        files: every file it wrote there.
    """

    text: str
    rows: list[dict[str, Any]]
    claims: list[dict[str, Any]]
    correlations: list[dict[str, Any]]
    not_reported: list[dict[str, Any]]
    out: Path
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------- functions
def train(
    config: TrainConfig | Mapping[str, Any] | str | PathLike | None = None,
    *,
    overrides: Overrides = (),
    tracking_uri: str | None = None,
    address: str | None = None,
) -> TrainResult:
    """Train one model (a teacher, or a student distilled from one) as a Ray Train job tracked in MLflow.

    ``encmm train`` from Python: the same checks, the same run, the same outputs (README, "Commands").

    Args:
        config: a :class:`~encmm.trainables.config.TrainConfig`, a plain dict of the YAML's contents
            (``{"student": {"width": 32}, "schedule": {"epochs": 2}}``; errors name it ``<dict>``), a YAML
            file, or a shipped config's name (``"digits-teacher"``). ``None``: the shipped default,
            ``digits-teacher``. Relative paths in it resolve against the current folder.
        overrides: dotted overrides applied on top, as ``--set``: ``["kd.alpha=0.9"]`` or ``{"kd.alpha": 0.9}``.
        tracking_uri: the MLflow store; default ``MLFLOW_TRACKING_URI``, then ``tracking.uri``, then
            ``sqlite:///<cwd>/mlflow.db``.
        address: the Ray cluster (default ``RAY_ADDRESS``, else a local cluster started in this process).

    Returns:
        :class:`TrainResult`: ``run_id``, ``run_dir``, ``metrics`` (``metrics["best/val/acc1"]``), ``checkpoint``.

    Raises:
        encmm.ConfigError: bad input (a field, a file, the teacher), with one line naming the source and
            the field, before any run or folder is created.
        encmm.TrackingError: the MLflow store cannot be used.
        Exception: training itself failed; the MLflow run is then FAILED (KILLED on KeyboardInterrupt),
            with the error in its ``encmm.error`` tag.
    """
    from encmm.orchestrator.training import prepare_train, run_train

    cfg, uri, teacher_checkpoint, _ = prepare_train(config, override_list(overrides), tracking_uri)
    final = dict(run_train(cfg, uri, teacher_checkpoint=teacher_checkpoint, address=address))
    run_id, run_dir = final.pop("run_id"), Path(final.pop("run_dir"))
    return TrainResult(run_id=run_id, run_dir=run_dir, metrics=final, tracking_uri=uri)


@overload
def sweep(
    config: SweepConfig | Mapping[str, Any] | str | PathLike | None = ...,
    *,
    overrides: Overrides = ...,
    tracking_uri: str | None = ...,
    address: str | None = ...,
    resume: str | None = ...,
    dry_run: Literal[True],
) -> SweepPlan: ...


@overload
def sweep(
    config: SweepConfig | Mapping[str, Any] | str | PathLike | None = ...,
    *,
    overrides: Overrides = ...,
    tracking_uri: str | None = ...,
    address: str | None = ...,
    resume: str | None = ...,
    dry_run: Literal[False] = ...,
) -> SweepResult: ...


def sweep(
    config: SweepConfig | Mapping[str, Any] | str | PathLike | None = None,
    *,
    overrides: Overrides = (),
    tracking_uri: str | None = None,
    address: str | None = None,
    resume: str | None = None,
    dry_run: bool = False,
) -> SweepResult | SweepPlan:
    """Run a Ray Tune sweep (every trial a Ray Train job, every run in MLflow); ``encmm sweep`` from Python.

    Trains (or reuses, by config hash) the sweep's ``teacher_training`` teacher first, opens the parent
    MLflow run, runs every trial, then writes the summary onto the parent run and closes it.

    Args:
        config: a :class:`~encmm.orchestrator.sweep_config.SweepConfig`, a plain dict of a sweep file's
            contents (errors name it ``<dict>``; its relative ``base: file.yaml`` and ``teacher_training``
            resolve against the current folder), a sweep file, or a shipped sweep's name (``"digits"``,
            ``"digits-claims"``; ``encmm sweep --list``). ``None``: the shipped default, ``digits``.
        overrides: as ``--set``: ``kd.alpha=0.9`` sets the base training config of every trial,
            ``sweep.max_concurrent_trials=1`` the sweep itself; a list of strings or a dict.
        tracking_uri: the MLflow store; default ``MLFLOW_TRACKING_URI``, then the base's ``tracking.uri``,
            then ``sqlite:///<cwd>/mlflow.db``.
        address: the Ray cluster (default ``RAY_ADDRESS``, else a local cluster started in this process).
        resume: finish the interrupted sweep of this name (``SweepResult.name``; a folder under
            ``<tracking.output_dir>/sweeps``) instead of starting a new one; ``config`` must be the same.
        dry_run: only plan: returns a :class:`SweepPlan` (``print(plan)`` shows the trials, arms and the
            resource plan); trains nothing, creates nothing.

    Returns:
        :class:`SweepResult` (``name``, ``parent_run_id``, ``status``, ``rows``, ``best``), or
        :class:`SweepPlan` with ``dry_run=True``. A failed trial does not raise: it is a row with
        ``status`` FAILED, and the parent run ends FAILED only when no trial finished.

    Raises:
        encmm.ConfigError: bad input (the sweep, any trial's config, the teacher, a cluster too small for one
            trial, an unknown ``resume`` name), with one line naming the source and the field, before any
            run or folder is created.
        encmm.TrackingError: the MLflow store cannot be used.
        Exception: the teacher's training or the sweep's set-up failed (their runs end FAILED).
        KeyboardInterrupt: interrupted (Ctrl-C, a notebook's interrupt, SIGTERM or SIGHUP under ``encmm``):
            Tune stopped the trials, their runs and the parent ended KILLED and the summary was written;
            ``sweep(config, resume=name)`` finishes it.
    """
    from encmm.orchestrator import sweep_command as sc
    from encmm.orchestrator import tracking

    setup = sc.prepare_sweep(config, override_list(overrides), tracking_uri)
    if dry_run:
        return SweepPlan(name=setup.cfg.name, total_trials=sc.trial_count(setup.cfg), text=sc.plan_text(setup, address))
    plan = sc.begin_sweep(setup, resume, address)
    rows, best = sc.run_sweep(plan, resume=bool(resume), address=address)
    status = tracking.get_run(plan.uri, plan.parent_run_id).info.status
    return SweepResult(
        name=plan.name,
        parent_run_id=plan.parent_run_id,
        status=status,
        rows=rows,
        best=best,
        total_trials=plan.total_trials,
        sweep_dir=plan.sweep_dir,
        tracking_uri=plan.uri,
    )


def diagnose(
    *,
    model: str | None = None,
    models: Sequence[str | Mapping[str, Any]] | str | PathLike = (),
    checkpoint: str | PathLike | None = None,
    run: str | None = None,
    features: str | PathLike | None = None,
    pretrained: bool = False,
    model_args: Mapping[str, Any] | Sequence[str] = (),
    data: str | PathLike | None = None,
    data_root: str | PathLike | None = None,
    images_per_class: int = 1,
    thresholds: Sequence[float] | str = (0.8, 0.9, 0.95, 0.99),
    center: bool = False,
    permutations: int = 0,
    sep_statistic: Literal["per-image", "pooled"] = "per-image",
    pairs: int = 500,
    seed: int = 0,
    layers: Sequence[int] | str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
    out: str | PathLike | None = None,
    experiment: str = "encmm",
    tracking_uri: str | None = None,
    address: str | None = None,
) -> DiagnoseResult | DiagnoseComparison:
    """The paper's spectral diagnostics of a model's block outputs; ``encmm diagnose`` from Python.

    Per layer: the per-image SVD rank, the rank in a shared PCA basis, subspace rotation and the token
    Spectral Energy Pattern (SEP), streamed over Ray workers that each read a shard of the images. Writes
    ``diagnostics.json``, CSV tables and figures to ``out`` and logs them to one MLflow run. Every option is
    the command's (README, ``encmm diagnose``).

    Args:
        model: a timm model name (random init, seeded by ``seed``, unless ``pretrained``); next to
            ``features`` it only names them. Give exactly one of ``model``, ``checkpoint``, ``run``,
            ``features``.
        models: several timm models to compare (``encmm diagnose --model A --model B`` / ``--models FILE``):
            names, or ``{"model": name, "model_args": {...}, "pretrained": bool}`` mappings (``model_args``
            after ``model_args`` below, ``pretrained`` defaulting to ``pretrained``), or the path of a YAML
            file listing them. After ``model`` if both are given; each model once. With two or more, every
            model is checked first, then each is diagnosed into ``out/<model>/`` and a child MLflow run of one
            parent run holding the comparison; the result is a :class:`DiagnoseComparison`. One model in
            all is the plain one-model diagnose.
        checkpoint: an encmm checkpoint (``best.pt``, e.g. ``TrainResult.checkpoint``).
        run: the MLflow run id of a FINISHED encmm training run (its ``checkpoints/best.pt``).
        features: saved features: one ``[L, I, N, C]`` ``.npy`` / ``.npz`` / ``.pt``, or a folder of
            per-image ``[L, N, C]`` arrays.
        pretrained: load timm's pretrained weights for ``model`` (downloads).
        model_args: ``timm.create_model`` overrides: ``{"img_size": 32, "depth": 4}`` or ``["img_size=32"]``.
        data: ``"digits"`` (default), an ImageFolder folder, or a timm dataset name (``"torch/cifar10"``).
        data_root: root folder of a timm dataset name (default ``./data``).
        images_per_class: the first K images of each class (the paper: 1).
        thresholds: energy thresholds, each in (0, 1): ``(0.9, 0.99)`` or ``"0.9,0.99"``.
        center: subtract each image's token mean first.
        permutations: random channel orders for the SEP robustness check (0: none).
        sep_statistic: the permutation statistic: ``"per-image"`` (the authors') or ``"pooled"``.
        pairs: sampled image pairs for image-vs-image rotation.
        seed: seed of the pair sample, the permutations and a random-init ``model``.
        layers: a subset of layers, e.g. ``(0, 5, -1)`` or ``"0,5,-1"`` (default: all).
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:1"``.
        workers: Ray worker actors, each reading a shard of the images (default: one per free CPU, or per GPU
            with a CUDA ``device``; at most one per batch).
        out: the output folder (default ``./diagnostics/<model>-<timestamp>``).
        experiment: the MLflow experiment.
        tracking_uri: the MLflow store (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``).
        address: the Ray cluster (default ``RAY_ADDRESS``, else a local cluster started in this process).

    Returns:
        :class:`DiagnoseResult`: ``run_id``, ``out``, ``diagnostics`` (the parsed ``diagnostics.json``), ``summary``;
        with several models a :class:`DiagnoseComparison`: ``run_id`` (the parent), ``out``, ``models`` (one
        :class:`DiagnoseResult` each), ``rows`` (``comparison.csv``), ``files``, ``summary``.

    Raises:
        encmm.ConfigError: bad input (two sources, a threshold outside (0, 1), an unknown timm name, a missing
            file, an array of the wrong rank or with NaN/inf, a model given twice, ...), with the CLI's one line
            (it names the option as its flag, e.g. ``--thresholds``), before any run or folder is created.
        encmm.TrackingError: the MLflow store cannot be used.
    """
    from encmm.orchestrator.diagnose_command import (
        ComparisonPlan,
        DiagnoseOptions,
        model_arg_strings,
        prepare_diagnose_models,
        run_comparison,
        run_diagnose,
    )

    if isinstance(model_args, Mapping):
        model_args = model_arg_strings(model_args)
    options = DiagnoseOptions(
        checkpoint=optional_str(checkpoint),
        run=run,
        features=optional_str(features),
        pretrained=pretrained,
        model_args=[model_args] if isinstance(model_args, str) else list(model_args),
        data=optional_str(data),
        data_root=optional_str(data_root),
        images_per_class=images_per_class,
        thresholds=thresholds if isinstance(thresholds, str) else ",".join(str(t) for t in thresholds),
        center=center,
        permutations=permutations,
        sep_statistic=sep_statistic,
        pairs=pairs,
        seed=seed,
        layers=layers if layers is None or isinstance(layers, str) else ",".join(str(i) for i in layers),
        batch_size=batch_size,
        device=device,
        workers=workers,
        out=optional_str(out),
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    file = optional_str(models) if isinstance(models, (str, PathLike)) else None
    names = [model] if model is not None else []
    plan = prepare_diagnose_models(options, names if file else [*names, *models], file)
    if not isinstance(plan, ComparisonPlan):
        return diagnose_result(run_diagnose(plan, address=address))
    done = run_comparison(plan, address=address)
    return DiagnoseComparison(
        run_id=done["run_id"],
        out=Path(done["out"]),
        models=[diagnose_result(child) for child in done["children"]],
        rows=done["rows"],
        files=[Path(path) for path in done["files"]],
        summary=done["summary"],
    )


def diagnose_result(done: dict) -> DiagnoseResult:
    """The :class:`DiagnoseResult` of one model's ``run_diagnose``."""
    out_dir = Path(done["out"])
    diagnostics = json.loads((out_dir / "diagnostics.json").read_text())
    return DiagnoseResult(run_id=done["run_id"], out=out_dir, diagnostics=diagnostics, summary=done["summary"])


def report(sweep: str, *, out: str | PathLike | None = None, tracking_uri: str | None = None) -> SweepReport:
    """The paper-style table (Markdown + CSV), the claims and the plots of a sweep; ``encmm report`` from Python.

    Reads the sweep from MLflow only, writes to ``out`` and logs the same files to its parent run under
    ``report/``.

    Args:
        sweep: the sweep's name (``SweepResult.name``, tag ``encmm.sweep_name``) or its parent run id.
        out: the output folder (default ``./reports/<sweep name>``).
        tracking_uri: the MLflow store (default ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``).

    Returns:
        :class:`SweepReport`: ``text`` (``print`` it, or ``IPython.display.Markdown(report.text)``), ``rows``,
        ``claims``, ``correlations``, ``not_reported``, ``out``, ``files``.

    Raises:
        encmm.ConfigError: an unknown sweep, or an ``out`` that cannot be written.
        encmm.TrackingError: the MLflow store cannot be used.
    """
    from encmm.orchestrator.report_command import run_report

    done = run_report(sweep, optional_str(out), tracking_uri)
    return SweepReport(
        text=done.text,
        rows=done.rows,
        claims=done.claims,
        correlations=done.correlations,
        not_reported=done.not_reported,
        out=Path(done.out),
        files=[Path(path) for path in done.files],
    )


# ----------------------------------------------------------------------------------------- helpers
def override_list(overrides: Overrides) -> list[str]:
    """``--set`` strings from a list of them, one string, or a dict (values written as JSON, which is YAML:
    ``{"resources.compile": "on"}`` stays the string ``on``)."""
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value, default=str)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


def optional_str(value: str | PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)
