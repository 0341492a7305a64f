"""The audit chain: every gate run, promotion, rollback and override as an append-only event.

Each row stores the hash of the row before it (the first one, 64 zeros) and its own hash over
(previous hash, time, kind, actor, payload). Editing or deleting a row breaks every hash after
it, and ``verify_chain`` names the first row that no longer fits. ``prev_hash`` is unique, so
two writers racing for the same predecessor cannot fork the chain: the loser retries.

The hashes alone stop accidents, not someone with write access to the store: they can
recompute them. So each row also carries an HMAC of its hash under a key kept outside the
store, and a checkpoint beside the key records how long the chain was (:mod:`.audit_key`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mloop.errors import MloopError
from mloop.security.actor import current_actor, set_current_actor
from mloop.security.audit_key import (
    KEY_ENV,
    AuditKeyError,
    advance_checkpoint,
    audit_key,
    checkpoint_mac,
    checkpoint_path,
    event_mac,
    key_source,
    read_checkpoint,
)
from mloop.store.db import Store, json_safe
from mloop.store.models import AuditHeadRow, EventRow

GENESIS = "0" * 64
_PENDING = "mloop_audit_checkpoint"  # Session.info key: the checkpoint to write on commit
log = logging.getLogger("mloop.audit")
__all__ = ["GENESIS", "ChainReport", "add_event", "append_event", "current_actor",
           "event_hash", "event_kinds", "list_events", "set_current_actor", "verify_chain"]

def _stamp(at: datetime) -> str:
    if at.tzinfo is None:  # SQLite hands back naive UTC: skip the conversions (verify's loop)
        return at.isoformat(timespec="microseconds") + "+00:00"
    return at.astimezone(UTC).isoformat(timespec="microseconds")


# json.dumps(..., sort_keys=True, default=str) without building an encoder per call
_ENCODE = json.JSONEncoder(sort_keys=True, default=str).encode


def event_hash(prev_hash: str, at: datetime, kind: str, actor: str,
               payload: dict[str, Any]) -> str:
    body = _ENCODE({"prev": prev_hash, "at": _stamp(at), "kind": kind, "actor": actor,
                    "payload": payload})
    return hashlib.sha256(body.encode()).hexdigest()


def add_event(session: Session, kind: str, payload: dict[str, Any], *, store: Store,
              actor: str | None = None) -> EventRow:
    """Append an event inside the caller's transaction (committed or rolled back with it).

    ``store`` is the store ``session`` writes to: its key signs the event, and the checkpoint
    beside the key advances once the caller's transaction commits (never before: a rolled
    back event must not be expected by the verifier)."""
    actor = actor or current_actor()
    # None only for a store without a keys folder and no MLOOP_AUDIT_KEY: the event is then
    # hash-chained but unkeyed, and the verifier reports a keyed chain it follows as broken
    key = audit_key(store, create=True)
    payload = json_safe(payload)
    last = session.scalars(sa.select(EventRow).order_by(EventRow.id.desc()).limit(1)).first()
    prev = last.hash if last is not None else GENESIS
    at = datetime.now(UTC)
    head = session.get(AuditHeadRow, 1)
    count = (head.events if head is not None else
             session.scalar(sa.select(sa.func.count()).select_from(EventRow)) or 0)
    digest = event_hash(prev, at, kind, actor, payload)
    row = EventRow(at=at, kind=kind, actor=actor, payload=payload, prev_hash=prev,
                   hash=digest, mac=event_mac(key, digest) if key is not None else None)
    session.add(row)
    if head is None:
        session.add(AuditHeadRow(id=1, events=count + 1, head_hash=row.hash))
    else:
        head.events, head.head_hash = count + 1, row.hash
    if key is not None:  # the newest of the transaction
        session.info[_PENDING] = (store, key, count + 1, digest)
    if not sa.event.contains(session, "after_commit", _write_checkpoint):
        sa.event.listen(session, "after_commit", _write_checkpoint)
        sa.event.listen(session, "after_rollback", _drop_checkpoint)
    return row


def _write_checkpoint(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if pending is None:
        return
    store, key, events, digest = pending
    try:
        advance_checkpoint(store, key, events, digest)
    except OSError as exc:  # the event is committed: the checkpoint lags, the verifier says so
        log.warning("could not advance the audit checkpoint %s: %s", checkpoint_path(store),
                    exc)


def _drop_checkpoint(session: Session) -> None:
    session.info.pop(_PENDING, None)


def append_event(store: Store, kind: str, payload: dict[str, Any], *,
                 actor: str | None = None, attempts: int = 20) -> EventRow:
    """Append an event in its own write transaction, retrying while another writer holds the
    database (SQLite) or took the same place in the chain (PostgreSQL)."""
    for attempt in range(attempts):
        with store.engine.connect().execution_options(immediate=True) as conn, \
                Session(bind=conn) as s:
            try:
                s.begin()
                row = add_event(s, kind, payload, store=store, actor=actor)
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
    # events from before the chain was keyed (no MAC); only ever the oldest ones
    unkeyed: int = 0
    # the chain length the checkpoint outside the store vouches for (None: no checkpoint)
    checkpoint: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "events": self.events, "first_bad_id": self.first_bad_id,
                "problem": self.problem, "unkeyed": self.unkeyed,
                "checkpoint": self.checkpoint}


_ROW = (EventRow.id, EventRow.at, EventRow.kind, EventRow.actor, EventRow.payload,
        EventRow.prev_hash, EventRow.hash, EventRow.mac)


def verify_chain(store: Store, *, since: ChainReport | None = None) -> ChainReport:
    """Recompute every hash and MAC in order; report the first row that does not fit, or a
    tail shorter than the checkpoint outside the store says.

    ``since``, an intact report of an earlier check, makes the check incremental: only the
    events appended after it are rehashed, once its last event is found unchanged (same id,
    same hash). A dashboard re-checks on every visit this way at the cost of the new events,
    and runs the full check on demand: an edit to an already-verified row that keeps its
    stored hash is caught only by the full check."""
    try:
        key = audit_key(store, create=False)
        cp = read_checkpoint(store)
    except AuditKeyError as exc:
        return ChainReport(False, 0, None, str(exc))
    if cp is not None and key is not None and not hmac.compare_digest(
            cp.mac, checkpoint_mac(key, cp.events, cp.hash)):
        return ChainReport(False, 0, None, f"the audit checkpoint {checkpoint_path(store)} "
                                           f"was altered (its MAC does not match)")
    prev, count, after, unkeyed = GENESIS, 0, None, 0
    with store.session() as s:
        if since is not None and since.ok and since.last_id is not None:
            if s.scalar(sa.select(EventRow.hash).where(EventRow.id == since.last_id)) \
                    != since.last_hash:
                return ChainReport(False, since.events, since.last_id,
                                   f"event {since.last_id}, verified before, was modified or "
                                   f"deleted since")
            prev, count, after = since.last_hash, since.events, since.last_id
            unkeyed = since.unkeyed
        keyed = count > unkeyed
        q = sa.select(*_ROW).order_by(EventRow.id)
        if after is not None:
            q = q.where(EventRow.id > after)
        last_id = after
        for row_id, at, kind, actor, payload, prev_hash, digest, mac in s.execute(q):
            count += 1
            if prev_hash != prev:
                return _broken(count, row_id, f"event {row_id} does not follow the event "
                                              f"before it (a row was deleted or inserted)")
            if digest != event_hash(prev_hash, at, kind, actor, payload):
                return _broken(count, row_id, f"event {row_id} ({kind}) was modified after it "
                                              f"was written")
            if mac is None:
                if keyed:
                    return _broken(count, row_id, f"event {row_id} ({kind}) has no MAC but "
                                                  f"events before it have one (it was "
                                                  f"inserted, its MAC stripped, or written "
                                                  f"by a process without {KEY_ENV})")
                unkeyed += 1
            elif key is None:
                return _broken(count, row_id, f"the events are keyed but no audit key was "
                                              f"found ({key_source(store)}): restore the key "
                                              f"to verify them")
            elif not hmac.compare_digest(mac, event_mac(key, digest)):
                return _broken(count, row_id, f"event {row_id} ({kind}): its MAC does not "
                                              f"match (written or rewritten without the "
                                              f"audit key of {key_source(store)}; every "
                                              f"writer of a shared store must use the same "
                                              f"{KEY_ENV})")
            else:
                keyed = True
            if cp is not None and count == cp.events and digest != cp.hash:
                return _broken(count, row_id, f"event {row_id} is not the event the "
                                              f"checkpoint outside the store recorded at "
                                              f"position {cp.events} (the chain was "
                                              f"rewritten)")
            prev, last_id = digest, row_id
        head = s.get(AuditHeadRow, 1)
    if cp is not None and count < cp.events:
        return ChainReport(False, count, None,
                           f"{cp.events - count} event(s) missing at the end of the chain: "
                           f"the checkpoint outside the store ({checkpoint_path(store)}) "
                           f"records {cp.events} (the newest were deleted)",
                           checkpoint=cp.events)
    if head is not None and (head.events != count or head.head_hash != prev):
        missing = head.events - count
        what = (f"{missing} event(s) missing at the end of the chain (the newest were deleted)"
                if missing > 0 else "the chain does not end where its recorded head says")
        return ChainReport(False, count, None, what)
    return ChainReport(True, count, last_id=last_id, last_hash=prev, unkeyed=unkeyed,
                       checkpoint=cp.events if cp is not None else None)


def _broken(count: int, row_id: int, problem: str) -> ChainReport:
    return ChainReport(False, count, row_id, problem)


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
