"""Ioffe & Szegedy's (2015) Figure 1 network: three hidden layers of 100 sigmoid units.

A covshift model file, on scikit-learn's bundled handwritten digits (no download):

    covshift trace examples/mlp_sigmoid.py

covshift inserts BatchNorm1d after each hidden Linear for the "bn" run and trains both.
"""

from torch import nn

from covshift.datasets import digits

config = {"epochs": 10, "lr": 0.3, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "seed": 0}


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 100), nn.Sigmoid(),
        nn.Linear(100, 100), nn.Sigmoid(),
        nn.Linear(100, 100), nn.Sigmoid(),
        nn.Linear(100, 10),
    )


def data():
    return digits()
