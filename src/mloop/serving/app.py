"""The HTTP surface: FastAPI for routing and OpenAPI docs, raw bodies and orjson on the hot path.

Handlers take the ``Request`` and parse bytes themselves: a pydantic model per row would cost
more than the model on a one-row call. Every client error is answered before the model is
touched: 400 malformed JSON or CSV, 413 oversized body, 415 unknown content type, 422 a body
that does not match the signature (each bad field named), 401/403 auth.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from mloop.config import ServingConfig
from mloop.project import Project
from mloop.serving.inference_log import InferenceLog, LogEntry, new_request_id
from mloop.serving.metrics import ServingMetrics
from mloop.serving.model import predict_method
from mloop.serving.schema import FieldError, InputError, InputSchema
from mloop.serving.state import ServerState, Slot

log = logging.getLogger("mloop.serving")

Parser = Callable[[InputSchema], tuple[dict[str, list], int]]


class HTTPError(Exception):
    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("error"))
        self.status, self.body, self.headers = status, body, headers or {}


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


_PREDICT_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object",
        "description": "Rows as 'records' (list of objects) or 'columns' (object of lists). "
                       "Optional 'key' (sticky canary routing) and 'timestamp' (event time, "
                       "ISO 8601 or epoch seconds; default: now).",
        "properties": {"records": {"type": "array", "items": {"type": "object"}},
                       "columns": {"type": "object"}, "key": {"type": "string"},
                       "timestamp": {"type": ["string", "number"]}}}}}},
    "responses": {"200": {"description": "Predictions with their request ids and the version "
                                         "that answered; for a classifier also "
                                         "'probabilities' (one list per row) and 'classes' "
                                         "(their order)"},
                  "422": {"description": "Body does not match the model signature"}},
}
_INVOCATIONS_DOC = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "description":
                             "MLflow scoring protocol: dataframe_split, dataframe_records, "
                             "inputs or instances; optional params {'predict_method': "
                             "'predict' (default) or 'predict_proba'}"}},
        "text/csv": {"schema": {"type": "string"}}}},
}
_FEEDBACK_DOC = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "description": "{'labels': [{'request_id': ..., 'label': ...}]} or "
                                         "one {'request_id', 'label'}"}}}},
}


def create_app(project: Project, config: ServingConfig | None = None, *,
               auth: Any = None) -> FastAPI:
    """The ASGI app serving ``project``'s champion (and challenger). ``auth`` is an
    ``mloop.serving.auth.TokenAuth`` or None (open)."""
    cfg = config or project.config.serving
    state = ServerState(project, cfg, ServingMetrics())
    logcfg = cfg.inference_log
    if logcfg.enabled:
        m = state.metrics
        state.inference_log = InferenceLog(
            project.uris["inference_log_uri"], commit_interval=logcfg.commit_interval_seconds,
            max_queue=logcfg.max_queue_rows,
            on_write=lambda n: m.log_rows.labels("written").inc(n),
            on_queue=m.log_queue.set)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model thread is CPU-bound Python (scikit-learn's per-call overhead): with the
        # default 5 ms GIL switch interval the event loop waits up to 5 ms per turn to accept
        # and answer requests. A short interval keeps it responsive.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        if state.inference_log is not None:
            state.inference_log.start()
        await state.poll()
        watcher = asyncio.create_task(state.watch())
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await state.close()
            from mloop.serving.metrics import worker_exit

            worker_exit()
            sys.setswitchinterval(switch)

    app = FastAPI(title=f"mloop · {project.config.model_name}", lifespan=lifespan,
                  description="Predictions from the champion (and canary) of "
                              f"'{project.config.model_name}', with MLflow's scoring protocol "
                              "on /invocations.")
    app.state.mloop = state
    from mloop.loop.gauges import LoopCollector
    from mloop.monitoring.alerts import MonitorCollector

    monitor_gauges = MonitorCollector(project)
    loop_gauges = LoopCollector(project)
    state.metrics.registry.register(monitor_gauges)  # type: ignore[arg-type]
    state.metrics.registry.register(loop_gauges)  # type: ignore[arg-type]

    async def read_body(request: Request) -> bytes:
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, {"error": f"body of {declared} bytes exceeds the limit of "
                                           f"{limit} (serving.max_body_bytes)"})
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, {"error": f"body exceeds the limit of {limit} bytes "
                                               f"(serving.max_body_bytes)"})
            chunks.append(chunk)
        return b"".join(chunks)

    def check_auth(request: Request, role: str) -> None:
        if auth is not None:
            auth.check(request.headers.get("authorization"), role)

    async def guarded(request: Request, endpoint: str, role: str,
                      handler: Callable[[Request], Any]) -> Response:
        m = state.metrics
        t0 = time.perf_counter()
        m.in_flight.inc()
        version = ""
        try:
            check_auth(request, role)
            response, version = await handler(request)
        except HTTPError as exc:
            response = _json(exc.body, exc.status, exc.headers)
        except InputError as exc:
            response = _json(exc.to_dict(), 422)
        except Exception as exc:  # the model or the server failed: a 500, never silent
            log.exception("%s failed", endpoint)
            response = _json({"error": f"prediction failed: {type(exc).__name__}: {exc}"}, 500)
        finally:
            m.in_flight.dec()
        m.latency.labels(endpoint).observe(time.perf_counter() - t0)
        m.requests.labels(endpoint, str(response.status_code), version).inc()
        return response

    # ------------------------------------------------------------------ scoring endpoints

    async def score(request: Request, parser: Parser, key: str | None, ts: float,
                    ) -> tuple[Slot, str, list[Any], list[str], list[list[float]] | None]:
        routing = state.routing
        if routing.champion is None:
            raise HTTPError(503, {"error": "no model is loaded yet (no champion, or it failed "
                                           "to load: see /ready)"}, {"Retry-After": "5"})
        slot, role = routing.pick(key)
        cols, n = parser(slot.model.schema)
        t0 = time.perf_counter()
        try:
            preds = await slot.batcher.submit(cols, n)
        except Exception as exc:
            if role != "canary":
                raise
            # a failing canary never fails the client: the champion answers, the failure is
            # counted and recorded, and the controller rolls the canary back
            state.challenger_failed(slot.model.version, n, exc)
            assert routing.champion is not None  # checked above; routing is a snapshot
            slot, role = routing.champion, "champion"
            cols, n = parser(slot.model.schema)
            t0 = time.perf_counter()
            preds = await slot.batcher.submit(cols, n)
        latency_ms = (time.perf_counter() - t0) * 1000
        preds, proba = slot.model.unpack(preds)
        ids = [new_request_id(ts) for _ in range(n)]
        _observe(state.metrics, slot, preds)
        state.metrics.scored(n)
        await _log(state, LogEntry(ids, ts, slot.model.version, role, latency_ms, preds, cols,
                                   key, proba, slot.model.classes))
        if routing.mode == "shadow" and routing.challenger is not None:
            _shadow(state, routing.challenger, parser, ids, ts, key)
        return slot, role, preds, ids, proba

    async def predict_handler(request: Request) -> tuple[Response, str]:
        body = _parse_json(await read_body(request))
        if not isinstance(body, dict):
            raise InputError([FieldError("body", "must be an object with 'records' or "
                                                 "'columns'")])
        key = body.get("key")
        if key is not None and not isinstance(key, str | int):
            raise InputError([FieldError("key", "must be a string")])
        ts = _event_time(body.get("timestamp"))
        if "records" in body:
            records = body["records"]
            parser: Parser = lambda s: s.from_records(records)  # noqa: E731
        elif "columns" in body:
            columns = body["columns"]
            parser = lambda s: s.from_columns(columns)  # noqa: E731
        else:
            raise InputError([FieldError("body", "needs 'records' (list of objects) or "
                                                 "'columns' (object of lists)")])
        extra = body.keys() - {"records", "columns", "key", "timestamp"}
        if extra:
            raise InputError([FieldError(k, "unknown top-level field") for k in sorted(extra)])
        slot, role, preds, ids, proba = await score(request, parser,
                                                    None if key is None else str(key), ts)
        v = slot.model.version
        return _json({"version": v, "role": role, "request_ids": ids,
                      **slot.model.response_fields(preds, proba)},
                     headers={"x-mloop-version": str(v)}), str(v)

    async def invocations_handler(request: Request) -> tuple[Response, str]:
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
        raw = await read_body(request)
        method = "predict"
        if ctype == "text/csv":
            header, rows = _parse_csv(raw)
            parser: Parser = lambda s: s.from_split(_typed_csv(s, header, rows))  # noqa: E731
        elif ctype in ("application/json", ""):
            body = _parse_json(raw)
            parser = _mlflow_parser(body)
            champion = state.routing.champion
            method = predict_method(body, champion.model if champion else None)
        else:
            raise HTTPError(415, {"error": f"content type '{ctype}' is not supported; use "
                                           f"application/json or text/csv"})
        key = request.headers.get("x-mloop-key")
        slot, _, preds, ids, proba = await score(request, parser, key, time.time())
        v = slot.model.version
        return _json(slot.model.response_fields(preds, proba, method=method),
                     headers={"x-mloop-version": str(v),
                              "x-mloop-request-ids": ",".join(ids[:1000])}), str(v)

    @app.post("/predict", openapi_extra=_PREDICT_DOC, tags=["scoring"])
    async def predict(request: Request) -> Response:
        """Score rows with the champion (or the canary, by weight or sticky key)."""
        return await guarded(request, "predict", "predict", predict_handler)

    @app.post("/invocations", openapi_extra=_INVOCATIONS_DOC, tags=["scoring"])
    async def invocations(request: Request) -> Response:
        """MLflow's scoring protocol, so MLflow clients and tools work unchanged."""
        return await guarded(request, "invocations", "predict", invocations_handler)

    # ------------------------------------------------------------------ labels and admin

    async def feedback_handler(request: Request) -> tuple[Response, str]:
        from mloop.serving.labels import parse_feedback, store_labels

        body = _parse_json(await read_body(request))
        task = (state.routing.champion.model.task if state.routing.champion
                else project.config.task or "regression")
        try:
            labels = parse_feedback(body, task)
        except ValueError as exc:
            raise HTTPError(422, {"error": str(exc)}) from None
        log_ = state.inference_log
        if log_ is None:
            raise HTTPError(409, {"error": "the inference log is disabled "
                                           "(serving.inference_log.enabled), so no request id "
                                           "can be matched"})
        result = await asyncio.to_thread(store_labels, log_.store, labels, task=task,
                                         source="feedback", pending=log_.pending)
        status = 404 if result["stored"] == 0 else 200
        if status == 404:
            result["error"] = "none of the request ids is in the inference log"
        return _json(result, status), ""

    @app.post("/feedback", openapi_extra=_FEEDBACK_DOC, tags=["labels"])
    async def feedback(request: Request) -> Response:
        """Ground truth for earlier predictions, by request id (unknown ids are reported)."""
        return await guarded(request, "feedback", "admin", feedback_handler)

    async def reload_handler(request: Request) -> tuple[Response, str]:
        state.failed.clear()
        state.retry_at.clear()
        await state.poll()
        return _json({"desired": state.desired.to_dict() if state.desired else None,
                      **state.routing.describe()}), ""

    @app.post("/reload", tags=["admin"])
    async def reload(request: Request) -> Response:
        """Re-read the aliases now (instead of at the next poll) and retry failed loads."""
        return await guarded(request, "reload", "admin", reload_handler)

    async def flush_handler(request: Request) -> tuple[Response, str]:
        if state.inference_log is None:
            raise HTTPError(409, {"error": "the inference log is disabled "
                                           "(serving.inference_log.enabled: false)"})
        rows = await asyncio.to_thread(state.inference_log.commit)
        return _json({"committed_rows": rows}), ""

    @app.post("/flush", tags=["admin"])
    async def flush(request: Request) -> Response:
        """Commit the inference log's buffer now instead of at the next interval (before a
        backup, or for a replay that reads back what it just sent)."""
        return await guarded(request, "flush", "admin", flush_handler)

    # --------------------------------------------------------------------------- probes

    @app.get("/health", tags=["probes"])
    async def health() -> Response:
        """The process is alive (no model needed)."""
        return _json({"status": "alive"})

    @app.get("/ready", tags=["probes"])
    async def ready() -> Response:
        """A champion is loaded and warmed: traffic may be sent."""
        r = state.routing
        if state.ready:
            assert r.champion is not None
            return _json({"status": "ready", "version": r.champion.model.version})
        want = state.desired.champion if state.desired else None
        why = ("no champion is deployed" if want is None
               else state.failed.get(want, f"v{want} is loading"))
        return _json({"status": "not ready", "reason": why}, 503)

    @app.get("/model", tags=["probes"])
    async def model_info(request: Request) -> Response:
        """The versions serving, their signatures and the traffic split."""
        check_auth_safe = _safe(check_auth)
        denied = check_auth_safe(request, "predict")
        if denied is not None:
            return denied
        return _json({"model": project.config.model_name, **state.routing.describe(),
                      "desired": state.desired.to_dict() if state.desired else None,
                      "failed_versions": {str(k): v for k, v in state.failed.items()},
                      "last_poll": state.last_poll, "poll_error": state.poll_error})

    @app.get("/metrics", tags=["probes"])
    async def metrics() -> Response:
        """Prometheus exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from mloop.serving.metrics import exposition, multiprocess_enabled

        if state.inference_log is not None:
            state.metrics.log_queue.set(state.inference_log.queued)
        state.metrics.export_cpu()
        body = exposition(monitor_gauges, loop_gauges) if multiprocess_enabled() else \
            generate_latest(state.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app


def _safe(check: Callable[[Request, str], None]) -> Callable[[Request, str], Response | None]:
    def run(request: Request, role: str) -> Response | None:
        try:
            check(request, role)
        except HTTPError as exc:
            return _json(exc.body, exc.status, exc.headers)
        return None
    return run


# ---------------------------------------------------------------------------- helpers

def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise HTTPError(400, {"error": "empty body; expected JSON"})
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, {"error": f"malformed JSON: {exc}"}) from None


def _event_time(value: Any) -> float:
    """Event time in epoch seconds, between 1970 and a day from now (epoch milliseconds and
    far-future dates are client bugs, and would not fit the log's day partitions)."""
    if value is None:
        return time.time()
    ts: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
            ts = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):
            ts = None
    if ts is None:
        raise InputError([FieldError("timestamp", "must be ISO 8601 or epoch seconds",
                                     value=value)])
    if not 0 <= ts <= time.time() + 86_400:
        raise InputError([FieldError("timestamp", "must be between 1970 and now (epoch "
                                     "seconds, not milliseconds)", value=value)])
    return ts


