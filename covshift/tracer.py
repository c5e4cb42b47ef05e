"""The Tracer: hook lifecycle, step boundaries and batched flushing to the trace file."""

from __future__ import annotations

import contextlib
import itertools
import os
import warnings
from dataclasses import dataclass, field
from functools import partial
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist, stats
from .layers import ROOT, calls_children_functionally, first_tensor, functional_candidates, select_layers
from .records import UNSET, Arena, Calls, Place, Slots, Staging, StepRecord, fetch, gather
from .columns import Layers, run_columns, summarize
from .params import ParamNorms
from .saving import Batch, Saver
from .whole import DeviceIndices, WholePlan

__all__ = ["ROOT", "Tracer", "first_tensor", "select_layers"]


#: Outputs of up to this many times ``sample_size`` values are kept whole: copying one
#: costs less than sampling it and taking its moments in the hook, and its statistics are
#: then exact (``benchmarks/overhead.py``, the mlp's 6400-value outputs).
WHOLE_UP_TO = 2


@dataclass
class _Layer:
    name: str
    index: int  # in the tracer's layers, in the order they were added
    module: nn.Module
    kind: stats.Nonlinearity | None
    position: int | None = None
    edges: np.ndarray | None = None  # histogram edges, fixed at the layer's first flush
    input_sample: tuple[int, int, int] | None = None  # of_input kinds: (buffer, offset, length) from the pre-hook
    # where its hooks took the staging's elements at the last step: input and output samples,
    # the moments' row, the gradient's cell
    places: tuple[Place, ...] = field(default_factory=lambda: tuple(Place() for _ in range(4)))


def _scalar(value: Tensor | float) -> Tensor | float:
    """``value`` as kept until the flush: a tensor as a one-element tensor in float32, or
    float64 when it is float64 (a loss keeps its precision), apart from later in-place
    changes; a number as a float (nothing to send to the device and back)."""
    if isinstance(value, Tensor):
        value = value.detach().reshape(1)
        return value.clone() if value.dtype in (torch.float32, torch.float64) else value.float()
    return float(value)


def _output_grad(nr: int, hook: Callable[[Tensor], None], grads: tuple[Tensor | None, ...]) -> None:
    """A node's pre-hook that calls ``hook`` with the gradient of its output ``nr`` (when it has one)."""
    grad = grads[nr]
    if grad is not None:
        hook(grad)


