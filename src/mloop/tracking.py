"""MLflow glue: experiments, nested step runs, batched metric logging, dataset inputs, lineage.

Everything goes through an explicit ``MlflowClient`` (no module-global active run), so steps
can run in any process and threads never share run state.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import logging
import re
import subprocess
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloop.errors import MloopError

if TYPE_CHECKING:  # mlflow takes seconds to import; the CLI imports it only when needed
    from mlflow.tracking import MlflowClient

MAX_METRICS_PER_BATCH = 1000  # MLflow's per-request limit
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000

_LIVE_LOGGERS: weakref.WeakSet[BatchLogger] = weakref.WeakSet()
_CURRENT_LOGGER: contextvars.ContextVar[BatchLogger | None] = contextvars.ContextVar(
    "mloop_logger", default=None)


class BatchLogger:
    """Buffers metrics and writes them in bulk.

    Per-call ``mlflow.log_metric`` is one round trip (one SQLite transaction) per point. This
    buffers points and, when the tracking store is an MLflow SQL database, inserts them with
    one statement per flush (:mod:`mloop.tracking_sql`); otherwise (an HTTP tracking server)
    it uses MLflow's ``log_batch``, 1,000 points a call. It flushes when ``flush_at`` points
    are buffered, every ``flush_seconds``, on ``close`` and at interpreter exit, so a normally
    ending process loses nothing.
    """

    def __init__(self, client: MlflowClient, run_id: str, *, tracking_uri: str | None = None,
                 flush_at: int = 20_000, flush_seconds: float = 10.0,
                 direct_sql: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.flush_at = flush_at
        self.flush_seconds = flush_seconds
        self._tracking_uri = tracking_uri or getattr(
            getattr(client, "_tracking_client", None), "tracking_uri", None)
        self._direct_sql = direct_sql
        self._writer: Any = None
        self._writer_checked = False
        self._buffer: list[tuple[str, float, int, int]] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._steps: dict[str, int] = {}
        self.written = 0
        _LIVE_LOGGERS.add(self)

    def log_metric(self, key: str, value: float, step: int | None = None,
                   timestamp_ms: int | None = None) -> None:
        if step is None:
            step = self._steps.get(key, -1) + 1
        self._steps[key] = max(step, self._steps.get(key, -1))
        point = (key, float(value), timestamp_ms or int(time.time() * 1000), int(step))
        with self._lock:
            self._buffer.append(point)
            due = (len(self._buffer) >= self.flush_at
                   or time.monotonic() - self._last_flush >= self.flush_seconds)
        if due:
            try:
                self.flush()
            except Exception:  # kept in the buffer; retried at the next flush and at close
                logging.getLogger(__name__).warning(
                    "mloop: could not write %d buffered metric points yet; will retry",
                    len(self._buffer), exc_info=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.log_metric(k, v, step)

    def _sql_writer(self) -> Any:
        if not self._writer_checked:
            self._writer_checked = True
            if self._direct_sql:
                from mloop.tracking_sql import SqlMetricWriter

                self._writer = SqlMetricWriter.for_uri(self._tracking_uri)
        return self._writer

    def flush(self) -> None:
        """Write everything buffered. On failure the points go back into the buffer (nothing
        is dropped) and the error is raised; ``close`` retries before giving up."""
        with self._lock:
            pending, self._buffer = self._buffer, []
            self._last_flush = time.monotonic()
            if not pending:
                return
            try:
                self._write(pending)
            except Exception:
                self._buffer = pending + self._buffer
                raise

    def _write(self, pending: list[tuple[str, float, int, int]]) -> None:
        writer = self._sql_writer()
        if writer is not None:
            writer.write(self.run_id, pending)
            self.written += len(pending)
            return
        from mlflow.entities import Metric

        done = 0
        try:
            for i in range(0, len(pending), MAX_METRICS_PER_BATCH):
                chunk = [Metric(k, v, ts, st) for k, v, ts, st in
                         pending[i : i + MAX_METRICS_PER_BATCH]]
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                done += len(chunk)
        finally:
            self.written += done
            del pending[:done]  # what was written must not be re-sent by the caller's retry

    def close(self, *, attempts: int = 3, backoff_seconds: float = 0.5) -> None:
        """Flush (retrying transient failures such as a locked SQLite file) and release."""
        for attempt in range(1, attempts + 1):
            try:
                self.flush()
                break
            except Exception:
                if attempt == attempts:
                    raise
                time.sleep(backoff_seconds * 2 ** (attempt - 1))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._writer_checked = False
        _LIVE_LOGGERS.discard(self)

    def __enter__(self) -> BatchLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _flush_all_loggers() -> None:
    for logger in list(_LIVE_LOGGERS):
        with contextlib.suppress(Exception):
            logger.flush()


def bind_logger(logger: BatchLogger | None) -> contextvars.Token[BatchLogger | None]:
    return _CURRENT_LOGGER.set(logger)


def unbind_logger(token: contextvars.Token[BatchLogger | None]) -> None:
    _CURRENT_LOGGER.reset(token)


def current_logger() -> BatchLogger:
    logger = _CURRENT_LOGGER.get()
    if logger is None:
        raise MloopError("mloop.log_metric was called outside a running step; call it from a "
                         "@step function, or create mloop.tracking.BatchLogger(client, run_id)")
    return logger


def log_metric(key: str, value: float, step: int | None = None) -> None:
    """Log a metric point to the current step's MLflow run (buffered, batched)."""
    current_logger().log_metric(key, value, step)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    current_logger().log_metrics(metrics, step)


