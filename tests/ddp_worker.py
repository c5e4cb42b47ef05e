"""A few SGD steps traced under torchrun (gloo, CPU), for tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/ddp_worker.py TRACE MODE [SAMPLE_SIZE]

MODE ``ddp``: DistributedDataParallel, each rank on its shard of the global batch;
``fsdp``: the same with FSDP2's ``fully_shard``; ``fail``: DDP where rank 1 raises at
step 3; ``compiled``: DDP under ``torch.compile``
(inductor); ``rank0``: DDP traced on rank 0 alone (``distributed=False``); ``reference`` (one process, no torchrun): the model on the whole global batch.
"""

from __future__ import annotations

import os
import sys

from collections.abc import Callable

import torch
from torch import nn

import covshift

GLOBAL_BATCH, STEPS, FAIL_AT = 32, 6, 3
TIMEOUT = 60  # seconds a flush waits for the other ranks


class Twice(nn.Module):
    """One linear layer applied twice: two calls of a module in a step."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.tanh(self.linear(x)))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Twice(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, GLOBAL_BATCH, 8, generator=gen) * 2 + 0.5
    return x, torch.randint(0, 4, (STEPS, GLOBAL_BATCH), generator=gen)


def main(path: str, mode: str, sample_size: int) -> None:
    distributed = mode != "reference"
    rank, world = 0, 1
    net = model()
    if distributed:
        torch.distributed.init_process_group("gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in net:
                if any(p.requires_grad for p in layer.parameters()):
                    fully_shard(layer)
            fully_shard(net)
        else:
            net = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    forward = torch.compile(net) if mode == "compiled" else net
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    if mode == "rank0" and rank != 0:  # a Tracer on rank 0 alone, recording its shard
        train(forward, opt, shard, None)
    else:
        with covshift.Tracer(net, path, run="run", optimizer=opt, flush_every=4, detail_every=2,
                             sample_size=sample_size, write_every=0, dist_timeout=TIMEOUT,
                             distributed=False if mode == "rank0" else None) as tracer:
            train(forward, opt, shard, tracer, fail=mode == "fail" and rank == 1)
    if distributed:
        torch.distributed.destroy_process_group()


def train(net: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, shard: slice,
          tracer: covshift.Tracer | None, fail: bool = False) -> None:
    xs, ys = data()
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xs[step, shard]), ys[step, shard])
        if fail and step == FAIL_AT:  # the other rank waits in DDP's all-reduce of this backward
            raise RuntimeError("rank 1 failed on purpose")
        loss.backward()
        opt.step()
        if tracer is not None:
            tracer.step(loss=loss)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1024)
    print(f"rank {os.environ.get('RANK', 0)} done")