class Tracer:
    """Records per-layer statistics of ``model`` at every step into a trace file.

    >>> with Tracer(model, "runs/demo.covshift", run="baseline", optimizer=opt) as tracer:  # doctest: +SKIP
    ...     for x, y in loader:
    ...         opt.zero_grad()
    ...         loss = loss_fn(model(x), y)
    ...         loss.backward()
    ...         opt.step()
    ...         tracer.step(loss=loss)

    Forward passes with gradients disabled (validation under ``torch.no_grad()``) are not
    recorded, nor, unless ``include_eval``, those while ``model`` is in eval mode. Only steps
    ended by :meth:`step` reach the file. Every ``flush_every`` recorded steps they are
    gathered from the device and summarised, and written to the file when ``write_every``
    seconds have passed since the last write or the start (a fast loop writes fewer, larger
    chunks);
    :meth:`flush` and closing, also on an exception, write everything. The loss and
    learning rates are recorded at every step, the layer statistics every ``every`` steps.

    Once started, the Tracer never raises because of its file: a batch it cannot write (a
    full disk, say) is kept in memory, at most ``max_unsaved`` steps, and retried at the
    next flush; it warns once, and :attr:`storage_error` and the run's config
    (``saved_steps``, ``unsaved_steps``) say what was saved.

    When a ``torch.distributed`` process group of several processes is initialised (DDP,
    FSDP2 under ``torchrun``), create the Tracer on every rank with the same path: the
    statistics are those of the global batch, merged at each flush, and only rank 0
    writes the file (:mod:`covshift.distributed`); a flush waits at most ``dist_timeout``
    seconds for the other ranks. ``distributed=False`` records this process alone (a Tracer
    on one rank only, writing its own file); the default, None, decides by the group.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        run: str = "run",
        *,
        optimizer: torch.optim.Optimizer | None = None,
        layers: Any = None,
        every: int = 1,
        detail_every: int = 50,
        flush_every: int = 100,
        write_every: float = 5.0,
        sample_size: int = 4096,
        bins: int = 64,
        config: dict[str, Any] | None = None,
        overwrite: bool = False,
        include_eval: bool = False,
        max_unsaved: int = 10_000,
        distributed: bool | None = None,
        dist_timeout: float = dist.DEFAULT_TIMEOUT,
    ) -> None:
        for label, value in [("every", every), ("detail_every", detail_every), ("flush_every", flush_every),
                             ("sample_size", sample_size), ("bins", bins), ("max_unsaved", max_unsaved)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not isinstance(write_every, (int, float)) or not write_every >= 0:
            raise ValueError(f"write_every must be a number of seconds >= 0, got {write_every!r}")
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be True, False or None, got {distributed!r}")
        if detail_every % every:
            raise ValueError(f"detail_every ({detail_every}) must be a multiple of every ({every})")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = dist.unwrap(model)  # torch.compile's and DDP's wrappers: hook the model they wrap
        self.model, self.path, self.run, self.optimizer = model, os.fspath(path), run, optimizer
        self.every, self.detail_every, self.flush_every = every, detail_every, flush_every
        self.sample_size, self.bins, self.overwrite = sample_size, bins, overwrite
        self.include_eval, self.max_unsaved, self.write_every = include_eval, max_unsaved, float(write_every)
        self.config = dict(config or {})
        self.distributed, self.dist_timeout = distributed, float(dist_timeout)
        self._ranks: dist.Ranks | None = None
        self._started = False
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._copies = np.array([dist.replicas(p) for p in self._params], dtype=np.int64)
        # DTensor parameters are sharded: their local shards are used
        self._param_norms = ParamNorms(self._params, sharded=bool(self._copies.any()))
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._layers: dict[str, _Layer] = {}
        self._by_index: list[_Layer] = []  # the layers by their index
        for name, module in select_layers(model, layers):
            self._add_layer(name, module)
        # default selection: containers to watch during step 0 (see covshift.layers)
        self._candidates = functional_candidates(model) if layers is None else []
        self._called: set[int] | None = set() if self._candidates else None  # ids of modules called in step 0
        self._compiled = False  # whether hooks ran in a torch.compile'd forward
        self._handles: list[Any] = []
        self._probes: list[Any] = []
        self._saver: Saver | None = None
        self._recorded = 0  # recorded steps pending, counted for flush_every
        self._order = itertools.count()
        self._pending: list[StepRecord] = []
        self._logged = Slots()  # values given to log(), with their rows in _log_rows
        self._log_rows: list[tuple[int, str, str, int]] = []  # (step, layer, metric, handle)
        self._paused = False
        self._step = 0
        self._recording = True  # self.recording, kept so that hooks do not read the step counter
        self._current = self._new_record()
        self._closed = False
        self._scratch: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._indices = DeviceIndices()
        self._whole = WholePlan(self._indices)
        self._held: dict[tuple[Any, ...], list[tuple[int, Tensor]]] = {}  # (buffer, shape, dtype) -> (cell, gradient)
        self._arena = Arena()
        # the step in progress, moved into the arena by step(); room for one call per layer
        room = sum(WHOLE_UP_TO * sample_size * (1 + bool(x.kind and x.kind.of_input)) + 5
                   for x in self._layers.values())
        self._staging = Staging(max(room, 1 << 12), parts=True)
        self._grad_staging = Staging(max(len(self._layers), 64), fill=UNSET)

    # lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if kind is None:
            self.close()
            return
        try:  # the training's exception goes on; closing must not replace it
            self.close(error)
        except Exception as problem:
            warnings.warn(f"covshift: closing the trace after {kind.__name__} failed too: {problem}",
                          RuntimeWarning, stacklevel=2)

    def start(self) -> Tracer:
        """Open the trace file, add this run and attach the hooks (``with`` does this).
        Under ``torch.distributed``, every rank must call it: it is collective."""
        if self._started:
            raise RuntimeError("this Tracer has already been started")
        self._ranks = None if self.distributed is False else dist.Ranks.detect(self.dist_timeout)
        if self.distributed and self._ranks is None:
            raise RuntimeError("Tracer(distributed=True) needs an initialised torch.distributed process group "
                               "of several processes")
        world = 1 if self._ranks is None else self._ranks.world
        settings = {"every": self.every, "detail_every": self.detail_every, "sample_size": self.sample_size,
                    "bins": self.bins, "include_eval": self.include_eval, "world_size": world}
        problem: Exception | None = None
        if self._ranks is None or self._ranks.writes:
            try:
                self._saver = Saver(self.path, self.run, {**self.config, "tracer": settings}, self.overwrite,
                                    self.max_unsaved, self.write_every)
            except Exception as error:
                problem = error
        if self._ranks is not None:  # the other ranks stop too when rank 0 cannot open the file
            said = self._ranks.agree(None if problem is None else f"{type(problem).__name__}: {problem}")
            if problem is None and said is not None:
                raise RuntimeError(f"rank 0 could not open the trace {self.path}: {said}")
        if problem is not None:
            raise problem
        self._started = True
        for layer in list(self._layers.values()):
            self._hook(layer)
        self._reserve()
        for name, module, children in self._candidates:
            self._probes.append(module.register_forward_hook(partial(self._on_container, name, children)))
        if self.optimizer is not None and hasattr(self.optimizer, "register_step_pre_hook"):
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_optimizer_step))
        self._param_norms.snapshot()
        return self

    def _reserve(self) -> None:
        """Allocate the staging buffers for the model's dtype and device now, outside a
        compiled forward (where allocating them would make the next step's graph differ)."""
        like = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        dtype = torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32
        device = torch.device("cpu") if like is None else like.device
        for staging in (self._staging, self._grad_staging):
            staging.reserve(staging.size, dtype, device)

    def _add_layer(self, name: str, module: nn.Module) -> _Layer:
        """Register a layer and track the trainable parameters it holds directly that no
        earlier layer holds (a tied weight stays with its first owner)."""
        layer = self._layers[name] = _Layer(name, len(self._layers), module, stats.nonlinearity(module))
        self._by_index.append(layer)
        tracked = {i for _, _, i in self._param_norms.tracked}
        for attr, param in module.named_parameters(recurse=False):
            index = self._index.get(id(param))
            if index is not None and index not in tracked:
                self._param_norms.track(name, attr, index)
        return layer

    def _hook(self, layer: _Layer) -> None:
        self._handles.append(layer.module.register_forward_hook(partial(self._on_forward, layer)))
        if layer.kind is not None and layer.kind.of_input:
            self._handles.append(layer.module.register_forward_pre_hook(partial(self._on_input, layer)))

    def _stop_probing(self) -> None:
        for handle in self._probes:
            handle.remove()
        self._probes.clear()
        self._called = None

    def close(self, error: BaseException | None = None) -> None:
        """Flush what is recorded, remove every hook and close the file. Safe to call twice.
        Under ``torch.distributed`` it is collective, like :meth:`flush`, unless ``error``,
        the exception that ends the training, is given: then the Tracer takes part in no
        collective (the other ranks may never reach one), and the steps since its last
        flush are not written (``with`` does this)."""
        failed = error is not None
        if self._closed or not self._started:
            return
        try:
            if not (failed and self._ranks is not None):
                self.flush()
        finally:
            self._closed = True
            self._detach()
            self._scratch.clear()
            self._held.clear()
            self._arena = Arena()
            if self._saver is not None:
                self._saver.close({**self.config, "steps": self._step})
            if self._ranks is not None and not failed:
                self._ranks.close()

    def _detach(self) -> None:
        """Remove every hook: nothing more is recorded."""
        self._stop_probing()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def storage_error(self) -> str | None:
        """The first error that kept a batch from the file, or None when all were written."""
        return None if self._saver is None else self._saver.error

    @property
    def unsaved_steps(self) -> list[list[int]]:
        """Ranges ``[first, last]`` of recorded steps not (yet) in the file."""
        return [] if self._saver is None else self._saver.unsaved_steps

    @property
    def layers(self) -> list[str]:
        """Names of the hooked layers."""
        return list(self._layers)

    @property
    def recording(self) -> bool:
        """Whether the current step's statistics are recorded (every ``every`` steps)."""
        return self._step % self.every == 0

    # hooks (device work only: no host synchronisation) ----------------------------------
    def _skips(self) -> bool:
        """Whether a forward now is not recorded."""
        return (self._closed or self._paused or not self._recording or not torch.is_grad_enabled()
                or not (self.model.training or self.include_eval))

    def _sample(self, flat: Tensor, compiling: bool, place: Place) -> tuple[int, int, Tensor]:
        """Write the sample of ``flat`` into the staging, at ``place`` when it is free:
        ``(buffer, offset, view)``."""
        n = flat.numel()
        # compiled: drawn outside the graph, which holds no Generator
        draw = stats.fixed_sample_indices if compiling else stats.drawn_sample_indices
        idx = draw(n, n if n <= WHOLE_UP_TO * self.sample_size else self.sample_size, flat.device)
        buffer, offset, view = self._staging.take(idx.numel(), flat, compiling, place)
        stats.take_sample(flat, idx, out=view)
        return buffer, offset, view

    def _on_input(self, layer: _Layer, module: nn.Module, args: Any) -> None:
        x = first_tensor(args)
        layer.input_sample = None
        if not self._skips() and x is not None and x.numel():
            buffer, offset, view = self._sample(stats.flat_float(x), torch.compiler.is_compiling(), layer.places[0])
            layer.input_sample = (buffer, offset, view.numel())

    def _on_container(self, name: str, children: list[nn.Module], module: nn.Module, args: Any, output: Any) -> None:
        """Step 0, default selection: make ``module`` a layer when it did not call one of
        its parameter-holding leaf children, and record this call."""
        if self._called is None or name in self._layers or not calls_children_functionally(children, self._called):
            return
        layer = self._add_layer(name, module)
        self._hook(layer)
        self._on_forward(layer, module, args, output)

    def _on_forward(self, layer: _Layer, module: nn.Module, args: Any, output: Any) -> None:
        # the first call, whatever its mode: forward order (compiled: step() places the
        # layers in the order of their first recorded call, so the graph does not read this)
        compiling = torch.compiler.is_compiling()
        if not compiling and layer.position is None:
            layer.position = next(self._order)
        if self._called is not None:
            self._called.add(id(module))
            self._compiled = compiling
        x_sample, layer.input_sample = layer.input_sample, None
        if self._skips():
            return
        y = first_tensor(output)
        if y is None or y.numel() == 0:
            return
        rec = self._current
        call = len(rec.calls)
        flat = stats.flat_float(y)
        buffer, offset, sample = self._sample(flat, compiling, layer.places[1])
        if x_sample is not None and x_sample[2] == sample.numel():
            rec.inputs[call] = x_sample[:2]
        if sample.numel() == flat.numel():  # kept whole: step() computes the moments of all such outputs
            at_buffer, at = -1, 0
        else:
            at_buffer, at, row = self._staging.take(5, flat, compiling, layer.places[2])
            torch.sum(sample, 0, out=row[0])  # the shift is the sample's mean, this sum / its length
            stats.moments(flat, None, self._scratch_for(flat, compiling), out=row, scale=1.0 / sample.numel())
        rec.calls.append((layer.index, flat.numel(), buffer, offset, sample.numel(), at_buffer, at))
        if layer.kind is not None and layer.kind.relu_family and y.dim() >= 2:
            rec.maxima[call] = stats.unit_max(y)
        # compiled: at every step, as the graph may not depend on the step (step() keeps them on detail steps)
        if (compiling or rec.detail) and y.dim() >= 2:
            rec.units[call] = stats.unit_sums(y)
        if y.requires_grad:
            if at_buffer < 0 and not compiling:  # small: the step's end sums it
                grad_buffer, grad_at = self._grad_staging.claim(1, flat, layer.places[3])
                hook = partial(self._hold_grad, grad_buffer, grad_at)
            else:
                grad_buffer, grad_at, cell = self._grad_staging.take(1, flat, compiling, layer.places[3])
                hook = partial(self._on_grad, cell)
            node = None if compiling else y.grad_fn
            if node is None:  # a leaf, or a graph being compiled
                y.register_hook(hook)
            else:  # a pre-hook of the node that made y: half the Python of Tensor.register_hook
                node.register_prehook(partial(_output_grad, y.output_nr, hook))
            rec.grads.append((layer.index, flat.numel(), grad_buffer, grad_at))

    def _scratch_for(self, flat: Tensor, compiling: bool) -> Tensor | None:
        """A buffer for ``flat``'s shifted values: one per dtype and device, as large as the
        largest :func:`covshift.stats.scratch_size` so far (on the CPU a piece of an output,
        elsewhere the whole output), shared by every layer (hooks run one at a time, and device
        work is ordered on the stream). None when ``compiling``: the graph keeps them in registers."""
        if compiling:
            return None
        key = (flat.dtype, flat.device)
        need = stats.scratch_size(flat.numel(), flat.device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = self._scratch[key] = flat.new_empty(need)
        return buffer[:need]

    def _on_grad(self, cell: Tensor, grad: Tensor) -> None:
        """Write the sum of squares of an output's gradient into the cell its forward kept."""
        g = stats.flat_float(grad)
        stats.sum_of_squares(g, self._scratch_for(g, torch.compiler.is_compiling()), out=cell[0])

    def _hold_grad(self, buffer: int, at: int, grad: Tensor) -> None:
        """Keep the gradient of an output kept whole until the step's end (:meth:`_write_held`)."""
        self._held.setdefault((buffer, grad.shape, grad.dtype), []).append((at, grad))

    def _write_held(self) -> None:
        """Write the sums of squares of the gradients held since the last step into their
        cells: a few kernels per gradient shape instead of two per gradient."""
        held, self._held = self._held, {}
        for (index, _, _), pairs in held.items():
            if index >= len(self._grad_staging.buffers):  # a backward after step() of a step whose buffers went
                continue
            cells = self._grad_staging.buffers[index]
            offsets = tuple(a for a, _ in pairs)
            at = self._indices.get(("cells", offsets, cells.device), lambda: torch.tensor(offsets).to(cells.device))
            cells.index_copy_(0, at, stats.stacked_sums_of_squares([g for _, g in pairs]).to(cells.dtype))

    # step boundary ---------------------------------------------------------------------
    def step(self, loss: Tensor | float | None = None) -> int:
        """End the current step, recording ``loss`` (a tensor is not synchronised), and
        return its index. Call it after ``optimizer.step()``."""
        if not self._started or self._closed:
            raise RuntimeError("Tracer.step() called outside the Tracer's `with` block")
        index = self._step
        rec = self._current
        self._hand_off(rec)
        if self.recording:
            self._param_norms.record(rec)
            self._recorded += 1
        self._record_scalars(rec, loss)
        self._pending.append(rec)
        self._step += 1
        self._recording = self.recording
        if self._compiled and self._called is not None:  # keep probing: removing hooks would change
            self._called.clear()  # the compiled graph's guards
        else:
            self._stop_probing()
        self._current = self._new_record()
        if self.recording:
            self._param_norms.snapshot()
        if self._recorded >= self.flush_every:
            self._flush(now=False)
        return index

    def _hand_off(self, rec: StepRecord) -> None:
        """Move the step's records from the staging into the arena (a copy per buffer), and
        place layers first recorded in it (a compiled forward does not place them)."""
        self._write_held()
        rec.places = self._staging.move(self._arena)
        rec.grad_places = self._grad_staging.move(self._arena)
        self._whole.compute(rec, self._arena, self._kind_of_output)
        if not rec.detail:
            rec.units.clear()
        for index, *_ in rec.calls:
            layer = self._by_index[index]
            if layer.position is None:
                layer.position = next(self._order)

    def _kind_of_output(self, index: int) -> stats.Nonlinearity | None:
        """Layer ``index``'s nonlinearity when it is one of the output (:class:`covshift.whole.WholePlan`)."""
        kind = self._by_index[index].kind
        return kind if kind is not None and not kind.of_input else None

    def _new_record(self) -> StepRecord:
        return StepRecord(self._step, detail=self._step % self.detail_every == 0)

    def _record_scalars(self, rec: StepRecord, loss: Tensor | float | None) -> None:
        if isinstance(loss, Tensor) and loss.numel() != 1:
            raise ValueError(f"loss must be a single value, got a tensor of shape {tuple(loss.shape)}")
        rec.loss = None if loss is None else rec.slots.put(_scalar(loss))
        if self.optimizer is not None and not hasattr(self.optimizer, "register_step_pre_hook"):
            self._record_lrs(rec)  # an optimizer without step hooks: its lr at the step's end

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before ``optimizer.step()``: the learning rates this update uses (a scheduler
        stepped after it changes them for the next step only)."""
        if not self._closed:
            self._record_lrs(self._current)

    def _record_lrs(self, rec: StepRecord) -> None:
        groups = getattr(self.optimizer, "param_groups", [])
        rec.lrs = [(i, rec.slots.put(_scalar(g["lr"]))) for i, g in enumerate(groups) if "lr" in g]

    def log(self, step: int | None = None, layer: str = "", **values: Tensor | float) -> None:
        """Record metrics such as ``val_loss=...`` at ``step`` (default: the last step
        ended), whether or not that step's layer statistics were recorded: run metrics, or
        metrics of a hooked ``layer``. Tensors are not synchronised.

        >>> tracer.log(val_loss=val_loss, val_accuracy=0.93)  # doctest: +SKIP
        """
        if self._closed:
            raise RuntimeError("Tracer.log() after close(): the trace file is closed")
        if layer and layer not in self._layers:
            raise ValueError(f"log(layer={layer!r}): not a layer this tracer hooks")
        at = max(self._step - 1, 0) if step is None else step
        for name, value in values.items():
            self._log_rows.append((at, layer, name, self._logged.put(_scalar(value))))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside this block are not recorded (e.g. extra measurement passes).

        >>> with tracer.paused():  # doctest: +SKIP
        ...     probe(model)
        """
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    # flushing --------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every recorded step to the file now, in one transaction (one host sync).
        A batch that cannot be written is kept and retried at the next flush. Under
        ``torch.distributed`` it is collective: call it on every rank."""
        self._flush(now=True)

    def _flush(self, now: bool) -> None:
        """Gather and summarise the pending steps; write them (with the batches kept
        since the last write) when ``now`` or ``write_every`` seconds have passed."""
        if not self._started or self._closed:
            return
        if not self._pending and not self._log_rows and self._ranks is None:
            self._saver.save(now=now)
            return
        records, self._pending, self._recorded = self._pending, [], 0
        logged, rows, self._logged, self._log_rows = self._logged, self._log_rows, Slots(), []
        fetch([r.slots for r in records] + [logged])
        detail = {r.step for r in records if r.detail}
        calls: Calls | None = gather(records, self._arena)
        if self._ranks is not None:
            calls = self._global(calls, records, detail)
        self._arena.reset()  # the step in progress is in the staging
        if calls is None or self._saver is None:  # another rank's flush, or a failed one
            if self._ranks is not None and self._ranks.failed:
                self._detach()
            return
        if not records and not rows:  # ranks flush together even when they have nothing
            self._saver.save(now=now)
            return
        known = list(self._layers.values())
        layers = Layers([x.name for x in known], [x.kind for x in known], [x.edges for x in known], self.bins)
        summary = summarize(calls, layers, detail)
        for layer, edges in zip(known, layers.edges):
            layer.edges = edges
        run_columns(summary, records)
        steps = [r.step for r in records] + [row[0] for row in rows]
        batch = Batch(min(steps), max(steps))
        batch.scalars = [(step, layer, name, float(logged.get(h)[0])) for step, layer, name, h in rows]
        batch.columns, batch.units, batch.hists = summary.columns, summary.units, summary.hists
        batch.layers = self._layer_rows(({row[1] for row in batch.scalars} | {k[0] for k in batch.columns}) - {""})
        self._saver.save(batch, now=now)

    def _global(self, calls: Calls, records: list[StepRecord], detail: set[int]) -> Calls | None:
        """On rank 0, the calls of every rank merged, and the loss and the norms of sharded
        parameters of ``records`` made global; None on the other ranks and after a failure."""
        assert self._ranks is not None
        names = list(self._layers)
        whole = np.array([self._kind_of_output(x.index) is not None for x in self._by_index], dtype=bool)
        cut = self._ranks.part(calls, self.sample_size, whole, detail)
        shares = self._ranks.gather(dist.share(cut, names, records, bool(self._copies.any())))
        if shares is None:
            return None
        try:
            merged = dist.merge(shares, names)
        except ValueError as error:
            self._ranks.failed = str(error)
            warnings.warn(f"covshift: {error}; distributed recording stops here", RuntimeWarning, stacklevel=3)
            return None
        dist.make_global(records, shares, self._copies)
        return merged

    def _layer_rows(self, seen: set[str]) -> list[tuple[str, str, str | None, int, list[float] | None]]:
        """The writer's layer registrations for the layers in a batch, positions given in
        the order layers first produce data."""
        out = []
        for name in sorted(seen, key=lambda n: (self._layers[n].position is None, self._layers[n].position or 0)):
            layer = self._layers[name]
            if layer.position is None:
                layer.position = next(self._order)
            out.append((name, type(layer.module).__name__, layer.kind.name if layer.kind else None, layer.position,
                        None if layer.edges is None else layer.edges.tolist()))
        return out
