"""The ``encmm`` command line (Typer). One small module per command; this file only wires them."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Encoding-mismatch experiments: diagnose ViT features, distil students, sweep remedies.",
)

SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="dotted override, e.g. kd.alpha=0.9")]
AddressOption = Annotated[
    Optional[str], typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
]
TrackingOption = Annotated[
    Optional[str],
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)"),
]


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="more detail, and Ray's own console output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="the full traceback behind an error (or ENCMM_DEBUG=1)")
    ] = False,
    dashboard: Annotated[
        bool,
        typer.Option("--dashboard", help="Ray's dashboard on the local cluster encmm starts (or ENCMM_DASHBOARD=1)"),
    ] = False,
) -> None:
    """encmm: encoding-mismatch experiments on timm ViTs, orchestrated by Ray, tracked in MLflow."""
    if debug:
        os.environ["ENCMM_DEBUG"] = "1"
    if verbose:
        os.environ["ENCMM_VERBOSE"] = "1"
    if dashboard:
        os.environ["ENCMM_DASHBOARD"] = "1"
    configure_logging(logging.DEBUG if verbose or debug else logging.WARNING if quiet else logging.INFO)


def configure_logging(level: int) -> None:
    """encmm's own messages (the ``encmm`` loggers) on stderr, as ``encmm: ...`` lines; Ray's stay Ray's."""
    logger = logging.getLogger("encmm")
    if not any(getattr(h, "_encmm", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._encmm = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    # MLflow's INFO lines (creating a store's tables, migrations) only with --verbose; its warnings always.
    # MLflow sets its loggers' level from this when it is imported; a value the user set wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if level <= logging.DEBUG else "WARNING")


def debugging() -> bool:
    from encmm.orchestrator import env_flag

    return env_flag("ENCMM_DEBUG")


def describe_error(exc: BaseException) -> str:
    """``Class: message`` of what went wrong, on one line. Ray wraps a worker's exception in its own,
    whose first line is only "Training failed due to worker errors:": the root cause is the first failed
    worker's exception, and in a remote traceback its last ``...Error: ...`` line."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b[^:]*: ", line)]
    if raised:
        return raised[-1]
    return f"{exc.__class__.__name__}: {lines[0] if lines else ''}"


def fail(message: str, code: int = 2) -> None:
    """The one-line error and the exit code; with ``--debug`` / ``ENCMM_DEBUG=1`` first the whole traceback
    of the exception being handled, causes included (even those a ``raise ... from None`` hides)."""
    exc = sys.exc_info()[1]
    if debugging() and exc is not None:
        cause = exc
        while cause is not None:
            cause.__suppress_context__ = False
            cause = cause.__cause__ or cause.__context__
        traceback.print_exception(exc)
    typer.echo(f"encmm: error: {message}", err=True)
    raise typer.Exit(code)


def stopped(exc: KeyboardInterrupt, message: str) -> None:
    """Ctrl-C, SIGTERM or SIGHUP: one ``encmm: ...`` line, exit 128 + the signal (130 for Ctrl-C)."""
    from encmm.orchestrator.interrupts import exit_code

    typer.echo(f"encmm: {message}", err=True)
    raise typer.Exit(exit_code(exc))


@app.command()
def train(
    config: Annotated[
        Optional[str], typer.Argument(help="YAML file, or a shipped config by name (default: digits-teacher)")
    ] = None,
    set_: SetOption = None,
    address: AddressOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Train one model (a teacher, or a student distilled from one) as a Ray Train job tracked in MLflow."""
    from encmm.orchestrator.interrupts import interruptible
    from encmm.orchestrator.tracking import TrackingError
    from encmm.orchestrator.training import prepare_train, run_train
    from encmm.trainables.config import ConfigError

    try:
        cfg, uri, teacher_checkpoint, _ = prepare_train(config, set_ or [], tracking_uri)
    except (ConfigError, TrackingError) as exc:
        fail(str(exc))
    try:
        with interruptible():
            result = run_train(cfg, uri, teacher_checkpoint=teacher_checkpoint, address=address)
    except KeyboardInterrupt as exc:
        stopped(exc, "interrupted; the MLflow run is marked KILLED")
    except Exception as exc:  # noqa: BLE001 - the run is already FAILED in MLflow; say why in one line
        fail(f"training failed: {describe_error(exc)}", 1)
    typer.echo(
        f"run {result['run_id']} FINISHED: val/acc1 {result.get('val/acc1', float('nan')):.2f} "
        f"(best {result.get('best/val/acc1', float('nan')):.2f}) -> {result['run_dir']}"
    )


@app.command()
def sweep(
    config: Annotated[
        Optional[str], typer.Argument(help="sweep YAML file, or a shipped sweep by name (default: digits; see --list)")
    ] = None,
    set_: SetOption = None,
    address: AddressOption = None,
    tracking_uri: TrackingOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the trials and the resource plan, train nothing")
    ] = False,
    resume: Annotated[Optional[str], typer.Option("--resume", help="finish an interrupted sweep by name")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the shipped sweeps and exit")] = False,
) -> None:
    """Ray Tune sweep over student width x remedy x KD weights; every trial a Ray Train job, every run in MLflow."""
    from encmm.orchestrator import sweep_command as sc
    from encmm.orchestrator.experiments import DEFAULT_SWEEP
    from encmm.orchestrator.interrupts import interruptible
    from encmm.orchestrator.tracking import TrackingError
    from encmm.trainables.config import ConfigError

    if list_:
        from encmm.orchestrator.experiments import format_listing

        typer.echo(format_listing(sweeps=True))
        return

    source = config or DEFAULT_SWEEP
    try:
        with interruptible():
            setup = sc.prepare_sweep(config, set_ or [], tracking_uri)
            if dry_run:
                typer.echo(sc.plan_text(setup, address))
                return
            plan = sc.begin_sweep(setup, resume, address)
    except (ConfigError, TrackingError) as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:  # before the parent run: a teacher run in flight ended KILLED
        stopped(exc, f"interrupted before the sweep started; nothing to resume: run encmm sweep {source} again")
    except Exception as exc:  # noqa: BLE001 - teacher training or set-up failed; its run is FAILED
        fail(f"sweep set-up failed: {describe_error(exc)}", 1)
    typer.echo(
        f"sweep {plan.name}: parent run {plan.parent_run_id} ({plan.total_trials} trials, "
        f"{plan.max_concurrent_trials} at once)"
    )
    try:
        with interruptible():
            rows, best = sc.run_sweep(plan, resume=bool(resume), address=address)
    except KeyboardInterrupt as exc:  # the runs in flight and the parent ended KILLED, the summary written
        stopped(exc, f"interrupted; resume with encmm sweep {source} --resume {plan.name}")
    except Exception as exc:  # noqa: BLE001 - parent run already FAILED; one line for the user
        fail(f"sweep failed: {describe_error(exc)}", 1)
    typer.echo((plan.sweep_dir / "summary.md").read_text())
    finished = [r for r in rows if r["status"] == "FINISHED"]
    if len(finished) < plan.total_trials:
        typer.echo(
            f"{plan.total_trials - len(finished)} trial(s) not finished; "
            f"resume with: encmm sweep {source} --resume {plan.name}"
        )
    if best:
        typer.echo(f"best trial {best['trial']}: best val/acc1 {best['best/val/acc1']}")
    if not finished:
        fail("every trial failed", 1)


@app.command()
def diagnose(
    model: Annotated[
        Optional[list[str]],
        typer.Option(
            "--model",
            help="timm model name (random init unless --pretrained); with --features it only names them. "
            "Repeat it (or use --models) to compare several models",
        ),
    ] = None,
    models: Annotated[
        Optional[str],
        typer.Option(
            "--models",
            help="YAML list of models to compare: timm names, or {model, model_args, pretrained} mappings "
            "(a file, or a shipped one: diagnose-sep-models)",
        ),
    ] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="an encmm checkpoint (best.pt)")] = None,
    run: Annotated[
        Optional[str], typer.Option("--run", help="MLflow run id of an encmm training run (its checkpoints/best.pt)")
    ] = None,
    features: Annotated[
        Optional[str],
        typer.Option(
            "--features", help="saved features: one [L,I,N,C] .npy/.npz/.pt, or a folder of per-image [L,N,C] arrays"
        ),
    ] = None,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="load timm's pretrained weights (downloads)")
    ] = False,
    model_arg: Annotated[
        Optional[list[str]], typer.Option("--model-arg", help="timm.create_model override KEY=VALUE, e.g. img_size=32")
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option("--data", help="digits (default) | ImageFolder path | timm dataset name (torch/cifar10, ...)"),
    ] = None,
    data_root: Annotated[
        Optional[str], typer.Option("--data-root", help="root folder of a timm dataset name (default ./data)")
    ] = None,
    images_per_class: Annotated[
        int, typer.Option("--images-per-class", help="first K images of each class (paper: 1)")
    ] = 1,
    thresholds: Annotated[str, typer.Option("--thresholds", help="energy thresholds in (0, 1)")] = "0.8,0.9,0.95,0.99",
    center: Annotated[bool, typer.Option("--center", help="subtract each image's token mean first")] = False,
    permutations: Annotated[
        int, typer.Option("--permutations", help="random channel orders for the SEP robustness check")
    ] = 0,
    sep_statistic: Annotated[
        str,
        typer.Option(
            "--sep-statistic",
            help="SEP permutation statistic: per-image (mean of each image's bandwidth, the authors') | "
            "pooled (bandwidth of the mean curve over all tokens)",
        ),
    ] = "per-image",
    pairs: Annotated[int, typer.Option("--pairs", help="sampled image pairs for image-vs-image rotation")] = 500,
    seed: Annotated[
        int, typer.Option("--seed", help="seed of the pair sample, the permutations and a random-init --model")
    ] = 0,
    layers: Annotated[
        Optional[str], typer.Option("--layers", help="subset of layers, e.g. 0,5,-1 (default: all)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:i]")] = "auto",
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            help="Ray worker actors reading shards of the images (default: one per free CPU, or per GPU with "
            "--device cuda; at most one per batch)",
        ),
    ] = None,
    out: Annotated[
        Optional[str], typer.Option("--out", help="output folder (default ./diagnostics/<model>-<timestamp>)")
    ] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment")] = "encmm",
    address: AddressOption = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Spectral diagnostics of a model's block outputs (per-image SVD rank, shared PCA rank, subspace rotation,
    token SEP), streamed over Ray workers that each read a shard of the images; JSON, CSV and PNGs in --out
    and an MLflow run. Several models: one child run each (outputs in --out/<model>/) under a parent run
    holding the comparison (comparison.csv, sep_overlay.png, rank_vs_depth.png)."""
    from encmm.orchestrator.diagnose_command import (
        ComparisonPlan,
        DiagnoseOptions,
        prepare_diagnose_models,
        run_comparison,
        run_diagnose,
    )
    from encmm.orchestrator.interrupts import interruptible
    from encmm.orchestrator.tracking import TrackingError
    from encmm.trainables.config import ConfigError

    options = DiagnoseOptions(
        checkpoint=checkpoint,
        run=run,
        features=features,
        pretrained=pretrained,
        model_args=model_arg or [],
        data=data,
        data_root=data_root,
        images_per_class=images_per_class,
        thresholds=thresholds,
        center=center,
        permutations=permutations,
        sep_statistic=sep_statistic,
        pairs=pairs,
        seed=seed,
        layers=layers,
        batch_size=batch_size,
        device=device,
        workers=workers,
        out=out,
        tracking_uri=tracking_uri,
        experiment=experiment,
    )
    try:
        plan = prepare_diagnose_models(options, model or [], models)
    except (ConfigError, TrackingError) as exc:
        fail(str(exc))
    try:
        with interruptible():
            if isinstance(plan, ComparisonPlan):
                result = run_comparison(plan, address=address)
            else:
                result = run_diagnose(plan, address=address)
    except KeyboardInterrupt as exc:
        several = isinstance(plan, ComparisonPlan)
        stopped(exc, f"interrupted; the MLflow run{'s in flight are' if several else ' is'} marked KILLED")
    except Exception as exc:  # noqa: BLE001 - the run is already FAILED in MLflow; say why in one line
        fail(f"diagnose failed: {describe_error(exc)}", 1)
    for child in result.get("children", []):
        typer.echo(child["summary"] + "\n")
    typer.echo(result["summary"])


@app.command()
def report(
    sweep: Annotated[str, typer.Argument(help="sweep name (tag encmm.sweep_name) or its parent run id")],
    out: Annotated[Optional[str], typer.Option("--out", help="output folder (default ./reports/<sweep name>)")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Paper-style table (Markdown + CSV) and plots of a sweep, read from MLflow and logged to its parent run."""
    from encmm.orchestrator.report_command import run_report
    from encmm.orchestrator.tracking import TrackingError
    from encmm.trainables.config import ConfigError

    try:
        result = run_report(sweep, out, tracking_uri)
    except (ConfigError, TrackingError) as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line for the user
        fail(f"report failed: {describe_error(exc)}", 1)
    typer.echo(result.text)
    typer.echo(f"wrote {len(result.files)} files to {result.out} (also on the parent run under report/)")


