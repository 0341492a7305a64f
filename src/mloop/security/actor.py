"""Who the audit chain records as acting. Import-light (the CLI's entry resets it before every
command without loading the store)."""

from __future__ import annotations

import getpass
import os
import socket
from contextvars import ContextVar

# The person a command acts for once it checked their token (mloop.security.people): a
# context variable, so two invocations in one process never see each other's.
_acting_as: ContextVar[str | None] = ContextVar("mloop_actor", default=None)


def current_actor() -> str:
    """Who is acting: the person whose token the command checked, else ``MLOOP_ACTOR`` when
    set (CI, the controller), else user@host (the embedded default: the OS user)."""
    return (_acting_as.get() or os.environ.get("MLOOP_ACTOR")
            or f"{getpass.getuser()}@{socket.gethostname()}")


def set_current_actor(actor: str | None) -> None:
    """Record ``actor`` for the rest of this context (a CLI command, once it checked who runs
    it); None: back to ``MLOOP_ACTOR`` or user@host."""
    _acting_as.set(actor)
