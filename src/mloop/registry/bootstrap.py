"""Paired bootstrap of a metric difference between two models scored on the same rows.

Resampling rows (with replacement) and recomputing both models' metric on the same resample
gives the distribution of the difference with the rows' own noise shared between the two, so a
retrain that is equally good does not look worse by chance. Mean-decomposable metrics are
computed for all resamples at once from multinomial row weights (one matrix product).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mloop.metrics import HIGHER_IS_BETTER, compute_metrics

_BLOCK = 256  # resamples per weight matrix, to bound memory on large holdouts


def _weighted(metric: str, w: np.ndarray, y: np.ndarray, pred: np.ndarray,
              proba: np.ndarray | None, classes: list[Any] | None) -> np.ndarray | None:
    """The metric under each row of weights ``w`` (shape R x n), or None if not decomposable."""
    n = len(y)
    if metric in ("mae", "rmse", "mape", "r2"):
        y_f, p_f = y.astype(float), pred.astype(float)
        err = y_f - p_f
        if metric == "mae":
            return w @ np.abs(err) / n
        if metric == "rmse":
            return np.sqrt(w @ (err**2) / n)
        if metric == "mape":
            return w @ (np.abs(err) / np.maximum(np.abs(y_f), np.finfo(float).eps)) / n
        sst = w @ (y_f**2) - (w @ y_f) ** 2 / n
        return 1.0 - (w @ (err**2)) / np.where(sst > 0, sst, np.nan)
    if metric == "accuracy":
        return w @ (y == pred).astype(float) / n
    if metric == "log_loss" and proba is not None and classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        cols = np.array([index[v] for v in y])
        p_true = np.clip(proba[np.arange(n), cols], 1e-15, 1.0)
        return w @ (-np.log(p_true)) / n
    return None


def paired_bootstrap(metric: str, task: str, y: np.ndarray, candidate: np.ndarray,
                     baseline: np.ndarray, *, candidate_proba: np.ndarray | None = None,
                     baseline_proba: np.ndarray | None = None,
                     classes: list[Any] | None = None, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """How much worse the candidate is than the baseline (positive = worse), observed and at
    the one-sided upper ``confidence`` bound."""
    sign = -1.0 if HIGHER_IS_BETTER.get(metric, False) else 1.0
    observed = sign * (
        compute_metrics(task, [metric], y, candidate, candidate_proba, classes=classes)[metric]
        - compute_metrics(task, [metric], y, baseline, baseline_proba, classes=classes)[metric])
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs: list[np.ndarray] = []
    done = 0
    while done < resamples:
        r = min(_BLOCK, resamples - done)
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=r).astype(float)
        mc = _weighted(metric, w, y, candidate, candidate_proba, classes)
        mb = _weighted(metric, w, y, baseline, baseline_proba, classes)
        if mc is None or mb is None:  # not decomposable (e.g. roc_auc): recompute per resample
            mc, mb = np.empty(r), np.empty(r)
            for i in range(r):
                idx = np.repeat(np.arange(n), w[i].astype(int))
                cp = candidate_proba[idx] if candidate_proba is not None else None
                bp = baseline_proba[idx] if baseline_proba is not None else None
                mc[i] = compute_metrics(task, [metric], y[idx], candidate[idx], cp,
                                        classes=classes)[metric]
                mb[i] = compute_metrics(task, [metric], y[idx], baseline[idx], bp,
                                        classes=classes)[metric]
        diffs.append(sign * (mc - mb))
        done += r
    all_diffs = np.concatenate(diffs)
    all_diffs = all_diffs[np.isfinite(all_diffs)]
    if not all_diffs.size:  # the metric is defined on no resample (e.g. one class labelled)
        return {"observed": float(observed), "upper": float("nan"), "lower": float("nan"),
                "confidence": confidence, "resamples": 0}
    return {"observed": float(observed),
            "upper": float(np.quantile(all_diffs, confidence)),
            "lower": float(np.quantile(all_diffs, 1.0 - confidence)),
            "confidence": confidence, "resamples": int(all_diffs.size)}
