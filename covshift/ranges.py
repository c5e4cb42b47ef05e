"""The values each numeric setting accepts, checked before a model file's data is loaded or
anything is trained: by the command line for its options, and by :mod:`covshift.modelfile`
for a model file's ``config``.

This module imports nothing heavy, so that the command line can check its options at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Range:
    """The values a setting accepts: ``description`` says which, ``accepts`` tests one."""

    description: str
    accepts: Callable[[Any], bool]


POSITIVE_WHOLE = Range("a whole number of at least 1", lambda v: _whole(v) and v >= 1)
FINITE_POSITIVE = Range("a finite number greater than 0", lambda v: _number(v) and v > 0)
FINITE_NON_NEGATIVE = Range("a finite number of at least 0", lambda v: _number(v) and v >= 0)
#: What torch.manual_seed and torch.Generator.manual_seed accept.
SEED = Range("a whole number from -2^63 to 2^64 - 1", lambda v: _whole(v) and -2**63 <= v < 2**64)

#: The range of each numeric setting, by its name in :class:`covshift.runner.Settings`
#: (``jobs``: the worker processes of a sweep).
SETTINGS: dict[str, Range] = {
    **dict.fromkeys(("epochs", "steps", "batch_size", "every", "detail_every", "eval_every", "ics_every", "jobs"),
                    POSITIVE_WHOLE),
    "lr": FINITE_POSITIVE,
    "init_scale": FINITE_POSITIVE,
    "momentum": FINITE_NON_NEGATIVE,
    "weight_decay": FINITE_NON_NEGATIVE,
    "seed": SEED,
}


def problem(name: str, value: Any) -> str | None:
    """What setting ``name`` takes (``"a finite number greater than 0"``) when ``value`` is
    out of its range; None when it is in range or None (not set), or when ``name`` is not a
    numeric setting."""
    expected = SETTINGS.get(name)
    return None if expected is None or value is None or expected.accepts(value) else expected.description


def shown(value: Any) -> str:
    """``value`` as a user wrote it: ``nan``, ``-1``, ``0.5``."""
    return format(value, "g") if isinstance(value, float) else str(value)
