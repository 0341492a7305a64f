"""Data quality of a window against the reference profile: findings with counts and examples.

Checks per reference column: the column is missing from the window, or its values are of
another type (text in a numeric column); the missing rate rose (by at least
``missing_rate_rise`` and beyond sampling noise); numeric values outside the reference range;
categories the reference never saw (only when the reference profile holds every category,
i.e. it had no more than top-K of them). A bad window is a finding, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EXAMPLES = 5


@dataclass
class Finding:
    column: str
    check: str  # missing_column | type_error | missing_rate | out_of_range | unseen_category
    count: int
    rate: float
    message: str
    examples: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class QualityThresholds:
    missing_rate_rise: float = 0.05  # absolute rise over the reference's missing rate
    out_of_range_rate: float = 0.01  # share of values outside [min, max] of the reference
    unseen_category_rate: float = 0.01


def _examples(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v if not isinstance(v, float) else round(v, 6))
        if len(out) == EXAMPLES:
            break
    return out


def numeric_values(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray | None, list[Any], int]:
    """Floats (NaN for missing), the examples that are not numbers, and how many there were."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    t = col.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) \
            or pa.types.is_boolean(t) or pa.types.is_null(t):
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False), [], 0
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text = col.to_pylist()
        out = np.full(len(text), np.nan)
        bad: list[Any] = []
        n_bad = 0
        for i, v in enumerate(text):
            if v is None or v == "":
                continue
            try:
                out[i] = float(v)
            except ValueError:
                n_bad += 1
                if len(bad) < EXAMPLES:
                    bad.append(v)
        return out, bad, n_bad
    return None, [str(t)], len(col)


def check_column(name: str, ref: dict[str, Any], col: pa.ChunkedArray | None, rows: int,
                 th: QualityThresholds) -> tuple[list[Finding], Any]:
    """Findings for one column, and its values ready for drift (floats or an Arrow array;
    None when the column cannot be compared)."""
    findings: list[Finding] = []
    if col is None:
        findings.append(Finding(name, "missing_column", rows, 1.0 if rows else 0.0,
                                f"column '{name}' is not in the window"))
        return findings, None
    kind = ref.get("kind")
    missing = int(col.null_count)
    values: Any = col
    if kind == "numeric":
        floats, bad, n_bad = numeric_values(col)
        if floats is None:
            findings.append(Finding(name, "type_error", rows, 1.0, f"column '{name}' is "
                                    f"{bad[0]}, the reference is numeric", []))
            return findings, None
        if n_bad:
            findings.append(Finding(name, "type_error", n_bad, n_bad / rows,
                                    f"{n_bad} value(s) of '{name}' are not numbers",
                                    _examples(bad)))
        missing = int(np.count_nonzero(~np.isfinite(floats))) - n_bad
        values = floats
        lo, hi = ref.get("min"), ref.get("max")
        if lo is not None and hi is not None:
            finite = floats[np.isfinite(floats)]
            outside = finite[(finite < lo) | (finite > hi)]
            rate = outside.size / finite.size if finite.size else 0.0
            if outside.size and rate >= th.out_of_range_rate:
                findings.append(Finding(name, "out_of_range", int(outside.size), rate,
                                        f"{outside.size} value(s) of '{name}' outside the "
                                        f"reference range [{lo:.4g}, {hi:.4g}]",
                                        _examples(outside.tolist())))
    elif kind == "categorical":
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            col = col.cast(pa.string())
        values = col
        top = ref.get("top") or {}
        if top and not ref.get("other_count") and len(top) == ref.get("n_unique", len(top)):
            present = pc.drop_null(col)
            unseen_mask = pc.invert(pc.is_in(present, value_set=pa.array(list(top))))
            unseen = pc.filter(present, unseen_mask)
            rate = len(unseen) / len(present) if len(present) else 0.0
            if len(unseen) and rate >= th.unseen_category_rate:
                findings.append(Finding(name, "unseen_category", len(unseen), rate,
                                        f"{len(unseen)} value(s) of '{name}' are categories "
                                        f"the reference never had",
                                        _examples(unseen.slice(0, 1000).to_pylist())))
    ref_rate = float(ref.get("missing_rate") or 0.0)
    rate = missing / rows if rows else 0.0
    noise = 3 * math.sqrt(max(ref_rate * (1 - ref_rate), 1e-6) / max(rows, 1))
    if rows and rate - ref_rate >= max(th.missing_rate_rise, noise):
        findings.append(Finding(name, "missing_rate", missing, rate,
                                f"'{name}' is missing in {rate:.1%} of rows (reference "
                                f"{ref_rate:.1%})"))
    return findings, values
