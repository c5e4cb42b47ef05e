"""Training-step time of covshift and of the tools a user would otherwise pick, side by side.

Copies of each model with identical weights train on the same fixed batch (SGD, momentum
0.9), one copy per column plus a plain one. In every round each copy runs one block of
``--block`` steps, one after the other, so drift of the machine hits all alike; a cell is the
median over rounds of the column's block time / the plain block time of the same round,
covshift's blocks each given their share of its flushes (every 100 recorded steps: they land
in few blocks, which the median would leave out). Every column records at every step
(covshift every=10: its layer statistics every 10th):

- covshift default: ``covshift.Tracer(model, path, optimizer=opt)``: every statistic of
  "What is recorded" (README) for every leaf module, each step, flushed to a trace file.
- covshift every=10: the same Tracer with ``every=10``: loss and learning rates each step,
  the layer statistics every 10th step.
- fastai ActivationStats, its default: ``fastai.callback.hook.ActivationStats()`` on the
  modules with parameters: mean, std and fraction of outputs <= 0.05 of each module's
  output (three ``.item()``), appended to ``stats`` after every batch. The callback is
  driven as a ``Learner`` drives it (``before_fit`` once, ``after_batch`` each step), not
  through fastai's own training loop.
- fastai ActivationStats, every layer: the same with ``include_paramless=True`` (every leaf
  module, covshift's default selection).
- wandb.watch all: ``wandb.watch(model, log="all", log_freq=1)`` in an offline run writing
  to a temporary folder (``mode="offline"``: ``mode="disabled"`` returns a no-op run that
  registers no hook), ``wandb.log({"loss": ...})`` each step: a 64-bin histogram of every
  parameter and of every parameter's gradient, each step. System metrics are off.
- TensorBoard histograms: by hand, as a user would do it: forward hooks keep every leaf
  module's output, and after each step ``SummaryWriter.add_histogram`` writes every kept
  output and every parameter to a temporary folder.
- TorchLens: ``torchlens.trace(model, x)`` after each training step (an extra forward pass
  that logs every operation and keeps every operation's output), then mean and std of each
  kept output (``.item()``). TorchLens wraps torch's functions for the whole process on its
  first call, so its column is measured after the others, in rounds of its own against
  plain blocks of their own.
- cockpit economy: ``cockpit.Cockpit(params, quantities=configuration("economy"))``
  (Alpha, Distance, GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest,
  UpdateSize, each every step) on the model and loss extended by BackPACK, the backward
  pass inside ``with cockpit(step, info=...)``, with the per-example losses it needs.

A tool whose package is missing gets "not installed" and the others go on. The models are
those of benchmarks/overhead.py (``cnn8``: seconds per step on a CPU, give it few rounds).

    python benchmarks/peers.py --threads 1                        # mlp and cnn, all columns
    python benchmarks/peers.py --threads 1 --models cnn8 --rounds 3 --block 1
    python benchmarks/peers.py --quick                            # one tiny round, covshift only
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import itertools
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import covshift
from overhead import Recorder, StepTimer, cnn, cnn8, deep, mlp, parse_steps, step_parser, sync, time_block

MODELS = {"mlp": mlp, "cnn": cnn, "cnn8": cnn8, "deep": deep}
#: A block runner: the seconds of one block of training steps.
Run = Callable[[], float]


@dataclass
class Workload:
    """One model's batch and the settings every column of it shares."""

    name: str
    base: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    block: int
    device: torch.device
    folder: Path

    def copy(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        """A fresh copy of the model, with the initial weights, and its optimizer."""
        model = copy.deepcopy(self.base).to(self.device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def timed(self, model: nn.Module, opt: torch.optim.Optimizer, recorder: Recorder | None) -> Run:
        """Blocks of the plain training step, each step ended by ``recorder.step(loss=...)``."""
        return partial(time_block, model, opt, recorder, self.x, self.y, self.block, self.device)


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module without children: covshift's default selection."""
    return [(name, module) for name, module in model.named_modules() if next(module.children(), None) is None]


def plain(w: Workload, stack: contextlib.ExitStack) -> Run:
    return w.timed(*w.copy(), None)


class SpreadRun:
    """A covshift column's blocks, each step timed (:class:`overhead.StepTimer`), so that
    :func:`measure_phase` gives every block its share of the flushes, which land in few."""

    def __init__(self, w: Workload, model: nn.Module, opt: torch.optim.Optimizer, tracer: covshift.Tracer) -> None:
        self.timer = StepTimer(tracer)
        self.run = w.timed(model, opt, self.timer)

    def __call__(self) -> float:
        return self.run()


def covshift_tracer(every: int, w: Workload, stack: contextlib.ExitStack) -> Run:
    model, opt = w.copy()
    tracer = stack.enter_context(covshift.Tracer(model, w.folder / f"{w.name}-every{every}.covshift",
                                                 optimizer=opt, every=every))
    return SpreadRun(w, model, opt, tracer)


class FastaiStats:
    """fastai's ActivationStats driven as a Learner drives it during fit."""

    def __init__(self, model: nn.Module, every_layer: bool) -> None:
        from fastai.callback.hook import ActivationStats

        self.callback = ActivationStats(include_paramless=every_layer)
        self.callback.learn = SimpleNamespace(model=model, training=True)
        self.callback.before_fit()

    def step(self, loss: torch.Tensor) -> None:
        self.callback.after_batch()


def fastai_stats(every_layer: bool, w: Workload, stack: contextlib.ExitStack) -> Run:
    model, opt = w.copy()
    stats = FastaiStats(model, every_layer)
    stack.callback(stats.callback.after_fit)
    return w.timed(model, opt, stats)


class WandbWatch:
    """An offline wandb run watching the model; each step's log commits its histograms."""

    def __init__(self, model: nn.Module, folder: Path) -> None:
        import wandb

        folder.mkdir()
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False,
                                  disable_git=True)
        self.run = wandb.init(mode="offline", dir=folder, project="covshift-peers", settings=settings)
        self.run.watch(model, log="all", log_freq=1)

    def step(self, loss: torch.Tensor) -> None:
        self.run.log({"loss": loss.item()})


def wandb_watch(w: Workload, stack: contextlib.ExitStack) -> Run:
    model, opt = w.copy()
    watch = WandbWatch(model, w.folder / f"{w.name}-wandb")
    stack.callback(watch.run.finish)
    return w.timed(model, opt, watch)


class Histograms:
    """TensorBoard histograms of every leaf module's output and every parameter, each step."""

    def __init__(self, model: nn.Module, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.model = model
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(partial(self._keep, name)) for name, module in leaf_modules(model)]
        self.steps = 0

    def _keep(self, name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.outputs[name] = output.detach()

    def step(self, loss: torch.Tensor) -> None:
        for name, output in self.outputs.items():
            self.writer.add_histogram(f"activation/{name}", output, self.steps)
        for name, parameter in self.model.named_parameters():
            self.writer.add_histogram(f"parameter/{name}", parameter.detach(), self.steps)
        self.steps += 1

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.writer.close()


def tensorboard_histograms(w: Workload, stack: contextlib.ExitStack) -> Run:
    model, opt = w.copy()
    histograms = Histograms(model, w.folder / f"{w.name}-tensorboard")
    stack.callback(histograms.close)
    return w.timed(model, opt, histograms)


class TorchLensStats:
    """A TorchLens trace of the step's batch, and the mean and std of every kept output."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        import torchlens

        self.trace = partial(torchlens.trace, model, x)
        self.stats: list[list[tuple[float, float]]] = []

    def step(self, loss: torch.Tensor) -> None:
        outputs = (getattr(layer, "out", None) for layer in self.trace().layers)
        self.stats.append([(out.mean().item(), out.std().item()) for out in outputs
                           if isinstance(out, torch.Tensor) and out.is_floating_point()])


def torchlens_trace(w: Workload, stack: contextlib.ExitStack) -> Run:
    model, opt = w.copy()
    return w.timed(model, opt, TorchLensStats(model, w.x))


def cockpit_economy(w: Workload, stack: contextlib.ExitStack) -> Run:
    from backpack import extend
    from cockpit import Cockpit
    from cockpit.utils.configuration import configuration

    model, opt = w.copy()
    extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    per_example = nn.CrossEntropyLoss(reduction="none")
    cockpit = Cockpit(model.parameters(), quantities=configuration("economy"))
    steps = itertools.count()

    def run() -> float:
        sync(w.device)
        start = time.perf_counter()
        for step in itertools.islice(steps, w.block):
            opt.zero_grad()
            output = model(w.x)
            loss = loss_fn(output, w.y)
            info = {"batch_size": len(w.x), "individual_losses": per_example(output, w.y), "loss": loss,
                    "optimizer": opt}
            with cockpit(step, info=info):
                loss.backward(create_graph=cockpit.create_graph(step))
            opt.step()
        sync(w.device)
        return time.perf_counter() - start

    return run


@dataclass(frozen=True)
class Column:
    key: str  # its name in --columns
    title: str  # its header in the table
    package: str | None  # the module it needs beyond covshift
    setup: Callable[[Workload, contextlib.ExitStack], Run]
    alone: bool = False  # measured in rounds of its own, after the others


COLUMNS = (
    Column("covshift", "covshift default", None, partial(covshift_tracer, 1)),
    Column("covshift10", "covshift every=10", None, partial(covshift_tracer, 10)),
    Column("fastai", "fastai ActivationStats, its default", "fastai", partial(fastai_stats, False)),
    Column("fastai-all", "fastai ActivationStats, every layer", "fastai", partial(fastai_stats, True)),
    Column("wandb", "wandb.watch all", "wandb", wandb_watch),
    Column("tensorboard", "TensorBoard histograms", "tensorboard", tensorboard_histograms),
    Column("torchlens", "TorchLens", "torchlens", torchlens_trace, alone=True),
    Column("cockpit", "cockpit economy", "cockpit", cockpit_economy),
)


def measure_phase(w: Workload, columns: list[Column], rounds: int, cells: dict[str, str]) -> float:
    """Interleaved rounds of a plain block and one block of each column; fills ``cells``.

    Returns the plain copy's median seconds per step."""
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the peers' deprecation warnings at import and setup
        runs: dict[str, Run] = {"plain": plain(w, stack)}
        for column in columns:
            try:
                runs[column.key] = column.setup(w, stack)
                runs[column.key]()  # warm up
            except Exception as error:  # a peer that fails to start leaves its cell, not the run
                cells[column.key] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                runs.pop(column.key, None)
        runs["plain"]()
        spread = {key: run.timer for key, run in runs.items() if isinstance(run, SpreadRun)}
        for timer in spread.values():
            timer.reset()
        times: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, run in runs.items():
                times[key].append(run())
        for key, timer in spread.items():
            times[key] = timer.spread(times[key], w.block)
    for column in columns:
        if column.key in runs:
            ratios = [t / p for t, p in zip(times[column.key], times["plain"])]
            cells[column.key] = f"{statistics.median(ratios):.2f}"
            print(f"{w.name:5s} {column.title}: {cells[column.key]} (rounds {min(ratios):.2f}..{max(ratios):.2f})",
                  flush=True)
    return statistics.median(times["plain"]) / w.block


def measure(name: str, device: torch.device, rounds: int, block: int, columns: list[Column], folder: Path,
            skipped: str) -> dict[str, str]:
    """The cells of one model's row: each column's ratio, or why it has none."""
    torch.manual_seed(0)
    base, shape = MODELS[name]()
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    w = Workload(name, base, x, y, block, device, folder)
    cells = {}
    for column in COLUMNS:
        if column.package is not None and importlib.util.find_spec(column.package) is None:
            cells[column.key] = "not installed"
        elif column not in columns:
            cells[column.key] = skipped
    chosen = [column for column in columns if column.key not in cells]
    together = [column for column in chosen if not column.alone]
    plain_step = measure_phase(w, together, rounds, cells)
    cells["plain"] = f"{plain_step * 1e3:.2f}"
    for column in chosen:
        if column.alone:
            alone_step = measure_phase(w, [column], rounds, cells)
            print(f"{name:5s} plain {plain_step * 1e3:.2f} ms/step, {alone_step * 1e3:.2f} in {column.title}'s rounds",
                  flush=True)
    return cells


def table(rows: dict[str, dict[str, str]]) -> str:
    """The Markdown table: one row per model, its plain step and one ratio per column."""
    keys = ["plain", *(column.key for column in COLUMNS)]
    lines = ["| model | plain ms/step | " + " | ".join(column.title for column in COLUMNS) + " |",
             "|---" * len(keys) + "|---|"]
    lines += [f"| {name} | " + " | ".join(cells.get(key, "–") for key in keys) + " |" for name, cells in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = step_parser(__doc__, list(MODELS), rounds=10, block=20)
    keys = [column.key for column in COLUMNS]
    parser.add_argument("--columns", default=",".join(keys), help=f"comma-separated, of: {', '.join(keys)}")
    parser.add_argument("--quick", action="store_true",
                        help="one round of 2 steps on mlp, covshift's columns only (the peers: "
                             "'not installed' or 'skipped')")
    args, device = parse_steps(parser, list(MODELS))
    unknown = set(args.columns.split(",")) - set(keys)
    if unknown:
        parser.error(f"unknown --columns {', '.join(sorted(unknown))}; choose from {', '.join(keys)}")
    if args.quick:
        args.models, args.rounds, args.block, args.columns = "mlp", 1, 2, "covshift,covshift10"
    columns = [column for column in COLUMNS if column.key in args.columns.split(",")]
    skipped = "skipped (--quick)" if args.quick else "not chosen"
    with tempfile.TemporaryDirectory() as folder:
        rows = {name: measure(name, device, args.rounds, args.block, columns, Path(folder), skipped)
                for name in args.models.split(",")}
    print(table(rows))


if __name__ == "__main__":
    main()