def _mlflow_parser(body: Any) -> Parser:
    """MLflow's JSON scoring formats → a parser for the routed version's schema."""
    if not isinstance(body, dict):
        raise InputError([FieldError("body", "must be an object with one of dataframe_split, "
                                             "dataframe_records, inputs, instances")])
    keys = [k for k in ("dataframe_split", "dataframe_records", "inputs", "instances")
            if k in body]
    if len(keys) != 1:
        raise InputError([FieldError("body", "needs exactly one of dataframe_split, "
                                             "dataframe_records, inputs, instances "
                                             f"(got {sorted(body)})")])
    k = keys[0]
    payload = body[k]
    if k == "dataframe_split":
        return lambda s: s.from_split(payload)
    if k == "dataframe_records":
        return lambda s: s.from_records(payload, where=k)
    if isinstance(payload, dict):
        return lambda s: s.from_columns(
            {c: v if isinstance(v, list) else [v] for c, v in payload.items()}, where=k)
    return lambda s: s.from_records(payload, where=k)


def _parse_csv(raw: bytes) -> tuple[list[str], list[list[str]]]:
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HTTPError(400, {"error": f"malformed CSV: {exc}"}) from None
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise HTTPError(400, {"error": "CSV needs a header row and at least one data row"})
    return rows[0], rows[1:]


