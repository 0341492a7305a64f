"""The dashboard's ASGI app: routes declared in one list, the session middleware, the error
pages. :func:`create_ui_app` is the composition root; endpoints read ``request.app.state``
(the project, the templates, whether auth is on)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from importlib import resources

import jinja2
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mloop.errors import MloopError
from mloop.project import Project
from mloop.ui import actions, cost_page, diff, monitoring_pages, pages, render, runs
from mloop.ui.auth import Forbidden
from mloop.ui.live import LiveTraffic

SESSION_COOKIE = "mloop_ui"
SESSION_SECONDS = 12 * 3600


def login_page(request: Request) -> Response:
    return render.render(request, "login.html", page="login",
                        next=request.query_params.get("next", "/"))


def health(request: Request) -> Response:
    return PlainTextResponse("ok")


ROUTES = [
    Route("/", pages.overview, methods=["GET"], name="overview"),
    Route("/timeline", pages.timeline_page, methods=["GET"], name="timeline"),
    Route("/versions", pages.versions_page, methods=["GET"], name="versions"),
    Route("/versions/diff", diff.diff_page, methods=["GET"], name="versions_diff"),
    Route("/versions/{version:int}", pages.version_page, methods=["GET"], name="version"),
    Route("/monitoring", pages.monitoring_page, methods=["GET"], name="monitoring"),
    Route("/monitoring/windows/{window_id}", monitoring_pages.window_page, methods=["GET"],
          name="window"),
    Route("/loop", pages.loop_page, methods=["GET"], name="loop"),
    Route("/cost", cost_page.cost_page, methods=["GET"], name="cost"),
    Route("/audit", pages.audit_page, methods=["GET"], name="audit"),
    Route("/runs", runs.runs_page, methods=["GET"], name="runs"),
    Route("/runs/{run_id}", runs.run_page, methods=["GET"], name="run"),
    Route("/snapshots", runs.snapshots_page, methods=["GET"], name="snapshots"),
    Route("/login", login_page, methods=["GET"], name="login"),
    Route("/login", actions.login_action, methods=["POST"]),
    Route("/logout", actions.logout_action, methods=["POST"], name="logout"),
    Route("/actions/promote", actions.promote_action, methods=["POST"]),
    Route("/actions/rollback", actions.rollback_action, methods=["POST"]),
    Route("/actions/canary", actions.canary_action, methods=["POST"]),
    Route("/actions/shadow", actions.shadow_action, methods=["POST"]),
    Route("/actions/stop-challenger", actions.stop_action, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Mount("/static", StaticFiles(packages=[("mloop.ui", "static")]), name="static"),
]

# every POST an operator may make (a viewer gets 403 on each; the tests walk this list)
ACTION_PATHS = ["/actions/promote", "/actions/rollback", "/actions/canary",
                "/actions/shadow", "/actions/stop-challenger"]


async def forbidden(request: Request, exc: Exception) -> Response:
    status = exc.status if isinstance(exc, Forbidden) else 403
    return _error_page(request, status, str(exc))


async def domain_error(request: Request, exc: Exception) -> Response:
    """A domain error on a read page (no such version, a bad ``?at=``): 404 or 400."""
    from mloop.errors import (
        ModelNotFoundError,
        RunNotFoundError,
        SnapshotNotFoundError,
        WindowNotFoundError,
    )

    missing = (ModelNotFoundError, RunNotFoundError, SnapshotNotFoundError, WindowNotFoundError)
    return _error_page(request, 404 if isinstance(exc, missing) else 400, str(exc))


def _error_page(request: Request, status: int, message: str) -> Response:
    from mloop.ui.auth import csrf_token, current_user

    template = request.app.state.templates.get_template("error.html")
    return HTMLResponse(template.render(
        request=request, user=current_user(request), csrf=csrf_token(request), flash=None,
        status=status, message=message, nav=render.NAV, page="",
        root=request.scope.get("root_path", ""), here=render.here(request),
        model=request.app.state.project.config.model_name,
        project=request.app.state.project.name, auth=request.app.state.auth),
        status_code=status)


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("mloop.ui") / "templates")),
        autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined)
    env.filters["day"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d %H:%M")
    env.filters["date"] = lambda t: "" if t is None else t.strftime("%Y-%m-%d")
    env.filters["pct"] = lambda x: "" if x is None else f"{x:.0%}"
    env.filters["num"] = lambda x: "n/a" if x is None else f"{x:.4g}"
    return env


def create_ui_app(project: Project, *, auth: bool = False, secure: bool = False,
                  secret_key: str | None = None,
                  live: Callable[[], LiveTraffic] | None = None) -> Starlette:
    """The dashboard of ``project``.

    ``auth``: reading needs a login too (acting always does). ``secure``: the session cookie
    is sent over TLS only (``mloop ui`` sets it when it serves HTTPS). ``secret_key`` signs
    sessions; by default a fresh random key, so sessions end when the process does.
    ``live`` reads the serving process's request counters (``mloop serve --ui`` passes
    :func:`mloop.ui.live.server_reader`); without it the Overview says they are not served
    by this process.
    """
    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(SessionMiddleware,  # type: ignore[arg-type]
                               secret_key=secret_key or secrets.token_urlsafe(32),
                               session_cookie=SESSION_COOKIE, max_age=SESSION_SECONDS,
                               same_site="strict", https_only=secure)],
        exception_handlers={Forbidden: forbidden, MloopError: domain_error})
    app.state.project = project
    app.state.auth = auth
    app.state.templates = templates()
    app.state.live = live
    app.state.chain_lock = threading.Lock()  # the audit chain's last check (pages.check_chain)
    return app
