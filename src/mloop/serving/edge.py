"""What every request meets before its endpoint: the error responses, the body limit, auth and
the request metrics.

Endpoints raise :class:`HTTPError` (or ``InputError`` for a body that does not match the
signature); the app's exception handlers turn them into JSON answers. :class:`RequestMetrics`
is a plain ASGI middleware (no per-request task or copy of the body) that times and counts
the answers of the endpoints that do work, and is where an unexpected exception becomes a 500
instead of a dropped connection. The scoring endpoints skip the app's layers: :func:`answer`
does all of that for them in one call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mloop.errors import MloopError
from mloop.serving.schema import InputError

log = logging.getLogger("mloop.serving")


class HTTPError(MloopError):
    """A request answered with ``status`` and the JSON ``body`` (which names the problem)."""

    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body.get("error"))
        self.status, self.body, self.headers = status, body, headers or {}


class JSONAnswer(Response):
    """A Starlette response whose raw headers are built in one step: Starlette's
    ``init_headers`` (lower-casing, searching for content-length and content-type, building
    the media type) cost ~3% of a compiled one-row request. Our headers are already
    lower-case, and never set content-length or content-type."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int = 200,
                 headers: dict[str, str] | list[tuple[bytes, bytes]] | None = None) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        raw = [(b"content-length", str(len(body)).encode()),
               (b"content-type", b"application/json")]
        if isinstance(headers, list):  # already raw: lower-case names, encoded
            raw += headers
        elif headers:
            raw += [(k.lower().encode("latin-1"), v.encode("latin-1"))
                    for k, v in headers.items()]
        self.raw_headers = raw


