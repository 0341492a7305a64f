"""Taking answered rows out of the inference log on purpose, and putting them back.

``purge_rows`` moves the rows with ``start <= _ts < end`` (of one version, if asked) out of
the log into ``<inference_log_uri>/quarantine/purges/<purge id>/``: stray rows that moved the
event clock, a test client's traffic, a replay sent twice. Monitoring, the loop and label
joins stop seeing them at once; ``restore_purge`` puts them back. Both are recorded in the
audit chain (``log.purged``, ``log.purge_restored``) with who, what and why.

Each affected segment is handled on its own: the rows to purge are first written to the
purge folder, then the segment is replaced, under its own name and atomically, by the rows
it keeps (or deleted if it keeps none). A reader of the log sees every row once or not at
all, never half a segment; a crash between the two steps leaves a segment's rows in both
places, never in neither, and a restore skips the rows the log still holds. The manifest
(``manifest.json``, written before the first segment is touched) says what was asked and how
far it got, so even an interrupted purge can be restored.

Rows still in a running server's buffer are not committed yet and so not purged: flush the
server first (``POST /flush``). Labels stay stored by request id and join again on restore.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mloop.errors import MloopError, PurgeNotFoundError
from mloop.project import Project
from mloop.security.audit import append_event
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import read_segments, rewrite_segment, segment_files
from mloop.traffic.quarantine import QUARANTINE_DIR, files_under

PURGES_DIR = f"{QUARANTINE_DIR}/purges"
MANIFEST = "manifest.json"


@dataclass
class PurgeResult:
    """What a purge (or its restore) did. ``segments``: the log segments rewritten, relative
    to the log's root."""

    purge_id: str | None
    status: str  # purged | restored | nothing (no row matched)
    start: datetime
    end: datetime
    version: int | None
    rows: int
    segments: list[str] = field(default_factory=list)
    location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"purge_id": self.purge_id, "status": self.status,
                "from": self.start.isoformat(), "to": self.end.isoformat(),
                "version": self.version, "rows": self.rows, "segments": self.segments,
                "location": self.location}


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def purge_rows(project: Project, *, start: datetime, end: datetime, version: int | None = None,
               reason: str = "", actor: str | None = None) -> PurgeResult:
    """Move the answered rows with ``start <= _ts < end`` (naive times are UTC), of
    ``version`` only if given, from the log to a new purge folder; record a ``log.purged``
    event. A purge that matches no row changes nothing and records nothing (status
    ``nothing``). MloopError if ``start`` is not before ``end``."""
    start, end = _utc(start), _utc(end)
    if start >= end:
        raise MloopError(f"purge: --from {start.isoformat()} must be before --to "
                         f"{end.isoformat()} (the range is from <= event time < to)")
    log = project.log_store
    purge_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    base = f"{PURGES_DIR}/{purge_id}"
    files = segment_files(log, first_day=f"{start:%Y-%m-%d}",
                          last_day=f"{end - timedelta(microseconds=1):%Y-%m-%d}")
    if version is not None:
        files = [f for f in files if f"/version={version}/" in f]
    manifest: dict[str, Any] = {
        "purge_id": purge_id, "from": start.isoformat(), "to": end.isoformat(),
        "version": version, "reason": reason, "status": "purging",
        "created_at": datetime.now(UTC).isoformat(), "segments": []}
    written = False
    done: list[dict[str, Any]] = []
    try:
        for path in files:
            rel = log.relative(path)
            tables = read_segments(log, [path])  # an unreadable one is quarantined, skipped
            if not tables:
                continue
            table = tables[0]
            mask = _matching(table, start, end, version)
            n = int(pc.sum(mask).as_py() or 0)
            if not n:
                continue
            if not written:  # the manifest first: an interrupted purge can still be restored
                _write_manifest(log, base, manifest)
                written = True
            kept = table.filter(pc.invert(mask))
            log.write_parquet(f"{base}/{rel}", table.filter(mask))
            rewrite_segment(log, rel, kept if kept.num_rows else None)
            done.append({"segment": rel, "rows": n, "kept": kept.num_rows})
    except Exception as exc:
        if written:
            _put_back(log, base)
            manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            _write_manifest(log, base, manifest)
        raise MloopError(f"purge {purge_id} failed and was undone: "
                         f"{type(exc).__name__}: {exc}") from exc
    rows = sum(d["rows"] for d in done)
    result = PurgeResult(purge_id if done else None, "purged" if done else "nothing", start,
                         end, version, rows, [d["segment"] for d in done],
                         log.uri_for(base) if done else None)
    if not done:
        return result
    manifest.update(status="purged", rows=rows, segments=done,
                    purged_at=datetime.now(UTC).isoformat())
    _write_manifest(log, base, manifest)
    append_event(project.store, "log.purged",
                 {**{k: manifest[k] for k in ("purge_id", "from", "to", "version", "reason",
                                              "rows")},
                  "segments": result.segments, "location": result.location}, actor=actor)
    return result


