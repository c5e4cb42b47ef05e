"""Per-example losses of a batch, from which an evaluation's standard error is computed.

A loss function ``loss_fn(output, target)`` gives per-example values when:

1. it is a ``torch.nn`` loss module with a ``reduction`` attribute (``nn.CrossEntropyLoss()``):
   a copy with ``reduction = "none"`` is called;
2. it takes a ``reduction`` keyword (``torch.nn.functional.cross_entropy``, the default loss,
   ``mse_loss``, ...): it is called with ``reduction="none"``;
3. otherwise it is applied to each example alone, as a batch of one (``torch.func.vmap``).

An example with several values (``mse_loss`` on ``(N, D)`` outputs) gets their mean. The values
are used only when their mean equals the batch loss ``loss_fn(output, target)`` to within
:data:`MEAN_TOLERANCE`: a loss that sums over the batch, weights classes or ignores some
targets is not a mean of per-example values and gives none (and so no standard error).

This applies to a ``loss_fn`` the model file defines, and to a tensor output without one;
the default losses of structured outputs get theirs in :mod:`covshift.outputs`.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Callable

import torch
from torch import nn

MEAN_TOLERANCE = 1e-4  #: relative (and absolute) tolerance between the per-example mean and the batch loss


def _takes_reduction(loss_fn: Callable) -> bool:
    try:
        return "reduction" in inspect.signature(loss_fn).parameters
    except (TypeError, ValueError):
        return False


def _raw(loss_fn: Callable, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if isinstance(loss_fn, nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        return unreduced(output, target)
    if _takes_reduction(loss_fn):
        return loss_fn(output, target, reduction="none")
    return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(output, target)


def per_example(loss_fn: Callable, output: Any, target: Any, batch_loss: float) -> torch.Tensor | None:
    """The loss of each example of the batch (float64, on the CPU), or None when ``loss_fn``
    cannot give them or their mean is not ``batch_loss``."""
    if not (isinstance(output, torch.Tensor) and isinstance(target, torch.Tensor)) or len(target) == 0:
        return None
    try:
        values = _raw(loss_fn, output, target)
    except Exception:  # the user's loss does not run per example: no standard error
        return None
    if not isinstance(values, torch.Tensor) or values.dim() == 0 or len(values) != len(target):
        return None
    values = values.detach().to("cpu", torch.float64).reshape(len(target), -1).mean(1)
    return values if mean_matches(values, batch_loss) else None


def mean_matches(values: torch.Tensor, batch_loss: float) -> bool:
    """Whether the mean of the per-example ``values`` is ``batch_loss`` (:data:`MEAN_TOLERANCE`)."""
    return math.isclose(float(values.mean()), batch_loss, rel_tol=MEAN_TOLERANCE, abs_tol=MEAN_TOLERANCE)
