"""Task metrics by name. The first configured metric is the project's primary metric.

Training, gates, tuning, monitoring and the loop all score with this one table, so a metric
means the same thing wherever it is reported; it depends on nothing else in mloop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class _SklearnMetrics:
    """scikit-learn's metrics module, imported on first use: the tables below (names,
    directions) are read by commands and pages that compute nothing, and the dashboard's
    first Overview paid ~2 s importing scikit-learn for them."""

    def __getattr__(self, name: str) -> Any:
        from sklearn import metrics

        return getattr(metrics, name)


skm: Any = _SklearnMetrics()

Metric = Callable[[Any, Any, Any], float]  # (y_true, y_pred, y_proba or None) -> value


def _rmse(y, p, _):
    return float(np.sqrt(skm.mean_squared_error(y, p)))


def _roc_auc(y, p, proba):
    if proba is None:
        return float("nan")
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    return float(skm.roc_auc_score(y, proba, multi_class="ovr"))


def _f1(y: Any, p: Any, classes: list[Any] | None) -> float:
    """F1 of the positive class for two classes, macro F1 beyond. The positive class is the
    larger label (``1`` of 0/1, ``True``, ``"yes"`` of no/yes): the model's second class,
    whose probability ROC AUC scores. It was always ``1``, so a binary target with text
    labels failed the train step."""
    labels = list(classes) if classes is not None else sorted(
        set(np.asarray(y).tolist()) | set(np.asarray(p).tolist()))
    if (len(classes) if classes is not None else len(set(np.asarray(y).tolist()))) > 2:
        return float(skm.f1_score(y, p, average="macro"))
    if len(labels) == 2:
        positive = labels[-1]
    else:  # one label on these rows: 1 for a numeric target (as before), else that label
        positive = labels[0] if labels and isinstance(labels[0], str) else 1
    return float(skm.f1_score(y, p, average="binary", pos_label=positive))


def _log_loss(y, p, proba):
    return float("nan") if proba is None else float(skm.log_loss(y, proba))


REGRESSION: dict[str, Metric] = {
    "rmse": _rmse,
    "mae": lambda y, p, _: float(skm.mean_absolute_error(y, p)),
    "r2": lambda y, p, _: float(skm.r2_score(y, p)),
    "mape": lambda y, p, _: float(skm.mean_absolute_percentage_error(y, p)),
    "median_ae": lambda y, p, _: float(skm.median_absolute_error(y, p)),
}
CLASSIFICATION: dict[str, Metric] = {
    "accuracy": lambda y, p, _: float(skm.accuracy_score(y, p)),
    "f1_macro": lambda y, p, _: float(skm.f1_score(y, p, average="macro")),
    "f1": lambda y, p, _: _f1(y, p, None),
    "balanced_accuracy": lambda y, p, _: float(skm.balanced_accuracy_score(y, p)),
    "roc_auc": _roc_auc,
    "log_loss": _log_loss,
}
DEFAULTS = {"regression": ["rmse", "mae", "r2"],
            "classification": ["accuracy", "f1_macro", "roc_auc", "log_loss"]}
# True when a larger value is better (gates and comparisons need the direction).
HIGHER_IS_BETTER = {"rmse": False, "mae": False, "r2": True, "mape": False, "median_ae": False,
                    "accuracy": True, "f1_macro": True, "f1": True, "balanced_accuracy": True,
                    "roc_auc": True, "log_loss": False}


# Computed from class probabilities, not from predicted labels.
PROBA_METRICS = frozenset({"roc_auc", "log_loss"})


def monitored_metric(task: str, primary: str | None) -> str:
    """The metric computed on labelled traffic: the primary one (probability metrics from
    the logged probabilities), else the task's default."""
    return primary or ("mae" if task == "regression" else "accuracy")


def label_metric(task: str, metric: str) -> str:
    """What stands in for ``metric`` on rows that have labels but no probabilities."""
    if metric not in PROBA_METRICS:
        return metric
    return "mae" if task == "regression" else "accuracy"


def metrics_for(task: str) -> dict[str, Metric]:
    return REGRESSION if task == "regression" else CLASSIFICATION


def compute_metrics(task: str, names: list[str], y_true: Any, y_pred: Any,
                    y_proba: Any = None, *, classes: list[Any] | None = None
                    ) -> dict[str, float]:
    """``names`` on these rows. ``classes`` names the columns of ``y_proba`` in order; with
    it the probability metrics hold on any subset of rows (a live window or a bootstrap
    resample that lacks a class): log loss still knows every class, and ROC AUC is NaN,
    not an error, when the rows hold a single class."""
    table = metrics_for(task)
    out = {}
    for name in names:
        if classes is not None and name in PROBA_METRICS and y_proba is not None:
            out[name] = _proba_metric(name, y_true, np.asarray(y_proba, dtype=float), classes)
        elif name == "f1" and task == "classification":
            out[name] = _f1(y_true, y_pred, classes)
        else:
            out[name] = table[name](y_true, y_pred, y_proba)
    return out


def _proba_metric(name: str, y: Any, proba: np.ndarray, classes: list[Any]) -> float:
    index = {c: i for i, c in enumerate(classes)}
    try:
        codes = np.fromiter((index[v] for v in y), dtype=np.int64, count=len(y))
    except KeyError as exc:
        raise ValueError(f"label {exc.args[0]!r} is not one of the model's classes "
                         f"{list(classes)}") from None
    sums = proba.sum(axis=1, keepdims=True)
    proba = proba / np.where(sums > 0, sums, 1.0)  # float32 probabilities sum to 1 ± 1e-7
    k = len(classes)
    if name == "log_loss":
        return float(skm.log_loss(codes, proba, labels=list(range(k))))
    present = np.unique(codes)
    if len(present) < 2:
        return float("nan")  # one class on these rows: no ROC curve at all
    if k == 2:
        return float(skm.roc_auc_score(codes, proba[:, 1]))
    # One-vs-rest, macro-averaged over the classes these rows hold: sklearn's 'ovr' when every
    # class is present, and still defined on a holdout or window that lacks a rare class.
    return float(np.mean([skm.roc_auc_score(codes == c, proba[:, c]) for c in present]))
