"""Hyperparameter tuning: ``mloop tune`` runs an Optuna study over the estimator's search space
from mloop.yaml (``tune:``), then trains the best trial through the unchanged pipeline so it
becomes a registered, gated candidate like any other. See :mod:`mloop.tuning.study`."""

from __future__ import annotations

from mloop.extras import require_extra


def require_optuna() -> None:
    """Optuna is an optional dependency (the ``tune`` extra): MissingExtraError without it."""
    require_extra("tune", "optuna")