def _typed_csv(schema: InputSchema, header: list[str], rows: list[list[str]]
               ) -> dict[str, Any]:
    """CSV cells are text: convert each to the signature's type, naming any that fail."""
    kinds = {c.name: c.type for c in schema.columns}
    errors: list[FieldError] = []
    data = []
    for i, row in enumerate(rows):
        out: list[Any] = []
        for name, cell in zip(header, row, strict=False):
            kind = kinds.get(name)
            if cell == "":
                out.append(None)
            elif kind in ("double", "float", "long", "integer"):
                try:
                    num = float(cell)
                    out.append(int(num) if kind in ("long", "integer") and num.is_integer()
                               else num)
                except ValueError:
                    errors.append(FieldError(name, f"expected {kind}", row=i, value=cell))
                    out.append(None)
            elif kind == "boolean":
                low = cell.lower()
                if low in ("true", "false", "1", "0"):
                    out.append(low in ("true", "1"))
                else:
                    errors.append(FieldError(name, "expected boolean", row=i, value=cell))
                    out.append(None)
            else:
                out.append(cell)
        out.extend([None] * (len(header) - len(row)))
        data.append(out[:len(header)] if len(row) <= len(header) else out + row[len(header):])
        if len(errors) >= 50:
            break
    if errors:
        raise InputError(errors)
    return {"columns": header, "data": data}


def _observe(m: ServingMetrics, slot: Slot, preds: list[Any]) -> None:
    v = str(slot.model.version)
    if slot.model.task == "regression":
        h = m.predictions.labels(v)
        for p in preds:
            if isinstance(p, int | float):
                h.observe(p)
    else:
        for p in preds:
            m.classes.labels(v, str(p)).inc()


async def _log(state: ServerState, entry: LogEntry) -> None:
    """Hand a request's rows to the inference log. Full buffer: drop and count, or
    (``on_full: block``) hold this response until the writer catches up, up to 5 s, then 503."""
    ilog = state.inference_log
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


def _shadow(state: ServerState, slot: Slot, parser: Parser, ids: list[str], ts: float,
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
            cols, _ = parser(slot.model.schema)
            t0 = time.perf_counter()
            preds, proba = slot.model.unpack(await slot.batcher.submit(cols, n))
            await _log(state, LogEntry(ids, ts, slot.model.version, "shadow",
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


_SHADOW_TASKS: set[asyncio.Task] = set()
