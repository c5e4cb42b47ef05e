"""The ``covshift`` command line."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__, ranges
from .sweep import SWEEP_DETAIL_EVERY, Job, Terminated, default_workers, jobs, parse_list, run_sweep

if TYPE_CHECKING:
    from .runner import Outcome

# torch, pandas and matplotlib are imported inside the commands that need them, so that
# `covshift --version` and `--help` answer at once.

#: The errors a command turns into one line and exit status 2, as (module, class).
_KNOWN_ERRORS = (("covshift.modelfile", "ModelFileError"), ("covshift.variants", "VariantError"),
                 ("covshift.store", "TraceError"), ("covshift.sweep_ray", "RayError"))
#: The sweep's backends: a pool of local worker processes, or Ray tasks (covshift.sweep_ray).
BACKENDS = ("process", "ray")

app = typer.Typer(
    help="Show why a neural network trains well or badly. covshift trace trains your model with and "
    "without BatchNorm and writes a report; covshift sweep repeats the pair over learning rates and "
    "init scales; covshift report re-reads any trace, including one recorded with covshift.Tracer.",
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
    """Trace a model file's BatchNorm / no-BatchNorm pair (covshift trace), or inspect a trace
    recorded with covshift.Tracer in your own loop (covshift info)."""


@app.command()
def info(trace: Path = typer.Argument(..., help="A trace file written by covshift.Tracer.")) -> None:
    """Summarise a trace file: its runs, their layers, steps and metrics.

    Example: covshift info runs/demo.covshift
    """
    from .store import TraceError, load

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


def _command(ctx: typer.Context) -> str:
    """The command line that ran, with the options the user gave (for "regenerate with")."""
    words = ["covshift", ctx.info_name or ""]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if param.param_type_name == "argument":
            words.append(str(value))
        elif isinstance(value, bool):
            words.append(param.opts[0] if value else (param.secondary_opts or [param.opts[0]])[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def _fail(message: str, detail: str | None = None, code: int = 2) -> typer.Exit:
    """Print a one-line error (and the user's own traceback, when given); the caller raises."""
    typer.echo(f"error: {message}", err=True)
    if detail:
        typer.echo(f"in your code:\n{detail.rstrip()}", err=True)
    return typer.Exit(code)


def _check_settings(values: dict[str, Any]) -> None:
    """Raise the one-line error for the first option, among ``values`` (by setting name, as
    in :class:`covshift.runner.Settings`; None: not given), that is out of its range."""
    for name, value in values.items():
        expected = ranges.problem(name, value)
        if expected is not None:
            raise _fail(f"--{name.replace('_', '-')} takes {expected}, not {ranges.shown(value)}")
    every, detail_every = values["every"], values["detail_every"]
    if detail_every % every:
        raise _fail(f"--detail-every {detail_every} must be a multiple of --every {every}")


def _check_output(folder: Path, trace: Path | None = None) -> None:
    """Raise the one-line error naming the path when the output folder ``folder``, or the
    trace file ``trace`` in it when given, cannot be written. Cheap checks, made before
    anything is trained; nothing is created."""
    if folder.exists() and not folder.is_dir():
        raise _fail(f"the output folder {folder} is a file: give --out a folder")
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise _fail(f"cannot create the output folder {folder}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail(f"cannot write to the output folder {folder}" + (
            " (not writable)" if existing == folder.absolute() else f": {existing} is not writable"))
    if trace is not None and trace.is_dir():
        raise _fail(f"{trace} is a folder, not a trace file: remove it or give another --out")
    if trace is not None and trace.exists() and not os.access(trace, os.W_OK):
        raise _fail(f"the trace file {trace} is not writable")


def _device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot be used here, or None."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device: use cpu, cuda, cuda:1, mps, ..."
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available here; use --device cpu"
    return None


