"""Profiles: the reference statistics of a snapshot, computed once and stored beside it.

Monitoring compares every window of live traffic against a profile without rescanning the
training data, so a profile keeps counts, not only summaries: numeric columns get bin edges at
the reference quantiles with the count in each bin (a window is binned on the same edges);
categorical columns get the top-K value frequencies plus an "other" count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PROFILE_VERSION = 1
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def column_kind(t: pa.DataType) -> str:
    """'numeric', 'categorical', 'datetime' or 'other': how a column is profiled and drifted."""
    if pa.types.is_dictionary(t):
        return "categorical"
    if pa.types.is_boolean(t):
        return "categorical"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "numeric"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or t == pa.string_view():
        return "categorical"
    if pa.types.is_temporal(t):
        return "datetime"
    return "other"


def _numeric(col: pa.ChunkedArray, rows: int, bins: int) -> dict[str, Any]:
    values = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    finite = values[np.isfinite(values)]
    missing = int(rows - finite.size)  # nulls, NaN and inf all count as missing
    out: dict[str, Any] = {"kind": "numeric", "count": int(finite.size), "missing": missing,
                           "missing_rate": missing / rows if rows else 0.0}
    if finite.size == 0:
        out.update(mean=None, std=None, min=None, max=None, quantiles={}, bin_edges=[],
                   bin_counts=[])
        return out
    qs = np.quantile(finite, QUANTILES)
    distinct = np.unique(finite) if finite.size <= 5_000_000 else None
    if distinct is not None and 1 < distinct.size <= bins:
        # few distinct values (flags, counts, ratings): one bin per value, edges halfway
        # between them, so a move from one value to another is visible to drift
        edges = np.concatenate([[distinct[0]], (distinct[:-1] + distinct[1:]) / 2,
                                [distinct[-1]]])
    else:
        edges = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        edges = np.array([edges[0], edges[0]])
    # Bin i holds edges[i] <= x < edges[i+1]; the last bin is closed on the right.
    counts, _ = np.histogram(finite, bins=edges) if edges[0] < edges[-1] else (
        np.array([finite.size]), None)
    out.update(
        mean=float(finite.mean()),
        std=float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
        min=float(finite.min()),
        max=float(finite.max()),
        quantiles={f"{q:g}": float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        bin_edges=[float(e) for e in edges],
        bin_counts=[int(c) for c in counts],
        n_unique=int(distinct.size) if distinct is not None else None,
    )
    return out


def _categorical(col: pa.ChunkedArray, rows: int, top_k: int) -> dict[str, Any]:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.string())
    missing = int(col.null_count)
    vc = pc.value_counts(col.drop_null()).to_pylist()
    vc.sort(key=lambda d: (-d["counts"], str(d["values"])))
    top = vc[:top_k]
    other = sum(d["counts"] for d in vc[top_k:])
    return {
        "kind": "categorical",
        "count": rows - missing,
        "missing": missing,
        "missing_rate": missing / rows if rows else 0.0,
        "n_unique": len(vc),
        "top": {str(d["values"]): int(d["counts"]) for d in top},
        "other_count": int(other),
    }


def _datetime(col: pa.ChunkedArray, rows: int) -> dict[str, Any]:
    missing = int(col.null_count)
    mm = pc.min_max(col)
    lo, hi = mm["min"].as_py(), mm["max"].as_py()
    return {"kind": "datetime", "count": rows - missing, "missing": missing,
            "missing_rate": missing / rows if rows else 0.0,
            "min": lo.isoformat() if lo is not None else None,
            "max": hi.isoformat() if hi is not None else None}


def compute_profile(table: pa.Table, *, bins: int = 20, top_k: int = 50) -> dict[str, Any]:
    """Profile every column of ``table``. One pass per column; O(rows)."""
    rows = table.num_rows
    columns: dict[str, Any] = {}
    for field, col in zip(table.schema, table.columns, strict=True):
        kind = column_kind(field.type)
        if kind == "numeric":
            stats = _numeric(col, rows, bins)
        elif kind == "categorical":
            stats = _categorical(col, rows, top_k)
        elif kind == "datetime":
            stats = _datetime(col, rows)
        else:
            missing = int(col.null_count)
            stats = {"kind": "other", "count": rows - missing, "missing": missing,
                     "missing_rate": missing / rows if rows else 0.0}
        stats["type"] = str(field.type)
        columns[field.name] = stats
    return {"version": PROFILE_VERSION, "rows": rows, "bins": bins, "top_k": top_k,
            "schema": {f.name: str(f.type) for f in table.schema}, "columns": columns}


def column_summary(stats: dict[str, Any]) -> str:
    """One line a person reads for a profiled column (what ``mloop data profile`` and the
    dashboard's snapshots page print): range and spread of a number, the most frequent
    values of a category, the span of a time."""
    kind = stats.get("kind")
    if kind == "numeric" and stats.get("mean") is not None:
        return (f"mean {stats['mean']:.4g} std {stats['std']:.4g} "
                f"[{stats['min']:.4g}, {stats['max']:.4g}]")
    if kind == "categorical":
        top = ", ".join(f"{k} {v}" for k, v in list(stats["top"].items())[:4])
        return f"{stats['n_unique']} values: {top}"
    if kind == "datetime":
        return f"{stats['min']} .. {stats['max']}"
    return ""
