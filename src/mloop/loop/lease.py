"""The controller's lease: at most one controller acts for a model at any moment.

The state's revision check (``save_state``) notices a second controller only when it saves,
after it may already have retrained, deployed a canary or promoted; a Kubernetes CronJob's
``concurrencyPolicy: Forbid`` covers that one CronJob, not a second one, an Airflow task, a
``mloop loop`` left running on a laptop or a pass started by hand. So before a pass acts it
takes the model's lease: one row of ``loop_leases`` in mloop's store (holder, generation,
expiry), shared by every controller whatever runs it.

- **Taken atomically**, by one compare-and-swap that works the same on SQLite and PostgreSQL:
  insert the row if there is none (the primary key lets one insert win), else replace it only
  if its ``generation`` is still the one read and it was released or has expired. The loser
  re-reads and finds the winner's live lease. ``generation`` grows with every new holder: a
  fencing token, checked again when the state is saved (:meth:`LoopLease.verify`).
- **Renewed while its holder lives**: a daemon thread pushes the expiry forward every third
  of the lease, so a retrain longer than the lease keeps it. A holder that is killed
  (``kill -9``, OOM, its node gone) stops renewing and its lease frees itself ``loop.lease``
  after the last renewal; the next controller takes it over and records
  ``loop.lease_taken_over`` naming the holder that never released it.
- **Lost, not stolen**: a holder whose renewals failed until the expiry (the store was
  unreachable, the process was paused) finds the lease lost at its next check and stops acting
  (:class:`~mloop.errors.LeaseLostError`); it never takes a live lease from another.

Expiry times are the holders' own UTC clocks: controllers on different hosts need clocks in
step to well within a lease (NTP), as any lease over a shared database does.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from mloop.errors import LeaseHeldError, LeaseLostError
from mloop.security.audit import append_event
from mloop.store.db import as_utc, utcnow
from mloop.store.models import LoopLeaseRow

if TYPE_CHECKING:
    from types import TracebackType

    from sqlalchemy.orm import Session

    from mloop.project import Project
    from mloop.store.db import Store

__all__ = ["LeaseRecord", "LoopLease", "default_holder", "read_lease"]

_T = LoopLeaseRow
_COLUMNS = (_T.model, _T.holder, _T.generation, _T.acquired_at, _T.renewed_at, _T.expires_at,
            _T.released_at)


def default_holder() -> str:
    """``host:pid:random``: names the process in messages, and differs for a restarted one
    (a new process must not inherit a lease it cannot know it still holds)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class LeaseRecord:
    """The lease row as read: who holds (or last held) it, and until when."""

    model: str
    holder: str
    generation: int
    acquired_at: datetime
    renewed_at: datetime
    expires_at: datetime
    released_at: datetime | None

    def live(self, now: datetime) -> bool:
        return self.released_at is None and self.expires_at > now

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.isoformat() if isinstance(v, datetime) else v)
                for k, v in self.__dict__.items()}


def _record(row: Any) -> LeaseRecord:
    return LeaseRecord(row.model, row.holder, row.generation, as_utc(row.acquired_at),
                       as_utc(row.renewed_at), as_utc(row.expires_at), as_utc(row.released_at))


def _read(conn: sa.Connection | Session, model: str) -> LeaseRecord | None:
    row = conn.execute(sa.select(*_COLUMNS).where(_T.model == model)).first()
    return _record(row) if row is not None else None


def read_lease(store: Store, model: str) -> LeaseRecord | None:
    """The lease row of ``model`` (None: no controller ever took it)."""
    with store.engine.connect() as conn:
        return _read(conn, model)


def _span(length: timedelta) -> str:
    seconds = max(0, round(length.total_seconds()))
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m {s:02d}s" if minutes else f"{s}s"


class _Raced(Exception):
    """Another controller changed the row between this one's read and write: read again."""


