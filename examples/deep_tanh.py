"""A deep tanh MLP with plain uniform initialisation, where the no-BatchNorm run saturates.

Six hidden layers of 128 tanh units, weights drawn from U(-1, 1) (no fan-in scaling), so
pre-activations have a standard deviation near sqrt(128 / 3) = 6.5 and most units sit at
+-1. A covshift model file, on scikit-learn's bundled digits:

    covshift trace examples/deep_tanh.py
"""

from torch import nn

from covshift.datasets import digits

config = {"epochs": 10, "lr": 0.05, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "seed": 0}


def build_model(batchnorm: bool) -> nn.Module:
    layers: list[nn.Module] = []
    width = 64
    for _ in range(6):
        linear = nn.Linear(width, 128)
        nn.init.uniform_(linear.weight, -1.0, 1.0)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.BatchNorm1d(128), nn.Tanh()] if batchnorm else [linear, nn.Tanh()]
        width = 128
    return nn.Sequential(*layers, nn.Linear(width, 10))


def data():
    return digits()
