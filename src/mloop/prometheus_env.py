"""Keeping this process's Prometheus metrics mloop's own while libraries import.

Importing Feast (``feast.metrics``, which ``import feast`` pulls in) points
``PROMETHEUS_MULTIPROC_DIR`` at a temp folder of its own when the variable is unset. Two things
read that variable: prometheus-client, once, at its own import, to keep metric values in
pid-named files in that folder; and mloop's /metrics, to decide whether to sum the workers of
``mloop serve --workers N`` (it also needs mloop's own flag, :data:`mloop.serving.metrics.
WORKERS_ENV`). Feast is imported in two ways: by mloop (``features.store: feast``) and by MLflow,
whose REST client loads every ``mlflow.request_header_provider`` entry point on its first call
to a tracking server, and Feast registers one. Both go through :func:`keep_prometheus_env`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

PROMETHEUS_DIRS = ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR")


@contextlib.contextmanager
def keep_prometheus_env() -> Iterator[None]:
    """Run the body (an import) with prometheus-client already imported under this process's
    own environment, and put the two variables back as they were afterwards."""
    import prometheus_client.values  # noqa: F401  (its choice is made now, before the body)

    with restored_environ(PROMETHEUS_DIRS):
        yield


@contextlib.contextmanager
def restored_environ(keys: Iterable[str]) -> Iterator[None]:
    """Put ``keys`` of the environment back as they were (set, or unset) when the body ends,
    whatever it set or removed in between."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_mlflow_plugins() -> None:
    """Load MLflow's request-header plugins (what its REST client does on its first call)
    now, under :func:`keep_prometheus_env`: with Feast installed that imports Feast."""
    with keep_prometheus_env():
        import mlflow.tracking.request_header.registry  # noqa: F401
