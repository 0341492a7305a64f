"""The serving process: the app composed with its collaborators, run under uvicorn in one
process or N workers, each with its own batcher and inference-log writer (segment names carry
the pid, so workers never collide).

This is the process's composition root, above serving, monitoring and the loop: it hands
``create_app`` the gauges of monitoring and the loop, so :mod:`mloop.serving` imports neither."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mloop.config import ServingConfig
from mloop.errors import MloopError
from mloop.loop.gauges import LoopCollector
from mloop.monitoring.alerts import MonitorCollector
from mloop.project import Project, open_project

ENV_PROJECT = "MLOOP_PROJECT"
ENV_AUTH = "MLOOP_SERVE_AUTH"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_enabled(cfg: ServingConfig, host: str, flag: bool | None = None) -> bool:
    """Explicit flag, then config, then: on unless bound to loopback only."""
    if flag is not None:
        return flag
    if cfg.auth is not None:
        return cfg.auth
    return not is_loopback(host)


def require_token_beyond_loopback(project: Project, host: str, use_auth: bool, *, what: str,
                                  role: str) -> None:
    """Refuse to start on a non-loopback ``host`` with auth on and no token to log in with:
    nobody could use the process, and the fix is one command. (``mloop serve`` and
    ``mloop ui`` share this rule.)"""
    if use_auth and not is_loopback(host):
        from mloop.security.tokens import active_hashes

        if not active_hashes(project.store):
            raise MloopError(f"{what} on {host} needs a token (auth is on beyond "
                             f"loopback): `mloop tokens create --role {role}`, or pass "
                             f"--no-auth to serve without one")


def default_collectors(project: Project) -> list[Any]:
    """The gauges /metrics shows beside the server's own: the newest monitor window and the
    loop's state."""
    return [MonitorCollector(project), LoopCollector(project)]


def build_app(project: Project, cfg: ServingConfig, *, auth: bool) -> Any:
    from mloop.serving.app import create_app

    checker = None
    if auth:
        from mloop.serving.auth import TokenAuth

        checker = TokenAuth(project.store, refresh_seconds=cfg.poll_seconds)
    return create_app(project, cfg, auth=checker, collectors=default_collectors(project))


def app_from_env() -> Any:
    """uvicorn factory for ``--workers N`` (each worker imports and builds its own app)."""
    project = open_project(os.environ[ENV_PROJECT])
    cfg = ServingConfig.model_validate_json(os.environ["MLOOP_SERVE_CONFIG"])
    return build_app(project, cfg, auth=os.environ.get(ENV_AUTH) == "1")


def serve(project: Project, *, host: str | None = None, port: int | None = None,
          workers: int | None = None, auth: bool | None = None,
          tls_cert: str | None = None, tls_key: str | None = None,
          announce: Callable[[str], None] | None = None,
          build: Callable[..., Any] = build_app, factory: str = "mloop.server:app_from_env",
          ) -> None:
    """Serve until SIGINT/SIGTERM; shutdown commits the inference log.

    ``build(project, cfg, auth=...)`` makes the app of one process and ``factory`` names the
    uvicorn factory each of ``--workers N`` imports; ``mloop serve --ui`` passes ones that
    mount the dashboard (which lives above this module).

    Every check (TLS files, a token when auth is on beyond loopback) runs first; only then is
    ``announce`` called with the base URL (``http(s)://host:port``), so a refused start prints
    nothing but its error.
    """
    import uvicorn

    updates: dict[str, Any] = {k: v for k, v in (("host", host), ("port", port),
                                                 ("workers", workers), ("tls_cert", tls_cert),
                                                 ("tls_key", tls_key)) if v is not None}
    cfg = project.config.serving.model_copy(update=updates)
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise MloopError("--tls-cert and --tls-key go together: pass both or neither")
    ssl: dict[str, Any] = {}
    if cfg.tls_cert:
        for label, value in (("tls_cert", cfg.tls_cert), ("tls_key", cfg.tls_key)):
            path = Path(value or "")
            if not path.is_absolute():
                path = project.root / path
            if not path.is_file():
                raise MloopError(f"serving.{label}: {path}: no such file")
            ssl["ssl_certfile" if label == "tls_cert" else "ssl_keyfile"] = str(path)
    use_auth = auth_enabled(cfg, cfg.host, auth)
    require_token_beyond_loopback(project, cfg.host, use_auth, what="serving",
                                  role="predict")
    if announce is not None:
        announce(f"{'https' if ssl else 'http'}://{cfg.host}:{cfg.port}")
    common: dict[str, Any] = {"host": cfg.host, "port": cfg.port, "log_level": "warning",
                              "access_log": False, "loop": "auto", "http": "auto",
                              "timeout_graceful_shutdown": 10, **ssl}
    if cfg.workers > 1:
        import tempfile

        from mloop.serving.metrics import MULTIPROC_ENV

        # one folder per server run: workers write their metric values there, /metrics sums
        metrics_dir = tempfile.mkdtemp(prefix="mloop-metrics-")
        os.environ.setdefault(MULTIPROC_ENV, metrics_dir)
        os.environ[ENV_PROJECT] = str(project.root)
        os.environ["MLOOP_SERVE_CONFIG"] = cfg.model_dump_json()
        os.environ[ENV_AUTH] = "1" if use_auth else "0"
        uvicorn.run(factory, factory=True, workers=cfg.workers,
                    **common)
    else:
        uvicorn.run(build(project, cfg, auth=use_auth), **common)