@contextlib.contextmanager
def _user_errors(debug: bool) -> Iterator[None]:
    """Turn a known problem into a one-line error and exit status 2, and anything else into
    one line and status 1; ``--debug`` lets the exception through with its traceback.
    Interrupts pass untouched: each command reports how far it got."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as e:
        if _loaded(e, (("covshift.runner", "Interrupted"),)):
            raise
        if isinstance(e, ValueError) or _loaded(e, _KNOWN_ERRORS):
            if debug:
                raise
            raise _fail(str(e), getattr(e, "user_traceback", None)) from None
        if debug:
            raise
        raise _fail(f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)", code=1) from None


def _loaded(error: BaseException, classes: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``error`` is one of ``classes`` (module, class); a class whose module was never
    imported cannot have been raised, so it is not imported to check."""
    return any(module in sys.modules and isinstance(error, getattr(sys.modules[module], name))
               for module, name in classes)


def _summary(outcomes: list[Outcome], title: str) -> Table:
    table = Table(title=title)
    for column in ("run", "steps", "train loss (eval)", "val loss", "val accuracy", "wall time", "diverged"):
        table.add_column(column)

    def number(value: float | None, fmt: str = ".4g") -> str:
        return "-" if value is None else format(value, fmt)

    for o in outcomes:
        diverged = "-" if o.diverged_at is None else f"at step {o.diverged_at}" + (
            f" ({o.first_nonfinite_layer})" if o.first_nonfinite_layer else "")
        table.add_row(o.run, str(o.steps), number(o.train_loss), number(o.val_loss),
                      number(o.val_accuracy, ".1%"), f"{o.wall_time:.1f} s",
                      diverged + (" (interrupted)" if o.interrupted else ""))
    return table


