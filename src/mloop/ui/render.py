"""One page render: a template with what every page needs (who is logged in, the CSRF
token, the flash message, the navigation). Its own module so that every page module imports
it from below, none from another page module."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from mloop.ui.auth import csrf_token, current_user, pop_flash


def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    """Render ``template`` with what every page needs (user, CSRF token, flash, nav)."""
    state = request.app.state
    user = current_user(request)
    body = state.templates.get_template(template).render(
        request=request, user=user, csrf=csrf_token(request), flash=pop_flash(request),
        model=state.project.config.model_name, project=state.project.name,
        auth=state.auth, nav=NAV, root=request.scope.get("root_path", ""),
        here=here(request), **context)
    return HTMLResponse(body, status_code=status)


def here(request: Request) -> str:
    """This page's path inside the app, without the mount point: what a form's ``next`` and
    a login link carry (the redirect adds the mount point back). Under ``mloop serve --ui``
    Starlette keeps the full path (``/ui/versions/3``) and puts ``/ui`` in ``root_path``."""
    path: str = request.scope["path"]
    root: str = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


NAV = [("overview", "/", "Overview"), ("timeline", "/timeline", "Timeline"),
       ("versions", "/versions", "Versions"), ("monitoring", "/monitoring", "Monitoring"),
       ("loop", "/loop", "Loop"), ("cost", "/cost", "Cost"), ("audit", "/audit", "Audit"),
       ("runs", "/runs", "Runs"), ("snapshots", "/snapshots", "Snapshots")]
