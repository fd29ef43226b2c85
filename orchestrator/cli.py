"""The ``encmm`` command line (Typer). One small module per command; this file only wires them."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Encoding-mismatch experiments: diagnose ViT features, distil students, sweep remedies.")

SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="dotted override, e.g. kd.alpha=0.9")]
AddressOption = Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")]
TrackingOption = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or ./mlflow.db)")]


@app.callback()
def _root() -> None:
    """encmm: encoding-mismatch experiments on timm ViTs, orchestrated by Ray, tracked in MLflow."""


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"encmm: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def train(config: Annotated[Optional[str], typer.Argument(help="YAML config (default: experiments/digits-teacher.yaml)")] = None,
          set_: SetOption = None, address: AddressOption = None, tracking_uri: TrackingOption = None) -> None:
    """Train one model (a teacher, or a student distilled from one) as a Ray Train job tracked in MLflow."""
    from orchestrator.tracking import TrackingError
    from orchestrator.train_command import prepare_train, run_train
    from trainables.config import ConfigError

    try:
        cfg, uri, teacher_checkpoint, _ = prepare_train(config, set_ or [], tracking_uri)
    except (ConfigError, TrackingError) as exc:
        fail(str(exc))
    try:
        result = run_train(cfg, uri, teacher_checkpoint=teacher_checkpoint, address=address)
    except KeyboardInterrupt:
        fail("interrupted; the MLflow run is marked KILLED", 130)
    except Exception as exc:  # noqa: BLE001 - the run is already FAILED in MLflow; say why in one line
        fail(f"training failed: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 1)
    typer.echo(f"run {result['run_id']} FINISHED: val/acc1 {result.get('val/acc1', float('nan')):.2f} "
               f"(best {result.get('best/val/acc1', float('nan')):.2f}) -> {result['run_dir']}")


def main() -> None:
    app(prog_name="encmm")


if __name__ == "__main__":
    sys.exit(main())
