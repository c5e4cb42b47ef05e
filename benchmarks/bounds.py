"""Where a traced step's extra time goes, part by part, and which operators bound each part.

For each model of ``benchmarks/overhead.py``, three copies with identical weights train on
one fixed batch in interleaved blocks of ``--block`` steps: plain, under bare hooks
(``overhead.Floor``: PyTorch's hook machinery, which any per-layer tracer pays) and traced.
In the traced copy the Tracer's parts are timed where they run, by wrapping this tracer
object's own methods (its instance attributes: covshift's code is not changed):

- forward hooks: covshift's work inside them (a copy of the output's sample, the moments
  of a large output, the gradient hook's registration);
- gradient hooks: the gradient's sum of squares, or holding it for the step's end;
- the optimizer's pre-hook: the learning rates;
- at the step's end: the held gradients' sums of squares, the copy of the step's buffers,
  the statistics of the outputs kept whole, the parameter norms, the weights' snapshot;
- the flush every ``flush_every`` steps, amortised over the steps (``overhead.StepTimer``).

Every step is also timed by phase (forward, backward, optimizer, ``step()``) in all three
copies, so each phase's extra time is set beside the parts that run in it; what is left
(traced minus bare hooks minus the parts) is PyTorch's calls of covshift's hooks beyond
the bare ones, the garbage collector, caches the statistics' passes took, and noise (the
bare hooks copy a sample too, so the forward's is counted twice). Then the share of the
plain step that the model's target leaves once PyTorch's hooks and the flush are paid.
Last, ``--profile`` steps run under ``torch.profiler`` and each part is split into the ATen
operators it calls (each top-level operator's time with its children, per step; the
profiler adds its own cost to every operator, so read the shares, not the sums): the
kernels that bound it. What no operator accounts for is Python and PyTorch's dispatch.
Times are the process's CPU time unless ``--clock wall``.

    python benchmarks/bounds.py --models mlp,deep --threads 1
    python benchmarks/bounds.py --models cnn --threads 1 --rounds 6 --block 4 --profile 4

CPU only: the parts are host times, which on a GPU do not wait for the device.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

import covshift
from overhead import PHASES, TARGETS, Floor, StepTimer, cnn, cnn8, deep, mlp, parse_steps, step_parser, time_block

#: The timed parts: (label, where the tracer keeps the method, the method's name).
PARTS: list[tuple[str, str, str]] = [
    ("forward hooks", "", "_on_forward"),
    ("forward hooks", "", "_on_input"),
    ("gradient hooks", "", "_on_grad"),
    ("gradient hooks", "", "_hold_grad"),
    ("learning rates", "", "_on_optimizer_step"),
    ("held gradients", "", "_write_held"),
    ("buffers' copy", "_staging", "move"),
    ("buffers' copy", "_grad_staging", "move"),
    ("outputs kept whole", "_whole", "compute"),
    ("parameter norms", "_param_norms", "record"),
    ("weights' snapshot", "_param_norms", "snapshot"),
]
#: The phases (``overhead.PHASES``) that parts run in, when not in ``step()``.
IN_PHASE = {"forward hooks": "forward", "gradient hooks": "backward", "learning rates": "optimizer"}
SCOPE = "covshift: "  # the profiler's label of a part


class Parts:
    """Seconds spent in each part of a tracer, by ``clock``; while :attr:`profiling`, each
    call is also a ``torch.profiler`` scope named after its part."""

    def __init__(self, tracer: covshift.Tracer, clock: Callable[[], float]) -> None:
        self.clock, self.profiling = clock, False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        for label, holder, name in PARTS:
            owner = getattr(tracer, holder) if holder else tracer
            setattr(owner, name, self._timed(label, getattr(owner, name)))

    def _timed(self, label: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = self.clock()
            with record_function(SCOPE + label) if self.profiling else contextlib.nullcontext():
                out = method(*args, **kwargs)
            self.seconds[label] += self.clock() - start
            self.calls[label] += 1
            return out

        return timed

    def reset(self) -> None:
        self.seconds.clear(), self.calls.clear()

    def own_cost(self, calls: int = 20_000) -> float:
        """Seconds that timing adds inside one call (the clock read, the scope's test): taken
        off each part, once per call."""
        label = "calibration"
        nothing = self._timed(label, lambda: None)
        for _ in range(calls):
            nothing()
        return self.seconds.pop(label) / self.calls.pop(label)


def operators(events: Any) -> tuple[dict[str, float], dict[str, dict[str, tuple[int, float]]]]:
    """From profiler ``events``: each part's time (µs) and, for each part, its top-level
    operators (those called by the part itself, not by another operator) as ``name ->
    (calls, µs)``, their children's time included."""
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, dict[str, tuple[int, float]]] = defaultdict(dict)
    for event in events:
        if event.name.startswith(SCOPE):
            totals[event.name[len(SCOPE):]] += event.cpu_time_total
            continue
        parent = event.cpu_parent
        if parent is None or not parent.name.startswith(SCOPE):
            continue  # outside the parts, or called by another operator
        part = parent.name[len(SCOPE):]
        calls, micros = ops[part].get(event.name, (0, 0.0))
        ops[part][event.name] = (calls + 1, micros + event.cpu_time_total)
    return dict(totals), dict(ops)


