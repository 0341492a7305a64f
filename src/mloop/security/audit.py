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
from collections.abc import Sequence
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
    # where a verified chain ended: a later check may start there (``verify_chain(since=)``)
    last_id: int | None = None
    last_hash: str = GENESIS


def verify_chain(store: Store, *, since: ChainReport | None = None) -> ChainReport:
    """Recompute every hash in order; report the first row that does not fit.

    ``since``, an intact report of an earlier check, makes the check incremental: only the
    events appended after it are rehashed, once its last event is found unchanged (same id,
    same hash). A dashboard re-checks on every visit this way at the cost of the new events,
    and runs the full check on demand: an edit to an already-verified row that keeps its
    stored hash is caught only by the full check."""
    prev, count, after = GENESIS, 0, None
    with store.session() as s:
        if since is not None and since.ok and since.last_id is not None:
            if s.scalar(sa.select(EventRow.hash).where(EventRow.id == since.last_id)) \
                    != since.last_hash:
                return ChainReport(False, since.events, since.last_id,
                                   f"event {since.last_id}, verified before, was modified or "
                                   f"deleted since")
            prev, count, after = since.last_hash, since.events, since.last_id
        q = sa.select(EventRow).order_by(EventRow.id)
        if after is not None:
            q = q.where(EventRow.id > after)
        last_id = after
        for row in s.scalars(q):
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
            prev, last_id = row.hash, row.id
        head = s.get(AuditHeadRow, 1)
    if head is not None and (head.events != count or head.head_hash != prev):
        missing = head.events - count
        what = (f"{missing} event(s) missing at the end of the chain (the newest were deleted)"
                if missing > 0 else "the chain does not end where its recorded head says")
        return ChainReport(False, count, None, what)
    return ChainReport(True, count, last_id=last_id, last_hash=prev)


def event_kinds(store: Store) -> list[str]:
    """The kinds of event the chain holds, sorted (the audit page's filter)."""
    with store.session() as s:
        return sorted(s.scalars(sa.select(EventRow.kind).distinct()))


def list_events(store: Store, *, limit: int = 50, kind: str | None = None,
                since: datetime | None = None, after_id: int | None = None,
                kinds: Sequence[str] | None = None) -> list[EventRow]:
    """Newest first. ``kind`` ending in ``.`` or ``*`` matches a prefix (``loop.``);
    ``kinds``, any of these exact kinds (filtered in SQL, so a limit counts only them)."""
    q = sa.select(EventRow).order_by(EventRow.id.desc()).limit(limit)
    if kinds is not None:
        q = q.where(EventRow.kind.in_(list(kinds)))
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