def json_response(body: Any, status: int = 200,
                  headers: dict[str, str] | list[tuple[bytes, bytes]] | None = None
                  ) -> Response:
    """orjson straight to bytes (numpy values included): no pydantic serialisation."""
    return JSONAnswer(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Exception handler for :class:`HTTPError`."""
    if not isinstance(exc, HTTPError):  # pragma: no cover - registered for HTTPError only
        raise exc
    return json_response(exc.body, exc.status, exc.headers)


async def input_error(request: Request, exc: Exception) -> Response:
    """Exception handler for ``InputError``: 422 naming each bad field."""
    if not isinstance(exc, InputError):  # pragma: no cover - registered for InputError only
        raise exc
    return json_response(exc.to_dict(), 422)


def header(request: Request, name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case, as ASGI servers hand them over), read
    straight from the scope: Starlette's ``request.headers`` builds a mapping and lower-cases
    and encodes each key looked up, ~5% of a compiled one-row request for three lookups."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def authorize(request: Request, action: str) -> None:
    """Raise 401/403 unless the bearer token's role may take ``action`` (an action of
    :mod:`mloop.security.roles`; no-op when the app has no auth)."""
    auth = request.app.state.auth
    if auth is not None:
        auth.check(header(request, b"authorization"), action)


_JSON_TYPES = frozenset({"application/json", "application/json; charset=utf-8",
                         "application/json;charset=utf-8", "application/json; charset=UTF-8"})


def require_json(request: Request) -> None:
    """415 unless the body is declared ``application/json`` (a ``charset`` parameter, if
    any, must be UTF-8, the only encoding JSON has): a form post or a text/plain body is a
    client bug, answered as such rather than parsed on a guess."""
    declared = header(request, b"content-type")
    if declared is not None:
        if declared in _JSON_TYPES:  # the common spellings, without parsing
            return
        mime, _, params = declared.partition(";")
        if mime.strip().lower() == "application/json":
            charset = next((v.strip().strip('"').lower() for k, _, v in
                            (p.partition("=") for p in params.split(";"))
                            if k.strip().lower() == "charset"), "utf-8")
            if charset in ("utf-8", "utf8"):
                return
    raise HTTPError(415, {"error": f"content type {declared!r} is not supported here; send "
                                   f"the body as application/json"
                                   if declared is not None else
                                   "no content type; send the body as application/json "
                                   "(Content-Type: application/json)"})


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``limit`` bytes
    (from Content-Length, else while streaming): an oversized body is never held in memory."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, {"error": f"body of {declared} bytes exceeds the limit of "
                                       f"{limit} (serving.max_body_bytes)"})
    # the ASGI messages themselves (what ``request.stream()`` reads, without its generator):
    # a one-row body is one message
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, {"error": f"body exceeds the limit of {limit} bytes "
                                           f"(serving.max_body_bytes)"})
        if not message.get("more_body", False):
            if not chunks:
                return chunk
            chunks.append(chunk)
            return b"".join(chunks)
        chunks.append(chunk)


VERSION_HEADER = b"x-mloop-version"


def failure(endpoint: str, exc: Exception) -> Response:
    """The 500 for an exception no handler took: logged here, never silent, never a dropped
    connection."""
    log.exception("%s failed", endpoint, exc_info=exc)
    return json_response({"error": f"prediction failed: {type(exc).__name__}: {exc}"}, 500)


Endpoint = Callable[[Request], Awaitable[Response]]


async def answer(endpoint: Endpoint, label: str, scope: Scope, receive: Receive, send: Send
                 ) -> None:
    """Run a scoring endpoint straight from the ASGI call, as the app's router, exception
    handlers and :class:`RequestMetrics` together would: the same answers (``HTTPError``,
    ``InputError`` -> 422, anything else -> a logged 500) and the same request metrics.

    Why not through them: FastAPI's routing, dependency solving and five middleware layers
    cost ~45 µs of CPU per request here, more than parsing, checking, scoring and logging a
    one-row request on the compiled model together (~25 µs); see
    benchmarks/serving/bench_overhead.py. ``scope["app"]`` must already be the app
    (``request.app`` reads it)."""
    metrics = scope["app"].state.mloop.metrics
    t0 = time.perf_counter()
    metrics.in_flight_now += 1
    status, version = 500, ""
    try:
        try:
            response = await endpoint(Request(scope, receive))
        except HTTPError as exc:
            response = json_response(exc.body, exc.status, exc.headers)
        except InputError as exc:
            response = json_response(exc.to_dict(), 422)
        except Exception as exc:  # the model or the server failed: a 500, never silent
            response = failure(label, exc)
        status = response.status_code
        for name, value in response.raw_headers:
            if name == VERSION_HEADER:
                version = value.decode()
                break
        await response(scope, receive, send)
    finally:
        metrics.in_flight_now -= 1
        metrics.answered(label, status, version, time.perf_counter() - t0)


def route_path(scope: Scope) -> str:
    """The path the app's routes see: behind a ``root_path`` (a proxy's prefix) the server's
    ``path`` starts with it, and the router strips it (as Starlette's own routing does)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):]
    return path


class RequestMetrics:
    """Count and time the answers of the endpoints in ``endpoints`` (path -> metric label):
    ``mloop_requests_total{endpoint,status,version}`` (version from the response's
    ``x-mloop-version`` header), the latency histogram and the in-flight gauge, read from the
    app's ``ServerState``. An exception no handler took is logged and answered 500 here.
    (The scoring endpoints skip it: see :func:`answer`.)"""

    def __init__(self, app: ASGIApp, *, endpoints: dict[str, str]) -> None:
        self.app = app
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.endpoints.get(route_path(scope)) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        metrics = scope["app"].state.mloop.metrics
        status, version, started = 500, "", False

        async def send_and_note(message: Message) -> None:
            nonlocal status, version, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == VERSION_HEADER:
                        version = value.decode()
            await send(message)

        t0 = time.perf_counter()
        metrics.in_flight_now += 1
        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:  # the model or the server failed: a 500, never silent
            status = 500
            if not started:
                await failure(endpoint, exc)(scope, receive, send)
            else:
                log.exception("%s failed", endpoint)
        finally:
            metrics.in_flight_now -= 1
            metrics.answered(endpoint, status, version, time.perf_counter() - t0)
