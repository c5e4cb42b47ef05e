"""A small ReLU CNN with in-place ReLUs, on the 8x8 digit images.

A covshift model file: covshift inserts BatchNorm2d after each hidden conv for the "bn"
run.

    covshift trace examples/cnn.py
"""

from torch import nn

from covshift.datasets import digits

config = {"epochs": 8, "lr": 0.05, "batch_size": 64, "optimizer": "sgd", "momentum": 0.9, "seed": 0}


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )


def data():
    return digits(images=True)