# ---------------------------------------------------------------------- params and tags

def flatten(prefix: str, value: Any, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[prefix or "value"] = text[:MAX_PARAM_LENGTH]
    return out


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")
_BAD_PARAM_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def redact(text: str, secrets: frozenset[str] | set[str] = frozenset()) -> str:
    """Hide URL passwords and any value that came from a ``${VAR}`` in mloop.yaml."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any], *,
               secrets: frozenset[str] | set[str] = frozenset()) -> None:
    """Flattened step params, keys made legal for MLflow, secrets redacted."""
    from mlflow.entities import Param

    flat = flatten("", params, {})
    items = [Param(_BAD_PARAM_CHARS.sub("_", k)[:250], redact(v, secrets))
             for k, v in flat.items()]
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])


def get_or_create_experiment(client: MlflowClient, name: str,
                             artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it between our two calls
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


_MLFLOW_TYPES = (("int", "long"), ("uint", "long"), ("float", "double"), ("double", "double"),
                 ("bool", "boolean"), ("timestamp", "datetime"), ("date", "datetime"),
                 ("string", "string"), ("large_string", "string"), ("binary", "binary"))


def _mlflow_schema(schema: dict[str, str]) -> Any:
    from mlflow.types import ColSpec, DataType, Schema

    cols: list[Any] = []
    for name, arrow_type in schema.items():
        mtype = next((m for prefix, m in _MLFLOW_TYPES if arrow_type.startswith(prefix)),
                     "string")
        cols.append(ColSpec(type=DataType[mtype], name=name))
    return Schema(cols)


def log_snapshot_input(client: MlflowClient, run_id: str, *, name: str, digest: str,
                       source: str, schema: dict[str, str], rows: int, context: str) -> None:
    """Record a snapshot as an MLflow dataset input (``mlflow.data``), digest and all.

    MLflow keeps 36 characters of a digest; the full sha256 is in the dataset's profile. The
    source is the snapshot's Parquet file, so ``mlflow.data.get_source(...)`` resolves it.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    class SnapshotDataset(MetaDataset):
        @property
        def profile(self) -> dict[str, Any]:
            return {"num_rows": rows, "mloop_digest": digest}

        def to_dict(self) -> dict[str, str]:
            out = super().to_dict()
            out["profile"] = json.dumps(self.profile)
            return out

    with warnings.catch_warnings():
        # MLflow registers two equivalent local sources and warns that it picked one.
        warnings.simplefilter("ignore", UserWarning)
        data_source = resolve_dataset_source(source)
    dataset = SnapshotDataset(data_source, name=name, digest=digest[:36],
                              schema=_mlflow_schema(schema))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[
        InputTag("mlflow.data.context", context)])])


def git_info(root: Path) -> dict[str, str]:
    """Commit and dirty flag when ``root`` is inside a git work tree; empty otherwise."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=10)
        return {"git_commit": commit.stdout.strip(),
                "git_dirty": "true" if dirty.stdout.strip() else "false"}
    except (OSError, subprocess.SubprocessError):
        return {}
