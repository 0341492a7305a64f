"""Performance before labels: a classifier's accuracy (and binary ROC AUC) estimated per window
from the probabilities the server logged, CBPE-style (confidence-based performance estimation,
as NannyML names it).

If a model's probabilities are calibrated, a row predicted with top probability 0.8 is right
four times in five, so a window's expected accuracy is the mean of its rows' top probability,
and its expected ROC curve follows from the expected confusion matrix at each threshold
(expected true positives = sum of p above it, false positives = sum of 1 - p). No label is
needed, so the estimate exists the moment a window closes.

It holds only as far as the probabilities are calibrated, so each version is checked once on
its gating holdout (tag ``mloop.snapshot.holdout``): the same estimates against the realized
metrics there. A gap beyond :data:`TOLERANCE` (or, on a holdout too small to tell that from
chance, :data:`Z` standard errors) marks every window of that version's estimate
``uncalibrated``, with both holdout numbers. Nothing is recalibrated here (not implemented).
The check is stored in the outputs store (``monitoring/calibration-v<N>.json``) the first
time a window of the version needs it, like the holdout prediction profile, so a version's
holdout is scored once, not per window nor per run.

Regression windows are estimated by direct loss estimation instead
(:mod:`mloop.monitoring.loss_estimate`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mloop.project import Project

# |expected - realized| on the holdout beyond which an estimate is not trusted: 0.02, or
# Z standard errors of the realized metric under perfect calibration when the holdout is too
# small to tell 0.02 from chance (300 rows at 60% accuracy: one standard error is 0.028)
TOLERANCE = 0.02
Z = 2.0
ESTIMABLE = ("accuracy", "roc_auc")


def expected_accuracy(proba: np.ndarray) -> float:
    """Mean top probability of (rows, classes) ``proba``: the accuracy the rows would have if
    the probabilities were calibrated (the prediction being the most probable class)."""
    return float(np.mean(np.max(proba, axis=1)))


def expected_roc_auc(positive: np.ndarray) -> float | None:
    """Binary ROC AUC expected from calibrated probabilities ``positive`` of the positive
    class: the area under the ROC curve of the expected confusion matrices at every distinct
    threshold. None when every row is sure of one class (no expected positive or negative).
    Symmetric in the classes, so which one is "positive" does not matter."""
    p = np.sort(np.asarray(positive, dtype=np.float64))[::-1]
    tp, fp = np.cumsum(p), np.cumsum(1.0 - p)
    if tp[-1] <= 0 or fp[-1] <= 0:
        return None
    last = np.r_[np.flatnonzero(np.diff(p) != 0), p.size - 1]  # ties move together
    tpr = np.r_[0.0, tp[last] / tp[-1]]
    fpr = np.r_[0.0, fp[last] / fp[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def expected_metrics(proba: np.ndarray) -> dict[str, float]:
    """Every estimable metric of (rows, classes) ``proba`` (ROC AUC for two classes only)."""
    sums = proba.sum(axis=1, keepdims=True)
    proba = proba / np.where(sums > 0, sums, 1.0)
    out = {"accuracy": expected_accuracy(proba)}
    if proba.shape[1] == 2:
        auc = expected_roc_auc(proba[:, 1])
        if auc is not None:
            out["roc_auc"] = auc
    return out


def holdout_calibration(project: Project, version: int) -> dict[str, Any] | None:
    """Expected vs realized accuracy (and binary ROC AUC) of ``version`` on its gating
    holdout, computed once and stored; None for a version without holdout snapshot,
    probabilities or classification task."""
    key = f"monitoring/calibration-v{version}.json"
    store = project.outputs
    if store.exists(key):
        stored: dict[str, Any] = json.loads(store.read_bytes(key))
        return stored or None
    result = _score_holdout(project, version)
    store.write_bytes(key, json.dumps(result or {}).encode())
    return result


def _score_holdout(project: Project, version: int) -> dict[str, Any] | None:
    from mloop.metrics import compute_metrics
    from mloop.registry.candidates import get_version
    from mloop.registry.refit import held_out_version
    from mloop.serving.model import load_served

    tags = dict(get_version(project, version).tags or {})
    # a refit has seen its holdout: learn from the held-out fit's rows and model instead
    scored = held_out_version(project, version, tags)
    if scored != version:
        tags = dict(get_version(project, scored).tags or {})
    holdout = tags.get("mloop.snapshot.holdout")
    if not holdout or tags.get("mloop.task", project.config.task) == "regression":
        return None
    model = load_served(project, scored, warm=False)
    if model.classes is None:
        return None
    frame = project.snapshots.read_table(holdout).to_pandas()
    target = project.config.target
    if target not in frame.columns:
        return None
    cols = {c: [None if (v is None or (isinstance(v, float) and v != v)) else v
                for v in frame[c].tolist()] for c in model.schema.names}
    pred, proba = model.score_frame(model.schema.frame(cols))
    if proba is None:
        return None
    y = np.asarray(frame[target].tolist()).astype(str)
    classes = [str(c) for c in model.classes]
    expected = expected_metrics(proba)
    realized = {"accuracy": float(np.mean(np.asarray(pred).astype(str) == y))}
    if "roc_auc" in expected:
        auc = compute_metrics("classification", ["roc_auc"], y, pred.astype(str), proba,
                              classes=classes)["roc_auc"]
        if np.isfinite(auc):
            realized["roc_auc"] = float(auc)
    tolerance = {m: max(TOLERANCE, Z * se) for m, se in _standard_errors(proba, y, classes,
                                                                        realized).items()}
    return {"version": version, "rows": len(y),
            "metrics": {m: {"expected": expected[m], "realized": realized[m],
                            "tolerance": tolerance[m],
                            "calibrated": abs(expected[m] - realized[m]) <= tolerance[m]}
                        for m in expected if m in realized}}


def _standard_errors(proba: np.ndarray, y: np.ndarray, classes: list[str],
                     realized: dict[str, float]) -> dict[str, float]:
    """How far a calibrated model's realized metric strays from its expectation on these
    holdout rows by chance alone: accuracy's count of right rows is a sum of Bernoulli(p_top)
    draws; ROC AUC's error is Hanley & McNeil's (1982)."""
    top = np.max(proba, axis=1)
    out = {"accuracy": float(np.sqrt(np.sum(top * (1 - top))) / len(top))}
    if "roc_auc" in realized and len(classes) == 2:
        a = realized["roc_auc"]
        n_pos = int(np.sum(y == classes[1]))
        n_neg = len(y) - n_pos
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) \
            / max(n_pos * n_neg, 1)
        out["roc_auc"] = float(np.sqrt(max(var, 0.0)))
    return out


def estimate_window(proba: np.ndarray | None, *, metric: str | None,
                    calibration: dict[str, Any] | None) -> dict[str, Any] | None:
    """The window's estimated ``metric`` (its realized metric's name when estimable, else
    accuracy) from its rows' logged probabilities, with the holdout check that says whether
    to trust it. None without probabilities for every row."""
    if proba is None or not len(proba):
        return None
    values = expected_metrics(proba)
    name = metric if metric in values else "accuracy"
    check = ((calibration or {}).get("metrics") or {}).get(name)
    status = ("unchecked" if check is None else
              "calibrated" if check["calibrated"] else "uncalibrated")
    return {"metric": name, "value": values[name], "values": values, "rows": len(proba),
            "method": "cbpe", "status": status, "calibration": check}

