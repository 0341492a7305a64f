"""mloop: the whole machine-learning loop in one pip install.

The public surface: ``step`` and ``pipeline`` to write pipelines, ``log_metric`` /
``log_metrics`` to log from inside a step (buffered, batched), ``open_project`` to work with a
project from Python.
"""

__version__ = "0.1.0"

from mloop.pipeline.dsl import pipeline, step
from mloop.tracking import log_metric, log_metrics


def open_project(path=None):
    from mloop.project import open_project as _open

    return _open(path)


__all__ = ["__version__", "log_metric", "log_metrics", "open_project", "pipeline", "step"]
