"""Joint shifts, the snapshot's side: what the multivariate check of a monitoring window needs,
computed once when a snapshot is stored (its profile's ``joint`` section, and the encoded
reference sample in ``<digest>/joint_sample.npy``). Monitoring reads both back
(:mod:`mloop.monitoring.joint`).

Per-column drift compares marginals, so rows that leave the reference's support while every
column stays familiar (latitude and longitude each usual, the pair never seen; ``temp`` and
``atemp`` each usual, a hot day that feels freezing) pass unseen. The check here is an
**out-of-support share**: the fraction of a window's rows whose nearest neighbour in a
reference sample is farther than the reference's own rows are from each other.

- **Encoding.** Numeric columns are standardized (mean 0, sd 1 on the reference; missing ->
  the mean); a categorical column is one-hot on its profile's top categories (at most
  ``MAX_CATEGORIES``), each entry ``1/sqrt(2)`` so two different categories are as far apart
  as one standard deviation; missing or unseen categories -> all zeros. The time column and
  ``exclude`` (the target, excluded columns: never in a live window) are left out.
- **Sample.** At most ``SAMPLE_ROWS`` (5,000) rows drawn at random (seed 0), stored encoded
  as float32.
- **Radius.** The ``SUPPORT_QUANTILE`` (0.99) quantile of the sample's leave-one-out
  nearest-neighbour distances. A row farther than it from every sample row is out of support;
  ``base_rate`` is the share of the sample's own rows that are (about 1%): the iid null's rate.
- **Temporal null.** With a time column, the statistic of every contiguous chunk of the
  reference period (the monitoring window's size, chunked exactly as
  :mod:`mloop.data.temporal_profile` does), each chunk judged against the sample *without its
  own rows* (leave-chunk-out: a live window is not part of the reference either). At most
  ``CHUNK_ROWS`` rows of a chunk are scored (a random subset): the statistic is a share.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mloop.data.temporal_profile import (
    MIN_CHUNK_ROWS,
    MIN_CHUNKS,
    _chunk_ids,
    _summarised,
    _window_size,
)

JOINT_VERSION = 1
METHOD = "out_of_support_share"
SAMPLE_KEY = "joint_sample.npy"
SAMPLE_ROWS = 5000
SUPPORT_QUANTILE = 0.99
MAX_CATEGORIES = 30
CHUNK_ROWS = 2000
ONE_HOT = 1 / math.sqrt(2)

ColumnGetter = Callable[[str], "pa.ChunkedArray | None"]


def joint_encoding(table: pa.Table, profile: dict[str, Any], *,
                   exclude: set[str]) -> list[dict[str, Any]]:
    """How each usable column is encoded: numeric (mean, sd) or categorical (categories)."""
    out: list[dict[str, Any]] = []
    for name, stats in profile["columns"].items():
        if name in exclude:
            continue
        if stats.get("kind") == "numeric":
            x = np.asarray(table.column(name).cast(pa.float64()).to_numpy(
                zero_copy_only=False), dtype=float)
            x = x[np.isfinite(x)]
            if not x.size:
                continue
            sd = float(x.std())
            out.append({"name": name, "kind": "numeric", "mean": float(x.mean()),
                        "sd": sd if sd > 0 else 1.0})
        elif stats.get("kind") == "categorical":
            top = [str(c) for c in (stats.get("top") or {})][:MAX_CATEGORIES]
            if top:
                out.append({"name": name, "kind": "categorical", "categories": top})
    return out


def _as_strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = col.cast(pa.string())
    return col


def encode_rows(encoding: list[dict[str, Any]], column: ColumnGetter, rows: int
                ) -> np.ndarray:
    """The (rows, dims) float32 encoding of a table's rows; ``column(name)`` gives a column
    (callers check that every encoded column is present first)."""
    parts: list[np.ndarray] = []
    for spec in encoding:
        col = column(spec["name"])
        if col is None:
            raise KeyError(spec["name"])
        if spec["kind"] == "numeric":
            x = np.asarray(col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
            z = (x - spec["mean"]) / spec["sd"]
            parts.append(np.where(np.isfinite(z), z, 0.0)[:, None])
        else:
            cats = spec["categories"]
            idx = pc.index_in(_as_strings(col), value_set=pa.array(cats, pa.string()))
            pos = np.asarray(idx.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
            block = np.zeros((rows, len(cats)), dtype=float)
            known = pos >= 0
            block[np.flatnonzero(known), pos[known]] = ONE_HOT
            parts.append(block)
    if not parts:
        return np.zeros((rows, 0), dtype=np.float32)
    return np.hstack(parts).astype(np.float32)


def _nearest(reference: np.ndarray, query: np.ndarray, k: int = 1) -> np.ndarray:
    """Distances from each query row to its k nearest reference rows, (rows, k)."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(reference).query(query, k=k)
    return np.asarray(d, dtype=float).reshape(len(query), k)


