"""Bearer tokens for the server and the dashboard: ``viewer`` may read the dashboard,
``predict`` may also score, ``admin`` may also deploy, send feedback and reload (and act in the
dashboard: promote, roll back, start and stop challengers). Only a token's sha256 is stored;
the token itself is printed once.

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
from mloop.store.db import Store, utcnow
from mloop.store.models import TokenRow

ROLES = ("viewer", "predict", "admin")  # each may do what the ones before it may
PREFIX = "mlp_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class NewToken:
    id: int
    name: str
    role: str
    token: str  # shown once


def create_token(store: Store, *, role: str, name: str = "") -> NewToken:
    if role not in ROLES:
        raise MloopError(f"unknown role '{role}' (expected one of {list(ROLES)})")
    token = PREFIX + secrets.token_urlsafe(32)
    actor = current_actor()
    with store.session(write=True) as s:
        row = TokenRow(name=name or role, role=role, token_hash=token_hash(token),
                       created_at=utcnow(), revoked_at=None, created_by=actor)
        s.add(row)
        s.flush()
        add_event(s, "token.create", {"token_id": row.id, "name": row.name, "role": role},
                  actor=actor)
        s.commit()
        return NewToken(row.id, row.name, role, token)


def revoke_token(store: Store, token_id: int) -> None:
    with store.session(write=True) as s:
        row = s.get(TokenRow, token_id)
        if row is None:
            raise MloopError(f"no token with id {token_id} (see `mloop tokens list`)")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            add_event(s, "token.revoke", {"token_id": token_id, "name": row.name})
        s.commit()


def list_tokens(store: Store) -> list[dict[str, Any]]:
    with store.session() as s:
        rows = s.scalars(sa.select(TokenRow).order_by(TokenRow.id)).all()
        return [{"id": r.id, "name": r.name, "role": r.role, "created_by": r.created_by,
                 "created_at": r.created_at.isoformat(timespec="seconds"),
                 "revoked": r.revoked_at is not None} for r in rows]


@dataclass(frozen=True)
class TokenIdentity:
    """Who a presented token belongs to (never the token itself)."""

    id: int
    name: str
    role: str


def token_identity(store: Store, token: str) -> TokenIdentity | None:
    """The active (not revoked) token matching ``token``, or None. The dashboard's login
    calls it once, then keeps only the id in its session (:func:`active_token`)."""
    with store.session() as s:
        row = s.scalars(sa.select(TokenRow).where(TokenRow.token_hash == token_hash(token),
                                                  TokenRow.revoked_at.is_(None))).first()
        return TokenIdentity(row.id, row.name, row.role) if row is not None else None


def active_token(store: Store, token_id: int) -> TokenIdentity | None:
    """Token ``token_id`` if it is still active: a session outliving its token's revocation
    loses its rights at the next request that checks."""
    with store.session() as s:
        row = s.get(TokenRow, token_id)
        if row is None or row.revoked_at is not None:
            return None
        return TokenIdentity(row.id, row.name, row.role)


def active_hashes(store: Store) -> dict[str, str]:
    """sha256 → role of every token not revoked."""
    with store.session() as s:
        rows = s.execute(sa.select(TokenRow.token_hash, TokenRow.role)
                         .where(TokenRow.revoked_at.is_(None))).all()
    return {h: r for h, r in rows}
