"""The mini-batches ``covshift trace`` and ``covshift sweep`` train and evaluate on.

A batch that ``data()``'s datasets or DataLoaders yield is either

- a tuple or list ``(input, target)``: the model is called as ``model(input)`` and the
  loss gets ``target``;
- a dict (any mapping), as Hugging Face collators make them (``{"input_ids": ..., "labels": ...}``): the
  model is called as ``model(**batch)`` and the target is ``batch["labels"]``, or None when
  the batch has no ``labels``.

Every tensor of a batch, also inside nested tuples, lists and dicts, is moved to the
device. A batch's size, its weight in an evaluation's mean loss, is the length of its
target, else of its input's first tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .modelfile import ModelFileError

#: The key of a dict batch that holds the target (Hugging Face's name).
LABELS = "labels"


def move(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it, through tuples, lists and mappings, on ``device``
    (a mapping becomes a dict, a named tuple stays one)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [move(v, device) for v in value]
    if isinstance(value, tuple):
        moved = [move(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


def arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How a batch's inputs are passed to the model: a dict as keyword arguments, anything
    else as the single positional argument."""
    return ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})


def call(model: nn.Module, inputs: Any) -> Any:
    """The model's output on a batch's inputs: ``model(**inputs)`` for a dict, else ``model(inputs)``."""
    args, kwargs = arguments(inputs)
    return model(*args, **kwargs)


@dataclass(frozen=True)
class Batch:
    """One batch on its device: what the model is called with, and the loss's target."""

    inputs: Any  # the input of an (input, target) pair, or the whole dict
    target: Any  # the target, the dict's labels, or None

    def forward(self, model: nn.Module) -> Any:
        """The model's output on this batch (:func:`call`)."""
        return call(model, self.inputs)

    def __len__(self) -> int:
        """The number of examples: the length of the first tensor (not a scalar) in the
        target, else in the inputs; 1 when there is none."""
        first = _first_tensor((self.target, self.inputs))
        return 1 if first is None else len(first)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.dim() > 0 else None
    parts = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, parts) if t is not None), None)


def to_device(batch: Any, device: torch.device) -> Batch:
    """The :class:`Batch` of one item the data yields, its tensors on ``device``."""
    if isinstance(batch, Mapping):
        moved = move(batch, device)
        return Batch(moved, moved.get(LABELS))
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        found = f"{len(batch)} parts" if isinstance(batch, (tuple, list)) else type(batch).__name__
        raise ModelFileError("data() must yield (input, target) pairs or dicts of keyword arguments for the model: "
                             f"each batch here is {found}")
    x, y = batch
    return Batch(move(x, device), move(y, device))
