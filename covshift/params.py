"""A recorded step's parameter statistics: the norms of the gradients, of the tracked weights
and of their updates, and the snapshot of the weights that the updates are taken against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import distributed as dist, stats
from .records import StepRecord


@dataclass
class _Last:
    step: int
    norms: Tensor  # the weights' norms after that step


class ParamNorms:
    """The norms of a recorded step's parameter gradients, tracked weights and updates.

    ``params`` are the model's trainable parameters; :meth:`track` adds one that a layer
    holds (its weight norms and updates are recorded). :meth:`snapshot` keeps the
    tracked weights before the next update; :meth:`record` puts the step's norms into its
    record after the update."""

    def __init__(self, params: list[Tensor], sharded: bool) -> None:
        self.params, self.sharded = params, sharded
        self.tracked: list[tuple[str, str, int]] = []  # (layer, attribute, index into params)
        self.prev: list[Tensor] | None = None  # the snapshot
        self.last: _Last | None = None
        self.plans: dict[tuple[tuple[int, ...], int, bool], stats.NormPlan] = {}  # by layout, see record

    def track(self, layer: str, attr: str, index: int) -> None:
        """Record the weight ``params[index]``, attribute ``attr`` of ``layer``, too; during a
        step, its value now is its snapshot (it was added before any update of the step)."""
        self.tracked.append((layer, attr, index))
        if self.prev is not None:
            self.prev.append(dist.local(self.params[index]).detach().clone())

    def _locals(self, tensors: list[Tensor]) -> list[Tensor]:
        return [dist.local(t) for t in tensors] if self.sharded else tensors

    def _weights(self) -> list[Tensor]:
        return self._locals([self.params[i] for _, _, i in self.tracked])

    @torch.no_grad()
    def snapshot(self) -> None:
        """Keep the tracked weights as they are before the next optimizer step."""
        weights = self._weights()
        if self.prev is None or not weights:
            self.prev = [p.detach().clone() for p in weights]
        else:
            torch._foreach_copy_(self.prev, weights)

    def _fresh_last(self, rec: StepRecord, count: int) -> Tensor | None:
        """The norms of the weights before this update when the previous step recorded them."""
        last = self.last
        return last.norms if last is not None and last.step == rec.step - 1 and len(last.norms) == count else None

    @torch.no_grad()
    def record(self, rec: StepRecord) -> None:
        """Put the norms of ``rec``'s gradients, tracked weights and updates into ``rec``, in
        one batch: the update is computed in place of the snapshot, which :meth:`snapshot`
        renews before it is used again."""
        grads = [p.grad for p in self.params]
        have = [i for i, g in enumerate(grads) if g is not None and not g.is_sparse]
        batch = self._locals([grads[i] for i in have])
        rec.grad_params = have
        weights = self._weights()
        prev = self.prev if weights and self.prev is not None else None
        before: Tensor | None = None
        if prev is not None:
            before = self._fresh_last(rec, len(weights))
            if before is None:
                before = stats.norms(prev)
        batch += weights
        if prev is not None:
            torch._foreach_sub_(prev, weights)  # minus the update: the same norm
            batch += prev
        if not batch:
            return
        layout = (tuple(have), len(weights), prev is not None)
        if layout not in self.plans:
            self.plans[layout] = stats.NormPlan.of(batch)
        norms = stats.norms(batch, self.plans[layout])
        put, g, w = rec.slots.put, len(have), len(weights)
        if have:
            rec.grad_norms = put(norms[:g])
        if weights:
            rec.tracked, rec.weight_norms = self.tracked, put(norms[g:g + w])
            self.last = _Last(rec.step, norms[g:g + w])
        if before is not None:
            rec.update_norms, rec.prev_norms = put(norms[g + w:]), put(before)
