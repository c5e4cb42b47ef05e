"""``CovshiftCallback``: a covshift trace of a Hugging Face ``Trainer.train`` run.

>>> from covshift.integrations.transformers import CovshiftCallback  # doctest: +SKIP
>>> trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=val,  # doctest: +SKIP
...                   callbacks=[CovshiftCallback("runs/gpt2.covshift", run="baseline")])
>>> trainer.train()  # doctest: +SKIP

What the callback records, event by event:

- ``on_train_begin``: a :class:`covshift.Tracer` hooks ``model`` (the unwrapped model the
  Trainer trains), reading the learning rate from the Trainer's optimizer (the torch optimizer
  inside accelerate's wrapper). Under DDP every process records its shard, and the trace
  holds the statistics of the global batch, written by world process zero (see the README's
  *Distributed training*); ``distributed=False`` in the options records process zero alone.
- ``on_optimizer_step`` (right after ``optimizer.step()``, once per optimizer step, so after
  gradient accumulation): the Tracer ends a step. The Trainer clears the gradients and steps
  the scheduler only after this event, so parameter gradients and the learning rate are those
  of the step.
- from ``on_step_end`` (and ``on_train_begin``) to the next ``on_step_begin``: the Tracer is paused. This is where the
  Trainer logs, evaluates and saves, so no evaluation forward is recorded.
- ``on_log``: the Trainer reports the training **loss** only at logging steps (every
  ``logging_steps`` optimizer steps), as the mean over the steps since the previous report. The
  callback records that value as ``loss`` at the last step of the window. ``logging_steps=1``
  gives a loss at every step; otherwise steps in between have no loss row.
- ``on_evaluate``: evaluation metrics are logged at the last step, ``eval_<name>`` as
  ``val_<name>`` (so ``eval_loss`` becomes ``val_loss``, which covshift's analysis reads);
  speed entries (runtime, samples or steps per second) and ``epoch`` are left out.
- ``on_train_end``: the Tracer is closed (recorded steps are written). The Trainer calls no
  callback when training raises: call :meth:`CovshiftCallback.close` yourself to write what
  was recorded, with the exception under DDP (``except Exception as e: callback.close(e)``),
  so that no process waits for the others.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:
    raise ImportError('covshift.integrations.transformers needs transformers: '
                      'pip install "covshift[transformers]"') from error

from ..tracer import Tracer

#: Prefix of the Trainer's evaluation metrics, replaced by ``VAL_PREFIX`` in the trace.
EVAL_PREFIX = "eval_"
#: Prefix of validation metrics in a trace (``val_loss`` and ``val_accuracy`` are analysed).
VAL_PREFIX = "val_"
#: Endings of evaluation entries that measure speed, not the model: not logged.
SPEED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_jit_compilation_time")


def val_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The evaluation ``metrics`` to log, renamed from ``eval_<name>`` to ``val_<name>``.

    >>> val_metrics({"eval_loss": 2.5, "eval_runtime": 0.1, "epoch": 1.0, "custom": 3})
    {'val_loss': 2.5, 'custom': 3}
    """
    kept = {}
    for name, value in metrics.items():
        if name == "epoch" or name.endswith(SPEED_SUFFIXES) or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            kept[VAL_PREFIX + name[len(EVAL_PREFIX):] if name.startswith(EVAL_PREFIX) else name] = value
    return kept


def torch_optimizer(optimizer: Any) -> Any:
    """The torch optimizer that steps: the Trainer's is accelerate's ``AcceleratedOptimizer``,
    a wrapper whose ``step`` never runs the wrapper's own optimizer step hooks."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class CovshiftCallback(TrainerCallback):
    """Records a covshift trace of ``trainer.train()`` at ``path`` as run ``run``;
    ``tracer_options`` (``layers``, ``every``, ``detail_every``, ``config``, ``overwrite``, ...)
    go to :class:`covshift.Tracer`. The Tracer is ``self.tracer`` while training runs."""

    def __init__(self, path: str | os.PathLike[str], run: str = "run", **tracer_options: Any) -> None:
        self.path, self.run, self.tracer_options = os.fspath(path), run, tracer_options
        self.tracer: Tracer | None = None
        self._between_steps = contextlib.ExitStack()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        alone = self.tracer_options.get("distributed") is False
        if model is not None and (state.is_world_process_zero or not alone):
            self.tracer = Tracer(model, self.path, self.run, optimizer=torch_optimizer(optimizer),
                                 **self.tracer_options).start()
            self._between_steps.enter_context(self.tracer.paused())  # until the first step begins

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._between_steps.close()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        if self.tracer is not None:
            self.tracer.step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.tracer is not None:
            self._between_steps.enter_context(self.tracer.paused())

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.tracer is not None and logs and "loss" in logs:
            self.tracer.log(step=state.global_step - 1, loss=logs["loss"])

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        kept = val_metrics(metrics or {})
        if self.tracer is not None and kept and state.global_step > 0:
            self.tracer.log(step=state.global_step - 1, **kept)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.close()

    def close(self, error: BaseException | None = None) -> None:
        """Close the Tracer: write what was recorded and remove the hooks (``error``: see
        :meth:`covshift.Tracer.close`). Safe to call twice."""
        if self.tracer is not None:
            self._between_steps.close()
            self.tracer.close(error)
            self.tracer = None
