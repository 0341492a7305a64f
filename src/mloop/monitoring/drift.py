"""Drift of a window against a reference profile, with thresholds calibrated by simulation.

Everything works on counts: the reference is the snapshot profile (numeric columns: counts in
bins whose edges are the reference quantiles; categorical: top-K frequencies plus "other"), and
a window is binned on the same edges, so a report costs O(window) and never rescans the
training data.

Methods (each a function of the two count vectors):

- ``psi``: population stability index, sum (q - p) ln(q / p);
- ``ks``: Kolmogorov-Smirnov distance between the binned CDFs (a lower bound of the exact KS);
- ``wasserstein``: earth mover's distance between the binned distributions (mass uniform inside
  each bin), divided by the reference standard deviation;
- ``jensen_shannon``: Jensen-Shannon distance (base 2, in [0, 1]);
- ``chisquare``: Cohen's w, sqrt(sum (q - p)^2 / p), the chi-square statistic per observation
  (so it is an effect size; its calibrated p-value is the chi-square test's).

Default per column (``method: auto``), following the sample size: numeric columns use ``ks``
for windows up to 1,000 rows and ``wasserstein`` above; categorical columns ``chisquare`` up to
1,000 rows and ``jensen_shannon`` above.

**Calibration, not magic numbers.** A statistic's distribution when nothing changed depends on
the window size and on the column's own histogram. So each verdict comes from a p-value
measured against that distribution: ``simulations`` pairs of count vectors are drawn from the
reference histogram (a multinomial for the window, another for the reference sample itself)
and the statistic computed on each pair. The per-column p-values are combined with Holm's
step-down procedure at the configured ``false_alarm_rate``, which bounds the probability that a
window drawn from the reference flags *any* column (the dataset verdict) by that rate.

**Practical size.** A column drifts only if its statistic is also at least ``min_effect`` (per
method, defaults below), so a million-row window does not flag a shift too small to matter.

**Temporal calibration.** When the reference profile holds the statistic over contiguous
chunks of the reference period (:mod:`mloop.monitoring.temporal`), a column drifts only if its
statistic is also above the reference period's own chunk-to-chunk variation (the ``1 -
false_alarm_rate`` quantile of the chunk statistics, per column): a window as unusual as an
ordinary week of the training data is not drift. Without chunk statistics, iid only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mloop.monitoring.temporal import TemporalReference

from mloop.data.divergence import (
    CATEGORICAL_METHODS,
    MIN_EFFECT,
    OTHER,
    ColumnReference,
    _norm,
    default_method,
    statistic,
)

# --------------------------------------------------------------------------- calibration

@dataclass
class NullModel:
    """Simulated statistics when nothing changed, for one column, method and window size."""

    values: np.ndarray  # sorted

    def p_value(self, observed: float) -> float:
        exceed = self.values.size - np.searchsorted(self.values, observed - 1e-12, side="left")
        return float((1 + exceed) / (1 + self.values.size))


def simulate_null(ref: ColumnReference, method: str, window: int, simulations: int,
                  rng: np.random.Generator) -> NullModel:
    """Draw ``simulations`` (reference, window) count pairs from the reference histogram."""
    p = ref.probs
    cur = rng.multinomial(window, p, size=simulations).astype(float)
    refs = rng.multinomial(max(ref.n, 1), p, size=simulations).astype(float)
    widths = np.diff(ref.edges) if ref.edges is not None else None
    values = statistic(method, refs, cur, widths=widths, std=ref.std)
    return NullModel(np.sort(np.asarray(values, dtype=float)))


FIRST_DRAWS = 2_000


def _calibrate(ref: ColumnReference, method: str, n: int, score: float, sims: int,
               rate: float, rng: np.random.Generator, cache: dict[tuple, NullModel] | None,
               first: int = FIRST_DRAWS) -> tuple[NullModel | None, float]:
    """The null model and p-value of ``score``. A first 2,000 draws settle most columns (a
    p-value far above the rate needs no precision); only a column whose p-value might fall
    under a Holm threshold gets the full ``sims`` draws."""
    if n == 0:
        return None, 1.0
    for draws in ((min(first, sims), sims) if sims > first else (sims,)):
        key = (ref.name, method, n, draws)
        null = cache.get(key) if cache is not None else None
        if null is None:
            null = simulate_null(ref, method, n, draws, rng)
            if cache is not None:
                cache[key] = null
        p = null.p_value(score)
        # settled: far above the rate, or beyond every draw (more draws only lower p, and
        # ``first`` draws already put 1/(draws+1) under the smallest Holm threshold)
        if p > 5 * rate or score > null.values[-1]:
            break
    return null, p


def simulations_needed(columns: int, false_alarm_rate: float) -> int:
    """Enough draws that the smallest Holm threshold (rate / columns) is resolvable."""
    return int(min(200_000, max(2_000, math.ceil(20 * max(columns, 1) / false_alarm_rate))))


# ------------------------------------------------------------------------------ verdicts

@dataclass
class ColumnDrift:
    column: str
    kind: str
    method: str
    score: float
    threshold: float  # the statistic's value at the column's Holm level (iid calibration)
    min_effect: float
    p_value: float
    drifted: bool
    reference_rows: int
    window_rows: int
    reference_hist: list[float]
    window_hist: list[float]
    labels: list[str]
    # the reference period's chunk-to-chunk variation at the false-alarm rate; None when the
    # window is judged iid-only (see the report's ``temporal``)
    temporal_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DriftReport:
    columns: list[ColumnDrift]
    false_alarm_rate: float
    simulations: int
    drifted: bool
    drift_share: float
    window_rows: int
    # whether the temporal null was applied, for which chunk size, from how many chunks, or why
    # not; None when the caller gave no temporal reference
    temporal: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"drifted": self.drifted, "drift_share": self.drift_share,
                "false_alarm_rate": self.false_alarm_rate, "simulations": self.simulations,
                "window_rows": self.window_rows, "temporal": self.temporal,
                "columns": [c.to_dict() for c in self.columns]}


def _labels(ref: ColumnReference) -> list[str]:
    if ref.kind == "numeric":
        assert ref.edges is not None
        return [f"[{a:.4g}, {b:.4g})" for a, b in zip(ref.edges[:-1], ref.edges[1:], strict=True)]
    return [*ref.categories, *([OTHER] if ref.has_other else [])]


def detect(references: list[ColumnReference], windows: dict[str, np.ndarray], *,
           false_alarm_rate: float = 0.01, methods: dict[str, str] | None = None,
           min_effect: dict[str, float] | None = None, simulations: int | None = None,
           seed: int = 0, null_cache: dict[tuple, NullModel] | None = None,
           temporal: TemporalReference | None = None) -> DriftReport:
    """Per-column and dataset drift of binned windows (``windows[name]`` = counts). With
    ``temporal`` (the reference period's chunk statistics for this window size), a column
    must also exceed its temporal threshold to drift."""
    rng = np.random.default_rng(seed)
    methods = methods or {}
    effects = {**MIN_EFFECT, **(min_effect or {})}
    m = len(references)
    # never fewer draws than the smallest Holm threshold needs (else nothing could drift)
    sims = max(simulations or 0, simulations_needed(m, false_alarm_rate))
    rows = 0
    pending = []
    for ref in references:
        counts = windows[ref.name]
        n = int(counts.sum())
        rows = max(rows, n)
        method = methods.get(ref.name, "auto")
        if method == "auto":
            method = default_method(ref.kind, n)
        if ref.kind == "categorical" and method not in CATEGORICAL_METHODS:
            raise ValueError(f"column '{ref.name}': method '{method}' is for numeric columns; "
                             f"use one of {list(CATEGORICAL_METHODS)}")
        widths = np.diff(ref.edges) if ref.edges is not None else None
        score = float(statistic(method, ref.counts, counts, widths=widths, std=ref.std)) \
            if n else 0.0
        first = max(FIRST_DRAWS, math.ceil(2 * m / false_alarm_rate))
        null, p = _calibrate(ref, method, n, score, sims, false_alarm_rate, rng, null_cache,
                             first)
        pending.append((ref, method, score, p, n, null))
    # Holm: sort p ascending; reject while p_(i) <= rate / (m - i)
    order = sorted(range(m), key=lambda i: pending[i][3])
    level = {}
    rejected = set()
    still = True
    for rank, i in enumerate(order):
        alpha_i = false_alarm_rate / (m - rank)
        level[i] = alpha_i
        if still and pending[i][3] <= alpha_i:
            rejected.add(i)
        else:
            still = False
    out = []
    for i, (ref, method, score, p, n, null) in enumerate(pending):
        eff = effects.get(method, 0.1)
        thr = float(np.quantile(null.values, 1 - level[i])) if null is not None else math.inf
        chunks = temporal.null(ref.name, method) if temporal is not None else None
        t_thr = chunks.threshold(false_alarm_rate) if chunks is not None else None
        drifted = i in rejected and score >= eff and (t_thr is None or score > t_thr)
        out.append(ColumnDrift(ref.name, ref.kind, method, score, thr, eff, p, drifted,
                               ref.n, n, [float(x) for x in ref.probs],
                               [float(x) for x in _norm(windows[ref.name])], _labels(ref),
                               t_thr))
    n_drift = sum(c.drifted for c in out)
    return DriftReport(out, false_alarm_rate, sims, n_drift > 0,
                       n_drift / m if m else 0.0, rows,
                       temporal.describe() if temporal is not None else None)
