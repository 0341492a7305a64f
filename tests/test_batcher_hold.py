"""Holding a batch open for company: concurrent clients share one call instead of taking
turns, a lone client is never held, and no request is held beyond ``serving.max_wait_ms``.

The batcher runs for real (its event loop and model thread); the model is a stand-in whose
call sleeps ``fixed + per_row x rows`` (sleep releases the GIL, as scikit-learn's heavy parts
do), and clients are closed loops that send their next request a jittered "round trip" after
their answer, as HTTP clients do."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import pytest

from mloop.config import parse_config
from mloop.errors import ConfigError
from mloop.serving.batcher import MicroBatcher
from mloop.serving.hold import MIN_FIXED_S, PROBE_EVERY, Hold

FIXED, PER_ROW = 0.020, 0.0001  # a scikit-learn pipeline on a busy machine: the call dominates


class SleepyModel:
    """Predicts each row's ``x`` doubled after sleeping like a model with a per-call cost;
    records every batch's size."""

    def __init__(self, fixed: float = FIXED, per_row: float = PER_ROW) -> None:
        self.fixed, self.per_row = fixed, per_row
        self.batches: list[int] = []

    def __call__(self, cols: dict[str, list]) -> list[Any]:
        n = len(cols["x"])
        time.sleep(self.fixed + self.per_row * n)
        self.batches.append(n)
        return [2 * v for v in cols["x"]]


async def _closed_loop_clients(batcher: MicroBatcher, *, clients: int, requests: int,
                               rtt: tuple[float, float] = (0.0005, 0.003)) -> list[float]:
    """``clients`` concurrent clients, each sending ``requests`` one-row requests in turn;
    every answer is checked. Returns each request's latency (seconds)."""
    rng = random.Random(7)
    latencies: list[float] = []

    async def client(k: int) -> None:
        for i in range(requests):
            x = k * 1000 + i
            t0 = time.perf_counter()
            assert await batcher.submit({"x": [x]}, 1) == [2 * x]
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(rng.uniform(*rtt))

    await asyncio.gather(*(client(k) for k in range(clients)))
    return latencies


def _serve(model: SleepyModel, clients: int, requests: int, **kwargs: Any) -> list[float]:
    async def main() -> list[float]:
        batcher = MicroBatcher(model, max_batch=64, **kwargs)
        try:
            return await _closed_loop_clients(batcher, clients=clients, requests=requests)
        finally:
            await batcher.stop()

    return asyncio.run(main())


def test_eight_concurrent_clients_share_one_call_instead_of_taking_turns() -> None:
    """By default (no ``max_wait_ms`` given) eight clients share each call; without holding
    (``max_wait_ms: 0``) the first answered client to come back is scored with the few
    already queued, and the eight settle into batches of 3 and 5 taking turns."""
    held, eager = SleepyModel(), SleepyModel()
    latencies = _serve(held, clients=8, requests=30)
    _serve(eager, clients=8, requests=30, max_wait_ms=0)
    steady_held = statistics.mean(held.batches[10:])
    steady_eager = statistics.mean(eager.batches[10:])
    assert steady_held >= 6.5, held.batches
    assert steady_held >= 1.5 * steady_eager, (held.batches, eager.batches)
    # holding ends when the crowd is in, not when the budget runs out
    assert statistics.median(latencies) < 1.5 * FIXED, latencies


def test_a_generous_budget_is_not_spent_once_everyone_is_in() -> None:
    model = SleepyModel()
    latencies = _serve(model, clients=8, requests=20, max_wait_ms=500)
    assert statistics.mean(model.batches[5:]) >= 6.5, model.batches
    assert statistics.median(latencies) < 1.5 * FIXED, latencies


def test_a_lone_client_is_never_held() -> None:
    """One closed-loop client never has company: even with a generous budget each request
    costs one call, not a call plus a hold."""
    model = SleepyModel()
    latencies = _serve(model, clients=1, requests=25, max_wait_ms=500)
    assert set(model.batches) == {1}
    assert statistics.median(latencies) < FIXED + 0.008, latencies


def test_a_request_arriving_after_the_crowd_left_is_held_at_most_the_budget() -> None:
    """Eight clients taught the batcher that company comes; then one request arrives alone
    and nobody follows. It is held, but for no more than ``max_wait_ms``."""
    budget = 0.005
    model = SleepyModel()

    async def main() -> float:
        batcher = MicroBatcher(model, max_batch=64, max_wait_ms=budget * 1000)
        try:
            await _closed_loop_clients(batcher, clients=8, requests=10)
            assert batcher.hold.company > 0.5  # it expects company now
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            assert await batcher.submit({"x": [1]}, 1) == [2]
            return time.perf_counter() - t0
        finally:
            await batcher.stop()

    latency = asyncio.run(main())
    assert latency < FIXED + PER_ROW + budget + 0.010, latency


