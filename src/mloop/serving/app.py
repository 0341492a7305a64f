"""The HTTP surface, declared: endpoints are module-level functions reading
``request.app.state``; routes, middleware and exception handlers are lists handed to the app
(as Starlette's ``applications.py`` composes one); :func:`create_app` only builds the state.

Handlers take the ``Request`` and parse bytes themselves (orjson on the raw body): a pydantic
model per row would cost more than the model on a one-row call. Every client error is answered
before the model is touched: 400 malformed JSON or CSV, 413 oversized body, 415 unknown content
type, 422 a body that does not match the signature (each bad field named), 401/403 auth,
503 no model loaded (or, with ``features.store``, an online store that cannot be read:
``mloop.serving.lookup``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol
from urllib.parse import quote

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from mloop.config import ServingConfig
from mloop.project import Project
from mloop.security.pii import PiiPolicy
from mloop.serving import openapi
from mloop.serving.edge import (
    Endpoint,
    HTTPError,
    RequestMetrics,
    answer,
    authorize,
    http_error,
    input_error,
    json_response,
    read_body,
    require_json,
)
from mloop.serving.formats import csv_parser, mlflow_parser, parse_json, predict_request
from mloop.serving.metrics import ServingMetrics
from mloop.serving.model import predict_method
from mloop.serving.schema import InputError
from mloop.serving.scoring import Scored, score
from mloop.serving.shared_reload import SharedReload
from mloop.serving.state import ServerState
from mloop.traffic.inference_log import InferenceLog

__all__ = ["HTTPError", "create_app"]


class Collector(Protocol):
    """A Prometheus collector (``prometheus_client``'s duck type): what /metrics adds to the
    server's own metrics, e.g. the monitoring and loop gauges."""

    def collect(self) -> Any: ...

    def describe(self) -> Any: ...


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.mloop
    return state


# ------------------------------------------------------------------------ scoring endpoints

async def predict(request: Request) -> Response:
    """Score rows with the champion (or the canary, by weight or sticky key)."""
    state = _state(request)
    authorize(request, "predict")
    require_json(request)
    req = predict_request(parse_json(await read_body(request, state.config.max_body_bytes)),
                          strict=state.config.strict_columns)
    scored = await score(state, req.parser, key=req.key, timestamp=req.timestamp)
    v = scored.slot.model.version
    return json_response({"version": v, "role": scored.role,
                          "request_ids": scored.request_ids,
                          **scored.slot.model.response_fields(scored.predictions,
                                                              scored.probabilities)},
                         headers=_headers(scored))


async def invocations(request: Request) -> Response:
    """MLflow's scoring protocol, so MLflow clients and tools work unchanged."""
    state = _state(request)
    authorize(request, "predict")
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    raw = await read_body(request, state.config.max_body_bytes)
    strict = state.config.strict_columns
    method = "predict"
    if ctype == "text/csv":
        parser = csv_parser(raw, strict=strict)
    elif ctype in ("application/json", ""):
        body = parse_json(raw)
        parser = mlflow_parser(body, strict=strict)
        champion = state.routing.champion
        method = predict_method(body, champion.model if champion else None)
    else:
        raise HTTPError(415, {"error": f"content type '{ctype}' is not supported; use "
                                       f"application/json or text/csv"})
    scored = await score(state, parser, key=request.headers.get("x-mloop-key"),
                         timestamp=time.time())
    headers = _headers(scored)
    headers.append((b"x-mloop-request-ids", ",".join(scored.request_ids[:1000]).encode()))
    return json_response(scored.slot.model.response_fields(scored.predictions,
                                                           scored.probabilities, method=method),
                         headers=headers)


IGNORED_HEADER = "x-mloop-ignored-columns"


def _headers(scored: Scored) -> list[tuple[bytes, bytes]]:
    """The version that answered, and the request's fields that were left out (outside the
    signature): at most 20 names, each percent-encoded (a name is any JSON string; a header
    is ASCII) and cut to 64 characters. Raw (lower-case, encoded) as the response sends them."""
    headers = [(b"x-mloop-version", str(scored.slot.model.version).encode()),
               (b"x-mloop-worker", _worker_id())]
    if scored.ignored:
        names = [quote(n[:64], safe="") for n in sorted(scored.ignored)[:20]]
        headers.append((IGNORED_HEADER.encode(),
                        (",".join(names) + (",..." if len(scored.ignored) > 20 else ""))
                        .encode()))
    return headers


@functools.cache
def _worker_id() -> bytes:
    """This process's id for ``x-mloop-worker``, read at its first answer (a worker is
    forked or spawned before it answers anything)."""
    return str(os.getpid()).encode()


# ------------------------------------------------------------------------- labels and admin

async def feedback(request: Request) -> Response:
    """Ground truth for earlier predictions, by request id (unknown ids are reported)."""
    from mloop.traffic.labels import parse_feedback, store_labels

    state = _state(request)
    authorize(request, "feedback")
    body = parse_json(await read_body(request, state.config.max_body_bytes))
    champion = state.routing.champion
    task = champion.model.task if champion else state.project.config.task or "regression"
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
    if result["stored"] == 0:
        result["error"] = "none of the request ids is in the inference log"
        return json_response(result, 404)
    return json_response(result)


async def reload(request: Request) -> Response:
    """Re-read the aliases now (instead of at the next poll) and retry failed loads."""
    state = _state(request)
    authorize(request, "deploy")
    workers, behind = await state.reload()
    body: dict[str, Any] = {"desired": state.desired.to_dict() if state.desired else None,
                            **state.routing.describe()}
    if workers:  # --workers N: what each one serves now, by pid
        body["workers"] = {str(pid): ack for pid, ack in sorted(workers.items())}
    if behind:
        body["error"] = (f"worker(s) {', '.join(map(str, behind))} did not confirm the reload "
                         f"in time; they pick the deployment up at their next poll")
        return json_response(body, 503)
    return json_response(body)


async def flush(request: Request) -> Response:
    """Commit the inference log's buffer now instead of at the next interval (before a
    backup, or for a replay that reads back what it just sent)."""
    state = _state(request)
    authorize(request, "deploy")
    if state.inference_log is None:
        raise HTTPError(409, {"error": "the inference log is disabled "
                                       "(serving.inference_log.enabled: false)"})
    report = await asyncio.to_thread(state.inference_log.commit_report)
    return json_response({"committed_rows": report.written,
                          "quarantined_rows": report.quarantined})


# ----------------------------------------------------------------------------------- probes

async def health(request: Request) -> Response:
    """The process is alive (no model needed)."""
    return json_response({"status": "alive"})


async def ready(request: Request) -> Response:
    """A champion is loaded and warmed: traffic may be sent."""
    state = _state(request)
    champion = state.routing.champion
    if state.ready and champion is not None:
        return json_response({"status": "ready", "version": champion.model.version})
    want = state.desired.champion if state.desired else None
    why = ("no champion is deployed" if want is None
           else state.failed.get(want, f"v{want} is loading"))
    return json_response({"status": "not ready", "reason": why}, 503)


async def model_info(request: Request) -> Response:
    """The versions serving, their signatures and the traffic split."""
    state = _state(request)
    authorize(request, "predict")
    return json_response({"model": state.project.config.model_name, **state.routing.describe(),
                          "desired": state.desired.to_dict() if state.desired else None,
                          "failed_versions": {str(k): v for k, v in state.failed.items()},
                          "last_poll": state.last_poll, "poll_error": state.poll_error})


async def metrics(request: Request) -> Response:
    """Prometheus exposition."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from mloop.serving.metrics import exposition, multiprocess_enabled

    state = _state(request)
    if state.inference_log is not None:
        state.metrics.log_queue.set(state.inference_log.queued)
    state.metrics.export_cpu()
    if multiprocess_enabled():
        state.metrics.flush()  # this worker's own counts, into the files the sum reads
        body = exposition(*request.app.state.collectors)
    else:  # collecting the registry flushes the counts first
        body = generate_latest(state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------ declaration

_VERSION_HEADERS = {
    "x-mloop-version": {"description": "The version that answered", "required": True,
                        "schema": {"type": "string"}},
    "x-mloop-worker": {"description": "The server process that answered (its pid; with "
                                      "--workers N, one of N)", "required": True,
                       "schema": {"type": "string"}},
    IGNORED_HEADER: {"description": "Request fields outside the signature, left out "
                                    "(percent-encoded, comma-separated)",
                     "schema": {"type": "string"}},
}
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_PREDICTIONS = {"type": "array", "description": "One per row, in row order"}

ROUTES: list[BaseRoute] = [
    APIRoute("/predict", predict, methods=["POST"], tags=["scoring"], responses={
        **openapi.ok("Predictions, their request ids, and the version that answered; for a "
                     "classifier also 'probabilities' (one list per row) and 'classes' (their "
                     "order)", {
            "type": "object", "required": ["version", "role", "request_ids", "predictions"],
            "properties": {"version": {"type": "integer"},
                           "role": {"enum": ["champion", "canary"]},
                           "request_ids": {"type": "array", "items": {"type": "string"}},
                           "predictions": _PREDICTIONS}}, headers=_VERSION_HEADERS),
        **openapi.errors(400, 413, 415, 422, 503)}),
    APIRoute("/invocations", invocations, methods=["POST"], tags=["scoring"], responses={
        **openapi.ok("Predictions, as MLflow's scoring server answers (with params "
                     "{'predict_method': 'predict_proba'}: per-row class probabilities, and "
                     "'classes')", {
            "type": "object", "required": ["predictions"],
            "properties": {"predictions": _PREDICTIONS}}, headers={
            **_VERSION_HEADERS, "x-mloop-request-ids": {
                "description": "Request ids of the rows (the first 1,000), comma-separated",
                "required": True, "schema": {"type": "string"}}}),
        **openapi.errors(400, 413, 415, 422, 503)}),
    APIRoute("/feedback", feedback, methods=["POST"], tags=["labels"], responses={
        **openapi.ok("Labels stored; unknown request ids listed", _ANY_OBJECT),
        **openapi.errors(400, 404, 409, 413, 422)}),
    APIRoute("/reload", reload, methods=["POST"], tags=["admin"], responses={
        **openapi.ok("The deployment now served (with --workers N, also by each worker)",
                     _ANY_OBJECT),
        503: {"description": "With --workers N: a worker did not confirm the reload in time",
              "content": {openapi.JSON: {"schema": openapi.ERROR}}}}),
    APIRoute("/flush", flush, methods=["POST"], tags=["admin"], responses={
        **openapi.ok("Rows committed, and rows set aside in quarantine (values the log cannot "
                     "store)", {"type": "object",
                                "required": ["committed_rows", "quarantined_rows"],
                                "properties": {"committed_rows": {"type": "integer"},
                                               "quarantined_rows": {"type": "integer"}}}),
        **openapi.errors(409)}),
    APIRoute("/health", health, methods=["GET"], tags=["probes"], responses=openapi.ok(
        "Alive", {"type": "object", "properties": {"status": {"const": "alive"}}})),
    APIRoute("/ready", ready, methods=["GET"], tags=["probes"], responses={
        **openapi.ok("Ready", {"type": "object", "required": ["status", "version"],
                               "properties": {"status": {"const": "ready"},
                                              "version": {"type": "integer"}}}),
        503: {"description": "Not ready: no champion, or it is loading or failed to load",
              "content": {openapi.JSON: {"schema": {
                  "type": "object", "required": ["status", "reason"],
                  "properties": {"status": {"const": "not ready"},
                                 "reason": {"type": "string"}}}}}}}),
    APIRoute("/model", model_info, methods=["GET"], tags=["probes"],
             responses=openapi.ok("Versions, signatures, traffic split", _ANY_OBJECT)),
    APIRoute("/metrics", metrics, methods=["GET"], tags=["probes"],
             response_class=PlainTextResponse, responses=openapi.ok(
        "Prometheus text exposition", {"type": "string"}, media_type="text/plain")),
]

# the endpoints whose answers are counted and timed (path -> `endpoint` label)
COUNTED = {"/predict": "predict", "/invocations": "invocations", "/feedback": "feedback",
           "/reload": "reload", "/flush": "flush"}

MIDDLEWARE = [Middleware(RequestMetrics, endpoints=COUNTED)]

EXCEPTION_HANDLERS = {HTTPError: http_error, InputError: input_error}

# the scoring endpoints, answered before the middleware and the router (see ServingApp)
HOT: dict[str, tuple[Endpoint, str]] = {"/predict": (predict, "predict"),
                                        "/invocations": (invocations, "invocations")}


class ServingApp(FastAPI):
    """The FastAPI app, except that a POST to a scoring endpoint goes straight to it
    (:func:`mloop.serving.edge.answer`: the same answers, errors and metrics, without
    FastAPI's middleware, routing and dependency solving, which cost more than the rest of
    a one-row request). Everything else, the spec and the docs are FastAPI's. Behind a
    ``root_path`` the scoring endpoints take the ordinary way (the router strips it)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" \
                and not scope.get("root_path"):
            hot = HOT.get(scope["path"])
            if hot is not None:
                scope["app"] = self
                await answer(hot[0], hot[1], scope, receive, send)
                return
        await super().__call__(scope, receive, send)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the log writer, load the deployment, watch the aliases; on shutdown stop the
    models (finishing what they queued) and commit the log."""
    from mloop.serving.metrics import worker_exit

    state: ServerState = app.state.mloop
    # The model thread is CPU-bound Python (scikit-learn's per-call overhead): with the
    # default 5 ms GIL switch interval the event loop waits up to 5 ms per turn to accept
    # and answer requests. A short interval keeps it responsive.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    if state.inference_log is not None:
        state.inference_log.start()
    if state.project.config.features.store is not None and state.features is None:
        from mloop.features.service import online_features

        # once per server: Feast's store and its connection serve every request
        state.features = await asyncio.to_thread(online_features, state.project)
    await state.poll()
    thresholds = _serving_gc()
    watcher = asyncio.create_task(state.watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await state.close()
        state.metrics.flush()  # with workers, what the others' /metrics sum from now on
        worker_exit()
        sys.setswitchinterval(switch)
        gc.unfreeze()
        gc.set_threshold(*thresholds)


GC_YOUNG = 20_000  # allocations between young-generation collections while serving


def _serving_gc() -> tuple[int, ...]:
    """Tune the cyclic garbage collector for serving; return the thresholds it replaced.
    Each request allocates a few dozen short-lived containers, so the default young
    threshold (700) runs a collection every ~20 requests, and each older collection walks
    every object the libraries and the model hold. Freezing what is loaded now (modules,
    the model) out of the collector's reach and collecting the young generation less often
    cut ~5% of the server's CPU per compiled one-row request (benchmarks/serving). Garbage
    freed by reference counting, nearly all of it, is unaffected."""
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(GC_YOUNG, before[0]), *before[1:])  # never more often than set
    return before


def create_app(project: Project, config: ServingConfig | None = None, *, auth: Any = None,
               collectors: Sequence[Collector] = (),
               reloads: SharedReload | None = None) -> ServingApp:
    """The ASGI app serving ``project``'s champion (and challenger).

    ``auth`` is an ``mloop.serving.auth.TokenAuth`` or None (open). ``collectors`` are extra
    Prometheus collectors /metrics exposes beside the server's own (``mloop serve`` passes the
    monitoring and loop gauges; the server itself knows nothing of those layers).
    ``reloads`` is the reload generation the workers of ``mloop serve --workers N`` share.
    """
    cfg = config or project.config.serving
    state = ServerState(project, cfg, ServingMetrics(), reloads=reloads)
    logcfg = cfg.inference_log
    if logcfg.enabled:
        if project.codec is not None:  # a missing key stops the start, not every commit
            project.codec.check()
        m = state.metrics
        state.inference_log = InferenceLog(
            project.log_store, commit_interval=logcfg.commit_interval_seconds,
            max_queue=logcfg.max_queue_rows,
            on_write=lambda n: m.log_rows.labels("written").inc(n),
            on_quarantine=lambda n: m.log_rows.labels("quarantined").inc(n),
            on_queue=m.log_queue.set)
    state.pii = PiiPolicy.of(project.config, project.root)  # the key is read once, here
    for collector in collectors:
        state.metrics.registry.register(collector)  # type: ignore[arg-type]
    app = ServingApp(title=f"mloop · {project.config.model_name}",
                  description="Predictions from the champion (and canary) of "
                              f"'{project.config.model_name}', with MLflow's scoring protocol "
                              "on /invocations.",
                  routes=ROUTES, middleware=MIDDLEWARE,
                  exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
                  lifespan=lifespan)
    app.state.mloop = state
    app.state.auth = auth
    app.state.collectors = tuple(collectors)
    app.openapi = functools.partial(openapi.describe, app)  # type: ignore[method-assign]
    return app
