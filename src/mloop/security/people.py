"""Who is acting, and may they: the CLI's side of people and roles.

On the embedded default (a SQLite store on this machine) whoever can run ``mloop`` here can
open the file anyway: the OS user acts, with every right, and is recorded as user@host.
Against a central store (any other URL), or whenever ``MLOOP_TOKEN`` is set, the CLI acts as
the person the token names and refuses what the token's role does not allow, before anything
is changed. A central store with no working token yet has no people to hold to roles: whoever
reaches it acts (someone has to create the first token), recorded as such; from its first
token on, every mutating command needs ``MLOOP_TOKEN``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mloop.errors import PermissionDeniedError
from mloop.security.actor import current_actor, set_current_actor
from mloop.security.roles import required_role, role_allows
from mloop.security.tokens import has_active_tokens, token_identity
from mloop.store.db import Store

TOKEN_ENV = "MLOOP_TOKEN"


@dataclass(frozen=True)
class Principal:
    """The person a command acts for: from a token, or the OS user on the embedded store."""

    person: str
    role: str
    token_id: int | None  # None: the OS user (embedded store, or a central store's bootstrap)
    actor: str  # as recorded in the audit chain


def is_central(store: Store) -> bool:
    """Anything but a SQLite file is shared by people who cannot read each other's files."""
    return not store.url.startswith("sqlite")


def principal(store: Store, *, token: str | None, via: str = "cli") -> Principal | None:
    """Who acts: the token's person (``token`` given), the OS user (embedded store, no
    token), or None (a central store and no token)."""
    if token is None:
        if is_central(store):
            return None
        actor = current_actor()
        return Principal(actor, "admin", None, actor)
    ident = token_identity(store, token.strip())
    if ident is None:
        raise PermissionDeniedError(f"{TOKEN_ENV} is not a working token (unknown or revoked)",
                                    person="unknown", role=None, action="read",
                                    needed="viewer")
    return Principal(ident.person, ident.role, ident.id, ident.actor(via))


def authorize(store: Store, action: str, *, token: str | None = None,
              env: bool = True) -> Principal:
    """Check that whoever runs this command may take ``action``; from then on every event it
    records names them. ``token``: the presented token (default ``$MLOOP_TOKEN`` when
    ``env``). Raises :class:`PermissionDeniedError` naming the person, their role and the
    role needed; nothing has been changed then."""
    if token is None and env:
        token = os.environ.get(TOKEN_ENV) or None
    who = principal(store, token=token)
    needed = required_role(action)
    if who is None:
        if not has_active_tokens(store):
            # no people yet: whoever reaches the store acts (and makes the first token);
            # roles hold from the first token on
            actor = current_actor()
            who = Principal(actor, "admin", None, f"{actor} (no token exists yet)")
        else:
            raise PermissionDeniedError(
                f"this store is central: set {TOKEN_ENV} to your token to '{action}' (needs "
                f"role '{needed}'); an admin creates one with `mloop tokens create --person "
                f"YOU --role {needed}`", person=current_actor(), role=None, action=action,
                needed=needed)
    if not role_allows(who.role, action):
        raise PermissionDeniedError(
            f"{who.person} has role '{who.role}' (token #{who.token_id}): '{action}' needs role "
            f"'{needed}' or above; nothing was changed", person=who.person, role=who.role,
            action=action, needed=needed)
    set_current_actor(who.actor)
    return who
