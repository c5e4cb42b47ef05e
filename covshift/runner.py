"""Training a model's BatchNorm / no-BatchNorm pair under identical conditions, traced.

Both runs get the same seed, the same sequence of mini-batches (a seeded sampler of their
own, not the global RNG), the same optimizer settings, and every layer the variants share
starts from the same weights. Each run is recorded into the trace under its variant name,
followed by its seed when the pair is trained with several seeds (``bn seed=1``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .batches import Batch, call, to_device
from .modelfile import ModelFile, ModelFileError, user_traceback
from .outputs import Criterion, evaluate
from .store import TraceError, TraceWriter, load
from .ics import Instruments
from .tracer import ROOT, Tracer
from .variants import derive_variant, share_weights

VARIANTS = ("bn", "nobn")
StepCallback = Callable[[str, int, int, int, float], None]  # run, epoch, step, total steps, loss


@dataclass
class Settings:
    """Training settings: defaults, overridden by the model file's ``config``, overridden
    by the command line."""

    epochs: int = 5
    steps: int | None = None  # total optimizer steps; overrides epochs
    lr: float = 0.1
    batch_size: int | None = None  # None: the DataLoader's, else 64
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    every: int = 1
    detail_every: int = 50
    eval_every: int | None = None
    ics_every: int | None = None  # measure ICS and the loss landscape every N steps (covshift.ics)
    init_scale: float = 1.0  # multiplies every Linear/Conv weight right after initialization

    @classmethod
    def resolve(cls, *layers: dict[str, Any]) -> Settings:
        """Settings from dicts applied in order; None values are skipped."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for layer in layers:
            values.update({k: v for k, v in layer.items() if k in names and v is not None})
        settings = cls(**values)
        if settings.optimizer not in ("sgd", "adam"):
            raise ModelFileError(f"optimizer must be sgd or adam, got {settings.optimizer!r}")
        return settings


@dataclass
class Outcome:
    """How one run ended."""

    run: str
    steps: int = 0
    train_loss: float | None = None  # the last train_eval_loss (eval mode, not the last mini-batch's)
    val_loss: float | None = None
    val_accuracy: float | None = None
    wall_time: float = 0.0
    diverged_at: int | None = None
    first_nonfinite_layer: str | None = None
    interrupted: bool = False


