"""covshift: shows why a neural network trains well or badly.

>>> import covshift
>>> with covshift.Tracer(model, "runs/demo.covshift", optimizer=opt) as tracer:  # doctest: +SKIP
...     ...  # your training loop, ending each step with tracer.step(loss=loss)
>>> covshift.load("runs/demo.covshift").scalars()  # doctest: +SKIP
"""

__version__ = "0.1.0"

from .analysis import Analysis, Finding, analyze  # noqa: E402
from .report import report  # noqa: E402
from .store import Trace, TraceError, load  # noqa: E402
from .tracer import Tracer  # noqa: E402

__all__ = ["Analysis", "Finding", "Trace", "TraceError", "Tracer", "__version__", "analyze", "load", "report"]
