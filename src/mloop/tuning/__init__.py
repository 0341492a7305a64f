"""Hyperparameter tuning: ``mloop tune`` runs an Optuna study over the estimator's search space
from mloop.yaml (``tune:``), then trains the best trial through the unchanged pipeline so it
becomes a registered, gated candidate like any other. See :mod:`mloop.tuning.study`."""

from __future__ import annotations

from mloop.errors import MloopError


def require_optuna() -> None:
    """Optuna is an optional dependency (``pip install 'mloop[tune]'``)."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise MloopError("`mloop tune` needs Optuna: pip install 'mloop[tune]'") from None
