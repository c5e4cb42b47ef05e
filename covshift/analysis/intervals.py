"""Uncertainty of a claim's number: a mean over seeds with its 95% interval, and the
standard error of an accuracy measured on a finite evaluation set.

>>> lo, mean, hi = mean_interval([0.1, 0.2, 0.3])
>>> round(mean, 3), round(lo, 3), round(hi, 3)
(0.2, -0.048, 0.448)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95  #: confidence level of every interval
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))  #: two-sided normal quantile of LEVEL (1.96)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """``(low, mean, high)``: the mean of the finite ``values`` and its Student-t interval.
    With one value the interval is that value (no spread is known); NaNs without any."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean - half, mean, mean + half


def accuracy_se(accuracy: float, n: float) -> float:
    """Binomial standard error of an accuracy measured on ``n`` examples (NaN without n)."""
    if not (n and n > 0 and math.isfinite(accuracy)):
        return math.nan
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)
