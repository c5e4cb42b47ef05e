"""Training-step time with and without a covshift Tracer (all per-step statistics, all layers).

Two copies of each model with identical weights train on the same fixed batch. Blocks of
``--block`` steps alternate between the plain and the traced copy, so drift of the machine
(clock, other load) hits both alike; the ratio is the median over rounds of traced/plain
block time. Flushes to the trace file fall inside some traced blocks: each block is given
its share of all flushes instead (``StepTimer.spread``), so that the median counts them. Each
line also gives the cost per hooked layer and step, (traced - plain) / layers, in µs, and
the model's target ratio (✗ when missed).

Models: ``mlp`` (3 × 100 sigmoid units, batch 64), ``cnn`` (3 conv layers of ``--channels``,
batch 64), ``cnn8`` (8 conv layers of 64 channels on 32 × 32, batch 64: seconds per step on a
CPU, give it few rounds) and ``deep`` (24 × (Linear(64, 64) + Tanh) + Linear(64, 10), 49
hooked layers, batch 32).

    python benchmarks/overhead.py                 # CPU, mlp and cnn
    python benchmarks/overhead.py --models deep --threads 1 --rounds 20 --block 20
    python benchmarks/overhead.py --device cuda   # where a GPU is available
    python benchmarks/overhead.py --models mlp,deep --threads 1 --breakdown   # where the time goes
    python benchmarks/overhead.py --models deep --threads 1 --compare HEAD~1 --clock cpu   # a change's effect

``--breakdown`` splits ``traced/plain - 1`` into PyTorch's hook machinery (the floor: bare
hooks on the same layers of a third copy, interleaved), covshift's work inside the hooks
(the rest), ``tracer.step()`` at the steps that do not flush (the step's end: statistics
of the outputs kept whole, parameter norms) and the flush, amortised over ``flush_every``
steps. Times of ``step()`` are host times: on a GPU they do not wait for the device.

``--compare REF`` traces a fourth copy with covshift as of the git commit ``REF`` (extracted
with ``git archive`` and imported under another name), in the same rounds, and prints the
median of this code's traced block time over REF's, with the quartiles over rounds: the
way to see a change of a few percent. ``--clock cpu`` times blocks by the process's CPU time
(``time.process_time``, CPU only), which other load on a shared machine disturbs less than
wall-clock time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Protocol

import torch
from torch import nn

import covshift


def mlp() -> tuple[nn.Module, torch.Size]:
    """Three hidden layers of 100 sigmoid units (Ioffe & Szegedy 2015, Figure 1)."""
    layers: list[nn.Module] = []
    width = 784
    for _ in range(3):
        layers += [nn.Linear(width, 100), nn.Sigmoid()]
        width = 100
    return nn.Sequential(*layers, nn.Linear(100, 10)), torch.Size([64, 784])


def cnn(channels: int = 32) -> tuple[nn.Module, torch.Size]:
    """Three 3x3 conv layers with ReLU on 32x32x3 inputs, then a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10),
    ), torch.Size([64, 3, 32, 32])


def cnn8() -> tuple[nn.Module, torch.Size]:
    """Eight 3x3 conv layers of 64 channels with ReLU on 32x32x3 inputs, then a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    for _ in range(7):
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), torch.Size([64, 3, 32, 32])


def deep() -> tuple[nn.Module, torch.Size]:
    """The "deep narrow" MLP of benchmarks/store.py: 49 hooked layers of 64 units, batch 32."""
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(64, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 10)), torch.Size([32, 64])


#: The target ratio of each model (issue 13).
TARGETS = {"mlp": 1.5, "cnn": 1.10, "cnn8": 1.10, "deep": 2.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Recorder(Protocol):
    """What ends each timed step: a covshift Tracer, or a peer tool's adapter (benchmarks/peers.py)."""

    def step(self, loss: torch.Tensor) -> object: ...


#: A training step's phases, as :func:`time_block` times them.
PHASES = ("forward", "backward", "optimizer", "step()")


def time_block(forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
               tracer: Recorder | None, x: torch.Tensor, y: torch.Tensor, block: int,
               device: torch.device, clock: Callable[[], float] = time.perf_counter,
               phases: dict[str, float] | None = None) -> float:
    """Seconds of ``clock`` for ``block`` training steps on the batch ``(x, y)``, each ended by
    ``tracer``; with ``phases``, each of :data:`PHASES`' seconds (host time) are added to it."""
    tick = clock if phases is not None else _no_time
    sync(device)
    start = clock()
    for _ in range(block):
        t0 = tick()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(forward(x), y)
        t1 = tick()
        loss.backward()
        t2 = tick()
        opt.step()
        t3 = tick()
        if tracer is not None:
            tracer.step(loss=loss)
        if phases is not None:
            for phase, took in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, tick() - t3)):
                phases[phase] += took
    sync(device)
    return clock() - start


def _no_time() -> float:
    return 0.0


def _ignore(grad: object) -> None:
    return None


