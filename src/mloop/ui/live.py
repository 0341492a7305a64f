"""The serving process's own request counters, for the dashboard mounted in ``mloop serve --ui``.

The inference log keeps what was answered, not what failed, and a page must not rescan it:
the live request rate, error rate and HTTP latency come from the server's Prometheus
counters (``mloop_requests_total``, ``mloop_request_latency_seconds``), read in this
process. They count since the server started; a dashboard run alone (``mloop ui``) has no
server and shows none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

REQUESTS = "mloop_requests"
LATENCY = "mloop_request_latency_seconds"


@dataclass(frozen=True)
class LiveTraffic:
    """What the server answered since ``since``: every request its predict endpoints saw,
    those answered 5xx (errors) and 4xx (refused input), and the HTTP latency quantiles
    estimated from the histogram's buckets (as Prometheus's ``histogram_quantile`` does)."""

    since: datetime
    seconds: float
    requests: int
    server_errors: int
    client_errors: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def per_second(self) -> float | None:
        return self.requests / self.seconds if self.seconds > 0 else None

    @property
    def error_rate(self) -> float | None:
        """Share of requests answered 5xx (the ``MloopServingErrors`` rule's numerator)."""
        return self.server_errors / self.requests if self.requests else None


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as (upper bound, cumulative count) pairs,
    interpolated linearly inside the bucket that holds it; a quantile in the ``+Inf``
    bucket is the largest finite bound. None when nothing was observed."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def live_traffic(families: Iterable[Any], *, since: datetime,
                 now: datetime | None = None) -> LiveTraffic:
    """Sum ``families`` (``prometheus_client`` metric families, from one process's metrics
    or the multiprocess aggregate) over endpoints, versions and workers."""
    requests = server = client = 0.0
    cumulative: dict[float, float] = {}
    for family in families:
        if family.name == REQUESTS:
            for s in family.samples:
                if s.name != f"{REQUESTS}_total":
                    continue
                requests += s.value
                status = str(s.labels.get("status", ""))
                server += s.value if status.startswith("5") else 0.0
                client += s.value if status.startswith("4") else 0.0
        elif family.name == LATENCY:
            for s in family.samples:
                if s.name == f"{LATENCY}_bucket":
                    le = float(s.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + s.value
    buckets = list(cumulative.items())
    p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
    now = now or datetime.now(UTC)
    return LiveTraffic(since=since, seconds=(now - since).total_seconds(),
                       requests=int(requests), server_errors=int(server),
                       client_errors=int(client),
                       p50_ms=None if p50 is None else p50 * 1000,
                       p99_ms=None if p99 is None else p99 * 1000)


def server_reader(metrics: Any) -> Callable[[], LiveTraffic]:
    """A reader of ``metrics`` (the serving app's :class:`ServingMetrics`) from now on. With
    ``--workers N`` it reads every worker's values from the multiprocess folder, as /metrics
    does, but only these two metrics: the registry's other collectors read the store."""
    from mloop.serving.metrics import multiprocess_enabled

    since = datetime.now(UTC)

    def read() -> LiveTraffic:
        metrics.flush()  # the per-request counts are taken in bulk (ServingMetrics)
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            families: Iterable[Any] = multiprocess.MultiProcessCollector(None).collect()
        else:
            families = [*metrics.requests.collect(), *metrics.latency.collect()]
        return live_traffic(families, since=since)

    return read
