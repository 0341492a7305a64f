"""Bearer tokens for the server, the dashboard and the CLI against a central store. A token
names a person and a role (what each role may do: :mod:`mloop.security.roles`); everything
done with it is recorded as that person's. Only a token's sha256 is stored; the token itself
is printed once.

The tokens are 32 random bytes, so a plain sha256 (not a slow password hash) is the right
tool: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from mloop.errors import MloopError
from mloop.security.audit import add_event, current_actor
from mloop.security.roles import ROLES, check_role
from mloop.store.db import Store, utcnow
from mloop.store.models import TokenRow

__all__ = ["PREFIX", "ROLES", "NewToken", "TokenIdentity", "active_hashes", "active_token",
           "create_token", "has_active_tokens", "list_tokens", "revoke_token",
           "token_identity"]

PREFIX = "mlp_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class NewToken:
    id: int
    name: str
    role: str
    token: str  # shown once
    person: str = ""


def create_token(store: Store, *, role: str, name: str = "", person: str = "") -> NewToken:
    """A new token for ``person`` (default: ``name``, else who creates it) with ``role``."""
    check_role(role)
    if len(person) > 200 or len(name) > 200:
        raise MloopError("a token's --person and --name hold at most 200 characters")
    token = PREFIX + secrets.token_urlsafe(32)
    actor = current_actor()
    person = person.strip() or name.strip() or actor
    with store.session(write=True) as s:
        row = TokenRow(name=name or role, role=role, token_hash=token_hash(token),
                       created_at=utcnow(), revoked_at=None, created_by=actor, person=person)
        s.add(row)
        s.flush()
        add_event(s, "token.create", {"token_id": row.id, "name": row.name, "role": role,
                                      "person": person}, store=store, actor=actor)
        s.commit()
        return NewToken(row.id, row.name, role, token, person)


def revoke_token(store: Store, token_id: int) -> None:
    with store.session(write=True) as s:
        row = s.get(TokenRow, token_id)
        if row is None:
            raise MloopError(f"no token with id {token_id} (see `mloop tokens list`)")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            add_event(s, "token.revoke", {"token_id": token_id, "name": row.name},
                      store=store)
        s.commit()


def list_tokens(store: Store) -> list[dict[str, Any]]:
    with store.session() as s:
        rows = s.scalars(sa.select(TokenRow).order_by(TokenRow.id)).all()
        return [{"id": r.id, "name": r.name, "person": r.person or r.name, "role": r.role,
                 "created_by": r.created_by,
                 "created_at": r.created_at.isoformat(timespec="seconds"),
                 "revoked": r.revoked_at is not None} for r in rows]


@dataclass(frozen=True)
class TokenIdentity:
    """Who a presented token belongs to (never the token itself)."""

    id: int
    name: str
    role: str
    person: str = ""

    def actor(self, via: str) -> str:
        """How the audit chain names what this token did through ``via`` (cli, ui)."""
        return f"{self.person} (token #{self.id}, {via})"


def _identity(row: TokenRow) -> TokenIdentity:
    return TokenIdentity(row.id, row.name, row.role, row.person or row.name)


def token_identity(store: Store, token: str) -> TokenIdentity | None:
    """The active (not revoked) token matching ``token``, or None. The dashboard's login
    calls it once, then keeps only the id in its session (:func:`active_token`)."""
    with store.session() as s:
        row = s.scalars(sa.select(TokenRow).where(TokenRow.token_hash == token_hash(token),
                                                  TokenRow.revoked_at.is_(None))).first()
        return _identity(row) if row is not None else None


def active_token(store: Store, token_id: int) -> TokenIdentity | None:
    """Token ``token_id`` if it is still active: a session outliving its token's revocation
    loses its rights at the next request that checks."""
    with store.session() as s:
        row = s.get(TokenRow, token_id)
        if row is None or row.revoked_at is not None:
            return None
        return _identity(row)


def active_hashes(store: Store) -> dict[str, str]:
    """sha256 → role of every token not revoked."""
    with store.session() as s:
        rows = s.execute(sa.select(TokenRow.token_hash, TokenRow.role)
                         .where(TokenRow.revoked_at.is_(None))).all()
    return {h: r for h, r in rows}


def has_active_tokens(store: Store) -> bool:
    """Does any token still work? (None yet: a central store's first admin token is made by
    whoever can reach the store, see :func:`mloop.security.people.authorize`.)"""
    with store.session() as s:
        return s.scalar(sa.select(TokenRow.id).where(TokenRow.revoked_at.is_(None))
                        .limit(1)) is not None
