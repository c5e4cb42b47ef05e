"""A null pair for the claims: build_model ignores its batchnorm flag, so "bn" and "nobn"
are the same network trained under the same conditions."""

from torch import nn

from covshift.datasets import digits

config = {"steps": 60, "lr": 0.5, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "seed": 0}


def build_model(batchnorm: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def data():
    return digits()
