"""Floor for bench_serving.py: the cheapest Starlette app uvicorn can serve.

It reads the request body and answers a constant JSON prediction, so its req/s is what
uvicorn + Starlette alone reach on this machine (no parsing, no model):

    python -m uvicorn bare_asgi:app --app-dir benchmarks/serving --workers 1 --no-access-log
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

_BODY = b'{"predictions":[0.0]}'


async def predict(request: Request) -> Response:
    await request.body()
    return Response(_BODY, media_type="application/json")


async def ping(request: Request) -> Response:
    return Response(b"\n", media_type="application/json")


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]),
                        Route("/invocations", predict, methods=["POST"]),
                        Route("/ping", ping, methods=["GET"])])
