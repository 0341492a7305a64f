"""How far a sample's histogram is from a profile's, per column: the statistics (PSI, KS,
Wasserstein, Jensen-Shannon, chi-square) on the binning the profile fixed.

Below monitoring because the data layer needs them too: a time-ordered snapshot's profile
keeps the statistic of each chunk of its own period against the rest
(:mod:`mloop.data.temporal_profile`), computed when the snapshot is stored. Monitoring
(:mod:`mloop.monitoring.drift`) calibrates and judges with the same functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

METHODS = ("psi", "ks", "wasserstein", "jensen_shannon", "chisquare")
NUMERIC_METHODS = METHODS
CATEGORICAL_METHODS = ("psi", "jensen_shannon", "chisquare")
# smallest statistic that counts as a practical shift, per method
MIN_EFFECT = {"psi": 0.1, "ks": 0.1, "wasserstein": 0.1, "jensen_shannon": 0.1,
              "chisquare": 0.1}
SMALL_WINDOW = 1000
_EPS = 1e-4
OTHER = "__other__"


def default_method(kind: str, n: int) -> str:
    if kind == "numeric":
        return "ks" if n <= SMALL_WINDOW else "wasserstein"
    return "chisquare" if n <= SMALL_WINDOW else "jensen_shannon"


# ---------------------------------------------------------------------- the reference side

@dataclass
class ColumnReference:
    """One column's reference histogram, from a profile."""

    name: str
    kind: str  # numeric | categorical
    counts: np.ndarray  # reference counts per bin (categorical: per category, other last)
    edges: np.ndarray | None = None  # numeric bin edges (len = bins + 1)
    categories: list[str] = field(default_factory=list)  # categorical, without OTHER
    has_other: bool = True  # categorical: the last count is the "other" bucket
    std: float = 0.0
    missing_rate: float = 0.0
    minimum: float | None = None
    maximum: float | None = None

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @property
    def probs(self) -> np.ndarray:
        total = self.counts.sum()
        return self.counts / total if total else self.counts.astype(float)

    @classmethod
    def from_profile(cls, name: str, stats: dict[str, Any]) -> ColumnReference | None:
        kind = stats.get("kind")
        if kind == "numeric":
            edges = np.asarray(stats.get("bin_edges") or [], dtype=float)
            counts = np.asarray(stats.get("bin_counts") or [], dtype=float)
            if edges.size < 2 or counts.size == 0 or counts.sum() == 0:
                return None
            return cls(name, "numeric", counts, edges=edges, std=float(stats.get("std") or 0),
                       missing_rate=float(stats.get("missing_rate") or 0),
                       minimum=stats.get("min"), maximum=stats.get("max"))
        if kind == "categorical":
            top = stats.get("top") or {}
            if not top:
                return None
            cats = list(top)
            other = int(stats.get("other_count", 0) or 0)
            # With an "other" bucket, unknown values share it; without one (the reference
            # held every category) unseen values are left to the quality check: a bucket
            # the reference never filled would make a single new value look like drift.
            counts = np.asarray([*top.values(), *([other] if other else [])], dtype=float)
            return cls(name, "categorical", counts, categories=cats,
                       missing_rate=float(stats.get("missing_rate") or 0),
                       has_other=bool(other))
        return None

    # ----------------------------------------------------------------- binning a window

    def bin(self, values: Any) -> tuple[np.ndarray, int]:
        """Counts of ``values`` (non-missing) on this reference's bins, and the missing count."""
        if self.kind == "numeric":
            x = np.asarray(values, dtype=float)
            finite = x[np.isfinite(x)]
            assert self.edges is not None
            k = self.counts.size
            idx = np.searchsorted(self.edges[1:-1], finite, side="right") if k > 1 else \
                np.zeros(finite.size, dtype=int)
            return np.bincount(idx, minlength=k).astype(float), int(x.size - finite.size)
        return self.bin_categories(values)

    def bin_categories(self, values: Any) -> tuple[np.ndarray, int]:
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = values if isinstance(values, pa.ChunkedArray | pa.Array) else pa.array(
            values, from_pandas=True)
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            arr = arr.cast(pa.string())
        missing = int(arr.null_count)
        k = len(self.categories)
        counts = np.zeros(k + 1)
        index = {c: i for i, c in enumerate(self.categories)}
        for item in pc.value_counts(pc.drop_null(arr)).to_pylist():
            counts[index.get(item["values"], k)] += item["counts"]
        return (counts if self.has_other else counts[:k]), missing


# ------------------------------------------------------------------------- the statistics

def _norm(counts: np.ndarray) -> np.ndarray:
    """Row-wise proportions of count vectors (shape (..., k))."""
    total = counts.sum(axis=-1, keepdims=True)
    return counts / np.where(total == 0, 1, total)


def statistic(method: str, ref: np.ndarray, cur: np.ndarray, *,
              widths: np.ndarray | None = None, std: float = 1.0) -> np.ndarray:
    """The statistic for reference counts ``ref`` and window counts ``cur``; both may be
    batches (shape (B, k)) for the null simulation. Returns shape ().. or (B,)."""
    p, q = _norm(ref), _norm(cur)
    if method == "psi":
        ps, qs = np.maximum(p, _EPS), np.maximum(q, _EPS)
        return np.sum((qs - ps) * np.log(qs / ps), axis=-1)
    if method == "ks":
        return np.max(np.abs(np.cumsum(p, axis=-1) - np.cumsum(q, axis=-1)), axis=-1)
    if method == "wasserstein":
        if widths is None:
            raise ValueError("wasserstein needs the bin widths")
        cdf_gap = np.abs(np.cumsum(p, axis=-1) - np.cumsum(q, axis=-1))[..., :-1]
        # CDFs of piecewise-uniform densities differ linearly inside a bin; the gap at each
        # inner edge times the mean of the two adjacent half-widths approximates the area
        inner = (widths[:-1] + widths[1:]) / 2
        return np.sum(cdf_gap * inner, axis=-1) / (std if std > 0 else 1.0)
    if method == "jensen_shannon":
        m = (p + q) / 2

        def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(a > 0, a * np.log2(a / np.where(b > 0, b, 1)), 0.0)
            return t.sum(axis=-1)

        return np.sqrt(np.clip((kl(p, m) + kl(q, m)) / 2, 0, 1))
    if method == "chisquare":
        # Cohen's w: the chi-square goodness-of-fit statistic per observation,
        # sqrt(sum (q - p)^2 / p); unlike chi-square itself it does not grow with the window
        ps = np.maximum(p, _EPS)
        return np.sqrt(np.sum((q - p) ** 2 / ps, axis=-1))
    raise ValueError(f"unknown drift method '{method}' (expected one of {list(METHODS)})")