def _encode_subset(encoding: list[dict[str, Any]], table: pa.Table, rows: np.ndarray
                   ) -> np.ndarray:
    """The encoding of some rows only: a large snapshot is never encoded whole."""
    part = table.select([e["name"] for e in encoding]).take(pa.array(rows, pa.int64()))
    return encode_rows(encoding, part.column, part.num_rows)


def _chunk_distances(table: pa.Table, encoding: list[dict[str, Any]], sample: np.ndarray,
                     sample_rows: np.ndarray, *,
                     time_column: str, window: str, seed: int
                     ) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Per usable chunk, its rows' nearest-neighbour distances to the sample without the
    chunk's own rows (leave-chunk-out); or, in the dict, why there are no chunks."""
    out: dict[str, Any] = {"time_column": time_column, "window": window}
    if time_column not in table.column_names:
        return {**out, "reason": f"the snapshot has no column '{time_column}'"}, []
    by, size = _window_size(window)
    ids, reason = _chunk_ids(table, time_column, by, size)
    if reason:
        return {**out, "reason": reason}, []
    present = ids >= 0
    if not present.any():
        return {**out, "reason": f"no row has a {time_column}"}, []
    ids = np.where(present, ids - int(ids[present].min()), -1)
    rows = np.bincount(ids[present])
    nonempty = rows[rows > 0]
    min_rows = max(MIN_CHUNK_ROWS, math.ceil(float(np.median(nonempty)) / 2))
    usable = np.flatnonzero(rows >= min_rows)
    out.update(by=by, chunks=int(usable.size))
    if usable.size < MIN_CHUNKS:
        return {**out, "reason": f"only {usable.size} usable {window} chunk(s) of at least "
                                 f"{min_rows} rows in the reference period ({MIN_CHUNKS} "
                                 f"needed)"}, []
    rng = np.random.default_rng(seed)
    sample_chunk = ids[sample_rows]
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], usable)
    distances = []
    for c, start in zip(usable, starts, strict=True):
        members = order[start:start + rows[c]]
        if members.size > CHUNK_ROWS:
            members = rng.choice(members, CHUNK_ROWS, replace=False)
        distances.append(_nearest(sample[sample_chunk != c],
                                  _encode_subset(encoding, table, np.sort(members)))[:, 0])
    return out, distances


def joint_profile(table: pa.Table, profile: dict[str, Any], *, exclude: set[str],
                  time_column: str | None, window: str | None, seed: int = 0
                  ) -> tuple[dict[str, Any], np.ndarray | None]:
    """The profile's ``joint`` section and the encoded reference sample (None when there is
    nothing to compare: fewer than two usable columns or rows)."""
    skip = set(exclude) | ({time_column} if time_column else set())
    encoding = joint_encoding(table, profile, exclude=skip)
    out: dict[str, Any] = {"version": JOINT_VERSION, "method": METHOD,
                           "columns": [e["name"] for e in encoding], "encoding": encoding}
    if len(encoding) < 2 or table.num_rows < 2 * MIN_CHUNK_ROWS:
        return {**out, "reason": f"{len(encoding)} usable column(s) and {table.num_rows} "
                                 f"row(s): a joint check needs 2 columns and "
                                 f"{2 * MIN_CHUNK_ROWS} rows"}, None
    rng = np.random.default_rng(seed)
    n = min(SAMPLE_ROWS, table.num_rows)
    sample_rows = np.sort(rng.choice(table.num_rows, n, replace=False))
    sample = _encode_subset(encoding, table, sample_rows)
    loo = _nearest(sample, sample, k=2)[:, 1]  # the first neighbour is the row itself
    temporal: dict[str, Any] | None = None
    chunks: list[np.ndarray] = []
    if time_column and window:
        temporal, chunks = _chunk_distances(table, encoding, sample, sample_rows,
                                            time_column=time_column, window=window, seed=seed)
    radius = float(np.quantile(loo, SUPPORT_QUANTILE))
    out.update(sample_rows=int(n), radius=radius, base_rate=float(np.mean(loo > radius)))
    if temporal is not None:
        if chunks:
            temporal["values"] = _summarised(np.asarray([np.mean(d > radius)
                                                         for d in chunks]))
        out["temporal"] = temporal
    return out, sample


def sample_bytes(sample: np.ndarray) -> bytes:
    """The sample as stored (``.npy``, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, sample.astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def read_sample(data: bytes) -> np.ndarray:
    return np.asarray(np.load(io.BytesIO(data), allow_pickle=False), dtype=np.float32)