def _seeds(text: str, seed: int | None) -> int | list[int]:
    """``--seeds``: a count (``"3"``) or a comma-separated list of distinct seeds (``"0,1,2"``);
    raises the one-line error otherwise."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise _fail(f"--seeds takes a count (3) or a comma-separated list of seeds (0,1,2), not {text!r}") from None
    if len(values) == 1:
        if values[0] < 1:
            raise _fail(f"--seeds {text}: the number of seeds must be at least 1")
        return values[0]
    if len(set(values)) < len(values):
        raise _fail(f"--seeds {text} lists a seed twice")
    for value in values:
        if not ranges.SEED.accepts(value):
            raise _fail(f"--seeds {text}: each seed must be {ranges.SEED.description}")
    if seed is not None:
        raise _fail(f"--seed {seed} and the list --seeds {text} exclude each other: give the seeds in the list")
    return values


@app.command()
def trace(
    ctx: typer.Context,
    model_file: str = typer.Argument(
        ..., metavar="MODEL_FILE[:FACTORY]",
        help="A Python file defining build_model(batchnorm) or build_model() or `model`, and data(). "
             "Append :NAME to use another factory."),
    epochs: Optional[int] = typer.Option(None, help="Epochs to train (default: the file's config, else 5)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps to train; overrides --epochs."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: config, else 0.1)."),
    batch_size: Optional[int] = typer.Option(None, help="Mini-batch size (default: config, the DataLoader's, else 64)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adam (default: config, else sgd)."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum (default: config, else 0)."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay (default: config, else 0)."),
    seed: Optional[int] = typer.Option(None, help="Seed of both runs: initial weights and batch order."),
    seeds: Optional[str] = typer.Option(None, help="Train the pair once per seed: a count N (the seed, from --seed or "
                                        "the file's config, and the N-1 after it) or a list 0,1,2. With several "
                                        "seeds the runs are named 'bn seed=0', 'nobn seed=0', ..."),
    only: Optional[str] = typer.Option(None, help="Build and train only the bn or the nobn variant."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, ..."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: reports/<model file stem>/)."),
    every: int = typer.Option(1, help="Record layer statistics every N steps."),
    detail_every: int = typer.Option(50, help="Steps between per-unit statistics and histograms."),
    eval_every: Optional[int] = typer.Option(None, help="Also validate every N steps (always at epoch ends)."),
    ics_every: Optional[int] = typer.Option(None, help="Measure internal covariate shift (Santurkar et al. 2018) "
                                            "and the loss landscape every N steps (off by default: costs about "
                                            "one forward+backward pass per layer)."),
    debug: bool = typer.Option(False, help="Show full tracebacks."),
) -> None:
    """Train the model twice, with and without BatchNorm, under identical conditions, and
    record both runs into OUT/trace.covshift.

    Both runs share the seed, the mini-batch order and the initial weights of every layer
    they have in common. A model without BatchNorm gets it inserted after each Linear/Conv
    that feeds a nonlinearity; a model with BatchNorm gets it replaced by Identity.

    --seeds trains the pair once per seed, all into the one trace. A rerun removes the runs
    of an earlier covshift trace in that file that it does not write again.

    Example: covshift trace examples/mlp_sigmoid.py --epochs 3 --lr 0.5 --seeds 3
    """
    if only not in (None, "bn", "nobn"):
        raise _fail(f"--only takes bn or nobn, not {only!r}")
    overrides = {"epochs": epochs, "steps": steps, "lr": lr, "batch_size": batch_size, "optimizer": optimizer,
                 "momentum": momentum, "weight_decay": weight_decay, "seed": seed, "device": device,
                 "every": every, "detail_every": detail_every, "eval_every": eval_every, "ics_every": ics_every}
    _check_settings(overrides)
    seed_spec = 1 if seeds is None else _seeds(seeds, seed)
    problem = _device_problem(device)
    if problem:
        raise _fail(problem)
    from .modelfile import load as load_model_file
    from .runner import Interrupted, train_pair

    console = Console(stderr=True)
    try:
        with _user_errors(debug):
            mf = load_model_file(model_file)
            folder = out if out is not None else Path("reports") / mf.path.stem
            path = folder / "trace.covshift"
            _check_output(folder, path)
            with Progress(TextColumn("{task.description:>5}"), TextColumn("epoch {task.fields[epoch]}"), BarColumn(),
                          MofNCompleteColumn(), TextColumn("steps  loss {task.fields[loss]}"), TimeElapsedColumn(),
                          console=console) as progress:
                tasks: dict[str, int] = {}

                def on_step(run: str, epoch: int, step: int, total: int, loss: float) -> None:
                    if run not in tasks:
                        tasks[run] = progress.add_task(run, total=total, loss="-", epoch=epoch)
                    progress.update(tasks[run], completed=step, loss=f"{loss:.4g}", epoch=epoch)

                outcomes = train_pair(mf, overrides, path, only, on_step, seed_spec)
    except Interrupted as e:
        Console().print(_summary(e.outcomes, "interrupted: the trace keeps every step flushed so far"))
        typer.echo(f"interrupted; trace: {path}", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        typer.echo("interrupted before training started", err=True)
        raise typer.Exit(130) from None
    Console().print(_summary(outcomes, str(path)))
    diverged = [o.run for o in outcomes if o.diverged_at is not None]
    if diverged:
        typer.echo(f"diverged: {', '.join(diverged)} (recorded in the trace; the other run carried on)")
    typer.echo(f"trace: {path}")
    _write_report(path, folder, ("md", "html"), _command(ctx), debug)


def _write_report(path: Path, folder: Path, formats: tuple[str, ...], command: str, debug: bool) -> None:
    from .report import report as write_report
    from .store import TraceError

    with Console(stderr=True).status("writing the report"):
        try:
            written = write_report(path, folder, formats, command)
        except TraceError as e:
            raise _fail(str(e)) from None
        except Exception as e:
            if debug:
                raise
            raise _fail(f"the report failed: {type(e).__name__}: {e} (the trace is intact; rerun "
                        f"covshift report {path} --debug)", code=1) from None
    for name in ("report.md", "report.html"):
        if name in written:
            typer.echo(f"{name.split('.')[1]} report: {written[name]}")


def _grid(done: list[tuple[Job, Outcome]], title: str) -> Table:
    """Final eval-mode training loss (mean over seeds) per learning rate, init scale and variant."""
    table = Table(title=title)
    for column in ("lr", "init scale", "bn", "nobn"):
        table.add_column(column)
    cells: dict[tuple[float, float, str], list[Outcome]] = {}
    for job, outcome in done:
        cells.setdefault((job.lr, job.init_scale, job.variant), []).append(outcome)
    for lr, scale in sorted({(lr, scale) for lr, scale, _ in cells}):
        row = [f"{lr:g}", f"{scale:g}"]
        for variant in ("bn", "nobn"):
            results = cells.get((lr, scale, variant), [])
            diverged = [o for o in results if o.diverged_at is not None]
            losses = [o.train_loss for o in results if o.diverged_at is None and o.train_loss is not None]
            text = f"{sum(losses) / len(losses):.4g}" if losses else "-"
            if diverged:
                text += f" ({len(diverged)}/{len(results)} diverged)" if losses else f"diverged at step {diverged[0].diverged_at}"
            row.append(text)
        table.add_row(*row)
    return table


@app.command()
def sweep(
    ctx: typer.Context,
    model_file: str = typer.Argument(..., metavar="MODEL_FILE[:FACTORY]", help="A model file, as for covshift trace."),
    lr: str = typer.Option("0.003,0.03,0.3,3", "--lr", help="Comma-separated learning rates."),
    init_scale: str = typer.Option("1", "--init-scale",
                                   help="Comma-separated factors applied to every Linear/Conv weight after init."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (default: the file's config seed, else 0)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per run (default: config, else 5)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per run; overrides --epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Mini-batch size (default: config, else 64)."),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adam."),
    momentum: Optional[float] = typer.Option(None, help="SGD momentum."),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay."),
    jobs_: int = typer.Option(default_workers(), "--jobs", help="Worker processes, or the CPUs of a local Ray "
                              "(default: the number of cores)."),
    backend: str = typer.Option("process", help="process: local worker processes; ray: Ray tasks, on the cluster "
                                "at --address or RAY_ADDRESS, else on a local Ray (pip install covshift[ray])."),
    address: Optional[str] = typer.Option(None, help="With --backend ray: the Ray cluster's address (host:port, "
                                          "ray://host:port or auto; default: RAY_ADDRESS)."),
    device: str = typer.Option("cpu", help="cpu, cuda, ..."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: reports/<model file stem>-sweep/)."),
    every: int = typer.Option(1, help="Record layer statistics every N steps."),
    detail_every: int = typer.Option(SWEEP_DETAIL_EVERY, help="Steps between per-unit statistics and histograms "
                                     "(large by default so that sweeps stay cheap)."),
    ics_every: Optional[int] = typer.Option(None, help="Measure ICS and the loss landscape every N steps (off)."),
    debug: bool = typer.Option(False, help="Show full tracebacks."),
) -> None:
    """Train the BatchNorm / no-BatchNorm pair at every learning rate x init scale x seed,
    in parallel worker processes, into one trace; then write the report with the
    learning-rate and initialization sections.

    --init-scale s multiplies the weight of every nn.Linear and nn.Conv1d/2d/3d layer by s
    right after initialization (biases and BatchNorm parameters are not scaled), in both
    variants. A diverging setting stops at its first non-finite loss.

    Example: covshift sweep examples/mlp_sigmoid.py --lr 0.03,0.3,3 --init-scale 0.25,1,4 --steps 200
    """
    overrides = {"epochs": epochs, "steps": steps, "batch_size": batch_size, "optimizer": optimizer,
                 "momentum": momentum, "weight_decay": weight_decay, "device": device, "every": every,
                 "detail_every": detail_every, "ics_every": ics_every}
    _check_settings({**overrides, "jobs": jobs_})
    if backend not in BACKENDS:
        raise _fail(f"--backend takes {' or '.join(BACKENDS)}, not {backend!r}")
    if address is not None and backend != "ray":
        raise _fail("--address is the Ray cluster's: give it with --backend ray")
    problem = _device_problem(device)
    if problem:
        raise _fail(problem)
    from .modelfile import load as load_model_file
    from .runner import Interrupted, prepare

    console = Console(stderr=True)
    done: list[tuple[Job, Outcome]] = []
    todo: list[Job] = []
    path: Path | None = None
    try:
        with _user_errors(debug):
            connected: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if backend == "ray":
                from .sweep_ray import import_ray, run_sweep_ray, session

                import_ray()  # its error before anything else
                connected = session(address, jobs_)  # connects when entered, after the checks
            lrs, scales = parse_list(lr, float, "--lr"), parse_list(init_scale, float, "--init-scale")
            seed_list = parse_list(seeds, int, "--seeds") if seeds else None
            mf = load_model_file(model_file)
            seed_list = seed_list or [int(mf.config.get("seed", 0))]
            folder = out if out is not None else Path("reports") / f"{mf.path.stem}-sweep"
            path = folder / "trace.covshift"
            _check_output(folder, path)
            # check the file once here, so that its errors surface before any worker starts
            prepare(mf, {**overrides, "lr": lrs[0], "init_scale": scales[0], "seed": seed_list[0]})
            todo = jobs(model_file, lrs, scales, seed_list, overrides, path, 1 if jobs_ > 1 or backend == "ray" else 0)
            with connected, Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                                     TimeElapsedColumn(), console=console) as progress:
                task = progress.add_task("sweep", total=len(todo))

                def on_done(job: Job, outcome: Outcome) -> None:
                    done.append((job, outcome))
                    ending = (f"diverged at step {outcome.diverged_at}" if outcome.diverged_at is not None
                              else f"final eval-mode training loss {outcome.train_loss:.4g}" if outcome.train_loss is not None
                              else "")
                    progress.console.print(f"{job.run}: {outcome.steps} steps, {ending}, {outcome.wall_time:.1f} s")
                    progress.advance(task)

                if backend == "ray":
                    run_sweep_ray(todo, jobs_, address, on_done)
                else:
                    run_sweep(todo, jobs_, on_done)
    except (KeyboardInterrupt, Interrupted, Terminated) as e:
        stopped = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        Console().print(_grid(done, f"{stopped}: finished settings so far"))
        typer.echo(f"{stopped} after {len(done)} of {len(todo)} runs; trace: {path}", err=True)
        raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None
    Console().print(_grid(done, f"final eval-mode training loss (on a training subset the size of the validation "
                                f"set), mean over seeds: {path}"))
    typer.echo(f"trace: {path}")
    _write_report(path, folder, ("md", "html"), _command(ctx), debug)


@app.command()
def merge(
    traces: list[Path] = typer.Argument(..., metavar="TRACE...", help="Trace files to merge, in order."),
    output: Path = typer.Option(..., "-o", "--output", help="The merged trace file (not one of the inputs)."),
    on_clash: str = typer.Option("error", help="A run whose name an earlier input already gave: error; rename "
                                 "(copied as 'name (2)', the first free number); replace (the later run wins)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
    debug: bool = typer.Option(False, help="Show full tracebacks."),
) -> None:
    """Merge trace files into one: every run of each input, with all its data (per-step
    values, layers, per-unit statistics, histograms, config).

    Example: covshift merge a/trace.covshift b/trace.covshift -o all.covshift --on-clash rename
    """
    from .store.merge import CLASHES, RunClash
    from .store.merge import merge as merge_traces

    if on_clash not in CLASHES:
        raise _fail(f"--on-clash takes {', '.join(CLASHES)}, not {on_clash!r}")
    with _user_errors(debug):
        try:
            names = merge_traces(traces, output, on_clash, overwrite)  # type: ignore[arg-type]
        except RunClash as e:
            raise _fail(f"{e}: give --on-clash rename or --on-clash replace") from None
    typer.echo(f"merged {len(names)} runs from {len(traces)} traces into {output}")


@app.command()
def report(
    ctx: typer.Context,
    trace_file: Path = typer.Argument(..., metavar="TRACE", help="A trace file (covshift trace or covshift.Tracer)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: the trace's folder)."),
    format: str = typer.Option("md,html", "--format", help="Comma-separated: md, html."),
    debug: bool = typer.Option(False, help="Show full tracebacks."),
) -> None:
    """Analyse a trace and write its figures and report (report.md, report.html).

    Works for a bn/nobn pair from covshift trace, for a single run, and for traces recorded
    with covshift.Tracer in your own loop.

    Example: covshift report reports/mlp_sigmoid/trace.covshift
    """
    formats = tuple(f.strip() for f in format.split(",") if f.strip())
    if not formats or set(formats) - {"md", "html"}:
        raise _fail(f"--format takes md, html or md,html, not {format!r}")
    folder = out if out is not None else trace_file.parent
    _check_output(folder)
    _write_report(trace_file, folder, formats, _command(ctx), debug)


def main() -> None:
    """Entry point of the console script."""
    sys.exit(app())
