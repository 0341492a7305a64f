"""The audit chain's key and checkpoint: the two things kept *outside* mloop's store.

Whoever can write to the store can recompute every sha256 of the chain (the recipe is in
:mod:`mloop.security.audit`) and rewrite ``audit_head`` after deleting the newest events. Two
things stop that, both out of the store's reach:

- the **key** (32 random bytes): each event carries an HMAC-SHA256 of its hash under it, so an
  edited or inserted event cannot be given a valid MAC without the key. It comes from
  ``MLOOP_AUDIT_KEY`` (at least 32 characters: CI, a shared central store) or else from
  ``.mloop/keys/audit.key``, created 0600 on the first event, for a store on this machine
  (SQLite). A central store (PostgreSQL) takes its key from the variable only: without it its
  events are hash-chained but not keyed, and the verifier counts them. :func:`audit_key` is the one
  place a key is loaded, so another key source (a KMS) plugs in there.
- the **checkpoint** (a file beside the key, one per store): the newest event's position and
  hash with an HMAC over both, advanced after every commit that appends an event. Deleting
  the newest events leaves a chain shorter than the checkpoint says, whatever the head row
  claims. It lags only for events whose process died between the commit and the file write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mloop.errors import MloopError
from mloop.security.keys import env_key, read_key_file, write_key_file

KEY_ENV = "MLOOP_AUDIT_KEY"
KEY_FILE = "audit.key"
MIN_KEY_CHARS = 32


class KeyedStore(Protocol):
    """What the key and checkpoint need of a store: its URL and the folder beside it."""

    url: str
    keys_dir: Path | None


class AuditKeyError(MloopError):
    """The audit key cannot be loaded (missing, too short, unreadable)."""


def key_path(store: KeyedStore) -> Path | None:
    """The key file, or None for a store with no keys folder (its key comes from the
    environment)."""
    return store.keys_dir / KEY_FILE if store.keys_dir is not None else None


def is_local(store: KeyedStore) -> bool:
    """A store on this machine's disk (SQLite), whose key may live in a file beside the
    project. A central one is written from several machines, which could not share a file."""
    return store.url.startswith("sqlite:///") and not store.url.endswith(":memory:")


def key_source(store: KeyedStore) -> str:
    """Where the key is looked for, for messages: the variable, then the file."""
    path = key_path(store)
    if path is None or not is_local(store):
        return f"${KEY_ENV} (a central store's writers share it; there is no key file)"
    return f"${KEY_ENV} or {path}"


def audit_key(store: KeyedStore, *, create: bool) -> bytes | None:
    """The key that authenticates the chain of ``store``: ``MLOOP_AUDIT_KEY`` if set, else the
    key file. ``create`` (when writing an event): make the file, 0600, if it does not exist.
    None: no key (without ``create``, or for a central store without the variable: its
    writers on several machines could not share a file; the verifier then says what it
    needs)."""
    env = env_key(KEY_ENV, MIN_KEY_CHARS, lambda n: AuditKeyError(
        f"{KEY_ENV} must hold at least {MIN_KEY_CHARS} characters (got {n}); e.g. "
        f"`python -c 'import secrets; print(secrets.token_hex(32))'`"))
    if env is not None:
        return env
    path = key_path(store)
    if path is None or not is_local(store):
        return None  # a central store: its events are hash-chained, not keyed (see add_event)
    if not path.exists():
        if not create:
            return None
        write_key_file(path, secrets.token_hex(32), exist_ok=True, private_dir=True)
    return read_key_file(
        path, MIN_KEY_CHARS,
        unreadable=lambda exc: AuditKeyError(f"cannot read the audit key {path}: "
                                             f"{getattr(exc, 'strerror', exc)}"),
        too_short=lambda n: AuditKeyError(f"the audit key {path} holds {n} characters, fewer "
                                          f"than {MIN_KEY_CHARS}: it was truncated or replaced"))


def event_mac(key: bytes, event_hash: str) -> str:
    """HMAC-SHA256 of an event's hash: the hash covers the event and, through ``prev_hash``,
    every event before it. (``hmac.digest``: the one-shot C path, ~3x ``hmac.new`` here.)"""
    return hmac.digest(key, event_hash.encode(), "sha256").hex()


@dataclass(frozen=True)
class Checkpoint:
    """The chain's length and newest hash as last written outside the store."""

    events: int
    hash: str
    mac: str


def checkpoint_mac(key: bytes, events: int, head_hash: str) -> str:
    return hmac.new(key, f"checkpoint:{events}:{head_hash}".encode(),
                    hashlib.sha256).hexdigest()


def checkpoint_path(store: KeyedStore) -> Path | None:
    """One file per store (a project may switch stores): named by a digest of the store's
    URL, which is never written out (it may hold a password)."""
    if store.keys_dir is None:
        return None
    tag = hashlib.sha256(store.url.encode()).hexdigest()[:16]
    return store.keys_dir / f"audit-{tag}.checkpoint"


def read_checkpoint(store: KeyedStore) -> Checkpoint | None:
    """The checkpoint, or None when there is none yet. Raises :class:`AuditKeyError` when
    the file is not one mloop wrote."""
    path = checkpoint_path(store)
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        return Checkpoint(int(data["events"]), str(data["hash"]), str(data["mac"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditKeyError(f"the audit checkpoint {path} was altered or damaged (cannot "
                            f"read it: {exc})") from None


def advance_checkpoint(store: KeyedStore, key: bytes, events: int, head_hash: str) -> None:
    """Record ``events``/``head_hash`` as the newest checkpoint unless one at least as far
    along is already there (writers in several processes finish in any order)."""
    path = checkpoint_path(store)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_suffix(".lock")):
        try:
            current = read_checkpoint(store)
        except AuditKeyError:
            current = None  # a damaged file is replaced; the verifier reports the gap
        if current is not None and current.events >= events:
            return
        body = json.dumps({"events": events, "hash": head_hash,
                           "mac": checkpoint_mac(key, events, head_hash)})
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(body)
        os.replace(tmp, path)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

