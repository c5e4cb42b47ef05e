"""Internal covariate shift (ICS) and loss-landscape smoothness, measured without changing training.

Definitions follow Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help
Optimization?" (NeurIPS 2018), sections 2.2 and 3.1.

Notation. One training step t uses the batch ``(x, y)`` and the loss
``L(θ) = loss_fn(model(x; θ), y)``; a dict ``x`` (a Hugging Face batch) is passed as keyword
arguments, ``model(**x; θ)``. The trainable parameters are split into layer groups
``W_1, ..., W_k`` (:func:`layer_groups`: every module that directly owns trainable
parameters, in ``named_modules`` order, a BatchNorm's affine parameters counted with the
layer before it). ``W^t`` ("before") are the values before ``optimizer.step()``,
``W^{t+1}`` ("after") the values the model holds right after it.

ICS of group i at step t (:func:`measure_ics`)::

    G_i  = ∇_{W_i} L(W_1^t,     ..., W_{i-1}^t,     W_i^t, ..., W_k^t)
    G'_i = ∇_{W_i} L(W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

i.e. G'_i is the gradient layer i would see if the layers before it had already been
updated, on the same batch. Each group's gradient is its parameters' gradients flattened
and concatenated into one vector. Reported per group: ``l2 = ||G_i - G'_i||_2``,
``rel = ||G_i - G'_i||_2 / ||G_i||_2`` (nan when ``G_i = 0``) and ``cos = cos(G_i, G'_i)``
(nan when either is 0). Group 1 has nothing before it, so ``G'_1 = G_1``: l2 0, cos 1.
Cost: one forward+backward for all ``G_i``, plus one forward+backward per group.

Landscape along the gradient (:func:`measure_landscape`). From ``θ = W^t`` with
``g = ∇L(θ)`` on the same batch, take steps ``θ - η g`` for ``η = lr * f``, ``f`` in
``factors`` (default 0.25, 0.5, 1, 2, 4: a quarter to four times the step plain SGD would
take; the optimizer's real update, e.g. with momentum, is not used)::

    landscape_loss_min  = min of L(θ - η g) over η ∈ {0} ∪ {lr * f}        (η = 0 included)
    landscape_loss_max  = max of L(θ - η g) over the same η
    loss_variation      = landscape_loss_max - landscape_loss_min
    grad_predictiveness = max_η ||∇L(θ) - ∇L(θ - η g)||_2                  (η > 0 only)
    grad_predictiveness_min = min_η ||∇L(θ) - ∇L(θ - η g)||_2              (η > 0 only)
    beta_smoothness     = max_η ||∇L(θ) - ∇L(θ - η g)||_2 / ||η g||_2      (η > 0 only)

The minima and maxima are the bands of Santurkar et al.'s Figure 4.

The gradients are over all trainable parameters; ``beta_smoothness`` is an effective
β-smoothness along g (for a quadratic ``½ θᵀAθ`` it is ``||A g|| / ||g||`` at every η).
It is nan when ``g = 0``. Cost: one forward+backward for g, plus one per factor.

No interference. Every evaluation is ``torch.func.functional_call`` on detached copies of
the parameters and *clones* of the buffers, so the model's parameters, ``.grad`` fields,
BatchNorm running statistics and ``num_batches_tracked`` never change. The model's
train/eval mode is kept (in train mode BatchNorm normalizes with batch statistics, as in the
real step). Each evaluation runs inside ``torch.random.fork_rng`` started from the same RNG
state, so all evaluations of one measurement share their dropout masks and the training RNG
stream is left exactly where it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves

from .batches import arguments

#: Name given to parameters owned directly by the model itself (its qualified name is empty).
ROOT = "(model)"

LossFn = Callable[[Any, Any], Tensor]


def layer_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Ordered ``(layer name, [qualified parameter names])`` for every module that directly
    owns trainable parameters. A BatchNorm's parameters join the previous group (or form their
    own group when there is none). Shared parameters are counted once, with their first owner."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    seen: set[str] = set()
    groups: list[tuple[str, list[str]]] = []
    for name, module in model.named_modules():
        own = [
            n
            for n, _ in module.named_parameters(prefix=name, recurse=False)
            if n in trainable and n not in seen
        ]
        if not own:
            continue
        seen.update(own)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and groups:
            groups[-1][1].extend(own)
        else:
            groups.append((name or ROOT, own))
    return groups


def _cuda_devices(model: nn.Module, *inputs: Any) -> list[int]:
    """CUDA device indices whose RNG a forward pass may use (inputs may nest tensors)."""
    found = {t.device for t in (*model.parameters(), *model.buffers()) if t.device.type == "cuda"}
    found |= {t.device for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.device.type == "cuda"}
    return sorted({d.index if d.index is not None else torch.cuda.current_device() for d in found})


class _Evaluator:
    """Loss and gradients of ``loss_fn(model(x), y)`` at given parameter values, side-effect free."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Any, y: Any) -> None:
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.devices = _cuda_devices(model, x, y)
        self.args, self.kwargs = arguments(x)

    def __call__(self, values: dict[str, Tensor], wrt: Sequence[str]) -> tuple[float, list[Tensor]]:
        """``(L, [∂L/∂values[n] for n in wrt])`` with parameters ``values`` (trainable names)."""
        params = {n: v.detach().clone() for n, v in values.items()}
        for n in wrt:
            params[n].requires_grad_(True)
        params.update(self.frozen)
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        with torch.random.fork_rng(devices=self.devices), torch.enable_grad():
            out = functional_call(self.model, (params, buffers), self.args, self.kwargs)
            loss = self.loss_fn(out, self.y)
            inputs = [params[n] for n in wrt]
            grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(inputs, grads)]
        return float(loss.detach()), grads


