"""What the compiled one-row path relies on to stay fast, checked for staying correct: a fast
model's batches scored on the event loop (a slow one's never), the per-request metrics
counted in bulk yet exposed exactly as prometheus_client's own ``observe`` would, and the
garbage-collector tuning undone when the server stops."""

from __future__ import annotations

import asyncio
import gc
import math
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mloop.serving.app import GC_YOUNG
from mloop.serving.batcher import MicroBatcher
from mloop.serving.metrics import (
    LATENCY_BUCKETS,
    PREDICTION_BUCKETS,
    BulkCounter,
    BulkHistogram,
    ServingMetrics,
)

from .helpers import copy_project
from .serving_util import project_server, request_rows


def _threads_used(predict_seconds: float, *, inline_ms: float, batches: int = 6) -> list[str]:
    """Score ``batches`` one-row requests one after another; the thread each call ran on."""
    seen: list[str] = []

    def predict(cols: dict[str, list]) -> list[float]:
        seen.append(threading.current_thread().name)
        if predict_seconds:
            time.sleep(predict_seconds)
        return [float(v) * 2 for v in cols["x"]]

    async def go() -> None:
        b = MicroBatcher(predict, max_wait_ms=0, inline_ms=inline_ms, name="t")
        b.start()
        for i in range(batches):
            assert await b.submit({"x": [i]}, 1) == [2.0 * i]
        await b.stop()

    asyncio.run(go())
    return seen


def test_a_fast_models_batches_are_scored_on_the_event_loop_once_measured() -> None:
    seen = _threads_used(0.0, inline_ms=0.5)
    assert seen[0].startswith("mloop-t")  # nothing measured yet: the model thread
    assert set(seen[1:]) == {threading.current_thread().name}  # asyncio.run's thread


def test_a_slow_model_and_inline_zero_always_use_the_model_thread() -> None:
    assert all(t.startswith("mloop-t") for t in _threads_used(0.002, inline_ms=0.5))
    assert all(t.startswith("mloop-t") for t in _threads_used(0.0, inline_ms=0.0))


def test_a_model_failing_inline_fails_its_requests_not_the_batcher() -> None:
    calls = 0

    def predict(cols: dict[str, list]) -> list[float]:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first inline call
            raise ValueError("boom")
        return [1.0] * len(cols["x"])

    async def go() -> None:
        b = MicroBatcher(predict, max_wait_ms=0, inline_ms=0.5, name="t")
        assert await b.submit({"x": [1]}, 1) == [1.0]
        with pytest.raises(ValueError, match="boom"):
            await b.submit({"x": [1]}, 1)
        assert await b.submit({"x": [1]}, 1) == [1.0]
        await b.stop()

    asyncio.run(go())


def _samples(registry: CollectorRegistry) -> dict[str, float]:
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, PREDICTION_BUCKETS])
def test_bulk_histogram_exposes_what_observe_would(buckets: tuple[float, ...]) -> None:
    values = [*buckets, *(b * 1.5 for b in buckets), 0.0, -3.0, 1e9, math.inf, -math.inf,
              *(0.37 * i for i in range(200))]
    plain_reg, bulk_reg = CollectorRegistry(), CollectorRegistry()
    plain = Histogram("h", "h", ["v"], buckets=buckets, registry=plain_reg).labels("1")
    bulk = BulkHistogram(Histogram("h", "h", ["v"], buckets=buckets,
                                   registry=bulk_reg).labels("1"))
    for i, v in enumerate(values):
        plain.observe(v)
        bulk.observe(v)
        if i % 7 == 0:  # flushed now and then, as the server does
            bulk.flush()
    bulk.flush()
    want, got = _samples(plain_reg), _samples(bulk_reg)
    assert got.keys() == want.keys()
    for name, value in want.items():
        if name.startswith("h_sum"):
            assert math.isnan(got[name]) == math.isnan(value)  # +inf and -inf: NaN in both
        else:
            assert got[name] == value, name


def test_bulk_counter_and_the_in_flight_gauge_are_exact_at_every_collection() -> None:
    m = ServingMetrics()
    reg = CollectorRegistry()
    counter = BulkCounter(Counter("c", "c", registry=reg))
    for n in range(1, 40):
        counter.inc()
        m.in_flight_now += 1
        m.answered("predict", 200, "3", 0.001 * n)
        text = generate_latest(m.registry).decode()  # any collection flushes first
        assert f'mloop_requests_total{{endpoint="predict",status="200",version="3"}} {n}.0' \
            in text
        assert f"mloop_in_flight_requests {n}.0" in text
        assert f'mloop_request_latency_seconds_count{{endpoint="predict"}} {n}.0' in text
        counter.flush()
        assert _samples(reg)["c_total"] == n


@pytest.mark.slow
def test_serving_tunes_the_garbage_collector_and_restores_it(serving_registry: Path,
                                                              tmp_path: Path) -> None:
    before = gc.get_threshold()
    with project_server(copy_project(serving_registry, tmp_path)) as srv:
        assert srv.get("/ready").status_code == 200
        assert gc.get_threshold()[0] == max(GC_YOUNG, before[0])
        assert gc.get_freeze_count() > 0
        rows = request_rows(3)
        assert srv.post("/predict", {"records": rows}).status_code == 200
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
