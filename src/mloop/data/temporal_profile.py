"""Temporal calibration, the snapshot's side: how far the reference period drifts from itself,
chunk by chunk, computed when a time-ordered snapshot is stored (its profile's
``temporal`` section). Monitoring reads it back (:mod:`mloop.monitoring.temporal`).

The iid calibration (:mod:`mloop.monitoring.drift`) asks whether a window could be a random
draw from the reference histogram. Real windows are contiguous stretches of time (one week,
one season, one weather spell), and on time-ordered data even windows taken from *inside*
the training period fail that test. So when the training snapshot has a time column, its
profile also keeps, per column and per method, the drift statistic of every contiguous chunk
of the reference period against the rest of it (leave-one-out: a chunk is not compared with
itself, as a live window is not part of the reference). A chunk has the monitoring window's
size: the same length of event time, epoch-aligned as monitoring aligns its windows (``7d``),
or the same number of consecutive rows in time order (``5000rows``).

This is computed once, when the snapshot is stored, and never at window time: a window's
temporal threshold is a quantile of a few stored numbers.

Choices:

- A chunk is usable when it holds at least ``max(MIN_CHUNK_ROWS, half the median chunk's
  rows)`` rows (``MIN_CHUNK_ROWS`` = 20: a day of hourly data has 24). The half-median rule
  drops the partial chunks at the period's edges and near-empty ones, whose small samples
  would inflate the threshold.
- With fewer than ``MIN_CHUNKS`` (10) usable chunks no temporal threshold is kept; the profile
  records why and windows are judged iid-only, saying so in their report.
- The threshold is the ``1 - false_alarm_rate`` quantile of the chunk statistics, per column.
  When the rate is finer than the chunks resolve (``chunks * rate < 1``), it is extrapolated
  with an exponential tail fitted above the 90th percentile: ``u + mean excess * ln(0.1 /
  rate)`` (peaks over threshold with shape 0).
- The stored chunk statistics were computed for one window size. A window of another size
  (``--window 1d`` against chunks of ``7d``) is judged iid-only and its report says so; the
  chunks follow a new ``monitoring.window`` when a snapshot is profiled again (a new
  training run), never by rescanning an old one.
- More than ``MAX_STORED`` chunks are stored as that many evenly spaced quantiles.
- **Rolling references** (``monitoring.reference: {rolling: 28d}``) compare a window with the
  traffic just before it, not with the whole training period, so their null is another one:
  the statistic of each chunk against the ``rolling`` span of event time just before it
  (the whole chunks in it), each such reference profiled on its own quantile bins as a
  window's rolling reference is. Stored as the ``rolling`` section when the span is a whole
  number of time chunks; at most ``MAX_ROLLING`` chunks, evenly spaced, are measured (each
  costs a profile of its span).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mloop.data.divergence import (
    CATEGORICAL_METHODS,
    NUMERIC_METHODS,
    ColumnReference,
    statistic,
)

TEMPORAL_VERSION = 1
MIN_CHUNK_ROWS = 20
MIN_CHUNKS = 10
MAX_STORED = 101
MAX_ROLLING = 200
MIN_ROLLING_ROWS = 50  # as monitoring.reference.MIN_ROWS: a smaller span is not a reference
TAIL = 0.9  # the exponential tail is fitted above this quantile


def _window_size(window: str) -> tuple[str, int]:
    """('time', microseconds) or ('rows', count) of a window spec such as ``7d``."""
    from mloop.config import parse_window

    size = parse_window(window)
    if isinstance(size, int):
        return "rows", size
    return "time", int(size.total_seconds() * 1_000_000)


def same_window(a: str, b: str) -> bool:
    """Whether two window specs are the same size (``7d`` and ``168h`` are)."""
    try:
        return _window_size(a) == _window_size(b)
    except ValueError:
        return False


def _micros(col: pa.ChunkedArray) -> np.ndarray | None:
    """Event times as microseconds since the epoch (floats, exact below 2**53; NaN for a
    null), or None when the column is not a time. Naive times are read as UTC, as the
    inference log's are."""
    t = col.type
    if pa.types.is_date(t):
        col = col.cast(pa.timestamp("s"))
        t = col.type
    if not pa.types.is_timestamp(t):
        return None
    as_int = col.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64())
    return np.asarray(as_int.to_numpy(zero_copy_only=False), dtype=np.float64)


