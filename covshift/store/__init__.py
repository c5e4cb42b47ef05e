"""The trace file: one SQLite database holding runs, layers, metrics and step data.

:class:`TraceWriter` appends batches inside transactions, so an interrupted run keeps
every batch already written. :func:`load` opens a trace read-only as a :class:`Trace`
whose methods return tidy pandas DataFrames, or single series as arrays.

>>> trace = load("runs/demo.covshift")  # doctest: +SKIP
>>> trace.scalars(metric="loss").plot(x="step", y="value")  # doctest: +SKIP
"""

from .reader import Trace, load
from .schema import APPLICATION_ID, SCHEMA_VERSION, TraceError
from .writer import RunReplaced, TraceWriter

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "RunReplaced", "Trace", "TraceError", "TraceWriter", "load"]
