"""Column chunks: a series' steps and values as compact arrays.

Steps that are evenly spaced (every step, or every N) are stored as ``first``, ``count``
and ``stride`` alone; others as an int64 array. Layer metrics are stored as float32 (a
relative precision of 6e-8, finer than the float32 statistics they come from); run metrics
(loss, learning rates, validation) and the per-unit means and variances of detail steps
(they are few, and the covariate-shift measures difference them) as float64. Histogram
counts are int32. Values are stored byte-shuffled (all first bytes, then all second bytes,
...) and zlib-compressed: a series of statistics changes slowly, so its high bytes repeat,
and the chunk shrinks to about 60% of its raw size.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

LAYER_DTYPE = "<f4"
RUN_DTYPE = "<f8"
UNIT_DTYPE = "<f8"


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a series, as the ``series`` table holds it."""

    first: int
    count: int
    stride: int | None  # the spacing of evenly spaced steps, else None and ``steps`` is set
    steps: bytes | None
    dtype: str
    vals: bytes


def encode(steps: np.ndarray, values: np.ndarray, dtype: str) -> Chunk:
    """A chunk of ``values`` at ``steps`` (sorted by step, ties kept in order)."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    gaps = np.diff(steps)
    if (gaps < 0).any():
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
        gaps = np.diff(steps)
    first, count = int(steps[0]), len(steps)
    stride = int(gaps[0]) if count > 1 else 1
    if count > 1 and not (stride > 0 and np.all(gaps == stride)):
        return Chunk(first, count, None, steps.astype("<i8").tobytes(), dtype, compress(values, dtype))
    return Chunk(first, count, stride, None, dtype, compress(values, dtype))


def decode_steps(first: int, count: int, stride: int | None, steps: bytes | None) -> np.ndarray:
    if steps is not None:
        return np.frombuffer(steps, dtype="<i8").astype(np.int64)
    return first + (stride or 1) * np.arange(count, dtype=np.int64)


def compress(values: np.ndarray, dtype: str) -> bytes:
    """``values`` as ``dtype``, byte-shuffled and zlib-compressed."""
    raw = np.ascontiguousarray(values, dtype=dtype)
    planes = raw.view(np.uint8).reshape(len(raw), raw.itemsize).T
    return zlib.compress(np.ascontiguousarray(planes).tobytes(), 1)


def decode_values(dtype: str, vals: bytes) -> np.ndarray:
    """The float64 values of a :func:`compress`-ed chunk."""
    size = np.dtype(dtype).itemsize
    planes = np.frombuffer(zlib.decompress(vals), dtype=np.uint8).reshape(size, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(-1).astype(np.float64)


def pack(values: np.ndarray, dtype: str) -> bytes:
    return np.asarray(values).astype(dtype).tobytes()


def unpack(blob: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(blob, dtype=dtype)
