"""Training-step time under torch.compile with and without a covshift Tracer.

Four copies of each model with identical weights train on the same fixed batch: eager,
eager + Tracer, ``torch.compile(model)`` (inductor, the default backend) and compiled +
Tracer. Blocks of ``--block`` steps of the four alternate in every round, so drift of the
machine hits all alike; each ratio is the median over rounds of the block times' ratio,
each traced block given its share of all flushes (``overhead.StepTimer``).
Compiling (and the first steps) happen in warm-up blocks before the rounds. The graphs and
graph breaks that dynamo counted for the traced model are printed too (one graph: no break
and no recompile).

    python benchmarks/compiled.py --threads 1                 # CPU, mlp and cnn
    python benchmarks/compiled.py --models deep --threads 1 --rounds 10 --block 20
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from functools import partial
from collections.abc import Callable
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import covshift
from overhead import StepTimer, cnn, deep, mlp, parse_steps, step_parser, time_block

MODELS = {"mlp": mlp, "cnn": cnn, "deep": deep}
KINDS = ("eager", "eager+traced", "compiled", "compiled+traced")


def _dynamo_counts() -> str:
    breaks = sum(counters["graph_break"].values())
    return f"{counters['stats']['unique_graphs']} graphs, {breaks} graph breaks"


def measure(name: str, build: Callable, device: torch.device, rounds: int, block: int, folder: Path) -> None:
    torch.manual_seed(0)
    base, shape = build()
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    runs: dict[str, Callable[[], float]] = {}
    timers: dict[str, StepTimer] = {}
    for kind in KINDS:
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        tracer = None
        if kind.endswith("traced"):
            tracer = timers[kind] = StepTimer(
                covshift.Tracer(model, folder / f"{name}-{kind}.covshift", optimizer=opt).start())
        forward = torch.compile(model) if kind.startswith("compiled") else model

        runs[kind] = partial(time_block, forward, opt, tracer, x, y, block, device)
    # the traced copy compiles first: dynamo does not guard on module hooks, so a graph compiled
    # for the plain copy (same code) would run the traced copy without them
    counters.clear()
    runs["compiled+traced"]()
    after_first = _dynamo_counts()
    runs["compiled+traced"]()
    counted = _dynamo_counts()
    for kind in ("compiled", "eager", "eager+traced"):
        runs[kind]()  # warm up
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for timer in timers.values():
        timer.reset()
    for _ in range(rounds):
        for kind, run in runs.items():
            times[kind].append(run())
    for kind, timer in timers.items():
        timer.tracer.close()
        times[kind] = timer.spread(times[kind], block)

    def ratio(a: str, b: str) -> float:
        return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))

    steps = ", ".join(f"{kind} {statistics.median(times[kind]) / block * 1e3:.2f}" for kind in KINDS)
    print(f"{name:5s} {device.type}: ms/step {steps}", flush=True)
    print(f"      compiled+traced/compiled {ratio('compiled+traced', 'compiled'):.3f}, "
          f"eager+traced/eager {ratio('eager+traced', 'eager'):.3f}, "
          f"compiled+traced/eager+traced {ratio('compiled+traced', 'eager+traced'):.3f}, "
          f"compiled/eager {ratio('compiled', 'eager'):.3f}", flush=True)
    print(f"      dynamo, traced model: {after_first} after its first block; "
          f"{counted} after {2 * block} steps", flush=True)


def main() -> None:
    args, device = parse_steps(step_parser(__doc__, list(MODELS), rounds=10, block=20), list(MODELS))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            measure(name, MODELS[name], device, args.rounds, args.block, Path(folder))


if __name__ == "__main__":
    main()
