"""Shared test code: two runs, of two traces, hold the same data as covshift's reader reads it."""

from __future__ import annotations

import pandas as pd

from covshift.store import Trace


def assert_same_data(a: Trace, b: Trace, run: str, run_b: str | None = None) -> None:
    """Run ``run`` of ``a`` and run ``run_b`` (default: the same name) of ``b`` have equal
    layers, per-step values (float equality, NaN equal to NaN), per-unit rows and histograms."""
    run_b = run if run_b is None else run_b
    for table in ("scalars", "units", "histograms"):
        left, right = (ordered(getattr(t, table)(run=r)) for t, r in ((a, run), (b, run_b)))
        assert len(left) > 0, (table, run)
        pd.testing.assert_frame_equal(left, right, check_exact=True)
    info_a, info_b = a.layer_info(), b.layer_info()
    pd.testing.assert_frame_equal(info_a[info_a["run"] == run].drop(columns="run").reset_index(drop=True),
                                  info_b[info_b["run"] == run_b].drop(columns="run").reset_index(drop=True))


def ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without its run column, names as strings, sorted by every key column: the
    reader orders a step's metrics by their ids in the file, which a merge renumbers."""
    frame = frame.drop(columns="run").astype({c: str for c in ("layer", "metric") if c in frame})
    keys = [c for c in ("step", "layer", "metric", "unit", "bin") if c in frame]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)