def _nan_extreme(pick: Callable[..., float], values: Iterable[float]) -> float:
    """``pick`` (``min`` or ``max``) of the values that are not nan; nan when there are none."""
    return pick((v for v in values if v == v), default=float("nan"))


def _flat(tensors: Iterable[Tensor]) -> Tensor:
    """One float64 vector of all ``tensors``."""
    parts = [t.reshape(-1).to(torch.float64) for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _pre_step(model: nn.Module, before: dict[str, Tensor]) -> dict[str, Tensor]:
    """The pre-step values of every trainable parameter, checked against the model."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            if n not in before:
                raise KeyError(f"`before` has no value for trainable parameter {n!r}")
            out[n] = before[n].to(device=p.device, dtype=p.dtype)
    return out


def measure_ics(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    before: dict[str, Tensor],
    groups: list[tuple[str, list[str]]] | None = None,
    *,
    _g0: list[Tensor] | None = None,
) -> list[tuple[str, float, float, float]]:
    """``[(layer, ||G - G'||_2, ||G - G'|| / ||G||, cos(G, G'))]`` per layer group (module docstring).

    Call after ``optimizer.step()``: the model holds the updated parameters, ``before`` the
    pre-step ones (name -> tensor)."""
    groups = layer_groups(model) if groups is None else groups
    theta0 = _pre_step(model, before)
    names = list(theta0)
    after = {n: p.detach() for n, p in model.named_parameters() if n in theta0}
    evaluate = _Evaluator(model, loss_fn, x, y)
    g0 = dict(zip(names, _g0 if _g0 is not None else evaluate(theta0, names)[1]))
    results = []
    mixed = dict(theta0)
    for i, (layer, members) in enumerate(groups):
        G = _flat(g0[n] for n in members)
        if i == 0:
            G2 = G
        else:
            for n in groups[i - 1][1]:
                mixed[n] = after[n]  # groups before i take their updated values
            G2 = _flat(evaluate(mixed, members)[1])
        diff = float(torch.linalg.vector_norm(G - G2))
        norm, norm2 = float(torch.linalg.vector_norm(G)), float(torch.linalg.vector_norm(G2))
        rel = diff / norm if norm > 0 else float("nan")
        cos = float(G @ G2) / (norm * norm2) if norm > 0 and norm2 > 0 else float("nan")
        results.append((layer, diff, rel, cos))
    return results


def measure_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    before: dict[str, Tensor],
    lr: float,
    factors: Sequence[float] = (0.25, 0.5, 1, 2, 4),
    *,
    _g0: tuple[float, list[Tensor]] | None = None,
) -> dict[str, float]:
    """``loss_variation``, ``grad_predictiveness``, ``beta_smoothness``, ``landscape_loss_min``,
    ``landscape_loss_max`` and ``grad_predictiveness_min`` (by name) along ``-∇L`` from the
    pre-step parameters, step sizes ``lr * f`` for ``f`` in ``factors`` (module docstring)."""
    theta0 = _pre_step(model, before)
    names = list(theta0)
    evaluate = _Evaluator(model, loss_fn, x, y)
    loss0, grads = _g0 if _g0 is not None else evaluate(theta0, names)
    g = _flat(grads)
    gnorm = float(torch.linalg.vector_norm(g))
    losses, preds, betas = [loss0], [], []
    for f in factors:
        eta = float(lr) * float(f)
        moved = {n: theta0[n] - eta * d for n, d in zip(names, grads)}
        loss, grads_eta = evaluate(moved, names)
        change = float(torch.linalg.vector_norm(g - _flat(grads_eta)))
        losses.append(loss)
        preds.append(change)
        dist = abs(eta) * gnorm
        betas.append(change / dist if dist > 0 else float("nan"))
    return {
        "loss_variation": max(losses) - min(losses),
        "grad_predictiveness": _nan_extreme(max, preds),
        "beta_smoothness": _nan_extreme(max, betas),
        "landscape_loss_min": min(losses),
        "landscape_loss_max": max(losses),
        "grad_predictiveness_min": _nan_extreme(min, preds),
    }


class Instruments:
    """ICS and landscape measurements every ``every`` steps of a training loop.

    >>> inst = Instruments(model, loss_fn, every=10, lr_of=lambda: opt.param_groups[0]["lr"])  # doctest: +SKIP
    >>> loss.backward(); inst.before_step(step); opt.step(); rec = inst.after_step(step, x, y)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        every: int,
        lr_of: Callable[[], float],
        factors: Sequence[float] = (0.25, 0.5, 1, 2, 4),
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.model, self.loss_fn, self.every, self.lr_of = model, loss_fn, every, lr_of
        self.factors = tuple(factors)
        self._before: dict[str, Tensor] | None = None
        self._step: int | None = None

    def before_step(self, step: int) -> None:
        """Snapshot the parameters (after backward, before ``optimizer.step()``) at measured steps."""
        if step % self.every == 0:
            self._before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            self._step = step
        else:
            self._before, self._step = None, None

    def after_step(self, step: int, x: Any, y: Any) -> dict | None:
        """After ``optimizer.step()``: the measurements of a measured step (``layers``: the
        :func:`measure_ics` rows, and the :func:`measure_landscape` values by name), else None."""
        if self._before is None or self._step != step:
            return None
        before, self._before, self._step = self._before, None, None
        theta0 = _pre_step(self.model, before)
        loss0, g0 = _Evaluator(self.model, self.loss_fn, x, y)(theta0, list(theta0))
        layers = measure_ics(self.model, self.loss_fn, x, y, before, _g0=g0)
        landscape = measure_landscape(
            self.model, self.loss_fn, x, y, before, self.lr_of(), self.factors, _g0=(loss0, g0)
        )
        return {"layers": layers, **landscape}
