"""The inference log: every scored row, appended off the request path, committed in groups.

A request only appends its rows to an in-memory buffer (a lock and a list extend). A background
thread commits the buffer every ``commit_interval_seconds``: rows are grouped by day and
version and each group becomes one Parquet segment,

    <inference_log_uri>/day=YYYY-MM-DD/version=V/part-<first ts>-<pid>-<seq>.parquet

written to a temporary name and renamed into place, so a reader never sees a torn file. A
clean stop (SIGTERM, lifespan shutdown) commits everything; a ``kill -9`` loses at most what
arrived since the last commit, and every segment already on disk stays readable.

Columns: ``_request_id``, ``_ts`` (event time, UTC), ``_version``, ``_role`` (champion,
canary, shadow), ``_latency_ms``, ``_prediction``, ``_key`` (routing key or null), for a
classifier with probabilities one float64 ``_proba_<class>`` column per class (a column per
class rather than one list column: each segment names its own classes, segments of versions
with different classes concatenate by name, and DuckDB or pandas read them with no decoding;
logs written before these columns, or by a model without probabilities, simply lack them),
then one column per model input under its own name. The leading underscore keeps mloop's
columns out of the features' namespace.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from mloop.storage import ObjectStore

log = logging.getLogger("mloop.serving")

META_COLUMNS = ("_request_id", "_ts", "_version", "_role", "_latency_ms", "_prediction", "_key")
PROBA_PREFIX = "_proba_"
LABELS_DIR = "labels"


def new_request_id(ts: float) -> str:
    """Time-ordered id: 12 hex digits of epoch milliseconds + 12 random hex digits. The day a
    row was logged under can be read back from its id (labels use that to find it)."""
    return f"{int(ts * 1000):012x}{secrets.token_hex(6)}"


def id_day(request_id: str) -> str | None:
    """``YYYY-MM-DD`` of the event time encoded in a request id, or None if it is not one."""
    if len(request_id) != 24:
        return None
    try:
        ms = int(request_id[:12], 16)
        int(request_id[12:], 16)
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d")
    except (ValueError, OverflowError, OSError):
        return None


@dataclass
class LogEntry:
    """One answered request, kept column-wise: the request path builds no per-row objects,
    and the writer turns many entries into Arrow columns with short calls that let the event
    loop run in between (one large conversion would hold the GIL for tens of ms)."""

    ids: list[str]
    ts: float
    version: int
    role: str
    latency_ms: float
    predictions: list[Any]
    cols: dict[str, list]
    key: str | None = None
    probabilities: list[list[float]] | None = None  # per row, in ``classes`` order
    classes: list[Any] | None = None

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.ts, UTC).strftime("%Y-%m-%d")


class InferenceLog:
    """Buffer + background group commit. ``append`` is safe from any thread."""

    def __init__(self, uri: str, *, commit_interval: float = 1.0, max_queue: int = 100_000,
                 on_write: Callable[[int], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        self.store = ObjectStore(uri)
        self.commit_interval = commit_interval
        self.max_queue = max_queue
        self._entries: list[LogEntry] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()  # one commit at a time (interval, flush, close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._recent_ids: set[str] = set()  # uncommitted ids, so early feedback finds them
        self._on_write = on_write
        self._on_queue = on_queue
        self.dropped = 0
        self.rejected = 0  # rows no partition or Arrow type could hold (bugs, not load)
        self.written = 0
        self.segments = 0
        self.failures = 0

    # ------------------------------------------------------------------------- producer side

    def append(self, entry: LogEntry) -> bool:
        """Add a request's rows to the next commit; False (nothing added) when full."""
        n = len(entry.ids)
        with self._lock:
            if self._rows + n > self.max_queue:
                self.dropped += n
                return False
            self._entries.append(entry)
            self._rows += n
            self._recent_ids.update(entry.ids)
        return True

    def pending(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._recent_ids

    @property
    def queued(self) -> int:
        with self._lock:
            return self._rows

    # ------------------------------------------------------------------------- writer side

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mloop-inference-log",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Commit everything buffered and stop the writer (idempotent)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.commit()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.commit_interval)
            self._wake.clear()
            try:
                self.commit()
            except Exception:  # keep logging alive; the rows stay queued for the next try
                self.failures += 1
                log.exception("inference log commit failed; retrying at the next interval")

    def commit(self) -> int:
        """Write everything buffered now as one segment per (day, version)."""
        with self._commit_lock:
            return self._commit()

    def _commit(self) -> int:
        with self._lock:
            entries, self._entries = self._entries, []
            count, self._rows = self._rows, 0
        if not entries:
            return 0
        groups: dict[tuple[str, int], list[LogEntry]] = defaultdict(list)
        for e in entries:
            try:
                groups[(e.day, e.version)].append(e)
            except (ValueError, OverflowError, OSError):  # a time no partition can hold
                self.rejected += len(e.ids)
                count -= len(e.ids)
                log.error("inference log: dropped %d row(s) with an impossible event time %r",
                          len(e.ids), e.ts)
        pending = sorted(groups.items())
        try:
            while pending:
                (day, version), part = pending[0]
                try:
                    table = _to_table(part)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                    # rows Arrow cannot hold would block every later commit: set them aside
                    self.rejected += sum(len(e.ids) for e in part)
                    count -= sum(len(e.ids) for e in part)
                    log.error("inference log: dropped %d row(s) that cannot be stored: %s",
                              sum(len(e.ids) for e in part), exc)
                    pending.pop(0)
                    continue
                self._seq += 1
                name = (f"day={day}/version={version}/part-{int(time.time() * 1000):013d}-"
                        f"{os.getpid()}-{self._seq:06d}.parquet")
                self.store.write_parquet(name, table)
                self.segments += 1
                self.written += sum(len(e.ids) for e in part)
                pending.pop(0)
        except Exception:
            # only the groups not yet written go back (in front, in order): no duplicates
            unwritten = [e for _, part in pending for e in part]
            with self._lock:
                self._entries[:0] = unwritten
                self._rows += sum(len(e.ids) for e in unwritten)
            raise
        with self._lock:
            for e in entries:
                self._recent_ids.difference_update(e.ids)
            size = self._rows
        if self._on_write is not None:
            self._on_write(count)
        if self._on_queue is not None:
            self._on_queue(size)
        return count


def _to_table(entries: list[LogEntry]) -> pa.Table:
    """Entries of one (day, version) → one table, column by column."""
    def flat(get: Callable[[LogEntry], list]) -> list:
        return [v for e in entries for v in get(e)]

    def rep(get: Callable[[LogEntry], Any]) -> list:
        return [get(e) for e in entries for _ in e.ids]

    ts_us = [int(e.ts * 1_000_000) for e in entries for _ in e.ids]
    columns: dict[str, pa.Array] = {
        "_request_id": pa.array(flat(lambda e: e.ids), pa.string()),
        "_ts": pa.array(ts_us, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "_version": pa.array(rep(lambda e: e.version), pa.int64()),
        "_role": pa.array(rep(lambda e: e.role), pa.string()),
        "_latency_ms": pa.array(rep(lambda e: e.latency_ms), pa.float64()),
        "_prediction": pa.array(flat(lambda e: e.predictions)),
        "_key": pa.array(rep(lambda e: e.key), pa.string()),
    }
    # a version's entries share its classes: the first entry with probabilities names them
    classes = next((e.classes for e in entries if e.probabilities is not None), None) or []
    for j, c in enumerate(classes):
        values: list[float | None] = []
        for e in entries:
            if e.probabilities is None:
                values += [None] * len(e.ids)
            else:
                values += [row[j] for row in e.probabilities]
        columns[f"{PROBA_PREFIX}{c}"] = pa.array(values, pa.float64())
    names: list[str] = []
    for e in entries:  # inputs in signature order; a version's entries share one signature
        for name in e.cols:
            if name not in columns and name not in names:
                names.append(name)
    for name in names:
        columns[name] = pa.array([v for e in entries
                                  for v in e.cols.get(name, [None] * len(e.ids))])
    return pa.table(columns)


def segment_files(store: ObjectStore, *, first_day: str | None = None,
                  last_day: str | None = None) -> list[str]:
    """Full paths of the committed answer segments (not labels, not temporary files), only
    from the ``day=`` folders within [first_day, last_day] when given: the one place that
    knows the log's layout."""
    import pyarrow.fs as pafs

    out = []
    for day in log_days(store):
        if (first_day and day < first_day) or (last_day and day > last_day):
            continue
        sel = pafs.FileSelector(store.path(f"day={day}"), recursive=True,
                                allow_not_found=True)
        out += [i.path for i in store.fs.get_file_info(sel)
                if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                and not i.base_name.startswith(".tmp-")]
    return sorted(out)


class _SegmentCache:
    """Segments already read, by full path, least recently used dropped beyond a byte budget
    (``MLOOP_SEGMENT_CACHE_MB``, default 256). Segments are immutable (written once under a
    unique name, never rewritten), so a cached copy can never be stale: a controller pass or a
    monitor that rereads the log only pays for the segments committed since its last read."""

    def __init__(self) -> None:
        from collections import OrderedDict

        self.tables: OrderedDict[tuple[str, str], pa.Table] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def read(self, store: ObjectStore, path: str) -> pa.Table:
        import pyarrow.dataset as ds

        key = (store.uri, path)
        with self.lock:
            hit = self.tables.get(key)
            if hit is not None:
                self.tables.move_to_end(key)
                return hit
        table = ds.dataset(path, filesystem=store.fs, format="parquet").to_table()
        budget = float(os.environ.get("MLOOP_SEGMENT_CACHE_MB", "256")) * 2**20
        with self.lock:
            if table.nbytes <= budget and key not in self.tables:
                self.tables[key] = table
                self.bytes += table.nbytes
                while self.bytes > budget:
                    _, old = self.tables.popitem(last=False)
                    self.bytes -= old.nbytes
        return table


_SEGMENTS = _SegmentCache()


def read_segments(store: ObjectStore, files: list[str]) -> list[pa.Table]:
    """The tables of these segment files (log or label segments), from the cache when read
    before."""
    return [_SEGMENTS.read(store, f) for f in files]


def log_days(store: ObjectStore) -> list[str]:
    """The days (``YYYY-MM-DD``) the log holds answers for, oldest first."""
    return sorted(name.removeprefix("day=") for name in store.listdir()
                  if name.startswith("day="))


def read_log(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed row (all days, all versions) as one table; columns missing from some
    segments are null there. Partition folders are not added as columns (``_version`` and
    ``_ts`` already carry them)."""

    store = ObjectStore(uri)
    files = segment_files(store)
    if not files:
        return pa.table({c: pa.array([], pa.null()) for c in (columns or META_COLUMNS)})
    table = pa.concat_tables(read_segments(store, files), promote_options="permissive")
    return table.select(columns) if columns else table
