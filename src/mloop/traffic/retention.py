"""``security.retention``: answered rows and their labels older than the retention are deleted.

A row's age is its event time (``_ts``); a label's is the event time of the request it
labels (encoded in its request id, whose first 12 hex digits are epoch milliseconds, so ids
compare in time order as text). The cutoff is the wall clock minus the retention: a promise
about real time, not the log's own clock (which a replay of old traffic sets in the past,
and which stops when traffic stops).

Segments are handled one at a time as purges handle them (mloop.traffic.purge): a segment
entirely older than the cutoff is deleted, one that straddles it is replaced atomically,
under its own name, by the rows it keeps. A reader sees each segment whole, before or after.
Rows purged to quarantine (``quarantine/purges``) age out the same way, so a later restore
cannot bring them back. The loop controller applies it at the start of each pass;
``mloop data retention`` shows (or with ``--apply`` does) the same.

One ``data.retention`` event records each application that deleted something: the cutoff
and the counts, never the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mloop.project import Project
from mloop.security.audit import append_event
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import (
    parquet_files,
    read_segments,
    rewrite_segment,
    segment_files,
)
from mloop.traffic.labels import forget_latest_labels, label_files
from mloop.traffic.purge import PURGES_DIR


@dataclass
class RetentionResult:
    """What one application of the retention did (or, ``applied`` False, would do)."""

    retention: str
    cutoff: datetime
    applied: bool
    log_rows: int = 0
    log_segments: list[str] = field(default_factory=list)  # deleted or rewritten
    label_rows: int = 0
    label_segments: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"retention": self.retention, "cutoff": self.cutoff.isoformat(),
                "applied": self.applied, "log_rows": self.log_rows,
                "log_segments": len(self.log_segments), "label_rows": self.label_rows,
                "label_segments": len(self.label_segments)}


def apply_retention(project: Project, *, now: datetime | None = None, apply: bool = True,
                    actor: str | None = None) -> RetentionResult | None:
    """Delete (``apply``) or count the log rows and labels older than ``security.retention``
    before ``now`` (default: the wall clock). None when no retention is configured."""
    retention = project.config.security.retention
    if retention is None:
        return None
    cutoff = (now or datetime.now(UTC)).astimezone(UTC) - retention
    log = ObjectStore(project.uris["inference_log_uri"])
    result = RetentionResult(str(retention), cutoff, apply)
    files = segment_files(log, last_day=f"{cutoff:%Y-%m-%d}") + parquet_files(log, PURGES_DIR)
    for path in files:
        n = _drop(log, path, lambda t: _older(t.column("_ts"), cutoff), apply)
        if n:
            result.log_rows += n
            result.log_segments.append(log.relative(path))
    first_kept_id = f"{int(cutoff.timestamp() * 1000):012x}"
    for path in label_files(log):
        n = _drop(log, path, lambda t: pc.less(t.column("_request_id"), first_kept_id), apply)
        if n:
            result.label_rows += n
            result.label_segments.append(log.relative(path))
    if result.label_segments and apply:
        forget_latest_labels(log.uri)
    if apply and (result.log_rows or result.label_rows):
        append_event(project.store, "data.retention", result.to_dict(), actor=actor)
    return result


def _older(ts: pa.ChunkedArray, cutoff: datetime) -> Any:
    return pc.less(ts, pa.scalar(cutoff, ts.type))


def _drop(log: ObjectStore, path: str, older: Any, apply: bool) -> int:
    """Rows of the segment ``path`` that ``older(table)`` marks; removed when ``apply``."""
    tables = read_segments(log, [path])
    if not tables:
        return 0
    table = tables[0]
    mask = pc.fill_null(older(table), False)
    n = int(pc.sum(mask).as_py() or 0)
    if n and apply:
        kept = table.filter(pc.invert(mask))
        rewrite_segment(log, log.relative(path), kept if kept.num_rows else None)
    return n
