"""Query parameters of the read pages, checked in one place: a bad value is a 400 page
naming the parameter, the value and what is allowed (never a 500 from ``int()``)."""

from __future__ import annotations

from starlette.requests import Request

from mloop.errors import MloopError


def int_param(request: Request, name: str, *, default: int | None = None, low: int = 1,
              high: int | None = None) -> int:
    """``?name=`` as an integer in [low, high]; ``default`` when absent or empty (no default:
    required). Values above ``high`` are refused, not clipped: a user who asked for more
    rows than a page shows should know."""
    text = request.query_params.get(name)
    if text is None or text.strip() == "":
        if default is None:
            raise MloopError(f"query parameter '{name}' is required (an integer >= {low})")
        return default
    try:
        value = int(text)
    except ValueError:
        raise MloopError(f"query parameter '{name}' must be an integer, got '{text}'"
                         ) from None
    if value < low or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f">= {low}"
        raise MloopError(f"query parameter '{name}' must be {allowed}, got {value}")
    return value