def _chunk_ids(table: pa.Table, time_column: str, by: str, size: int
               ) -> tuple[np.ndarray, str | None]:
    """Per row, the index of its chunk (-1: no time), or a reason there are no chunks."""
    micros = _micros(table.column(time_column))
    if micros is None:
        return np.empty(0, dtype=np.int64), (
            f"time column '{time_column}' is {table.schema.field(time_column).type}, not a "
            f"timestamp")
    known = np.isfinite(micros)
    ids = np.full(micros.size, -1, dtype=np.int64)
    if by == "time":
        ids[known] = np.floor_divide(micros[known].astype(np.int64), size)
    else:
        order = np.argsort(micros[known], kind="stable")
        position = np.empty(order.size, dtype=np.int64)
        position[order] = np.arange(order.size)
        ids[known] = position // size
        # the last, partial chunk is not a window monitoring would evaluate
        full = (order.size // size)
        ids[ids >= full] = -1
    return ids, None


def _row_bins(ref: ColumnReference, col: pa.ChunkedArray) -> np.ndarray:
    """Per row, its bin on the reference's bins; -1 for missing (or, without an "other"
    bucket, a category the profile does not hold)."""
    if ref.kind == "numeric":
        x = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
        out = np.full(x.size, -1, dtype=np.int64)
        finite = np.isfinite(x)
        k = ref.counts.size
        assert ref.edges is not None
        out[finite] = np.searchsorted(ref.edges[1:-1], x[finite], side="right") if k > 1 else 0
        return out
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    k = len(ref.categories)
    idx = pc.index_in(col, value_set=pa.array(ref.categories, pa.string()))
    out = np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
    unknown = (out < 0) & np.asarray(col.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    out[unknown] = k if ref.has_other else -1
    return out


def _summarised(values: np.ndarray) -> list[float]:
    values = np.sort(values)
    if values.size > MAX_STORED:
        values = np.quantile(values, np.linspace(0.0, 1.0, MAX_STORED))
    return [float(f"{v:.6g}") for v in values]


def temporal_profile(table: pa.Table, profile: dict[str, Any], *, time_column: str,
                     window: str, rolling: str | None = None) -> dict[str, Any]:
    """The chunk statistics of every numeric and categorical column of ``table`` (whose
    ``profile`` was just computed), for windows of size ``window``. O(rows) per column.
    With ``rolling`` (a duration such as ``28d``) also the rolling null (``rolling``)."""
    out: dict[str, Any] = {"version": TEMPORAL_VERSION, "time_column": time_column,
                           "window": window}
    if time_column not in table.column_names:
        return {**out, "reason": f"the snapshot has no column '{time_column}'"}
    by, size = _window_size(window)
    ids, reason = _chunk_ids(table, time_column, by, size)
    if reason:
        return {**out, "reason": reason}
    present = ids >= 0
    if not present.any():
        return {**out, "reason": f"no row has a {time_column}"}
    first = int(ids[present].min())
    ids = np.where(present, ids - first, -1)
    n_chunks = int(ids.max()) + 1
    rows = np.bincount(ids[present], minlength=n_chunks)
    nonempty = rows[rows > 0]
    min_rows = max(MIN_CHUNK_ROWS, math.ceil(float(np.median(nonempty)) / 2))
    usable = np.flatnonzero(rows >= min_rows)
    out.update(by=by, min_chunk_rows=min_rows, chunks=int(usable.size),
               skipped_chunks=int(nonempty.size - usable.size))
    if usable.size < MIN_CHUNKS:
        return {**out, "reason": f"only {usable.size} usable {window} chunk(s) of at least "
                                 f"{min_rows} rows in the reference period ({MIN_CHUNKS} "
                                 f"needed)"}
    columns: dict[str, dict[str, list[float]]] = {}
    for name, stats in profile["columns"].items():
        if name == time_column:
            continue
        ref = ColumnReference.from_profile(name, stats)
        if ref is None:
            continue
        bins = _row_bins(ref, table.column(name))
        k = ref.counts.size
        keep = present & (bins >= 0)
        counts = np.bincount(ids[keep] * k + bins[keep], minlength=n_chunks * k).reshape(
            n_chunks, k)[usable].astype(float)
        counts = counts[counts.sum(axis=1) > 0]
        if counts.shape[0] < MIN_CHUNKS:
            continue
        rest = np.maximum(ref.counts[None, :] - counts, 0.0)  # leave-one-out reference
        widths = np.diff(ref.edges) if ref.edges is not None else None
        methods = NUMERIC_METHODS if ref.kind == "numeric" else CATEGORICAL_METHODS
        columns[name] = {m: _summarised(np.asarray(statistic(m, rest, counts, widths=widths,
                                                              std=ref.std), dtype=float))
                         for m in methods}
    out["columns"] = columns
    if rolling:
        out["rolling"] = _rolling(table, profile, ids, rows >= min_rows, by=by, size=size,
                                  rolling=rolling, time_column=time_column)
    return out


def _rolling(table: pa.Table, profile: dict[str, Any], ids: np.ndarray, usable: np.ndarray, *,
             by: str, size: int, rolling: str, time_column: str) -> dict[str, Any]:
    """Each usable chunk against the ``rolling`` span just before it, profiled on its own
    bins (what a window's rolling reference is): the rolling null, per column and method."""
    from mloop.data.profile import compute_profile

    out: dict[str, Any] = {"length": rolling}
    span_by, span = _window_size(rolling)
    if by != "time" or span_by != "time" or span % size:
        return {**out, "reason": f"a rolling {rolling} reference is measured in whole chunks "
                                 f"of event time: it needs a time window it is a multiple "
                                 f"of"}
    lag = span // size
    candidates = [i for i in np.flatnonzero(usable) if i >= lag and usable[i - lag:i].all()]
    if len(candidates) > MAX_ROLLING:
        picks = np.linspace(0, len(candidates) - 1, MAX_ROLLING).round().astype(int)
        candidates = [candidates[j] for j in sorted(set(picks))]
    names = [n for n, st in profile["columns"].items()
             if n != time_column and st.get("kind") in ("numeric", "categorical")]
    # rows in chunk order, once: a span and a chunk are then slices, not scans of the table
    present = np.flatnonzero(ids >= 0)
    order = present[np.argsort(ids[present], kind="stable")]
    ordered = table.select(names).take(pa.array(order))
    starts = np.searchsorted(ids[order], np.arange(int(ids.max()) + 2))
    values: dict[str, dict[str, list[float]]] = {}
    measured = 0
    for i in candidates:
        lo, mid, hi = (int(starts[i - lag]), int(starts[i]), int(starts[i + 1]))
        if mid - lo < MIN_ROLLING_ROWS:
            continue
        reference = compute_profile(ordered.slice(lo, mid - lo),
                                    bins=int(profile.get("bins") or 20),
                                    top_k=int(profile.get("top_k") or 50))
        chunk = ordered.slice(mid, hi - mid)
        measured += 1
        for name in names:
            ref = ColumnReference.from_profile(name, reference["columns"].get(name) or {})
            if ref is None:
                continue
            bins = _row_bins(ref, chunk.column(name))
            counts = np.bincount(bins[bins >= 0], minlength=ref.counts.size).astype(float)
            if counts.sum() == 0:
                continue
            widths = np.diff(ref.edges) if ref.edges is not None else None
            methods = NUMERIC_METHODS if ref.kind == "numeric" else CATEGORICAL_METHODS
            per = values.setdefault(name, {})
            for m in methods:
                per.setdefault(m, []).append(float(statistic(m, ref.counts, counts,
                                                             widths=widths, std=ref.std)))
    out["chunks"] = measured
    if measured < MIN_CHUNKS:
        return {**out, "reason": f"only {measured} chunk(s) have a whole {rolling} of usable "
                                 f"chunks before them ({MIN_CHUNKS} needed)"}
    out["columns"] = {n: {m: _summarised(np.asarray(v, dtype=float)) for m, v in per.items()}
                      for n, per in values.items() if all(len(v) >= MIN_CHUNKS
                                                          for v in per.values())}
    return out
