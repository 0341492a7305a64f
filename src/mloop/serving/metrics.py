"""The server's Prometheus metrics, on a registry of its own (one per app, so two servers in
one process, as in tests, never share counters).

With ``--workers N`` every worker is its own process; ``mloop serve`` then points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder and /metrics (whichever worker answers)
aggregates all workers' values from there.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# set by `mloop serve --workers N` for its workers: PROMETHEUS_MULTIPROC_DIR alone may be a
# library's (Feast sets it on import), and a single server must not read a folder it never wrote
WORKERS_ENV = "MLOOP_SERVING_MULTIPROC"


def exposition(*extra: Any) -> bytes:
    """The text format of every worker's metrics, summed across worker processes (plus
    ``extra`` collectors that read shared state, such as the monitoring gauges)."""
    from prometheus_client import generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)


def multiprocess_enabled() -> bool:
    return os.environ.get(WORKERS_ENV) == "1" and bool(os.environ.get(MULTIPROC_ENV))


def worker_exit() -> None:
    """Drop this worker's live gauges from the aggregate (in-flight, queue)."""
    mark_dead(os.getpid())


def mark_dead(pid: int) -> None:
    """Drop worker ``pid``'s live gauges from the aggregate: called by the worker as it
    stops, and by the supervisor for a worker that died without stopping (killed, crashed),
    whose last in-flight count would otherwise stay in the sum."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
# Predictions of any scale: ±1-2-5 steps from 0.01 to 500,000, and 0. A regression target may
# be a probability or a price; one fixed set (Prometheus needs one per metric) covers both.
_STEPS = [m * 10.0 ** k for k in range(-2, 6) for m in (1, 2, 5)]
PREDICTION_BUCKETS = tuple(sorted({*(-x for x in _STEPS), 0.0, *_STEPS}))
IGNORED_COLUMN_LABELS = 32  # distinct names of ignored columns with a series of their own
OTHER = "_other"


class BulkCounter:
    """A counter child's increments taken in plain Python and added in bulk by
    :meth:`ServingMetrics.flush`. prometheus_client takes a lock per update, and the
    per-request updates (seven locked increments) cost ~5% of a compiled one-row request."""

    __slots__ = ("_sent", "child", "n")

    def __init__(self, child: Any) -> None:
        self.child, self.n, self._sent = child, 0, 0

    def inc(self, amount: int = 1) -> None:
        self.n += amount

    def flush(self) -> None:
        n = self.n  # only read here: an increment racing a flush is taken by the next one
        if n != self._sent:
            self.child.inc(n - self._sent)
            self._sent = n


class BulkHistogram:
    """A histogram child's observations counted per bucket in plain Python (a bisect, not
    prometheus_client's scan of every bucket under a lock) and added in bulk by
    :meth:`ServingMetrics.flush`. It writes the child's bucket and sum values directly:
    ``tests/test_serving_hot_path.py`` checks the exposition against ``observe``'s."""

    __slots__ = ("_sent", "_sent_total", "bounds", "child", "counts", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self._sent = [0] * len(self.bounds)
        self._sent_total = 0.0

    def observe(self, value: float) -> None:
        if value == value:  # NaN lands in no bucket, as with prometheus_client
            self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def flush(self) -> None:
        sent = self._sent
        for i, n in enumerate(self.counts):
            if n != sent[i]:
                self.child._buckets[i].inc(n - sent[i])
                sent[i] = n
        total = self.total
        if total != self._sent_total:
            self.child._sum.inc(total - self._sent_total)
            self._sent_total = total


class _FlushFirst:
    """Registered first, so every collection of the registry (``/metrics``, or a test's
    ``generate_latest``) sees the bulk counts flushed."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> list[Any]:
        self.metrics.flush()
        return []

    def describe(self) -> list[Any]:
        return []


class ServingMetrics:
    """The server's metrics. The per-request ones (answers, latency, in-flight, predicted
    values, batch sizes) are counted in plain Python on the event loop and flushed into
    prometheus_client on every collection; with ``--workers N``, whose /metrics reads every
    worker's files, also whenever a worker falls idle and at least once a second under
    load."""

    def __init__(self, prediction_buckets: tuple[float, ...] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_FlushFirst(self))
        self.multiprocess = multiprocess_enabled()
        self.in_flight_now = 0
        self._bulk: list[BulkCounter | BulkHistogram] = []
        self._flush_lock = threading.Lock()
        self._flushed_at = time.monotonic()
        self.requests = Counter("mloop_requests", "Requests answered, by endpoint, HTTP status "
                                "and the version that answered", ["endpoint", "status", "version"],
                                registry=r)
        self.latency = Histogram("mloop_request_latency_seconds", "Time from request to "
                                 "response", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mloop_in_flight_requests", "Requests being answered now",
                               registry=r, multiprocess_mode="livesum")
        self.batch_rows = Histogram("mloop_batch_rows", "Rows per predict call (micro-batch "
                                    "size)", ["version"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("mloop_batch_predict_seconds", "Time in the model per "
                                       "predict call", ["version"], buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.model_loads = Counter("mloop_model_loads", "Versions loaded and warmed",
                                   ["version"], registry=r)
        self.model_load_failures = Counter("mloop_model_load_failures", "Versions that failed "
                                           "to load or warm (the previous one kept serving)",
                                           ["version"], registry=r)
        self.predictions = Histogram("mloop_prediction_value", "Distribution of predicted "
                                     "values (regression)", ["version"],
                                     buckets=prediction_buckets or PREDICTION_BUCKETS,
                                     registry=r)
        self.classes = Counter("mloop_prediction_class", "Predicted classes (classification)",
                               ["version", "label"], registry=r)
        self.shadow = Counter("mloop_shadow_predictions", "Shadow scoring outcomes",
                              ["version", "outcome"], registry=r)
        self.challenger_errors = Counter("mloop_challenger_errors", "Rows a canary failed to "
                                         "score (the champion answered them instead)",
                                         ["version"], registry=r)
        self.cpu_per_1k = Gauge("mloop_serving_cpu_seconds_per_1k_predictions", "This "
                                "server process's CPU-seconds per 1,000 rows scored",
                                registry=r, multiprocess_mode="liveall")
        self.rows_scored = 0
        self.cpu_base = 0.0  # process CPU time when the first row was scored (startup excluded)
        self.log_rows = Counter("mloop_inference_log_rows", "Inference-log rows by outcome "
                                "(written; dropped: queue full; quarantined: not storable, "
                                "kept in the log's quarantine folder)", ["outcome"],
                                registry=r)
        self.log_queue = Gauge("mloop_inference_log_queue", "Rows waiting for the next "
                               "inference-log commit", registry=r, multiprocess_mode="livesum")
        self.serving_version = Gauge("mloop_serving_version", "Version serving each role "
                                     "(champion, challenger)", ["role"], registry=r,
                                     multiprocess_mode="livemax")
        self.traffic = Gauge("mloop_traffic_share", "Configured share of traffic per role",
                             ["role"], registry=r, multiprocess_mode="livemax")
        self.ignored_columns = Counter("mloop_ignored_columns", "Request rows with a field "
                                       "outside the model signature, left out (the first "
                                       f"{IGNORED_COLUMN_LABELS} names seen, then '{OTHER}')",
                                       ["column"], registry=r)
        self._ignored_labels: set[str] = set()
        # labelled children, looked up once: ``labels()`` costs more than the update itself
        # and runs several times per request (the label values are the server's own)
        self._answers: dict[tuple[str, int, str], Any] = {}
        self._latencies: dict[str, Any] = {}
        self._values: dict[int, BulkHistogram] = {}

    def _bulk_child(self, bulk: Any) -> Any:
        self._bulk.append(bulk)
        return bulk

    def answered(self, endpoint: str, status: int, version: str, seconds: float) -> None:
        """Count one answer of ``endpoint`` and time it."""
        counter = self._answers.get((endpoint, status, version))
        if counter is None:
            counter = self._answers[endpoint, status, version] = self._bulk_child(
                BulkCounter(self.requests.labels(endpoint, str(status), version)))
        counter.n += 1
        latency = self._latencies.get(endpoint)
        if latency is None:
            latency = self._latencies[endpoint] = self._bulk_child(
                BulkHistogram(self.latency.labels(endpoint)))
        latency.observe(seconds)
        if self.multiprocess and (self.in_flight_now == 0
                                  or time.monotonic() - self._flushed_at > 1.0):
            self.flush()

    def histogram(self, metric: Histogram, *labels: str) -> BulkHistogram:
        """A bulk-counted child of ``metric`` (for the hot path: per batch, per row)."""
        return self._bulk_child(BulkHistogram(metric.labels(*labels)))

    def prediction_values(self, version: int) -> BulkHistogram:
        """The ``mloop_prediction_value`` histogram of ``version``."""
        h = self._values.get(version)
        if h is None:
            h = self._values[version] = self.histogram(self.predictions, str(version))
        return h

    def flush(self) -> None:
        """Add the bulk counts to prometheus_client's values (where /metrics reads them)."""
        with self._flush_lock:
            for bulk in self._bulk:
                bulk.flush()
            self.in_flight.set(self.in_flight_now)
            self._flushed_at = time.monotonic()

    def ignored(self, columns: dict[str, int]) -> None:
        """Count rows whose ``columns`` were left out. Names come from clients, so only the
        first few distinct ones get a series of their own (a client sending a new name per
        request must not grow /metrics without bound)."""
        labels = self._ignored_labels
        for name, rows in columns.items():
            if name not in labels:
                if len(labels) >= IGNORED_COLUMN_LABELS:
                    name = OTHER
                else:
                    labels.add(name)
            self.ignored_columns.labels(name).inc(rows)

    def scored(self, rows: int) -> None:
        import time

        if not self.rows_scored:
            self.cpu_base = time.process_time()
        self.rows_scored += rows

    def export_cpu(self) -> None:
        """Set the serving-cost gauge: this process's CPU time since it scored its first row
        (model swaps, logging and HTTP included) per 1,000 rows."""
        import time

        if self.rows_scored:
            self.cpu_per_1k.set((time.process_time() - self.cpu_base) / self.rows_scored * 1000)