class Floor:
    """The least a tracer that hooks every layer does, without any statistic or file: a
    forward hook on each of ``layers`` copying the output's first ``sample_size`` values into
    a preallocated buffer (covshift's sample is as large), and a gradient hook on the output
    (a pre-hook of the node that made it) that does nothing. Its cost is PyTorch's hook
    machinery and one small copy."""

    def __init__(self, model: nn.Module, layers: list[str], sample_size: int = 4096) -> None:
        modules = dict(model.named_modules())
        self.sample_size, self.buffer = sample_size, torch.empty(0)
        self.handles = [modules[name].register_forward_hook(self._forward) for name in layers]

    def _forward(self, module: nn.Module, args: object, output: object) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        flat = output.detach().reshape(-1)[: self.sample_size]
        if self.buffer.numel() < flat.numel() or self.buffer.device != flat.device:
            self.buffer = torch.empty_like(flat)
        self.buffer[: flat.numel()].copy_(flat)
        node = output.grad_fn  # a pre-hook of the node that made the output: the cheapest gradient hook
        if node is not None:
            node.register_prehook(_ignore)
        else:
            output.register_hook(_ignore)

    def step(self, loss: torch.Tensor) -> None:
        return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class StepTimer:
    """A tracer whose :meth:`step` calls are timed: those that flush (every ``flush_every``
    recorded steps; nothing else flushes here) apart from the others. A flush lands in one
    block of ``flush_every / block``, so the median over rounds would leave it out:
    :meth:`spread` gives every block its share of all flushes instead of the ones that fell
    into it, the blocks being the timed steps since :meth:`reset`, ``block`` at a time."""

    def __init__(self, tracer: covshift.Tracer, clock: Callable[[], float] = time.perf_counter) -> None:
        self.tracer, self.clock = tracer, clock
        self.ends: list[float] = []  # seconds of each step() that did not flush
        self.flushes: dict[int, float] = {}  # ... and of each that did, by its number since reset()

    def step(self, loss: torch.Tensor) -> None:
        start = self.clock()
        index = self.tracer.step(loss=loss)
        took = self.clock() - start
        if (index + 1) % self.tracer.flush_every == 0:
            self.flushes[len(self.ends) + len(self.flushes)] = took
        else:
            self.ends.append(took)

    def reset(self) -> None:
        """Forget the warm-up."""
        self.ends.clear(), self.flushes.clear()

    def _extra(self, took: float) -> float:
        """A flushing step's seconds beyond the median step end."""
        return took - (statistics.median(self.ends) if self.ends else 0.0)

    def flush_share(self) -> float:
        """Seconds per step that flushing adds: the flushing steps' extra time, summed and
        divided by all timed steps."""
        if not self.flushes:
            return 0.0
        return sum(map(self._extra, self.flushes.values())) / (len(self.ends) + len(self.flushes))

    def spread(self, times: list[float], block: int) -> list[float]:
        """``times`` of the blocks of ``block`` steps timed since :meth:`reset`, in order,
        with each block's flushes replaced by its share of all of them."""
        extra = [0.0] * len(times)
        for number, took in self.flushes.items():
            extra[number // block] += self._extra(took)
        share = self.flush_share() * block
        return [t - e + share for t, e in zip(times, extra)]


def covshift_at(ref: str, folder: Path) -> ModuleType:
    """The covshift package as of git commit ``ref`` of this repository, extracted into
    ``folder`` and imported as ``covshift_at_ref`` (its imports are relative)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", ref, "covshift"], capture_output=True)
    if done.returncode:
        sys.exit(f"--compare {ref}: {done.stderr.decode().strip() or 'git archive failed'}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (folder / "covshift").rename(folder / "covshift_at_ref")
    sys.path.insert(0, str(folder))
    return importlib.import_module("covshift_at_ref")


def measure(name: str, build, device: torch.device, rounds: int, block: int, folder: Path,
            target: float, breakdown: bool = False, reference: tuple[str, ModuleType] | None = None,
            clock: Callable[[], float] = time.perf_counter) -> float:
    torch.manual_seed(0)
    plain, shape = build()
    traced = copy.deepcopy(plain)
    bare = copy.deepcopy(plain) if breakdown else None  # under bare hooks
    old = copy.deepcopy(plain) if reference is not None else None  # traced by REF's covshift
    models = [m for m in (plain, traced, bare, old) if m is not None]
    for model in models:
        model.to(device)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models}

    def run(model: nn.Module, tracer: Recorder | None) -> float:
        return time_block(model, opts[id(model)], tracer, x, y, block, device, clock)

    floors, plain_times, traced_times, old_times = [], [], [], []
    with contextlib.ExitStack() as stack:
        tracer = stack.enter_context(covshift.Tracer(traced, folder / f"{name}.covshift", optimizer=opts[id(traced)]))
        then = None if reference is None else StepTimer(stack.enter_context(
            reference[1].Tracer(old, folder / f"{name}-ref.covshift", optimizer=opts[id(old)])), clock)
        timer = StepTimer(tracer, clock)
        run(plain, None), run(traced, timer)  # warm up (the tracer finds its layers in the first step)
        hooks = Floor(bare, tracer.layers) if breakdown else None
        for model, recorder in ((bare, hooks), (old, then)):
            if recorder is not None:
                run(model, recorder)
        timers = [(traced, timer, traced_times)] + ([] if then is None else [(old, then, old_times)])
        for _, each, _ in timers:
            each.reset()
        for i in range(rounds):
            plain_times.append(run(plain, None))
            for model, each, times in (timers if i % 2 == 0 else timers[::-1]):  # each first in turn
                times.append(run(model, each))
            if hooks is not None:
                floors.append(run(bare, hooks) / plain_times[-1])
        layers = len(tracer.layers)
    if hooks is not None:
        hooks.close()
    traced_times = timer.spread(traced_times, block)
    ratios = [t / p for t, p in zip(traced_times, plain_times)]
    ratio = statistics.median(ratios)
    plain_step = statistics.median(plain_times) / block

    def per_layer(share: float) -> str:  # a share of the plain step as µs per layer and step
        return f"{share * plain_step / layers * 1e6:.0f} µs"

    print(f"{name:5s} {device.type}: plain {plain_step * 1e3:7.2f} ms/step, "
          f"traced/plain {ratio:.3f}{' ✗' if ratio > target else ''} (target ≤ {target:.2f}; rounds "
          f"{min(ratios):.3f}..{max(ratios):.3f}), {layers} layers, {per_layer(ratio - 1.0)} per layer and step",
          flush=True)
    if floors:
        machinery = statistics.median(floors) - 1.0
        end = (statistics.median(timer.ends) if timer.ends else 0.0) / plain_step
        flush = timer.flush_share() / plain_step
        work = ratio - 1.0 - machinery - end - flush
        print(f"{'':5s} floor (hooks that copy each output's sample and hook its gradient, no statistics): "
              f"{1.0 + machinery:.3f} of plain, {per_layer(machinery)} per layer and step", flush=True)
        print(f"{'':5s} traced/plain - 1 = {ratio - 1.0:.3f}: PyTorch's hooks {machinery:.3f} ({per_layer(machinery)}), "
              f"covshift in the hooks {work:.3f} ({per_layer(work)}), step() {end:.3f} ({per_layer(end)}), "
              f"flush {flush:.3f} ({per_layer(flush)}) per layer and step", flush=True)
    if then is not None and reference is not None:
        old_times = then.spread(old_times, block)
        against = [a / b for a, b in zip(traced_times, old_times)]
        low, _, high = statistics.quantiles(against, n=4) if len(against) > 1 else (against[0],) * 3
        at_ref = statistics.median(b / p for b, p in zip(old_times, plain_times))
        print(f"{'':5s} traced/traced at {reference[0]}: {statistics.median(against):.3f} (rounds' quartiles "
              f"{low:.3f}..{high:.3f}); at {reference[0]} traced/plain {at_ref:.3f}", flush=True)
    return ratio


def step_parser(doc: str, models: list[str], rounds: int, block: int) -> argparse.ArgumentParser:
    """The options of a benchmark of training steps on ``models``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--block", type=int, default=block, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated, of: {', '.join(models)}")
    return parser


