"""covshift: shows why a neural network trains well or badly.

>>> import covshift
>>> with covshift.Tracer(model, "runs/demo.covshift", optimizer=opt) as tracer:  # doctest: +SKIP
...     ...  # your training loop, ending each step with tracer.step(loss=loss)
>>> covshift.load("runs/demo.covshift").scalars()  # doctest: +SKIP
"""

__version__ = "0.2.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .analysis import Analysis, Finding, analyze
    from .report import report
    from .store import Trace, TraceError, load
    from .tracer import Tracer

__all__ = ["Analysis", "Finding", "Trace", "TraceError", "Tracer", "__version__", "analyze", "load", "report"]

# Where each public name lives. They are imported on first use, so that `covshift --version`
# and `--help` start without importing torch, pandas or matplotlib.
_HOMES = {"Analysis": "analysis", "Finding": "analysis", "analyze": "analysis", "report": "report",
          "Trace": "store", "TraceError": "store", "load": "store", "Tracer": "tracer"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'covshift' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
