"""``mloop serve --ui``: the serving app with the dashboard mounted under ``/ui``.

The dashboard is the same app ``mloop ui`` serves; only its mount point differs (its links and
redirects carry the ``root_path`` Starlette sets under a ``Mount``). It follows the server's
auth rules: when the server requires bearer tokens, reading the dashboard needs a login too;
acting always needs an operator or admin token. Its session cookie is ``Secure`` when the
server speaks TLS. Its Overview reads this server's own request counters (:mod:`mloop.ui.live`).

This module sits above :mod:`mloop.server` (which knows nothing of the dashboard) and hands it
the builder and, for ``--workers N``, the factory each worker imports. The workers share one
session key through :data:`ENV_SECRET`, so a login made on one worker is valid on the next.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from mloop.config import ServingConfig
from mloop.project import Project, open_project

MOUNT = "/ui"
ENV_SECRET = "MLOOP_UI_SECRET"
FACTORY = "mloop.ui.mount:app_from_env"


def session_secret() -> str:
    """The key that signs dashboard sessions: the one the parent process chose (shared by the
    workers it starts), else a fresh one, set in the environment for workers to inherit."""
    secret = os.environ.get(ENV_SECRET)
    if not secret:
        secret = os.environ[ENV_SECRET] = secrets.token_urlsafe(32)
    return secret


def build_app_with_ui(project: Project, cfg: ServingConfig, *, auth: bool) -> Any:
    """The serving app of ``project`` (``mloop.server.build_app``) with the dashboard under
    ``/ui``, reading with the same auth rule as the server."""
    from mloop.server import build_app
    from mloop.ui.app import create_ui_app
    from mloop.ui.live import server_reader

    app = build_app(project, cfg, auth=auth)
    app.mount(MOUNT, create_ui_app(project, auth=auth, secure=cfg.tls_cert is not None,
                                   secret_key=session_secret(),
                                   live=server_reader(app.state.mloop.metrics)), name="ui")
    return app


def app_from_env() -> Any:
    """uvicorn factory for ``mloop serve --ui --workers N`` (each worker builds its own)."""
    from mloop.server import ENV_AUTH, ENV_PROJECT

    project = open_project(os.environ[ENV_PROJECT])
    cfg = ServingConfig.model_validate_json(os.environ["MLOOP_SERVE_CONFIG"])
    return build_app_with_ui(project, cfg, auth=os.environ.get(ENV_AUTH) == "1")