def parse_steps(parser: argparse.ArgumentParser, models: list[str]) -> tuple[argparse.Namespace, torch.device]:
    """Parse and check the options, set torch's threads and print the versions."""
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(models)
    if unknown:
        parser.error(f"unknown --models {', '.join(sorted(unknown))}; choose from {', '.join(models)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, covshift {covshift.__version__}, {torch.get_num_threads()} CPU threads")
    return args, torch.device(args.device)


def main() -> None:
    parser = step_parser(__doc__, list(TARGETS), rounds=15, block=50)
    parser.add_argument("--channels", type=int, default=32, help="channels of the CNN's conv layers")
    parser.add_argument("--breakdown", action="store_true",
                        help="split the overhead: time bare hooks on the same layers (a copy of each output's sample, "
                             "an empty gradient hook: PyTorch's hook machinery, which any per-layer tracer pays), "
                             "and each tracer.step() (the step's end, and the flush every flush_every steps)")
    parser.add_argument("--compare", metavar="REF", default=None,
                        help="also trace with covshift as of this git commit, interleaved, and print this code's "
                             "traced time over REF's")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time blocks by wall-clock time or by the process's CPU time (CPU only: steadier on a "
                             "shared machine)")
    args, device = parse_steps(parser, list(TARGETS))
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu times CPU work only; use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as folder:
        reference = None if args.compare is None else (args.compare, covshift_at(args.compare, Path(folder) / "ref"))
        for name in args.models.split(","):
            build = {"mlp": mlp, "cnn": partial(cnn, args.channels), "cnn8": cnn8, "deep": deep}[name]
            measure(f"{name}{args.channels if name == 'cnn' else ''}", build, device, args.rounds, args.block,
                    Path(folder), TARGETS[name], args.breakdown, reference, clock)


if __name__ == "__main__":
    main()
