"""Task metrics by name. The first configured metric is the project's primary metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn import metrics as skm

Metric = Callable[[Any, Any, Any], float]  # (y_true, y_pred, y_proba or None) -> value


def _rmse(y, p, _):
    return float(np.sqrt(skm.mean_squared_error(y, p)))


def _roc_auc(y, p, proba):
    if proba is None:
        return float("nan")
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    return float(skm.roc_auc_score(y, proba, multi_class="ovr"))


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
    "f1": lambda y, p, _: float(skm.f1_score(y, p, average="binary" if len(set(y)) <= 2
                                             else "macro")),
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


def metrics_for(task: str) -> dict[str, Metric]:
    return REGRESSION if task == "regression" else CLASSIFICATION


def compute_metrics(task: str, names: list[str], y_true: Any, y_pred: Any,
                    y_proba: Any = None) -> dict[str, float]:
    table = metrics_for(task)
    return {name: table[name](y_true, y_pred, y_proba) for name in names}
