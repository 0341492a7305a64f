"""mloop: the whole machine-learning loop in one pip install.

The public surface: ``step`` and ``pipeline`` to write pipelines, ``log_metric`` /
``log_metrics`` to log from inside a step (buffered, batched), ``open_project`` to work with a
project from Python, and the errors mloop raises (``mloop.MloopError`` and its tree, drawn in
:mod:`mloop.errors`), so callers catch ``mloop.ModelNotFoundError`` without knowing where it
is defined.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mloop._version import __version__
from mloop.errors import (
    CandidateNotRegisteredError,
    ConfigError,
    DataSourceError,
    EncryptionKeyError,
    GateFailedError,
    LeaseHeldError,
    LeaseLostError,
    MissingExtraError,
    MloopError,
    ModelNotFoundError,
    OnlineStoreError,
    PermissionDeniedError,
    PipelineDefinitionError,
    ProjectNotFoundError,
    PromotionError,
    PurgeNotFoundError,
    RunNotFoundError,
    SealedDataError,
    SnapshotNotFoundError,
    StaleStateError,
    StepFailedError,
    ValidationFailedError,
    WindowNotFoundError,
)
from mloop.pipeline.dsl import pipeline, step
from mloop.tracking import log_metric, log_metrics

if TYPE_CHECKING:
    from pathlib import Path

    from mloop.project import Project


def open_project(path: str | Path | None = None) -> Project:
    """The project whose mloop.yaml is in ``path`` or the nearest folder above it (default:
    the current folder); ProjectNotFoundError names where it looked.

    Imported when called, so ``import mloop`` in a pipeline file does not load the stores.
    """
    from mloop.project import open_project as _open

    return _open(path)


__all__ = [
    "CandidateNotRegisteredError",
    "ConfigError",
    "DataSourceError",
    "EncryptionKeyError",
    "GateFailedError",
    "LeaseHeldError",
    "LeaseLostError",
    "MissingExtraError",
    "MloopError",
    "ModelNotFoundError",
    "OnlineStoreError",
    "PermissionDeniedError",
    "PipelineDefinitionError",
    "ProjectNotFoundError",
    "PromotionError",
    "PurgeNotFoundError",
    "RunNotFoundError",
    "SealedDataError",
    "SnapshotNotFoundError",
    "StaleStateError",
    "StepFailedError",
    "ValidationFailedError",
    "WindowNotFoundError",
    "__version__",
    "log_metric",
    "log_metrics",
    "open_project",
    "pipeline",
    "step",
]