class LoopLease:
    """The right to act for one model's controller, held by this process.

    ``with LoopLease.of(project) as lease:`` takes it (LeaseHeldError naming the holder and
    its expiry when another controller has it), renews it in the background and releases it
    on the way out, so the next controller need not wait for it to expire.
    """

    def __init__(self, store: Store, model: str, *, duration: timedelta,
                 holder: str | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.store, self.model, self.duration = store, model, duration
        self.holder = holder or default_holder()
        self.clock = clock
        self.generation: int | None = None  # set while held
        self.expires_at: datetime | None = None
        # the lease this one replaced when its holder never released it (killed, lost)
        self.taken_over: LeaseRecord | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, project: Project, *, holder: str | None = None) -> LoopLease:
        """The lease of the project's model, for ``loop.lease``."""
        return cls(project.store, project.config.model_name,
                   duration=project.config.loop.lease, holder=holder)

    # ------------------------------------------------------------------------- taking it
    def acquire(self) -> LoopLease:
        """Take the lease, or raise LeaseHeldError if another controller holds it."""
        for _ in range(10):
            try:
                held = self._attempt()
            except (_Raced, sa.exc.IntegrityError):
                continue  # another controller wrote first: its lease is what to read now
            if held is not None:
                raise self._held_error(held)
            if self.taken_over is not None:
                previous = self.taken_over
                append_event(self.store, "loop.lease_taken_over", {
                    "model": self.model, "holder": self.holder,
                    "generation": self.generation, "previous": previous.to_dict(),
                    "reason": f"{previous.holder} stopped renewing the lease at "
                              f"{previous.renewed_at.isoformat(timespec='seconds')} and "
                              f"never released it (killed, or lost the store); it expired "
                              f"at {previous.expires_at.isoformat(timespec='seconds')}"},
                    actor="mloop-loop")
            return self
        raise LeaseLostError(f"could not take the loop lease of '{self.model}': it changed "
                             f"hands ten times while this controller tried")

    def _begin(self) -> Any:
        # SQLite: BEGIN IMMEDIATE, so the read below is the one the write is based on (a
        # deferred BEGIN lets two readers race and one fails with "database is locked")
        return self.store.engine.connect().execution_options(immediate=True)

    def _attempt(self) -> LeaseRecord | None:
        """One read-then-swap; the live lease of another holder, or None once taken."""
        now = self.clock()
        expires = now + self.duration
        values: dict[str, Any] = {"holder": self.holder, "acquired_at": now, "renewed_at": now,
                                  "expires_at": expires, "released_at": None}
        with self._begin() as conn, conn.begin():
            current = _read(conn, self.model)
            if current is None:
                conn.execute(sa.insert(_T).values(model=self.model, generation=1,
                                                      **values))
                generation = 1
            elif current.live(now) and current.holder != self.holder:
                return current
            else:
                generation = current.generation + 1
                swapped = conn.execute(sa.update(_T).where(
                    _T.model == self.model,
                    _T.generation == current.generation).values(
                    generation=generation, **values))
                if swapped.rowcount != 1:
                    raise _Raced()
        self.generation, self.expires_at, self._lost = generation, expires, None
        self.taken_over = current if current is not None and current.released_at is None \
            and current.holder != self.holder else None
        return None

    def _held_error(self, held: LeaseRecord) -> LeaseHeldError:
        now = self.clock()
        return LeaseHeldError(
            f"the loop lease of '{self.model}' is held by {held.holder} until "
            f"{held.expires_at.isoformat(timespec='seconds')} ({_span(held.expires_at - now)} "
            f"from now; taken {held.acquired_at.isoformat(timespec='seconds')}, last renewed "
            f"{held.renewed_at.isoformat(timespec='seconds')}): another controller is acting "
            f"for '{self.model}', so this one did nothing. A holder that was killed frees the "
            f"lease when it expires (loop.lease: {self.duration})",
            model=self.model, holder=held.holder, acquired_at=held.acquired_at,
            expires_at=held.expires_at)

    # ------------------------------------------------------------------------ keeping it
    def renew(self) -> None:
        """Push the expiry one lease ahead; LeaseLostError if the lease is no longer ours."""
        if self.generation is None:
            raise LeaseLostError(f"the loop lease of '{self.model}' is not held by "
                                 f"{self.holder}")
        now = self.clock()
        with self._begin() as conn, conn.begin():
            renewed = conn.execute(sa.update(_T).where(
                _T.model == self.model, _T.holder == self.holder,
                _T.generation == self.generation,
                _T.released_at.is_(None)).values(
                renewed_at=now, expires_at=now + self.duration))
        if renewed.rowcount != 1:
            self._lost = (f"the loop lease of '{self.model}' was taken by another controller "
                          f"after {self.holder}'s lease expired")
            raise LeaseLostError(self._lost)
        self.expires_at = now + self.duration

    def ensure(self) -> None:
        """LeaseLostError unless this process still holds the lease (no store access: the
        renewal thread's verdict and the local clock against the last expiry written)."""
        if self._lost is not None:
            raise LeaseLostError(f"{self._lost}: this controller stops acting")
        if self.expires_at is None or self.generation is None:
            raise LeaseLostError(f"the loop lease of '{self.model}' is not held by "
                                 f"{self.holder}")
        if self.clock() >= self.expires_at:
            raise LeaseLostError(
                f"the loop lease of '{self.model}' expired at "
                f"{self.expires_at.isoformat(timespec='seconds')} before {self.holder} could "
                f"renew it (the store unreachable, or this process paused): this controller "
                f"stops acting")

    def verify(self, session: Session) -> None:
        """Inside a transaction about to save the loop state: the row still names this
        holder and generation (the fencing check), and the lease has not run out."""
        current = _read(session, self.model)
        if current is None or current.holder != self.holder \
                or current.generation != self.generation or current.released_at is not None:
            who = "nobody" if current is None else current.holder
            self._lost = (f"the loop lease of '{self.model}' is now held by {who}, not "
                          f"{self.holder}")
        self.ensure()

    def _renew_until_stopped(self) -> None:
        interval = self.duration.total_seconds() / 3
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLostError:
                return
            except sa.exc.SQLAlchemyError:
                continue  # the store hiccuped: try again; ensure() sees the expiry if it lasts

    def start_renewing(self) -> None:
        """Renew every third of the lease in a daemon thread (it dies with the process, so a
        killed controller's lease runs out)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                        name=f"mloop-lease-{self.model}")
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        """Stop renewing and free the lease now (if it is still ours)."""
        self.stop_renewing()
        if self.generation is None:
            return
        now = self.clock()
        with self._begin() as conn, conn.begin():
            conn.execute(sa.update(_T).where(
                _T.model == self.model, _T.holder == self.holder,
                _T.generation == self.generation).values(released_at=now,
                                                               expires_at=now))
        self.generation, self.expires_at = None, None

    def __enter__(self) -> LoopLease:
        self.acquire()
        try:
            self.start_renewing()
        except BaseException:  # SIGTERM (SystemExit) or Ctrl-C: __exit__ will not run
            self.release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.release()
        except sa.exc.SQLAlchemyError:
            if exc is None:
                raise  # else the pass's own error says more; the lease expires by itself
