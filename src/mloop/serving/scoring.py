"""One request's way through the server: route it, parse it for the version that answers,
batch it into that version's model, log it, and copy it to a shadow challenger."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from mloop.serving.edge import HTTPError
from mloop.serving.formats import Parser
from mloop.serving.metrics import ServingMetrics
from mloop.serving.schema import InputError
from mloop.serving.state import ServerState, Slot
from mloop.traffic.inference_log import LogEntry, new_request_ids


@dataclass(frozen=True)
class Scored:
    """What answered a request: the slot (version), its role, and per row the prediction,
    the class probabilities (a classifier that has them; in ``slot.model.classes`` order)
    and the request id the inference log keeps it under."""

    slot: Slot
    role: str
    predictions: list[Any]
    request_ids: list[str]
    columns: dict[str, list]
    ignored: dict[str, int]  # fields outside the signature, left out: name -> rows
    probabilities: list[list[float]] | None = None


async def score(state: ServerState, parser: Parser, *, key: str | None, timestamp: float
                ) -> Scored:
    """Score a request on the version routing picks for ``key`` (503 while none is loaded);
    a failing canary falls back to the champion, so the client never sees its failure."""
    routing = state.routing
    if routing.champion is None:
        raise HTTPError(503, {"error": "no model is loaded yet (no champion, or it failed "
                                       "to load: see /ready)"}, {"Retry-After": "5"})
    champion = routing.champion
    slot, role = routing.pick(key)
    cols, n, ignored = parser(slot.schema)
    t0 = time.perf_counter()
    try:
        preds = await slot.batcher.submit(cols, n)
    except Exception as exc:
        if role != "canary" or isinstance(exc, HTTPError):  # 503 store down: not the canary's
            raise
        # a failing canary never fails the client: the champion answers, the failure is
        # counted and recorded, and the controller rolls the canary back
        state.challenger_failed(slot.model.version, n, exc)
        slot, role = champion, "champion"
        cols, n, ignored = parser(slot.schema)
        t0 = time.perf_counter()
        preds = await slot.batcher.submit(cols, n)
    if slot.lookup is not None:  # the looked-up columns join the request's, for the log
        preds, cols = slot.lookup.merge(preds, cols)
    if ignored:
        state.metrics.ignored(ignored)
    latency_ms = (time.perf_counter() - t0) * 1000
    preds, proba = slot.model.unpack(preds)
    ids = new_request_ids(timestamp, n)
    observe(state.metrics, slot, preds)
    state.metrics.scored(n)
    await log_rows(state, LogEntry(ids, timestamp, slot.model.version, role, latency_ms, preds,
                                   cols, key, proba, slot.model.classes))
    if routing.mode == "shadow" and routing.challenger is not None:
        shadow(state, routing.challenger, parser, ids, timestamp, key)
    return Scored(slot, role, preds, ids, cols, ignored, proba)


def observe(m: ServingMetrics, slot: Slot, preds: list[Any]) -> None:
    """The prediction metrics: a histogram of values (regression), counts per class."""
    if slot.model.task == "regression":
        h = m.prediction_values(slot.model.version)
        for p in preds:
            if isinstance(p, int | float):
                h.observe(p)
    else:
        v = str(slot.model.version)
        for p in preds:
            m.classes.labels(v, str(p)).inc()


async def log_rows(state: ServerState, entry: LogEntry) -> None:
    """Hand a request's rows to the inference log, as ``security.pii`` lets it keep them
    (the columns are replaced, never changed in place: the caller still answers with them).
    Full buffer: drop and count, or (``on_full: block``) hold this response until the writer
    catches up, up to 5 s, then 503."""
    ilog = state.inference_log
    if ilog is not None and state.pii is not None:  # before anything stores a value
        entry.cols = state.pii.apply(entry.cols)
    if ilog is None or ilog.append(entry):
        return
    if state.config.inference_log.on_full != "block":
        state.metrics.log_rows.labels("dropped").inc(len(entry.ids))
        return
    deadline = time.monotonic() + 5.0
    while not ilog.append(entry):
        if time.monotonic() > deadline:
            state.metrics.log_rows.labels("dropped").inc(len(entry.ids))
            raise HTTPError(503, {"error": "the inference log is full and not draining "
                                           "(serving.inference_log.on_full: block); retry"},
                            {"Retry-After": "1"})
        await asyncio.sleep(0.01)


def shadow(state: ServerState, slot: Slot, parser: Parser, ids: list[str], ts: float,
           key: str | None) -> None:
    """Score a copy of the request on the shadow challenger after the answer is decided;
    its failures are counted, never seen by the client."""
    m = state.metrics
    v = str(slot.model.version)
    n = len(ids)
    if state.shadow_rows + n > state.config.shadow_queue_rows:
        m.shadow.labels(v, "dropped").inc(n)
        return
    state.shadow_rows += n

    async def run() -> None:
        try:
            cols, _, _ = parser(slot.schema)
            t0 = time.perf_counter()
            out = await slot.batcher.submit(cols, n)
            if slot.lookup is not None:
                out, cols = slot.lookup.merge(out, cols)
            preds, proba = slot.model.unpack(out)
            await log_rows(state, LogEntry(ids, ts, slot.model.version, "shadow",
                                           (time.perf_counter() - t0) * 1000, preds, cols, key,
                                           proba, slot.model.classes))
            m.shadow.labels(v, "ok").inc(n)
        except InputError:
            m.shadow.labels(v, "invalid").inc(n)
        except Exception:
            m.shadow.labels(v, "error").inc(n)
        finally:
            state.shadow_rows -= n

    task = asyncio.get_running_loop().create_task(run())
    _SHADOW_TASKS.add(task)
    task.add_done_callback(_SHADOW_TASKS.discard)


# the event loop holds tasks weakly: a running shadow copy is kept alive here until it ends
_SHADOW_TASKS: set[asyncio.Task] = set()
