"""The loss, accuracy and per-example losses of a model's output, whatever its type.

**Outputs.** A model may return a tensor, a tuple or list, a dict, a dataclass or a Hugging
Face ``ModelOutput`` (a dict and a dataclass at once). Two parts are looked up in it:

- its *logits*: the output itself when it is a tensor, else its ``logits`` key or attribute
  when that is a tensor, else the first tensor of a tuple or list;
- its *own loss*: its ``loss`` key or attribute when that is a tensor (a Hugging Face model
  returns one when the batch carries ``labels``).

**The loss** of a batch (:class:`Criterion`), ``target`` being the batch's target
(:mod:`covshift.batches`):

1. the model file's ``loss_fn(output, target)`` when it defines one;
2. else the output's own loss;
3. else the cross-entropy of the logits with the target (:func:`cross_entropy`).

**Class layouts** (:func:`layout`). Logits score classes for integer targets when they are
``(N, classes)`` with targets ``(N,)``, or ``(N, T, classes)`` with targets ``(N, T)`` (one
score vector per token). A target equal to :data:`IGNORE_INDEX` does not count, as in
PyTorch's and Hugging Face's cross-entropy. Shift 1 pairs the logits at position t with
the target at t + 1 (``logits[:, :-1]`` with ``targets[:, 1:]``): a causal language model's
labels are its inputs, and Hugging Face shifts them inside the loss. The layout used is
shift 0 for rules 1 and 3; for rule 2 the first shift, 0 then 1, whose mean cross-entropy
over the counted targets equals the model's own loss (within
:data:`~covshift.example_losses.MEAN_TOLERANCE`), and none when neither does (the model's
loss is something else).

**Accuracy**: over the counted targets of the layout, the fraction whose argmax over the
classes is the target. No layout, no accuracy.

**Evaluation** (:func:`evaluate`): the mean of the batches' losses weighted by their sizes;
accuracy and the majority-class frequency over all counted targets, when every batch has a
layout; the standard error from the per-example losses, when every batch has them.

**Per-example losses** (for an evaluation's standard error): for rule 1, those of
:func:`covshift.example_losses.per_example`; for rules 2 and 3 with a layout, each
example's mean cross-entropy over its counted targets, and for rule 3 without one (float
targets, ``(N, classes, ...)`` logits) :func:`~covshift.example_losses.per_example` of
:func:`cross_entropy`. They are used only when their mean is the batch loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .batches import to_device
from .example_losses import mean_matches, per_example

#: The target value that does not count in the cross-entropy or the accuracy (PyTorch's and
#: Hugging Face's ``ignore_index``).
IGNORE_INDEX = -100
#: The shifts tried for a model's own loss, in order (module docstring).
SHIFTS = (0, 1)


def part(output: Any, name: str) -> Any:
    """``output[name]`` of a mapping, else the attribute ``name``, else None."""
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def logits_of(output: Any) -> Tensor | None:
    """The output's logits (module docstring), or None."""
    if isinstance(output, Tensor):
        return output
    named = part(output, "logits")
    if isinstance(named, Tensor):
        return named
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, Tensor)), None)
    return None


def own_loss(output: Any) -> Tensor | None:
    """The loss the model returned with its output, or None."""
    if isinstance(output, Tensor):
        return None
    loss = part(output, "loss")
    return loss if isinstance(loss, Tensor) else None


def describe(value: Any) -> str:
    """A short description for messages: a tensor's shape, a structure's tensors' shapes."""
    if isinstance(value, Tensor):
        return str(tuple(value.shape))
    if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        items = value.items() if isinstance(value, Mapping) else \
            ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        shown = [f"{k}={tuple(v.shape)}" for k, v in items if isinstance(v, Tensor)]
        return f"{type(value).__name__}({', '.join(shown)})"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(describe(v) for v in value)})"
    return type(value).__name__


def _per_token(logits: Tensor, target: Tensor) -> bool:
    return logits.dim() == 3 and target.dim() == 2 and logits.shape[:2] == target.shape


def cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.cross_entropy``, with the classes on the last dimension of
    ``(N, T, classes)`` logits whose targets are ``(N, T)`` (on dimension 1 otherwise, as
    PyTorch has it); ``reduction="none"`` gives the target's shape."""
    if _per_token(logits, target):
        values = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction=reduction)
        return values.reshape(target.shape) if reduction == "none" else values
    return F.cross_entropy(logits, target, reduction=reduction)


def layout(logits: Any, target: Any, shift: int = 0) -> tuple[Tensor, Tensor] | None:
    """``(scores, targets)`` of a class layout (module docstring), ``(N, T', classes)`` and
    ``(N, T')`` (T' = 1 for ``(N, classes)`` logits), or None when none applies."""
    if not (isinstance(logits, Tensor) and isinstance(target, Tensor)) or target.is_floating_point():
        return None
    if logits.dim() == 2 and target.dim() == 1 and len(logits) == len(target) and shift == 0:
        return logits.unsqueeze(1), target.unsqueeze(1)
    if _per_token(logits, target):
        return logits[:, :logits.shape[1] - shift], target[:, shift:]
    return None


