"""The actions an operator takes from the dashboard, each through the service the CLI calls
(``promote``, ``rollback``, ``deploy_challenger``, ``stop_challenger``): the same gates, the
same audit events, the same race safety (a promotion names the champion it read). The UI adds
only who acted (the token's name, recorded as the actor) and the required reason.

Each POST is checked in this order: CSRF, operator role, reason; then the service runs in the
thread pool. A domain error (a failed gate, a race lost, a version that never served) comes
back as the page's message, the registry unchanged; success redirects (303) to where the
form was, with the change in a one-time message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from mloop.errors import MloopError
from mloop.ui.auth import Forbidden, User, check_csrf, flash, log_in, log_out, require_operator

MAX_FORM_BYTES = 16_384


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (what the pages' forms send) as a dict;
    parsed here so the UI needs no multipart dependency."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Forbidden(f"form body over {MAX_FORM_BYTES} bytes", status=413)
    return dict(parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))


def _back(request: Request, form: dict[str, str]) -> str:
    """Where to return: the form's ``next`` if it is a path of this app, else the overview
    (under the app's mount point, e.g. ``/ui`` inside ``mloop serve``)."""
    target = form.get("next") or "/"
    if not target.startswith("/") or target.startswith("//"):
        target = "/"
    return request.scope.get("root_path", "") + target


def _reason(form: dict[str, str]) -> str:
    reason = form.get("reason", "").strip()
    if not reason:
        raise MloopError("a reason is required: it is recorded in the history and the audit "
                         "chain")
    return reason


def _int(form: dict[str, str], key: str) -> int | None:
    """An optional version field: None when blank, 7 for "7" or "v7"."""
    value = form.get(key, "").strip().lstrip("v")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise MloopError(f"field '{key}' must be a version number, got '{value}'") from None


def _version(form: dict[str, str], key: str = "version") -> int:
    version = _int(form, key)
    if version is None:
        raise MloopError(f"field '{key}' is required (a version number)")
    return version


async def _act(request: Request, run: Callable[[Any, User, dict[str, str]], str]) -> Response:
    form = await read_form(request)
    check_csrf(request, form)
    user = await run_in_threadpool(require_operator, request)
    back = _back(request, form)
    try:
        reason = _reason(form)
        message = await run_in_threadpool(run, request.app.state.project, user,
                                          {**form, "reason": reason})
    except MloopError as exc:
        flash(request, str(exc), "error")
        return RedirectResponse(back, status_code=303)
    flash(request, message)
    return RedirectResponse(back, status_code=303)


def _promote(project: Any, user: User, form: dict[str, str]) -> str:
    from mloop.registry.promotion import promote

    version = _version(form)
    change = promote(project, version, reason=form["reason"], force=form.get("force") == "on",
                     actor=user.actor)
    how = "override (gates failed)" if change.action == "override" else "gates passed"
    return (f"v{version} is now champion (was v{change.replaced}; {how}), recorded with "
            f"your reason")


def _rollback(project: Any, user: User, form: dict[str, str]) -> str:
    from mloop.registry.promotion import rollback

    change = rollback(project, reason=form["reason"], to=_int(form, "to"),
                      actor=user.actor)
    return f"champion rolled back to v{change.version} (from v{change.replaced})"


def _canary(project: Any, user: User, form: dict[str, str]) -> str:
    from mloop.serving.deploy import deploy_challenger

    version = _version(form)
    try:
        weight = float(form.get("weight") or "0.1")
    except ValueError:
        raise MloopError(f"field 'weight' must be a share of traffic in (0, 1), got "
                         f"'{form.get('weight')}'") from None
    deploy_challenger(project, version, mode="canary", weight=weight, reason=form["reason"],
                      actor=user.actor)
    return f"v{version} is the canary on {weight:.0%} of traffic"


def _shadow(project: Any, user: User, form: dict[str, str]) -> str:
    from mloop.serving.deploy import deploy_challenger

    version = _version(form)
    deploy_challenger(project, version, mode="shadow", reason=form["reason"], actor=user.actor)
    return f"v{version} runs as shadow (scored on a copy of traffic, answers nothing)"


def _stop(project: Any, user: User, form: dict[str, str]) -> str:
    from mloop.serving.deploy import stop_challenger

    change = stop_challenger(project, reason=form["reason"], actor=user.actor)
    return f"challenger v{change.replaced} stopped: the champion answers everything"


async def promote_action(request: Request) -> Response:
    return await _act(request, _promote)


async def rollback_action(request: Request) -> Response:
    return await _act(request, _rollback)


async def canary_action(request: Request) -> Response:
    return await _act(request, _canary)


async def shadow_action(request: Request) -> Response:
    return await _act(request, _shadow)


async def stop_action(request: Request) -> Response:
    return await _act(request, _stop)


async def login_action(request: Request) -> Response:
    form = await read_form(request)
    check_csrf(request, form)
    user = await run_in_threadpool(log_in, request, form.get("token", ""))
    flash(request, f"logged in as '{user.name}' ({'operator' if user.can_act else 'viewer'})")
    return RedirectResponse(_back(request, form), status_code=303)


async def logout_action(request: Request) -> Response:
    form = await read_form(request)
    check_csrf(request, form)
    log_out(request)
    return RedirectResponse(_back(request, {}), status_code=303)
