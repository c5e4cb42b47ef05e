"""Trace a model inside your own training loop with covshift.Tracer.

The network is Ioffe & Szegedy's (2015) Figure 1 MLP: three hidden layers of 100 sigmoid
units, here on scikit-learn's bundled 8x8 handwritten digits (no download).

    python examples/trace_own_loop.py [--out runs/own_loop.covshift] [--epochs 20]

It prints, for every sigmoid layer, how its output distribution and gradient changed from
the first to the last step, read back from the trace with covshift.load.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import covshift
from covshift.datasets import digits


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    width = 64
    for _ in range(3):
        layers += [nn.Linear(width, 100), nn.Sigmoid()]
        width = 100
    return nn.Sequential(*layers, nn.Linear(width, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/own_loop.covshift", help="trace file to write")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.3)
    args = parser.parse_args()

    torch.manual_seed(0)
    train, val = digits()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    with covshift.Tracer(model, args.out, run="sigmoid-mlp", optimizer=opt, overwrite=True,
                         config={"lr": args.lr, "epochs": args.epochs}) as tracer:
        for _ in range(args.epochs):
            for x, y in loader:
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                tracer.step(loss=loss)
    with torch.no_grad():
        x, y = val.tensors
        accuracy = (model(x).argmax(1) == y).float().mean().item()

    trace = covshift.load(args.out)
    frame = trace.scalars(run="sigmoid-mlp")
    first, last = frame["step"].min(), frame["step"].max()
    loss = frame[frame["metric"] == "loss"].set_index("step")["value"]
    print(f"trace: {args.out}  steps: {last + 1}  loss {loss[first]:.3f} -> {loss[last]:.3f}  "
          f"validation accuracy {accuracy:.1%}")
    sigmoids = trace.layer_info().query("nonlinearity == 'sigmoid'")["layer"]
    table = frame[frame["layer"].isin(sigmoids) & frame["step"].isin([first, last])]
    table = table.pivot_table(index=["layer", "step"], columns="metric", values="value")
    print(table[["mean", "std", "p15", "p85", "saturation", "gain", "grad_norm"]].round(4).to_string())


if __name__ == "__main__":
    main()