@app.command()
def ui(
    host: Annotated[
        str, typer.Option("--host", help="address to bind (keep 127.0.0.1 unless you mean it)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port of the UI")] = 5000,
    tracking_uri: TrackingOption = None,
    sweep: Annotated[Optional[str], typer.Option("--sweep", help="print the URL of this sweep's experiment")] = None,
) -> None:
    """The MLflow UI on the store encmm uses; prints the experiment URL, stops on Ctrl-C."""
    from encmm.orchestrator.tracking import TrackingError
    from encmm.orchestrator.ui_command import run_ui
    from encmm.trainables.config import ConfigError

    try:
        code = run_ui(host, port, tracking_uri, sweep, echo=lambda line: typer.echo(line))
    except (ConfigError, TrackingError) as exc:
        fail(str(exc))
    if code > 128:  # stopped by SIGTERM / SIGHUP: the conventional 128 + signal, no error line
        raise SystemExit(code)
    if code:
        fail(f"mlflow server exited with code {code}", 1)


def main() -> None:
    code = 0
    try:
        app(prog_name="encmm")
    except SystemExit as exc:
        code = exc.code
    exit_fast_after_ray(code)
    sys.exit(code)


def exit_fast_after_ray(code) -> None:
    """End a process that started Ray without its seconds of C++ teardown.

    Once the atexit handlers have run (``ray.shutdown`` among them: the local cluster is stopped, every
    MLflow call here is synchronous and already done), the interpreter still spends ~6 s in Ray's native
    finalizers on 2 cores. Flush, then ``os._exit`` with the command's exit code.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    sys.exit(main())