def measure(name: str, build: Callable[[], tuple[nn.Module, torch.Size]], rounds: int, block: int,
            profiled: int, top: int, folder: Path, clock: Callable[[], float]) -> None:
    torch.manual_seed(0)
    plain, shape = build()
    bare, traced = copy.deepcopy(plain), copy.deepcopy(plain)
    x, y, cpu = torch.randn(shape), torch.randint(0, 10, (shape[0],)), torch.device("cpu")
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (plain, bare, traced)}
    phases: dict[int, dict[str, float]] = {id(m): defaultdict(float) for m in (plain, bare, traced)}

    def run(model: nn.Module, recorder: Any, steps: int = block) -> float:
        return time_block(model, opts[id(model)], recorder, x, y, steps, cpu, clock, phases[id(model)])

    tracer = covshift.Tracer(traced, folder / f"{name}.covshift", optimizer=opts[id(traced)])
    parts = Parts(tracer, clock)
    with tracer:
        timer = StepTimer(tracer, clock)
        # warm up past a flush: the tracer finds its layers in the first step, its buffers fill once
        run(plain, None), run(traced, timer, tracer.flush_every + 1)
        floor = Floor(bare, tracer.layers)
        run(bare, floor)
        timer.reset(), parts.reset()
        for each in phases.values():
            each.clear()
        plain_times, floor_times, traced_times = [], [], []
        for _ in range(rounds):
            plain_times.append(run(plain, None))
            floor_times.append(run(bare, floor))
            traced_times.append(run(traced, timer))
        steps = rounds * block
        cost = parts.own_cost()
        seconds = {label: s - cost * parts.calls[label] for label, s in parts.seconds.items()}
        parts.profiling = True
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time_block(traced, opts[id(traced)], tracer, x, y, profiled, cpu, clock)
        parts.profiling = False
    floor.close()
    plain_step = statistics.median(plain_times) / block
    ratio = statistics.median(t / p for t, p in zip(timer.spread(traced_times, block), plain_times))
    hooks = statistics.median(f / p for f, p in zip(floor_times, plain_times)) - 1.0
    flush = timer.flush_share() / plain_step
    target = TARGETS[name]
    print(f"\n{name}: plain {plain_step * 1e3:.3f} ms/step, traced/plain {ratio:.3f} (target ≤ {target:.2f}), "
          f"{len(tracer.layers)} layers, {rounds} rounds of {block} steps")
    micros = {label: s / steps * 1e6 for label, s in seconds.items()}
    if flush:
        micros["flush"] = flush * plain_step * 1e6
    print(f"  {'µs per step (means)':20s} {'plain':>7s} {'bare hooks':>11s} {'traced':>8s} {'left':>6s}  "
          "covshift's parts in the traced phase (left: traced - bare hooks - parts)")
    for phase in PHASES:
        plain_us, bare_us, traced_us = (phases[id(m)][phase] / steps * 1e6 for m in (plain, bare, traced))
        inside = {k: v for k, v in micros.items() if IN_PHASE.get(k, "step()") == phase}
        left = traced_us - bare_us - sum(inside.values())
        listed = ", ".join(f"{k} {v:.0f}" for k, v in inside.items())
        print(f"  {phase:20s} {plain_us:7.0f} {bare_us - plain_us:+11.0f} {traced_us - plain_us:+8.0f} {left:+6.0f}  "
              f"{listed}")
    own = ratio - 1.0 - hooks - flush
    leaves = target - 1.0 - hooks - flush
    print(f"  target {target:.2f} leaves {leaves:.3f} of the plain step ({leaves * plain_step * 1e6:.0f} µs) for covshift's "
          f"own work once PyTorch's hooks ({hooks:.3f}, bare hooks' median ratio - 1) and the flush ({flush:.3f}) "
          f"are paid; it takes {own:.3f} ({own * plain_step * 1e6:.0f} µs)")
    totals, ops = operators(prof.events())
    print(f"  operators of each part (torch.profiler, {profiled} steps; µs per step with the profiler's cost):")
    for label in sorted(totals, key=totals.get, reverse=True):
        found = sorted(ops.get(label, {}).items(), key=lambda kv: kv[1][1], reverse=True)
        total = totals[label] / profiled
        named = sum(m for _, (_, m) in found) / profiled
        listed = ", ".join(f"{op.removeprefix('aten::')} {c / profiled:g}× {m / profiled:.0f}"
                           for op, (c, m) in found[:top])
        print(f"  {label:26s} {total:7.0f} µs: {listed or 'no operator'}; Python and dispatch {total - named:.0f}")


def main() -> None:
    parser = step_parser(__doc__, list(TARGETS), rounds=10, block=20)
    parser.add_argument("--profile", type=int, default=20, help="steps run under torch.profiler")
    parser.add_argument("--top", type=int, default=5, help="operators listed per part")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                        help="time by the process's CPU time (default: steadier on a shared machine) or wall-clock")
    parser.add_argument("--channels", type=int, default=32, help="channels of the CNN's conv layers")
    args, device = parse_steps(parser, list(TARGETS))
    if device.type != "cpu":
        parser.error("bounds.py times host work: use --device cpu (benchmarks/overhead.py measures a GPU)")
    if min(args.rounds, args.block, args.profile, args.top) < 1:
        parser.error("--rounds, --block, --profile and --top must be at least 1")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    builds = {"mlp": mlp, "cnn": partial(cnn, args.channels), "cnn8": cnn8, "deep": deep}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            measure(name, builds[name], args.rounds, args.block, args.profile, args.top, Path(folder), clock)


if __name__ == "__main__":
    main()
