"""The audit chain: every gate run, promotion, rollback and override as an append-only event.

Each row stores the hash of the row before it (the first one, 64 zeros) and its own hash over
(previous hash, time, kind, actor, payload). Editing or deleting a row breaks every hash after
it, and ``verify_chain`` names the first row that no longer fits. ``prev_hash`` is unique, so
two writers racing for the same predecessor cannot fork the chain: the loser retries.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mloop.errors import MloopError
from mloop.store.db import Store, json_safe
from mloop.store.models import AuditHeadRow, EventRow

GENESIS = "0" * 64


def current_actor() -> str:
    """Who is acting: ``MLOOP_ACTOR`` when set (CI, the controller), else user@host."""
    return os.environ.get("MLOOP_ACTOR") or f"{getpass.getuser()}@{socket.gethostname()}"


def _stamp(at: datetime) -> str:
    return at.replace(tzinfo=at.tzinfo or UTC).astimezone(UTC).isoformat(
        timespec="microseconds")


def event_hash(prev_hash: str, at: datetime, kind: str, actor: str,
               payload: dict[str, Any]) -> str:
    body = json.dumps({"prev": prev_hash, "at": _stamp(at), "kind": kind, "actor": actor,
                       "payload": payload}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def add_event(session: Session, kind: str, payload: dict[str, Any], *,
              actor: str | None = None) -> EventRow:
    """Append an event inside the caller's transaction (committed or rolled back with it)."""
    actor = actor or current_actor()
    payload = json_safe(payload)
    last = session.scalars(sa.select(EventRow).order_by(EventRow.id.desc()).limit(1)).first()
    prev = last.hash if last is not None else GENESIS
    at = datetime.now(UTC)
    head = session.get(AuditHeadRow, 1)
    count = (head.events if head is not None else
             session.scalar(sa.select(sa.func.count()).select_from(EventRow)) or 0)
    row = EventRow(at=at, kind=kind, actor=actor, payload=payload, prev_hash=prev,
                   hash=event_hash(prev, at, kind, actor, payload))
    session.add(row)
    if head is None:
        session.add(AuditHeadRow(id=1, events=count + 1, head_hash=row.hash))
    else:
        head.events, head.head_hash = count + 1, row.hash
    return row


def append_event(store: Store, kind: str, payload: dict[str, Any], *,
                 actor: str | None = None, attempts: int = 20) -> EventRow:
    """Append an event in its own write transaction, retrying while another writer holds the
    database (SQLite) or took the same place in the chain (PostgreSQL)."""
    for attempt in range(attempts):
        with store.engine.connect().execution_options(immediate=True) as conn, \
                Session(bind=conn) as s:
            try:
                s.begin()
                row = add_event(s, kind, payload, actor=actor)
                s.commit()
                return row
            except (sa.exc.IntegrityError, sa.exc.OperationalError):
                s.rollback()
                time.sleep(min(0.05 * 2**attempt, 1.0))
    raise MloopError(f"could not append a '{kind}' event after {attempts} attempts "
                     f"(the events table is under heavy concurrent writes)")


@dataclass
class ChainReport:
    ok: bool
    events: int
    first_bad_id: int | None = None
    problem: str | None = None


def verify_chain(store: Store) -> ChainReport:
    """Recompute every hash in order; report the first row that does not fit."""
    prev = GENESIS
    count = 0
    with store.session() as s:
        for row in s.scalars(sa.select(EventRow).order_by(EventRow.id)):
            count += 1
            if row.prev_hash != prev:
                return ChainReport(False, count, row.id,
                                   f"event {row.id} does not follow the event before it "
                                   f"(a row was deleted or inserted)")
            expected = event_hash(row.prev_hash, row.at, row.kind, row.actor, row.payload)
            if row.hash != expected:
                return ChainReport(False, count, row.id,
                                   f"event {row.id} ({row.kind}) was modified after it was "
                                   f"written")
            prev = row.hash
        head = s.get(AuditHeadRow, 1)
    if head is not None and (head.events != count or head.head_hash != prev):
        missing = head.events - count
        what = (f"{missing} event(s) missing at the end of the chain (the newest were deleted)"
                if missing > 0 else "the chain does not end where its recorded head says")
        return ChainReport(False, count, None, what)
    return ChainReport(True, count)


def list_events(store: Store, *, limit: int = 50, kind: str | None = None,
                since: datetime | None = None, after_id: int | None = None) -> list[EventRow]:
    """Newest first. ``kind`` ending in ``.`` or ``*`` matches a prefix (``loop.``)."""
    q = sa.select(EventRow).order_by(EventRow.id.desc()).limit(limit)
    if kind is not None:
        if kind.endswith((".", "*")):
            q = q.where(EventRow.kind.startswith(kind.rstrip("*")))
        else:
            q = q.where(EventRow.kind == kind)
    if since is not None:
        q = q.where(EventRow.at >= since)
    if after_id is not None:
        q = q.where(EventRow.id > after_id)
    with store.session() as s:
        return list(s.scalars(q).all())
