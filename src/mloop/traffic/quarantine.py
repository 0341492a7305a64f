"""The inference log's quarantine: what could not stay in the log, kept beside it instead.

Nothing the log acknowledged disappears without a trace, and nothing unreadable stops a
reader. Under ``<inference_log_uri>/quarantine/`` (a folder no log or label reader lists):

    rows/part-<ms>-<pid>-<seq>.jsonl   entries a commit could not store as Parquet, one
                                       LogEntry per JSON line, values exactly as received
                                       (``read_quarantined_entries`` gives them back)
    segments/<original path>           log or label segments no reader could open, moved
                                       unchanged (bytes as found, for a post-mortem)
    purges/<purge id>/...              rows taken out on purpose (mloop.traffic.purge)

Each rows file and each moved segment gets a note ``<file>.pending.json`` saying what happened
and why. Damage is found by whichever process reads first (a server answering /feedback, a
monitor, a label import), and not all of them hold mloop's store; so the audit events are
written by :func:`record_quarantine_events`, which the store-holding entry points call (the
monitor, the loop's clock, label ingest): each pending note becomes one ``log.<kind>`` event
(``log.rows_quarantined``, ``log.segment_quarantined``) and the note is renamed ``<file>.json``.
A note is claimed by that rename before its event is written, so two processes recording at
once do not write the event twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mloop.errors import SealedDataError
from mloop.storage import ObjectStore

if TYPE_CHECKING:
    from mloop.store.db import Store

log = logging.getLogger("mloop.serving")

QUARANTINE_DIR = "quarantine"
ROWS_DIR = f"{QUARANTINE_DIR}/rows"
SEGMENTS_DIR = f"{QUARANTINE_DIR}/segments"
PENDING = ".pending.json"


def write_note(store: ObjectStore, rel: str, kind: str, payload: dict[str, Any]) -> None:
    """The pending note next to a quarantined file ``rel``: what happened, when, and why."""
    body = {"kind": kind, "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "file": rel, "uri": store.uri_for(rel), **payload}
    store.write_bytes(rel + PENDING, json.dumps(body, default=str).encode())


def files_under(store: ObjectStore, rel: str, suffix: str = "") -> list[str]:
    """Full paths of the files under ``rel`` (recursively) whose names end with ``suffix``,
    skipping the temporary names of writes in progress."""
    sel = pafs.FileSelector(store.path(rel), recursive=True, allow_not_found=True)
    return sorted(i.path for i in store.fs.get_file_info(sel)
                  if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
                  and not i.base_name.startswith(".tmp-"))


# ------------------------------------------------------------------------ damaged segments

def damage(store: ObjectStore, path: str) -> str | None:
    """Why the Parquet file at ``path`` cannot be read, or None if it can (the earlier
    failure was the store's, not the file's). The bytes are fetched once and parsed in
    memory, so a failing network or disk (OSError while fetching, raised to the caller) is
    never mistaken for a damaged file. A sealed file (encryption at rest) is opened first: a
    missing or wrong key is raised (EncryptionKeyError: the file is fine), a sealed file
    whose contents do not verify is damaged."""
    with store.fs.open_input_file(path) as f:
        raw = f.read()
    try:
        pq.read_table(pa.BufferReader(store.decode(bytes(raw), path)))
    except (pa.ArrowException, OSError, SealedDataError) as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def quarantine_segment(store: ObjectStore, path: str, reason: str) -> str | None:
    """Move the unreadable segment at ``path`` (a full path from a listing) to
    ``quarantine/segments/`` under the same relative name and leave a pending note; the new
    relative path, or None if another process moved it first."""
    rel = store.relative(path)
    dest = f"{SEGMENTS_DIR}/{rel}"
    size = store.size(rel) if store.exists(rel) else 0
    try:
        store.move(rel, dest)
    except FileNotFoundError:
        return None
    write_note(store, dest, "segment_quarantined",
               {"segment": rel, "moved_to": dest, "bytes": size, "reason": reason})
    log.error("inference log: segment %s cannot be read (%s); moved to %s", rel, reason,
              store.uri_for(dest))
    return dest


def read_or_quarantine(store: ObjectStore, path: str, read: Callable[[], pa.Table]
                       ) -> pa.Table | None:
    """``read()`` the segment at ``path``; None, instead of an error, when the file is gone
    (moved by another reader or a purge since it was listed) or damaged (then it is moved
    to quarantine first). Failures of the store itself propagate."""
    try:
        return read()
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError, SealedDataError):
        try:
            why = damage(store, path)
        except FileNotFoundError:
            return None
        if why is None:
            raise
        quarantine_segment(store, path, why)
        return None


def quarantined_segments(store: ObjectStore) -> list[str]:
    """Relative paths of the segments in quarantine, oldest name first."""
    return [store.relative(p) for p in files_under(store, SEGMENTS_DIR, ".parquet")]


# ------------------------------------------------------------------------------ audit events

def record_quarantine_events(log_store: ObjectStore, store: Store, *,
                             actor: str | None = None) -> list[dict[str, Any]]:
    """Write one audit event per pending note (``log.segment_quarantined`` names the segment
    and where it went; ``log.rows_quarantined`` the rows file, its row count and the reason)
    and mark the notes recorded. Returns the events' payloads. Cheap when there is nothing
    to record: one listing of the quarantine folder."""
    from mloop.security.audit import append_event

    out: list[dict[str, Any]] = []
    for full in files_under(log_store, QUARANTINE_DIR, PENDING):
        pending = log_store.relative(full)
        done = pending.removesuffix(PENDING) + ".json"
        try:
            log_store.move(pending, done)  # claim: only one recorder gets each note
        except FileNotFoundError:
            continue
        try:
            note = json.loads(log_store.read_bytes(done))
        except (json.JSONDecodeError, UnicodeDecodeError):
            note = {"kind": "note_unreadable", "file": pending.removesuffix(PENDING)}
        kind = str(note.pop("kind", "quarantined"))
        try:
            append_event(store, f"log.{kind}", note, actor=actor)
        except Exception:
            log_store.move(done, pending)  # give the note back for the next recorder
            raise
        recorded = datetime.now(UTC).isoformat(timespec="milliseconds")
        log_store.write_bytes(done, json.dumps({"kind": kind, **note, "recorded_at": recorded},
                                               default=str).encode())
        out.append({"kind": f"log.{kind}", **note})
    return out
