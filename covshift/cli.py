"""The ``covshift`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .store import TraceError, load

app = typer.Typer(
    help="Show why a neural network trains well or badly: record per-layer statistics "
    "while it trains, then read them back.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"covshift {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Record with covshift.Tracer in your training loop, then inspect the trace file here."""


@app.command()
def info(trace: Path = typer.Argument(..., help="A trace file written by covshift.Tracer.")) -> None:
    """Summarise a trace file: its runs, their layers, steps and metrics.

    Example: covshift info runs/demo.covshift
    """
    try:
        with load(trace) as t:
            scalars = t.scalars()
            layers = t.layer_info()
            runs = t.runs
    except TraceError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    table = Table(title=str(trace))
    for column in ("run", "steps recorded", "last step", "layers", "final loss"):
        table.add_column(column)
    for run in runs:
        rows = scalars[scalars["run"] == run]
        loss = rows[rows["metric"] == "loss"]["value"]
        table.add_row(
            run,
            str(rows["step"].nunique()),
            str(rows["step"].max()) if len(rows) else "-",
            str(int((layers["run"] == run).sum())),
            f"{loss.iloc[-1]:.4g}" if len(loss) else "-",
        )
    Console().print(table)
    metrics = sorted(set(scalars["metric"]))
    typer.echo(f"metrics: {', '.join(metrics) if metrics else 'none'}")


def main() -> None:
    """Entry point of the console script."""
    sys.exit(app())
