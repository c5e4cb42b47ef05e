"""Loading a user's model file: its model factory, data, loss and config.

A model file is a plain Python file that defines

- ``build_model(batchnorm: bool) -> nn.Module`` (both variants, built by the user), or
  ``build_model() -> nn.Module``, or a module-level ``model`` instance (covshift derives
  the other variant);
- ``data()`` returning ``(train, val)`` datasets or DataLoaders of ``(input, target)``
  pairs or dicts of keyword arguments (:mod:`covshift.batches`);
- optionally ``loss_fn(output, target)`` (default: the output's own ``loss``, else
  cross-entropy of its logits: :mod:`covshift.outputs`) and a ``config`` dict.

``path.py:name`` picks another factory name. Every problem becomes a
:class:`ModelFileError` whose message names it and the fix; an exception raised inside
the user's code keeps the part of its traceback that lies in their file.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from torch import nn
from torch.utils.data import DataLoader, Dataset

from .ranges import problem

FACTORY_NAMES = ("build_model", "model")
CONFIG_KEYS = ("epochs", "steps", "lr", "batch_size", "optimizer", "momentum", "weight_decay", "seed")


class ModelFileError(Exception):
    """A problem with the model file; ``user_traceback`` is the part of a traceback that
    lies in the user's own code, when their code raised."""

    def __init__(self, message: str, user_traceback: str | None = None) -> None:
        super().__init__(message)
        self.user_traceback = user_traceback


@dataclass
class ModelFile:
    """What a model file provides."""

    path: Path
    module: ModuleType
    factory_name: str
    factory: Callable[..., nn.Module] | None  # None when the file gives an instance
    instance: nn.Module | None
    takes_batchnorm: bool  # the factory builds both variants itself
    data: Callable[[], Any]
    loss_fn: Callable[[Any, Any], Any] | None
    config: dict[str, Any] = field(default_factory=dict)

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run user code, turning an exception into a ModelFileError with their traceback."""
        try:
            return fn(*args)
        except Exception as e:
            raise ModelFileError(f"{what} raised {type(e).__name__}: {e}", user_traceback(e, self.path)) from e

    def build(self, batchnorm: bool | None = None) -> nn.Module:
        """A fresh model: ``build_model(batchnorm)``, ``build_model()`` or the instance."""
        if self.instance is not None:
            return self.instance
        assert self.factory is not None
        args = () if batchnorm is None or not self.takes_batchnorm else (batchnorm,)
        shown = f"{self.factory_name}({', '.join(map(str, args))})"
        built = self.call(shown, self.factory, *args)
        if not isinstance(built, nn.Module):
            raise ModelFileError(f"{shown} returned {type(built).__name__}, not a torch.nn.Module")
        return built

    def datasets(self) -> tuple[Dataset | DataLoader, Dataset | DataLoader]:
        """``data()``'s ``(train, val)``, checked."""
        result = self.call("data()", self.data)
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ModelFileError(
                f"data() must return (train, val) datasets or DataLoaders, got {type(result).__name__}"
                + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        for name, part in zip(("train", "val"), result):
            if not isinstance(part, (Dataset, DataLoader)) and not hasattr(part, "__getitem__"):
                raise ModelFileError(
                    f"data() returned a {name} part of type {type(part).__name__}: "
                    "return a torch Dataset (e.g. TensorDataset) or a DataLoader")
            if isinstance(part, Dataset) and hasattr(part, "__len__") and len(part) == 0:
                raise ModelFileError(f"data() returned an empty {name} dataset")
        return result[0], result[1]


def user_traceback(error: BaseException, path: Path) -> str | None:
    """The frames of ``error``'s traceback that lie in the user's file, formatted."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
    if not frames:
        return None
    lines = traceback.format_list(frames)
    return "".join(lines) + "".join(traceback.format_exception_only(type(error), error))


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"dir/file.py:factory"`` -> ``("dir/file.py", "factory")``; no name -> None."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isidentifier() and head:
        return head, tail
    return spec, None


def load(spec: str) -> ModelFile:
    """Import the model file ``spec`` (``path.py`` or ``path.py:factory``) and find its parts."""
    file, name = split_spec(spec)
    path = Path(file).expanduser().resolve()
    if not path.exists():
        raise ModelFileError(f"no model file at {file}: give the path of a Python file that defines build_model")
    if path.is_dir() or path.suffix != ".py":
        raise ModelFileError(f"{file} is not a Python file (.py): give a model file that defines build_model")
    module = _import(path)
    names = (name,) if name else FACTORY_NAMES
    found = next((n for n in names if hasattr(module, n)), None)
    if found is None:
        defined = sorted(n for n, v in vars(module).items()
                         if not n.startswith("_") and (inspect.isfunction(v) or isinstance(v, nn.Module)))
        looked = " or ".join(names)
        raise ModelFileError(
            f"{file} defines no {looked}: define build_model(batchnorm: bool), build_model() or a "
            f"module-level `model`, or name the factory as {file}:NAME "
            f"(functions and models it defines: {', '.join(defined) or 'none'})")
    target = getattr(module, found)
    instance = target if isinstance(target, nn.Module) else None
    if instance is None and not callable(target):
        raise ModelFileError(f"{file}: `{found}` is a {type(target).__name__}, not a function or nn.Module")
    data = getattr(module, "data", None)
    if not callable(data):
        raise ModelFileError(f"{file} defines no data() function: add data() returning (train, val) "
                             "datasets or DataLoaders")
    loss_fn = getattr(module, "loss_fn", None)
    if loss_fn is not None and not callable(loss_fn):
        raise ModelFileError(f"{file}: loss_fn must be a function loss_fn(output, target)")
    config = getattr(module, "config", {})
    if not isinstance(config, dict):
        raise ModelFileError(f"{file}: config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelFileError(f"{file}: unknown config keys {', '.join(unknown)} (known: {', '.join(CONFIG_KEYS)})")
    for key, value in config.items():
        expected = problem(key, value)
        if expected is not None:
            raise ModelFileError(f'{file}: config["{key}"] must be {expected}, not {value!r}')
    return ModelFile(path, module, found, None if instance is not None else target, instance,
                     instance is None and _takes_argument(target), data, loss_fn, dict(config))


def _takes_argument(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _import(path: Path) -> ModuleType:
    module_name = f"covshift_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.fspath(path.parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelFileError(f"{path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        raise ModelFileError(f"importing {path.name} raised {type(e).__name__}: {e}", user_traceback(e, path)) from e
    finally:
        sys.path.remove(os.fspath(path.parent))
    return module
