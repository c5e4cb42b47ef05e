"""``CovshiftCallback``: a covshift trace of a Lightning ``Trainer.fit`` run.

>>> from covshift.integrations.lightning import CovshiftCallback  # doctest: +SKIP
>>> trainer = L.Trainer(callbacks=[CovshiftCallback("runs/fit.covshift", run="baseline")])  # doctest: +SKIP
>>> trainer.fit(module, train_loader, val_loader)  # doctest: +SKIP

What the callback records, hook by hook:

- ``on_train_start`` (after the sanity check): a :class:`covshift.Tracer` hooks the
  ``LightningModule`` (``pl_module``), reading the learning rate from the trainer's first
  optimizer. Under DDP every process records its shard, and the trace holds the statistics
  of the global batch, written by the global-zero process (see the README's *Distributed
  training*); ``distributed=False`` in the options records the global-zero process alone.
- ``on_train_batch_end``: when ``trainer.global_step`` has advanced since the last trace step,
  an optimizer step happened in this batch and the Tracer ends a step. With
  ``accumulate_grad_batches=k`` one trace step therefore covers k batches, whose forwards are
  merged as the Tracer merges several calls in one step. The step's **loss** is the sum of
  the ``loss`` values in ``outputs`` of its batches: in automatic optimization Lightning
  divides each batch's loss by ``accumulate_grad_batches``, so this is the loss the optimizer
  step's gradient belongs to (the mean of its batches' losses over a full window).
- ``on_validation_start`` / ``on_validation_end``: the Tracer is paused during validation,
  and at its end every scalar in ``trainer.callback_metrics`` that this validation set (for
  example ``val_loss`` from ``self.log("val_loss", ...)``) is logged at the last trace step
  under its own name. covshift's analysis reads ``val_loss`` and ``val_accuracy``.
- ``on_fit_end``: the Tracer is closed (recorded steps are written). ``on_exception``: the
  Tracer is closed with the exception, so that under DDP it waits for no other process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import torch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:
    raise ImportError('covshift.integrations.lightning needs Lightning: pip install "covshift[lightning]"') from error

from ..tracer import Tracer


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The loss in a ``training_step`` output: the tensor itself or its ``"loss"`` entry."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs.detach() if isinstance(outputs, torch.Tensor) and outputs.numel() == 1 else None


class CovshiftCallback(Callback):
    """Records a covshift trace of ``trainer.fit`` at ``path`` as run ``run``; ``tracer_options``
    (``layers``, ``every``, ``detail_every``, ``config``, ``overwrite``, ...) go to
    :class:`covshift.Tracer`. The Tracer is ``self.tracer`` while training runs."""

    def __init__(self, path: str | os.PathLike[str], run: str = "run", **tracer_options: Any) -> None:
        self.path, self.run, self.tracer_options = os.fspath(path), run, tracer_options
        self.tracer: Tracer | None = None
        self._last_step = 0
        self._loss: torch.Tensor | None = None  # summed over the batches of the current step
        self._validation = contextlib.ExitStack()
        self._before: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tracer_options.get("distributed") is False and not trainer.is_global_zero:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.tracer = Tracer(pl_module, self.path, self.run, optimizer=optimizer, **self.tracer_options).start()
        self._last_step, self._loss = trainer.global_step, None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.tracer is None:
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.tracer.step(loss=self._loss)
            self._loss = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tracer is not None:
            self._validation.enter_context(self.tracer.paused())
            self._before = dict(trainer.callback_metrics)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tracer is None:
            return
        self._validation.close()
        new = {name: value for name, value in trainer.callback_metrics.items()
               if value is not self._before.get(name) and torch.as_tensor(value).numel() == 1}
        if new:
            self.tracer.log(**new)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.close(exception)

    def close(self, error: BaseException | None = None) -> None:
        """Close the Tracer: write what was recorded and remove the hooks (``error``: see
        :meth:`covshift.Tracer.close`). Safe to call twice."""
        if self.tracer is not None:
            self._validation.close()
            self.tracer.close(error)
            self.tracer = None