def test_stop_while_holding_finishes_what_is_queued() -> None:
    model = SleepyModel()

    async def main() -> list[Any]:
        batcher = MicroBatcher(model, max_batch=64, max_wait_ms=1000)
        await _closed_loop_clients(batcher, clients=8, requests=5)
        pending = asyncio.ensure_future(batcher.submit({"x": [3]}, 1))
        await asyncio.sleep(0.002)  # it is being held now
        await batcher.stop()
        return [await pending]

    assert asyncio.run(main()) == [[6]]


# ------------------------------------------------------------------ the decision, synthetic

def _crowded(budget: float = 0.010) -> Hold:
    """A hold that has seen calls of 8 requests each (c=8 closed loop)."""
    hold = Hold(budget_s=budget)
    for _ in range(30):
        hold.called(8)
    return hold


def test_hold_waits_for_company_while_the_call_cost_dominates() -> None:
    hold = _crowded()
    wait = hold.timeout(rows=2, requests=2, held=0.0, fixed=FIXED, per_row=PER_ROW)
    assert wait == pytest.approx(FIXED / 2 if FIXED / 2 < 0.010 else 0.010)


@pytest.mark.parametrize(("why", "kwargs"), [
    ("everyone a call usually sees is here", {"rows": 8, "requests": 8}),
    ("the budget is spent", {"held": 0.010}),
    ("one fixed cost is spent (held longer than a separate call takes)",
     {"held": 0.004, "fixed": 0.004}),
    ("the per-row work already costs more than the call", {"rows": 40, "requests": 2,
                                                          "per_row": 0.001}),
    ("a compiled model's call is cheaper than a timer", {"fixed": MIN_FIXED_S / 2}),
])
def test_hold_scores_now_when(why: str, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"rows": 2, "requests": 2, "held": 0.0, "fixed": FIXED,
                            "per_row": PER_ROW, **kwargs}
    assert _crowded().timeout(**args) == 0.0, why


def test_hold_never_waits_without_company_or_without_a_budget() -> None:
    lone = Hold(budget_s=0.010)
    for _ in range(30):
        lone.called(1)  # one request a call, nobody arriving meanwhile
    assert lone.timeout(rows=1, requests=1, held=0.0, fixed=FIXED, per_row=PER_ROW) == 0.0
    off = Hold(budget_s=0.0)
    for _ in range(30):
        off.called(8)
    assert off.timeout(rows=1, requests=1, held=0.0, fixed=FIXED, per_row=PER_ROW) == 0.0


def test_arrivals_during_a_call_count_as_company() -> None:
    """Two clients taking turns (each call scores one, the other arrives meanwhile) are
    company: holding joins them."""
    hold = Hold(budget_s=0.010)
    for _ in range(30):
        hold.busy = True
        hold.arrived()
        hold.busy = False
        hold.called(1)
    assert hold.company == pytest.approx(1.0, rel=0.01)
    assert hold.timeout(rows=1, requests=1, held=0.0, fixed=FIXED, per_row=PER_ROW) > 0.0


def test_a_fit_skewed_by_noise_cannot_lock_holding_out() -> None:
    """A preempted call made the fit say the per-row work dominates (1 ms fixed, 5 ms a row:
    no hold for 4 rows). Batches then stay one size and cannot correct it, so every
    PROBE_EVERY-th refusal under company holds anyway, with the whole predicted call as
    fixed; without company there is no probe."""
    hold = _crowded()
    decided = [hold.assumed(0.001, 0.005, rows=4) for _ in range(PROBE_EVERY)]
    assert decided[:-1] == [(0.001, 0.005)] * (PROBE_EVERY - 1)
    fixed, per_row = decided[-1]
    assert (fixed, per_row) == pytest.approx((0.021, 0.0))
    assert hold.timeout(rows=4, requests=4, held=0.0, fixed=fixed, per_row=per_row) > 0.0
    lone = Hold(budget_s=0.010)
    lone.called(1)
    assert all(lone.assumed(0.001, 0.005, rows=1) == (0.001, 0.005) for _ in range(50))


# ------------------------------------------------------------------------------- the budget

VALID = "project: demo\ndata:\n  path: data/x.csv\ntarget: y\n"


def test_the_budget_defaults_to_ten_milliseconds() -> None:
    assert parse_config(VALID).serving.max_wait_ms == 10.0
    assert parse_config(VALID + "serving: {max_wait_ms: 0}\n").serving.max_wait_ms == 0.0


@pytest.mark.parametrize(("value", "message"), [
    ("-1", r"mloop.yaml:6: 'serving.max_wait_ms': Input should be greater than or equal to 0 "
           r"\(got -1\)"),
    ("5000", r"'serving.max_wait_ms': Input should be less than or equal to 1000 \(got 5000\)"),
    ("soon", r"'serving.max_wait_ms': Input should be a valid number.*\(got \"soon\"\)"),
])
def test_a_bad_budget_is_refused_naming_the_key_and_value(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(VALID + f"serving:\n  max_wait_ms: {value}\n")
