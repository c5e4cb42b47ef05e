"""Trace DistributedDataParallel training: one Tracer per rank, one trace file, global statistics.

The sigmoid MLP of examples/trace_own_loop.py on scikit-learn's digits, each rank on its
share of every batch (DistributedSampler). Run it with torchrun (CPU and gloo here; NCCL on
GPUs works the same way):

    torchrun --nproc_per_node 2 examples/ddp_train.py [--out runs/ddp.covshift] [--epochs 5]

Every rank creates the Tracer with the same path. At each flush the ranks' statistics are
merged into those of the global batch, and rank 0 writes the file; rank 0 then prints what
it wrote.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import covshift
from covshift.datasets import digits
from trace_own_loop import build_model  # the sigmoid MLP, beside this file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ddp.covshift", help="trace file to write (rank 0 writes it)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch, split among the ranks")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(build_model().to(device))
    train, _ = digits()
    sampler = DistributedSampler(train, shuffle=True, seed=0)
    loader = DataLoader(train, batch_size=args.batch_size // world, sampler=sampler)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    with covshift.Tracer(model, args.out, run="ddp", optimizer=opt, overwrite=True,
                         config={"lr": args.lr, "epochs": args.epochs}) as tracer:
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            for x, y in loader:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                loss.backward()
                opt.step()
                tracer.step(loss=loss)
    dist.destroy_process_group()

    if rank == 0:
        trace = covshift.load(args.out)
        loss_steps, loss = trace.series("ddp", "", "loss")
        print(f"trace: {args.out}  ranks: {trace.config('ddp')['tracer']['world_size']}  steps: {len(loss_steps)}  "
              f"loss {loss[0]:.3f} -> {loss[-1]:.3f}  layers: {', '.join(trace.layers)}")


if __name__ == "__main__":
    main()
