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
    if metric == "roc_auc" and proba is not None and classes is not None:
        return _weighted_roc_auc(w, y, proba, classes)
    if metric == "log_loss" and proba is not None and classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        cols = np.array([index[v] for v in y])
        p_true = np.clip(proba[np.arange(n), cols], 1e-15, 1.0)
        return w @ (-np.log(p_true)) / n
    return None


def _auc_rows(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for ``positive`` under each row of weights: the Mann-Whitney
    statistic with ties counted half, as sklearn's roc_auc_score computes it on the resample
    the weights stand for; NaN where a resample holds one side only."""
    order = np.argsort(score, kind="stable")
    s_sorted = score[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    ws = w[:, order]
    pos_mask = positive[order].astype(float)
    neg = np.add.reduceat(ws * (1.0 - pos_mask), starts, axis=1)
    pos = np.add.reduceat(ws * pos_mask, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def _weighted_roc_auc(w: np.ndarray, y: np.ndarray, proba: np.ndarray,
                      classes: list[Any]) -> np.ndarray:
    """ROC AUC per resample, defined as :func:`mloop.metrics.compute_metrics` defines it with
    ``classes``: binary on the second class's column; else one-vs-rest macro-averaged over the
    classes the resample holds; NaN when it holds one class. Sorting once and summing weights
    replaces thousands of roc_auc_score calls (a 3-class holdout: 12,000 calls, ~50 s)."""
    index = {c: i for i, c in enumerate(classes)}
    codes = np.array([index[v] for v in y])
    p = np.asarray(proba, dtype=float)
    sums = p.sum(axis=1, keepdims=True)
    p = p / np.where(sums > 0, sums, 1.0)
    k = len(classes)
    held = np.stack([w[:, codes == c].sum(axis=1) > 0 for c in range(k)], axis=1)
    two_or_more = held.sum(axis=1) >= 2
    if k == 2:
        return np.where(two_or_more, _auc_rows(w, codes == 1, p[:, 1]), np.nan)
    per_class = np.stack([np.where(held[:, c], _auc_rows(w, codes == c, p[:, c]), np.nan)
                          for c in range(k)], axis=1)
    with np.errstate(invalid="ignore"):
        total = np.nansum(per_class, axis=1)
        count = np.sum(~np.isnan(per_class), axis=1)
        return np.where(two_or_more & (count > 0), total / np.maximum(count, 1), np.nan)


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