def restore_purge(project: Project, purge_id: str, *, actor: str | None = None
                  ) -> PurgeResult:
    """Put a purge's rows back into the segments they came from (rows the log still holds
    are not added twice); record a ``log.purge_restored`` event. PurgeNotFoundError names
    the known purges; restoring twice is an error."""
    log = project.log_store
    base = f"{PURGES_DIR}/{purge_id}"
    manifest = _read_manifest(log, purge_id)
    if manifest.get("status") == "restored":
        raise MloopError(f"purge {purge_id} was already restored at "
                         f"{manifest.get('restored_at')}")
    segments, rows = _put_back(log, base)
    manifest.update(status="restored", restored_at=datetime.now(UTC).isoformat(),
                    restored_rows=rows)
    _write_manifest(log, base, manifest)
    result = PurgeResult(purge_id, "restored", datetime.fromisoformat(manifest["from"]),
                         datetime.fromisoformat(manifest["to"]), manifest.get("version"), rows,
                         segments, log.uri_for(base))
    append_event(project.store, "log.purge_restored",
                 {"purge_id": purge_id, "rows": rows, "segments": segments,
                  "from": manifest["from"], "to": manifest["to"],
                  "version": manifest.get("version")}, actor=actor)
    return result


def list_purges(project: Project) -> list[dict[str, Any]]:
    """Every purge's manifest (id, range, version, reason, status, rows), oldest first."""
    log = project.log_store
    out = []
    for path in files_under(log, PURGES_DIR, MANIFEST):
        out.append(json.loads(log.read_bytes(log.relative(path))))
    return sorted(out, key=lambda m: m.get("created_at", ""))


def _matching(table: pa.Table, start: datetime, end: datetime, version: int | None
              ) -> pa.ChunkedArray:
    ts = table.column("_ts")
    mask = pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)),
                   pc.less(ts, pa.scalar(end, ts.type)))
    if version is not None:
        mask = pc.and_(mask, pc.equal(table.column("_version"), version))
    return pc.fill_null(mask, False)


def _write_manifest(log: ObjectStore, base: str, manifest: dict[str, Any]) -> None:
    log.write_bytes(f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())


def _read_manifest(log: ObjectStore, purge_id: str) -> dict[str, Any]:
    rel = f"{PURGES_DIR}/{purge_id}/{MANIFEST}"
    if "/" in purge_id or not log.exists(rel):
        known = [m["purge_id"] for m in _manifests(log)]
        raise PurgeNotFoundError(f"no purge '{purge_id}' in {log.uri_for(PURGES_DIR)} "
                                 f"(known: {', '.join(known) or 'none'})")
    return dict(json.loads(log.read_bytes(rel)))


def _manifests(log: ObjectStore) -> list[dict[str, Any]]:
    return [json.loads(log.read_bytes(log.relative(p)))
            for p in files_under(log, PURGES_DIR, MANIFEST)]


def _put_back(log: ObjectStore, base: str) -> tuple[list[str], int]:
    """Merge every purged part under ``base`` back into its segment, then delete the part:
    (segments rewritten, rows added). Rows the segment still holds are not added again, so
    running it twice, or after an interrupted purge, never duplicates a row."""
    segments: list[str] = []
    added = 0
    prefix = f"{base}/"
    for path in files_under(log, base, ".parquet"):
        part_rel = log.relative(path)
        rel = part_rel.removeprefix(prefix)
        purged = log.read_parquet(part_rel)
        current = read_segments(log, [log.path(rel)]) if log.exists(rel) else []
        if current:
            held = current[0].column("_request_id")
            purged = purged.filter(pc.invert(pc.is_in(purged.column("_request_id"),
                                                      value_set=held.combine_chunks())))
            merged = pa.concat_tables([current[0], purged], promote_options="permissive")
        else:
            merged = purged
        if purged.num_rows:
            rewrite_segment(log, rel, merged)
            segments.append(rel)
            added += purged.num_rows
        log.delete(part_rel)
    return segments, added
