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
from mloop.loop.cost import CostCollector
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


def tls_files(project: Project, *, tls_cert: str | None = None,
              tls_key: str | None = None) -> dict[str, str]:
    """uvicorn's TLS arguments (``ssl_certfile``, ``ssl_keyfile``) for ``mloop serve`` and
    ``mloop ui``, or ``{}`` for plain HTTP: the flags (relative paths from the working
    folder), else ``serving.tls_cert`` and ``serving.tls_key`` of mloop.yaml (relative paths
    from the project's folder).

    Checked before anything is announced or bound, so a bad file is one clear error naming it
    and where it came from (not an OpenSSL traceback from inside uvicorn): both or neither,
    each a readable file, the certificate a PEM certificate and the key its PEM private key.
    A key that needs a password is refused too (uvicorn would stop to prompt for it).
    """
    import ssl

    serving = project.config.serving
    given = {"tls_cert": tls_cert, "tls_key": tls_key}
    chosen = {k: v if v is not None else getattr(serving, k) for k, v in given.items()}
    if (chosen["tls_cert"] is None) != (chosen["tls_key"] is None):
        raise MloopError("--tls-cert and --tls-key go together: pass both or neither")
    if chosen["tls_cert"] is None:
        return {}
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    for key, value in chosen.items():
        label = (f"--{key.replace('_', '-')}" if given[key] is not None
                 else f"serving.{key} in mloop.yaml")
        path = Path(value or "").expanduser()
        if not path.is_absolute():  # a flag's from here, mloop.yaml's from the project
            path = path.absolute() if given[key] is not None else project.root / path
        if not path.is_file():
            raise MloopError(f"{label} {path}: no such file")
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise MloopError(f"{label} {path}: cannot be read ({exc.strerror})") from None
        paths[key], labels[key] = path, label
    cert, pem_key = paths["tls_cert"], paths["tls_key"]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        raise MloopError(f"{labels['tls_cert']} {cert}: not a PEM certificate") from None
    try:
        context.load_cert_chain(str(cert), str(pem_key), password=lambda: b"")
    except ssl.SSLError as exc:
        raise MloopError(f"{labels['tls_key']} {pem_key}: not the unencrypted PEM private key of "
                         f"{cert} ({exc.reason or exc})") from None
    return {"ssl_certfile": str(cert), "ssl_keyfile": str(pem_key)}


def default_collectors(project: Project) -> list[Any]:
    """The gauges /metrics shows beside the server's own: the newest monitor window, the
    loop's state and, with ``costs.budget_per_day``, the last day's spend."""
    return [MonitorCollector(project), LoopCollector(project), CostCollector(project)]


def build_app(project: Project, cfg: ServingConfig, *, auth: bool) -> Any:
    from mloop.serving.app import create_app

    checker = None
    if auth:
        from mloop.serving.auth import TokenAuth

        checker = TokenAuth(project.store, refresh_seconds=cfg.poll_seconds)
    from mloop.serving.shared_reload import SharedReload

    return create_app(project, cfg, auth=checker, collectors=default_collectors(project),
                      reloads=SharedReload.from_env())


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
    ssl = tls_files(project, tls_cert=tls_cert, tls_key=tls_key)
    use_auth = auth_enabled(cfg, cfg.host, auth)
    require_token_beyond_loopback(project, cfg.host, use_auth, what="serving",
                                  role="predict")
    if announce is not None:
        announce(f"{'https' if ssl else 'http'}://{cfg.host}:{cfg.port}")
    common: dict[str, Any] = {"host": cfg.host, "port": cfg.port, "log_level": "warning",
                              "access_log": False, "loop": "auto", "http": "auto",
                              "timeout_graceful_shutdown": 10, **ssl}
    if cfg.workers > 1:
        _serve_workers(project, cfg, use_auth=use_auth, factory=factory, options=common)
    else:
        uvicorn.run(build(project, cfg, auth=use_auth), **common)


def _serve_workers(project: Project, cfg: ServingConfig, *, use_auth: bool, factory: str,
                   options: dict[str, Any]) -> None:
    """``cfg.workers`` processes on one port (:mod:`mloop.serving.workers`), sharing a
    folder for this run: their metric values (/metrics sums them) and the reload generation
    (POST /reload on one reaches all). The folder goes when the server stops."""
    import shutil
    import tempfile

    from mloop.prometheus_env import restored_environ
    from mloop.serving import shared_reload
    from mloop.serving.metrics import MULTIPROC_ENV, WORKERS_ENV, mark_dead
    from mloop.serving.workers import run_workers

    run_dir = Path(tempfile.mkdtemp(prefix="mloop-serve-"))
    (run_dir / "metrics").mkdir()
    (run_dir / "reload").mkdir()
    env = {ENV_PROJECT: str(project.root), "MLOOP_SERVE_CONFIG": cfg.model_dump_json(),
           ENV_AUTH: "1" if use_auth else "0", shared_reload.ENV: str(run_dir / "reload"),
           # this run's own folder, whatever the environment holds: an inherited one (Feast
           # sets one on import) would sum other servers' values into this one's /metrics
           MULTIPROC_ENV: str(run_dir / "metrics"), WORKERS_ENV: "1"}
    if project.env is not None:  # each worker opens the same environment's stores
        from mloop.project import ENV_VAR

        env[ENV_VAR] = project.env
    reloads = shared_reload.SharedReload(run_dir / "reload")

    def on_exit(pid: int) -> None:  # a worker ended: drop its live gauges and its reload ack
        mark_dead(pid)
        reloads.forget(pid)

    try:
        with restored_environ(env):
            os.environ.update(env)  # the workers inherit it
            run_workers(factory, cfg.workers, on_exit=on_exit, **options)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
