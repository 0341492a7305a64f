"""The paired bootstrap's all-resamples-at-once ROC AUC equals recomputing the metric on each
resample (what gates and canary verdicts relied on before), ties and one-class resamples
included."""

from __future__ import annotations

import numpy as np
import pytest

from mloop.metrics import compute_metrics
from mloop.registry.bootstrap import _weighted, paired_bootstrap


def _per_resample(w: np.ndarray, y: np.ndarray, proba: np.ndarray,
                  classes: list[str]) -> np.ndarray:
    out = []
    for row in w:
        idx = np.repeat(np.arange(len(y)), row.astype(int))
        out.append(compute_metrics("classification", ["roc_auc"], y[idx], y[idx], proba[idx],
                                   classes=classes)["roc_auc"])
    return np.array(out)


@pytest.mark.parametrize(("k", "n"), [(2, 40), (3, 36), (4, 25), (5, 300)])
def test_weighted_roc_auc_equals_the_metric_on_each_resample(k: int, n: int) -> None:
    rng = np.random.default_rng(k)
    classes = [f"c{i}" for i in range(k)]
    y = np.array(classes)[rng.integers(0, k, n)]
    proba = rng.dirichlet(np.ones(k), n).round(1)  # rounded: many tied scores
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=200).astype(float)
    w[0] = 0.0
    w[0, np.flatnonzero(y == y[0])] = 1.0  # a resample holding one class only: no AUC
    fast = _weighted("roc_auc", w, y, y, proba, classes)
    assert fast is not None
    slow = _per_resample(w, y, proba, classes)
    assert np.isnan(fast[0]) and np.isnan(slow[0])
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)


def test_a_gate_on_roc_auc_reports_the_same_bound_as_before() -> None:
    """The bound a non-inferiority gate reads, from the fast path, against the same
    quantile taken over per-resample recomputation with the same resamples."""
    rng = np.random.default_rng(7)
    classes = ["a", "b", "c"]
    y = np.array(classes)[rng.integers(0, 3, 60)]
    cand = rng.dirichlet(np.ones(3), 60)
    base = rng.dirichlet(np.ones(3), 60)
    out = paired_bootstrap("roc_auc", "classification", y, y, y, candidate_proba=cand,
                           baseline_proba=base, classes=classes, resamples=300, seed=3)
    w = np.random.default_rng(3).multinomial(60, np.full(60, 1 / 60), size=300).astype(float)
    diffs = -(_per_resample(w, y, cand, classes) - _per_resample(w, y, base, classes))
    diffs = diffs[np.isfinite(diffs)]
    assert out["resamples"] == diffs.size
    assert out["upper"] == pytest.approx(float(np.quantile(diffs, 0.95)), abs=1e-12)
