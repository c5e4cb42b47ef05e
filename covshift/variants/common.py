"""What the variant modules share: the error they raise and the BatchNorm test."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

HINT = "define build_model(batchnorm: bool) in the model file to build both variants yourself"
"""The way out every :class:`VariantError` about a derived variant names."""


class VariantError(Exception):
    """A variant cannot be derived safely; the one-line message says why and asks the user
    to write ``build_model(batchnorm: bool)``."""


def fail(reason: str) -> VariantError:
    """A :class:`VariantError` with ``reason`` and :data:`HINT` (names in ``reason`` are
    quoted with ``repr``, so the message stays on one line)."""
    return VariantError(f"{reason}; {HINT}")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm, ...)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def forward_args(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How one batch is passed to ``forward``: a tuple or list as positional arguments, a
    dict as keyword arguments, anything else as the single argument."""
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    if isinstance(example_input, dict):
        return (), dict(example_input)
    return (example_input,), {}