def token_losses(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Each target's cross-entropy (float64, on the CPU, 0 where it does not count) and
    whether it counts, both ``targets.shape``."""
    values = F.cross_entropy(scores.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
    return values.detach().to("cpu", torch.float64).reshape(targets.shape), (targets != IGNORE_INDEX).cpu()


@dataclass
class Scored:
    """One batch in an evaluation: its loss; per-example losses whose mean is that loss;
    for a class layout, the predicted class and the target of every counted target (CPU)."""

    loss: float
    examples: Tensor | None = None
    predicted: Tensor | None = None
    targets: Tensor | None = None


class Criterion:
    """The loss of a batch (module docstring), from the model file's ``loss_fn`` or None."""

    def __init__(self, loss_fn: Callable[[Any, Any], Any] | None = None) -> None:
        self.loss_fn = loss_fn

    def __call__(self, output: Any, target: Any) -> Any:
        if self.loss_fn is not None:
            return self.loss_fn(output, target)
        own = own_loss(output)
        if own is not None:
            return own
        logits = logits_of(output)
        if logits is None:
            raise TypeError("the output has no `loss` and no `logits` tensor")
        return cross_entropy(logits, target)

    def failure(self, output: Any, target: Any, error: Exception) -> str:
        """The message for ``error``, raised by computing the loss of ``output`` and ``target``."""
        shapes = f"output {describe(output)}, target {describe(target)}"
        if self.loss_fn is not None:
            return f"loss_fn({shapes}) raised {type(error).__name__}: {error}"
        return (f"cross-entropy, the default loss, cannot combine the model's {shapes} "
                f"({type(error).__name__}: {error}): define loss_fn(output, target) in the model file")

    def score(self, output: Any, target: Any) -> Scored:
        """The batch's loss, per-example losses and predictions (module docstring)."""
        loss = float(self(output, target))
        logits = logits_of(output)
        own = self.loss_fn is None and own_loss(output) is not None
        for shift in SHIFTS if own else (0,):
            found = layout(logits, target, shift)
            if found is None:
                continue
            scores, targets = found
            if self.loss_fn is not None:
                examples = per_example(self.loss_fn, output, target, loss)
            else:
                losses, counts = token_losses(scores, targets)
                if own and not (counts.any() and mean_matches(losses[counts], loss)):
                    continue
                examples = losses.sum(1) / counts.sum(1)
                examples = examples if mean_matches(examples, loss) else None
            counted = targets != IGNORE_INDEX
            return Scored(loss, examples, scores.argmax(-1)[counted].cpu(), targets[counted].cpu())
        if own:
            return Scored(loss)
        if self.loss_fn is not None:
            return Scored(loss, per_example(self.loss_fn, output, target, loss))
        return Scored(loss, per_example(cross_entropy, logits, target, loss))


@dataclass
class Evaluation:
    """One pass over a data set in eval mode. ``accuracy`` and ``majority`` (the frequency of
    the most common counted target: the accuracy of always guessing it) only when every batch
    has a class layout; ``loss_se``, the standard error of the mean loss, only when every
    batch gives per-example losses."""

    loss: float
    accuracy: float | None = None
    majority: float | None = None
    loss_se: float | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        """``{prefix}_loss`` and, when measured, ``{prefix}_loss_se`` and ``{prefix}_accuracy``."""
        found = {"loss": self.loss, "loss_se": self.loss_se, "accuracy": self.accuracy}
        return {f"{prefix}_{name}": value for name, value in found.items() if value is not None}


def evaluate(model: nn.Module, data: Iterable[Any], criterion: Criterion, device: torch.device) -> Evaluation:
    """The model's mean loss over ``data`` in eval mode, without gradients (each batch's loss
    weighted by its size), with its standard error (the sample std, ddof 1, of the
    per-example losses over √n) and, for class layouts, its accuracy."""
    model.eval()
    total, count, correct, counted = 0.0, 0, 0, 0
    classes: Counter[int] = Counter()
    examples: list[Tensor] | None = []
    classify = True
    with torch.no_grad():
        for raw in data:
            batch = to_device(raw, device)
            scored = criterion.score(batch.forward(model), batch.target)
            n = len(batch)
            total += scored.loss * n
            count += n
            if examples is not None:  # None once a batch gave no per-example losses
                if scored.examples is None:
                    examples = None
                else:
                    examples.append(scored.examples)
            classify = classify and scored.targets is not None
            if classify:
                assert scored.predicted is not None and scored.targets is not None
                correct += int((scored.predicted == scored.targets).sum())
                counted += len(scored.targets)
                classes.update(scored.targets.tolist())
    model.train()
    every = torch.cat(examples) if examples else torch.empty(0)
    se = float(every.std() / math.sqrt(len(every))) if len(every) > 1 else None
    if not (classify and counted):
        return Evaluation(total / max(count, 1), loss_se=se)
    return Evaluation(total / count, correct / counted, max(classes.values()) / counted, se)
