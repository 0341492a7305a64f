"""The dashboard: ``mloop ui``."""

from __future__ import annotations

from typing import Annotated

import typer

from mloop.cli._common import TlsCertOpt, TlsKeyOpt, open_project
from mloop.cli.render import err


def ui(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8050,
    auth: Annotated[bool | None, typer.Option(
        "--auth/--no-auth", help="Require a login to read too (default: on unless bound to "
                                 "loopback, as for `mloop serve`). Acting always needs an "
                                 "operator or admin token.")] = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Serve the dashboard (overview, timeline, versions, monitoring, loop, audit) until
    Ctrl-C; it reads the project's stores through the same services as the CLI. With a TLS
    pair (the flags, or serving.tls_cert/tls_key as for `mloop serve`) it serves HTTPS and
    its session cookie is sent over TLS only."""
    import uvicorn

    from mloop.server import auth_enabled, require_token_beyond_loopback, tls_files
    from mloop.ui import create_ui_app

    project = open_project()
    ssl = tls_files(project, tls_cert=tls_cert, tls_key=tls_key)
    use_auth = auth_enabled(project.config.serving, host, auth)
    require_token_beyond_loopback(project, host, use_auth, what="the dashboard",
                                  role="viewer")
    app = create_ui_app(project, auth=use_auth, secure=bool(ssl))
    shown = f"[{host}]" if ":" in host else host
    err.print(f"mloop ui for '{project.config.model_name}' on "
              f"{'https' if ssl else 'http'}://{shown}:{port} "
              f"({'login required' if use_auth else 'read-only without login'}; actions need "
              f"an operator token: `mloop tokens create --person YOU --role operator`)",
              highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                ssl_certfile=ssl.get("ssl_certfile"), ssl_keyfile=ssl.get("ssl_keyfile"))