class Interrupted(Exception):
    """Ctrl-C during training; ``outcomes`` says how far each run got (the trace is flushed)."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        super().__init__("interrupted")
        self.outcomes = outcomes


def loader(data: Dataset | DataLoader, batch_size: int, seed: int | None, limit: int | None = None) -> DataLoader:
    """A DataLoader over ``data`` (a Dataset, or a DataLoader's dataset and collate_fn) that
    shuffles with its own generator seeded by ``seed`` (None: no shuffling), over only the
    first ``limit`` examples when given. Every loader has a generator of its own, so that
    iterating it never draws from the global RNG."""
    collate = None
    if isinstance(data, DataLoader):
        data, collate = data.dataset, data.collate_fn
    if limit is not None:
        data = Subset(data, range(min(limit, len(data))))
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=seed is not None, generator=generator,
                      collate_fn=collate)


def build_pair(mf: ModelFile, example: Any, seed: int, only: str | None = None) -> dict[str, nn.Module]:
    """The variants to train, ``only`` one or both, sharing initial weights; the user's objects
    are not modified. A derived variant is derived only when it is trained; with
    ``build_model(batchnorm)`` both models are built (the no-BN one gives the shared weights)."""
    if mf.takes_batchnorm:
        torch.manual_seed(seed)
        bn = mf.build(True)
        torch.manual_seed(seed)
        nobn = mf.build(False)
        if bn is nobn:
            raise ModelFileError(f"{mf.factory_name}(True) and {mf.factory_name}(False) returned the same object")
        for model in (nobn, bn):
            check_forward(mf, model, example)
        share_weights(nobn, bn, forward_input(example))
        return {v: m for v, m in (("bn", bn), ("nobn", nobn)) if only in (None, v)}
    torch.manual_seed(seed)
    base = mf.build()
    check_forward(mf, base, example)
    return {v: derive_variant(base, forward_input(example), v) for v in VARIANTS if only in (None, v)}


def forward_input(inputs: Any) -> Any:
    """A batch's inputs as the variants module takes an example: a dict as keyword
    arguments, anything else as the single argument (as ``batches.call`` calls the model)."""
    return inputs if isinstance(inputs, dict) else (inputs,)


def check_forward(mf: ModelFile, model: nn.Module, example: Any) -> None:
    """Run ``model`` (a copy, in eval mode) on ``example`` once: a forward that fails on the data
    is the user's problem, reported with their traceback, not a variant's."""
    with torch.no_grad():
        mf.call("the model's forward pass on a batch of data()", call, copy.deepcopy(model).eval(), example)


def scale_init(model: nn.Module, scale: float) -> None:
    """Multiply the weight (not the bias) of every Linear and Conv layer by ``scale``, in place."""
    if scale == 1.0:
        return
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                module.weight.mul_(scale)


def check_model(mf: ModelFile, criterion: Criterion, model: nn.Module, run: str, batch: Batch) -> None:
    """Fail early, with a clear message, when the model cannot take the data or the loss
    cannot combine output and target."""
    model.eval()
    with torch.no_grad():
        out = mf.call(f"the {run} model's forward pass on a batch of data()", batch.forward, model)
        try:
            loss = criterion(out, batch.target)
        except Exception as e:
            raise ModelFileError(criterion.failure(out, batch.target, e), user_traceback(e, mf.path)) from e
    model.train()
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ModelFileError("the loss (loss_fn(output, target), or the output's loss) must be a single-value tensor")


def make_optimizer(model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def first_nonfinite_layer(path: Path, run: str) -> tuple[int, str] | None:
    """The earliest step and first layer (in forward order) with a non-finite output."""
    with load(path) as trace:
        rows = trace.scalars(run=run, metric="nonfinite")
    rows = rows[rows["value"] > 0]
    return None if rows.empty else (int(rows["step"].iloc[0]), str(rows["layer"].iloc[0]))


def train_run(mf: ModelFile, model: nn.Module, run: str, train: Dataset | DataLoader, val: Dataset | DataLoader,
              s: Settings, path: Path, on_step: StepCallback | None = None, variant: str | None = None,
              extra: dict[str, Any] | None = None) -> Outcome:
    """Train one variant (named ``run`` in the trace; ``variant`` defaults to ``run``) with a
    Tracer attached; stops at the first non-finite loss. Raises :class:`Interrupted` on
    Ctrl-C, and :class:`ModelFileError` when the user's code raises, after the trace is
    flushed. ``extra`` goes into the run's config."""
    criterion = Criterion(mf.loss_fn)
    config = {"model_file": str(mf.path), "factory": mf.factory_name, **(extra or {})}
    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    model.to(device).train()
    optimizer = make_optimizer(model, s)
    batch_size = s.batch_size or 64
    batches = loader(train, batch_size, s.seed)
    val_batches = loader(val, batch_size, None)
    # the first len(val) training examples, unshuffled: the same for every run, and as many as val
    train_eval_batches = loader(train, batch_size, None, limit=len(val_batches.dataset))
    total = s.steps or s.epochs * len(batches)
    outcome = Outcome(run)
    settings = {**asdict(s), "batch_size": batch_size, "planned_steps": total,
                "val_examples": len(val_batches.dataset), "train_eval_examples": len(train_eval_batches.dataset)}
    del settings["steps"]  # "steps" is what the run did, set when the tracer closes
    start = time.perf_counter()

    instruments = Instruments(model, criterion, s.ics_every, lambda: float(optimizer.param_groups[0]["lr"])) \
        if s.ics_every else None
    validated = [-1]  # the step of the last validation

    def validate(tracer: Tracer) -> None:
        """Log ``val_*`` on the validation set and ``train_eval_*`` on the training subset."""
        if validated[0] == outcome.steps:
            return
        validated[0] = outcome.steps
        on_val = evaluate(model, val_batches, criterion, device)
        on_train = evaluate(model, train_eval_batches, criterion, device)
        outcome.val_loss, outcome.val_accuracy, outcome.train_loss = on_val.loss, on_val.accuracy, on_train.loss
        if on_val.majority is not None:
            tracer.config["chance_accuracy"] = on_val.majority
        tracer.log(**on_val.metrics("val"), **on_train.metrics("train_eval"))

    with Tracer(model, path, run=run, optimizer=optimizer, every=s.every, detail_every=s.detail_every,
                config={**config, **settings, "variant": variant or run}, overwrite=True) as tracer:
        try:
            epoch = 0
            while outcome.steps < total and outcome.diverged_at is None:
                epoch += 1
                for raw in batches:
                    batch = to_device(raw, device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = criterion(batch.forward(model), batch.target)
                    loss.backward()
                    if instruments is not None:
                        instruments.before_step(outcome.steps)
                    optimizer.step()
                    index = tracer.step(loss=loss)
                    if instruments is not None:
                        record_instruments(tracer, instruments, index, batch)
                    outcome.steps += 1
                    value = float(loss.detach())
                    if on_step is not None:
                        on_step(run, epoch, outcome.steps, total, value)
                    if not math.isfinite(value):
                        outcome.diverged_at = outcome.steps - 1
                        break
                    if s.eval_every and outcome.steps % s.eval_every == 0:
                        validate(tracer)
                    if outcome.steps >= total:
                        break
                if outcome.diverged_at is None:
                    validate(tracer)  # the end of an epoch, or of training
        except KeyboardInterrupt:
            outcome.interrupted = True
        except Exception as e:
            raise ModelFileError(f"the {run} run failed at step {outcome.steps}: {type(e).__name__}: {e}",
                                 user_traceback(e, mf.path)) from e
        finally:
            outcome.wall_time = time.perf_counter() - start
            tracer.flush()
            broken = first_nonfinite_layer(path, run)
            if broken is not None:
                outcome.first_nonfinite_layer = broken[1]
                if outcome.diverged_at is None:
                    outcome.diverged_at = broken[0]
            tracer.config.update({k: v for k, v in asdict(outcome).items() if k not in ("run", "steps")})
    if tracer.storage_error is not None:
        lost = ", ".join(f"{a}–{b}" if a != b else str(a) for a, b in tracer.unsaved_steps)
        raise TraceError(f"the {run} run trained {outcome.steps} steps, but its trace {path} could not be fully "
                         f"written ({tracer.storage_error})" + (f"; steps {lost} are not in it" if lost else ""))
    if outcome.interrupted:
        raise Interrupted([outcome])
    return outcome


def record_instruments(tracer: Tracer, instruments: Instruments, step: int, batch: Batch) -> None:
    """Measure ICS and the loss landscape at ``step`` when due, outside the recorded statistics."""
    with tracer.paused():
        measured = instruments.after_step(step, batch.inputs, batch.target)
    if not measured:
        return
    hooked = set(tracer.layers)
    for layer, l2, rel, cos in measured["layers"]:
        name = layer or ROOT
        if name in hooked:
            tracer.log(step=step, layer=name, ics_l2=l2, ics_rel=rel, ics_cos=cos)
    tracer.log(step=step, **{k: v for k, v in measured.items() if k != "layers"})


def prepare(mf: ModelFile, overrides: dict[str, Any], data: tuple[Any, Any] | None = None,
            only: str | None = None) -> tuple[Settings, Any, Any, dict[str, nn.Module]]:
    """Settings, ``(train, val)`` data (``data``, else the file's ``data()``) and the checked
    variants, ``only`` one or both (init scale applied)."""
    s = Settings.resolve(mf.config, overrides)
    train, val = mf.datasets() if data is None else data
    if s.batch_size is None and isinstance(train, DataLoader) and train.batch_size:
        s.batch_size = train.batch_size
    first = next(iter(loader(train, s.batch_size or 64, s.seed)), None)
    if first is None:
        raise ModelFileError("data() returned an empty training set")
    batch = to_device(first, torch.device("cpu"))
    variants = build_pair(mf, batch.inputs, s.seed, only)
    criterion = Criterion(mf.loss_fn)
    for run, model in variants.items():
        scale_init(model, s.init_scale)
        check_model(mf, criterion, model, run, batch)
    return s, train, val, variants


def remove_stale_runs(path: Path, keep: set[str]) -> None:
    """Remove from ``path`` the runs an earlier ``covshift trace`` wrote (config ``variant``
    bn or nobn, not a sweep's) whose names are not in ``keep``."""
    if not path.is_file():
        return
    with load(path) as trace:
        configs = {run: trace.config(run) for run in trace.runs}
    stale = [run for run, c in configs.items()
             if run not in keep and c.get("variant") in VARIANTS and c.get("sweep") is not True]
    if stale:
        writer = TraceWriter(path)
        try:
            writer.remove_runs(stale)
        finally:
            writer.close()


def train_pair(mf: ModelFile, overrides: dict[str, Any], path: Path, only: str | None = None,
               on_step: StepCallback | None = None, seeds: int | list[int] = 1) -> list[Outcome]:
    """Train the model file's BN and no-BN variants (or ``only`` one) into ``path``, once per
    seed: ``seeds`` is a list, or a count of consecutive seeds from the resolved seed. With
    one seed the runs are named ``bn`` and ``nobn``, with more ``bn seed=0``, ``nobn seed=0``,
    ``bn seed=1``, ... Runs of an earlier ``covshift trace`` that this call does not rewrite
    are removed from the file once the first seed's models are checked."""
    start = Settings.resolve(mf.config, overrides).seed
    seed_list = list(range(start, start + seeds)) if isinstance(seeds, int) else list(seeds)
    trained = [v for v in VARIANTS if only is None or v == only]
    names = {(seed, v): v if len(seed_list) == 1 else f"{v} seed={seed}" for seed in seed_list for v in trained}
    data = mf.datasets()
    outcomes: list[Outcome] = []
    for seed in seed_list:
        s, train, val, variants = prepare(mf, {**overrides, "seed": seed}, data, only)
        if seed == seed_list[0]:
            remove_stale_runs(path, set(names.values()))
        for variant in trained:
            try:
                outcomes.append(train_run(mf, variants[variant], names[seed, variant], train, val, s, path, on_step,
                                          variant=variant))
            except Interrupted as e:
                raise Interrupted(outcomes + e.outcomes) from None
    return outcomes
