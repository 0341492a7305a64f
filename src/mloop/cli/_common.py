"""What every command module shares: the ``Annotated`` options, the project opener, argument
parsers, the one ``report`` helper behind ``--json``, and atomic file writes.

Import-light on purpose: ``typer``, ``rich`` and mloop's own errors only. Each command imports
the services it drives inside its body, so ``mloop --help`` and the read commands never pay for
MLflow, pandas or scikit-learn they do not use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from mloop.cli.render import emit_json, err
from mloop.errors import MloopError

if TYPE_CHECKING:
    from mloop.config import MonitoringConfig
    from mloop.project import Project

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
EnvOpt = Annotated[
    str | None,
    typer.Option("--env", "-E", help="Environment of mloop.yaml's 'environments' to act in "
                                     "(default: MLOOP_ENV, else the first of "
                                     "promotion.order).", show_default=False),
]
ProjectOpt = Annotated[
    Path | None,
    typer.Option("--project", "-C", help="Project folder (default: search upward from here).",
                 envvar="MLOOP_PROJECT"),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Run every step, ignore the cache.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why: recorded in the history.")]
AllowOverrideOpt = Annotated[bool, typer.Option(
    "--allow-override", help="If a model this command must promote fails a gate, promote it "
                             "anyway (recorded as an override). Without it the command asks "
                             "at a terminal and stops otherwise (CI, pipes, cron).")]

# `mloop serve` and `mloop ui` take the same TLS pair, checked by mloop.server.tls_files
TlsCertOpt = Annotated[str | None, typer.Option(
    "--tls-cert", help="TLS certificate (PEM): serve HTTPS (default serving.tls_cert; "
                       "with --tls-key).")]
TlsKeyOpt = Annotated[str | None, typer.Option(
    "--tls-key", help="TLS private key (PEM, unencrypted) of --tls-cert (default "
                      "serving.tls_key).")]


@dataclass(frozen=True)
class RootOptions:
    """The root callback's options, seen by every command of one invocation."""

    project: Path | None = None
    debug: bool = False
    env: str | None = None


# A context variable, not a module global: two invocations in one process (tests call
# ``main`` repeatedly) each see their own options.
_root_options: ContextVar[RootOptions | None] = ContextVar("mloop_cli_root", default=None)


def set_root_options(*, project: Path | None, debug: bool, env: str | None = None) -> None:
    _root_options.set(RootOptions(project=project,
                                  debug=debug or bool(os.environ.get("MLOOP_DEBUG")), env=env))


def root_options() -> RootOptions:
    return _root_options.get() or RootOptions()


def confirm_override(question: str, *, allowed: bool) -> str | None:
    """May a promotion go ahead despite failed gates, and on whose word? ``"--allow-override"``
    when the flag was given; ``"confirmed at the prompt"`` when a person at the terminal said
    yes to ``question`` (asked on stderr, so ``--json`` output stays one document); ``None``
    when they said no, or when nobody can be asked because stdin is not a terminal (CI, a pipe,
    cron): an unattended run never overrides a gate it was not told to."""
    if allowed:
        return "--allow-override"
    if not sys.stdin.isatty():
        return None
    return "confirmed at the prompt" if typer.confirm(question, default=False, err=True) \
        else None


def open_project() -> Project:
    """The project named by ``-C``/``MLOOP_PROJECT``, else the one found upward from here,
    in the environment named by ``--env`` (else ``MLOOP_ENV``, else the default one)."""
    from mloop.project import open_project as _open_project

    opts = root_options()
    return _open_project(opts.project, env=opts.env)


def open_environment(env: str) -> Project:
    """The same project in environment ``env`` (a promotion's other side)."""
    from mloop.project import open_project as _open_project

    return _open_project(root_options().project, env=env)


def open_project_as(action: str) -> Project:
    """The project, once whoever runs this command may take ``action`` in it (a role from
    ``$MLOOP_TOKEN`` against a central store; the OS user on the embedded one): refused with
    exit 1 before anything changes, and every event it records names them."""
    from mloop.security.people import authorize

    project = open_project()
    authorize(project.store, action)
    return project


def monitoring_config() -> MonitoringConfig:
    """The project's monitoring section if there is a project here, else the defaults."""
    from mloop.config import MonitoringConfig
    from mloop.errors import ProjectNotFoundError

    try:
        return open_project().config.monitoring
    except ProjectNotFoundError:
        return MonitoringConfig()


T = TypeVar("T")


def report(result: T, json_: bool, render: Callable[[T], None], *,
           to_json: Callable[[T], Any] | None = None) -> None:
    """Print ``result``: one JSON document on stdout with ``--json`` (through ``to_json``
    when the result needs shaping first), else the human rendering."""
    if json_:
        emit_json(to_json(result) if to_json is not None else result)
    else:
        render(result)


def iso_arg(value: str | None, flag: str) -> datetime | None:
    """An ISO 8601 option value as an aware datetime (UTC when it names no zone; the
    dashboard's ``?from=``/``?at=`` read times the same way, :mod:`mloop.timeparse`)."""
    from mloop.timeparse import parse_iso_time

    if value is None:
        return None
    try:
        return parse_iso_time(value)
    except ValueError:
        raise MloopError(f"{flag} '{value}': not an ISO 8601 time (e.g. 2012-01-01 or "
                         f"2012-01-01T06:00)") from None


def write_text(path: Path, text: str) -> None:
    """Write atomically (temp + rename): a report is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    err.print(f"wrote {path} ({len(text.encode()) // 1024} KiB)")

