"""What global statistics cost under DDP: step time with and without a Tracer, and the
flushes' collectives (CPU, gloo, two processes on this machine).

The script starts itself under ``torchrun --nproc_per_node 2``. Each rank trains two DDP
copies of a model from benchmarks/overhead.py on its own batch; blocks of ``--block`` steps
alternate between the plain and the traced copy, and the ratio is the median over rounds of
traced / plain block time. The Tracer's distributed pieces are timed in place: cutting the
samples (``part``), the gather to rank 0 (``gather``, including the wait for the slower
rank) and rank 0's merge, per flush, with the bytes each rank sends.

    python benchmarks/distributed.py                              # deep, 20 rounds of 20 steps
    python benchmarks/distributed.py --model mlp --rounds 10 --block 50
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import covshift
from covshift import distributed

sys.path.insert(0, str(Path(__file__).parent))
import overhead  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(list)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - start)
    return run


def sent(share: distributed.Share) -> None:
    """The bytes a share sends: its samples' as a tensor, the rest's pickled."""
    rest = dataclasses.replace(share, calls=dataclasses.replace(share.calls, samples=share.calls.samples[:0]))
    TIMES["bytes"].append(share.calls.samples.nbytes + len(pickle.dumps(rest)))


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    build = {"mlp": overhead.mlp, "cnn": overhead.cnn, "deep": overhead.deep}[args.model]
    torch.manual_seed(0)
    net, shape = build()
    plain, traced = nn.parallel.DistributedDataParallel(net), nn.parallel.DistributedDataParallel(copy.deepcopy(net))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
    y = torch.randint(0, 10, (shape[0],), generator=torch.Generator().manual_seed(rank))
    gather, part = distributed.Ranks.gather, distributed.Ranks.part
    gather = timed("gather", gather)
    distributed.Ranks.gather = lambda self, share: (sent(share), gather(self, share))[1]
    distributed.Ranks.part = timed("part", part)
    distributed.merge = timed("merge", distributed.merge)
    blocks: dict[str, list[float]] = {"plain": [], "traced": []}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(args.out or folder) / "distributed.covshift"
        opts = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in (("plain", plain), ("traced", traced))}
        with covshift.Tracer(traced, path, optimizer=opts["traced"], overwrite=True,
                             flush_every=args.flush_every) as tracer:
            for _ in range(args.rounds):
                for name, model in (("plain", plain), ("traced", traced)):
                    torch.distributed.barrier()
                    start = time.perf_counter()
                    for _ in range(args.block):
                        opts[name].zero_grad()
                        loss = nn.functional.cross_entropy(model(x), y)
                        loss.backward()
                        opts[name].step()
                        if name == "traced":
                            tracer.step(loss=loss)
                    blocks[name].append((time.perf_counter() - start) / args.block)
    ratio = statistics.median(t / p for t, p in zip(blocks["traced"], blocks["plain"]))
    plain_ms, traced_ms = (1e3 * statistics.median(blocks[k]) for k in ("plain", "traced"))
    steps = args.rounds * args.block
    median = {name: 1e3 * statistics.median(TIMES[name]) for name in ("part", "gather", "merge") if TIMES[name]}
    per_flush = sum(median.values())  # the first gather also opens the group's connections: left out
    line = (f"rank {rank}: {args.model}, {steps} traced steps: plain {plain_ms:.2f} ms/step, traced {traced_ms:.2f} "
            f"({ratio:.2f}x); {len(TIMES['gather'])} flushes, medians: "
            + ", ".join(f"{name} {value:.1f} ms" for name, value in median.items())
            + f", sent {statistics.median(TIMES['bytes']) / 1e6:.2f} MB; first gather {1e3 * TIMES['gather'][0]:.0f} ms; "
            f"{per_flush / args.flush_every:.3f} ms/step at flush_every={args.flush_every} = "
            f"{per_flush / args.flush_every / traced_ms:.1%} of the traced step")
    print(line, flush=True)
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["mlp", "cnn", "deep"], default="deep")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--flush-every", type=int, default=100, help="the Tracer's flush_every")
    parser.add_argument("--out", help="folder for the trace (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--worker", "--model", args.model, "--rounds", str(args.rounds), "--block", str(args.block),
               "--flush-every", str(args.flush_every)]
    if args.out:
        command += ["--out", args.out]
    sys.exit(subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode)


if __name__ == "__main__":
    main()
