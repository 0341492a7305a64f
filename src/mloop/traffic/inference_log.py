"""The inference log: every scored row, appended off the request path, committed in groups.

A request only appends its rows to an in-memory buffer (a lock and a list extend). A background
thread commits the buffer every ``commit_interval_seconds``: rows are grouped by day and
version and each group becomes one Parquet segment,

    <inference_log_uri>/day=YYYY-MM-DD/version=V/part-<first ts>-<pid>-<seq>.parquet

written to a temporary name and renamed into place, so a reader never sees a torn file. A
clean stop (SIGTERM, lifespan shutdown) commits everything; a ``kill -9`` loses at most what
arrived since the last commit, and every segment already on disk stays readable.

No acknowledged row is lost silently. A group whose values Arrow cannot make columns of (an
integer beyond 2^53 among doubles, an object where a number belongs) is converted entry by
entry: the entries that cannot be stored, and only those, go to a JSON-lines file under
``quarantine/rows/`` with everything needed to append them again, and are counted
(``CommitReport.quarantined``, ``on_quarantine``). A segment a reader cannot open is moved to
``quarantine/segments/`` and the reader goes on with the rest (mloop.traffic.quarantine).

Columns: ``_request_id``, ``_ts`` (event time, UTC), ``_version``, ``_role`` (champion,
canary, shadow), ``_latency_ms``, ``_prediction``, ``_key`` (routing key or null), for a
classifier with probabilities one float64 ``_proba_<class>`` column per class (a column per
class rather than one list column: each segment names its own classes, segments of versions
with different classes concatenate by name, and DuckDB or pandas read them with no decoding;
logs written before these columns, or by a model without probabilities, simply lack them),
then one column per model input under its own name. The leading underscore keeps mloop's
columns out of the features' namespace.

What serving cost is kept with the rows: each segment's Parquet metadata holds
``mloop.cpu_seconds`` (the writing process's CPU time since its previous commit, from its
first logged row on, shared among the commit's segments by their rows: model, HTTP and
logging included) and ``mloop.rows`` (its rows when written; a purge may later remove some),
so ``mloop cost`` prices each version's predictions after the server has stopped
(:func:`segment_usage`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import chain, count
from operator import attrgetter, itemgetter
from typing import Any

import pyarrow as pa

from mloop.storage import ObjectStore, as_store
from mloop.traffic.quarantine import ROWS_DIR, read_or_quarantine, write_note

# segment numbers, shared by every log in this process: two logs (two servers in one
# process, or a log reopened) committing within one millisecond named their first segments
# alike, and the second overwrote the first (rows acknowledged, then lost)
_SEGMENT_NUMBERS = count(1)

log = logging.getLogger("mloop.serving")

META_COLUMNS = ("_request_id", "_ts", "_version", "_role", "_latency_ms", "_prediction", "_key")
PROBA_PREFIX = "_proba_"
LABELS_DIR = "labels"
CPU_KEY = b"mloop.cpu_seconds"  # segment metadata: the CPU-seconds its rows are charged
ROWS_KEY = b"mloop.rows"  # segment metadata: its rows when committed


class _RandomHex:
    """Random hex digits from the OS's source (what ``secrets`` reads), taken 64 KiB at a
    time: one read per request id cost a system call per request (~1 µs, a few % of a
    one-row request's CPU). Safe from any thread; a forked child starts with an empty
    buffer, so two processes never hand out the same digits."""

    CHUNK = 1 << 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digits = ""
        self._pos = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._digits, self._pos = "", 0

    def take(self, n: int) -> str:
        with self._lock:
            if self._pos + n > len(self._digits):
                self._digits = os.urandom(max(self.CHUNK, n // 2 + 1)).hex()
                self._pos = 0
            out = self._digits[self._pos:self._pos + n]
            self._pos += n
        return out


# the process's one buffer (like the random module's own state): ids must not repeat
_RANDOM = _RandomHex()


def new_request_id(ts: float) -> str:
    """Time-ordered id: 12 hex digits of epoch milliseconds + 12 random hex digits. The day a
    row was logged under can be read back from its id (labels use that to find it)."""
    return f"{int(ts * 1000):012x}{_RANDOM.take(12)}"


def new_request_ids(ts: float, n: int) -> list[str]:
    """``n`` ids in :func:`new_request_id`'s format."""
    if n == 1:
        return [new_request_id(ts)]
    prefix = f"{int(ts * 1000):012x}"
    rand = _RANDOM.take(12 * n)
    return [prefix + rand[i:i + 12] for i in range(0, 12 * n, 12)]


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


@dataclass
class CommitReport:
    """What one commit did with the rows it took from the buffer: every row is either in a
    log segment or in a quarantine file, never neither."""

    written: int = 0
    quarantined: int = 0
    segments: int = 0
    quarantine_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"committed_rows": self.written, "quarantined_rows": self.quarantined,
                "segments": self.segments, "quarantine_files": self.quarantine_files}


class InferenceLog:
    """Buffer + background group commit. ``append`` is safe from any thread.

    ``on_write(n)`` and ``on_quarantine(n)`` are called after each commit with the rows it
    wrote to segments and the rows it set aside in quarantine (for the server's
    ``mloop_inference_log_rows_total{outcome=...}``); ``on_queue(n)`` with the rows still
    buffered."""

    def __init__(self, uri: str | ObjectStore, *, commit_interval: float = 1.0,
                 max_queue: int = 100_000,
                 on_write: Callable[[int], None] | None = None,
                 on_queue: Callable[[int], None] | None = None,
                 on_quarantine: Callable[[int], None] | None = None) -> None:
        self.store = as_store(uri)  # the project's log_store seals segments at rest
        self.commit_interval = commit_interval
        self.max_queue = max_queue
        self._entries: list[LogEntry] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()  # one commit at a time (interval, flush, close)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recent_ids: set[str] = set()  # uncommitted ids, so early feedback finds them
        self._on_write = on_write
        self._on_queue = on_queue
        self._on_quarantine = on_quarantine
        self.dropped = 0
        self.quarantined = 0  # rows no partition or Arrow type could hold (bugs, not load)
        self.written = 0
        self.segments = 0
        self.failures = 0
        self._cpu_mark: float | None = None  # process CPU time at the last commit's start

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
            if self._cpu_mark is None:  # serving cost counts from the first logged row
                self._cpu_mark = time.process_time()
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
        """Write everything buffered now as one segment per (day, version); the rows
        written (see :meth:`commit_report` for the rows set aside too)."""
        return self.commit_report().written

    def commit_report(self) -> CommitReport:
        """Commit now and say where every row went: segments, or quarantine for the entries
        Arrow cannot store (each such entry alone; the rest of its group is written)."""
        with self._commit_lock:
            return self._commit()

    def _plan(self, entries: list[LogEntry], cpu_seconds: float = 0.0
              ) -> list[tuple[str, pa.Table | None, list[LogEntry], list[str]]]:
        """What to write, in order: (name, table, its entries, []) per (day, version), then
        (name, None, entries, reasons) for the entries no segment can hold. ``cpu_seconds``
        is shared among the segments by their rows (in their metadata)."""
        groups: dict[tuple[str, int], list[LogEntry]] = defaultdict(list)
        bad: list[tuple[LogEntry, str]] = []
        days: dict[int, str] = {}  # UTC day number -> its name: one strftime per day
        for e in entries:
            try:
                n = int(e.ts // 86_400)
                day = days.get(n)
                if day is None:
                    day = days[n] = e.day
                groups[(day, e.version)].append(e)
            except (ValueError, OverflowError, OSError, TypeError) as exc:
                bad.append((e, f"event time {e.ts!r} has no day partition ({exc})"))
        todo: list[tuple[str, pa.Table | None, list[LogEntry], list[str]]] = []
        total = sum(len(e.ids) for e in entries) or 1
        for (day, version), part in sorted(groups.items(), key=lambda kv: str(kv[0])):
            table, kept, rejected = _convert(part)
            bad += rejected
            if table is not None:
                table = table.replace_schema_metadata({
                    **(table.schema.metadata or {}), ROWS_KEY: str(table.num_rows).encode(),
                    CPU_KEY: repr(cpu_seconds * table.num_rows / total).encode()})
                name = (f"day={day}/version={version}/part-{int(time.time() * 1000):013d}"
                        f"-{os.getpid()}-{next(_SEGMENT_NUMBERS):06d}.parquet")
                todo.append((name, table, kept, []))
        if bad:
            todo.append((f"{ROWS_DIR}/part-{int(time.time() * 1000):013d}-{os.getpid()}-"
                         f"{next(_SEGMENT_NUMBERS):06d}.jsonl", None, [e for e, _ in bad],
                         [why for _, why in bad]))
        return todo

    def _commit(self) -> CommitReport:
        with self._lock:
            entries, self._entries = self._entries, []
            self._rows = 0
        report = CommitReport()
        if not entries:
            return report
        cpu_now = time.process_time()
        cpu = cpu_now - self._cpu_mark if self._cpu_mark is not None else 0.0
        try:
            todo = self._plan(entries, cpu)
        except Exception:  # a bug, not a bad value: keep every row for the next try
            with self._lock:
                self._entries[:0] = entries
                self._rows += sum(len(e.ids) for e in entries)
            raise
        try:  # in order; after a failure only the items not yet written go back
            while todo:
                name, table, part, reasons = todo[0]
                rows = sum(len(e.ids) for e in part)
                if table is not None:
                    self.store.write_parquet(name, table)
                    self.segments += 1
                    self.written += rows
                    report.segments += 1
                    report.written += rows
                else:
                    _write_quarantine(self.store, name, part, reasons)
                    self.quarantined += rows
                    report.quarantined += rows
                    report.quarantine_files.append(name)
                todo.pop(0)
        except Exception:
            # only the items not yet written go back (in front, in order): no duplicates
            unwritten = [e for _, _, part, _ in todo for e in part]
            with self._lock:
                self._entries[:0] = unwritten
                self._rows += sum(len(e.ids) for e in unwritten)
            raise
        with self._lock:
            self._recent_ids.difference_update(chain.from_iterable(e.ids for e in entries))
            size = self._rows
            self._cpu_mark = cpu_now  # charged to these segments (a failed commit is not)
        if self._on_write is not None:
            self._on_write(report.written)
        if self._on_quarantine is not None and report.quarantined:
            self._on_quarantine(report.quarantined)
        if self._on_queue is not None:
            self._on_queue(size)
        return report


# Conversion failures of values a client sent: Arrow's (ArrowInvalid is a ValueError,
# ArrowTypeError a TypeError) and Python's (an int beyond int64 raises OverflowError).
_CONVERT_ERRORS = (pa.ArrowException, ValueError, TypeError, OverflowError)


def _convert(entries: list[LogEntry]
             ) -> tuple[pa.Table | None, list[LogEntry], list[tuple[LogEntry, str]]]:
    """Entries of one (day, version) → (one table, the entries in it, the entries set aside
    with why). The whole group is converted at once; only if that fails is each entry
    converted alone, to find the ones no column type can hold (or that disagree with the
    type most rows have), so one bad value never costs another request its rows."""
    try:
        return _checked(_to_table(entries)), entries, []
    except _CONVERT_ERRORS:
        pass
    good: list[tuple[pa.Table, LogEntry]] = []
    bad: list[tuple[LogEntry, str]] = []
    for e in entries:
        try:
            good.append((_checked(_to_table([e])), e))
        except _CONVERT_ERRORS as exc:
            bad.append((e, _why(exc)))
    target = _common_schema([t for t, _ in good])
    tables: list[pa.Table] = []
    kept: list[LogEntry] = []
    for t, e in good:
        try:
            tables.append(_conform(t, target))
            kept.append(e)
        except _CONVERT_ERRORS as exc:
            bad.append((e, _why(exc)))
    if not tables:
        return None, [], bad
    return pa.concat_tables(tables).combine_chunks(), kept, bad


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _checked(table: pa.Table) -> pa.Table:
    """``table`` if every model input holds one value per cell (a nested value, such as an
    object where a number belongs, would make a struct column no reader expects)."""
    for f in table.schema:
        if not f.name.startswith("_") and pa.types.is_nested(f.type):
            raise ValueError(f"input '{f.name}' holds {f.type} values, not one scalar per row")
    return table


def _common_schema(tables: list[pa.Table]) -> pa.Schema:
    """Per column, the type most rows have (integers and floats together make double; all-null
    columns take the others' type; a tie goes to the type seen first)."""
    rows: dict[str, dict[pa.DataType, int]] = {}
    for t in tables:
        for f in t.schema:
            rows.setdefault(f.name, {})
            if not pa.types.is_null(f.type):
                rows[f.name][f.type] = rows[f.name].get(f.type, 0) + t.num_rows
    fields = []
    for name, counts in rows.items():
        numeric = [t for t in counts if pa.types.is_integer(t) or pa.types.is_floating(t)]
        if len(numeric) > 1:
            counts = {**{t: n for t, n in counts.items() if t not in numeric},
                      pa.float64(): sum(counts[t] for t in numeric)}
        best = max(counts.items(), key=lambda kv: kv[1])[0] if counts else pa.null()
        fields.append(pa.field(name, best))
    return pa.schema(fields)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns and types: a safe cast (an integer a double cannot
    hold exactly fails), null columns where it has none."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            try:
                cols.append(col if col.type == f.type else col.cast(f.type, safe=True))
            except _CONVERT_ERRORS as exc:
                raise type(exc)(f"input '{f.name}': {col.type} where the other rows have "
                                f"{f.type}: {exc}") from exc
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.table(cols, schema=schema)


def _write_quarantine(store: ObjectStore, name: str, entries: list[LogEntry],
                      reasons: list[str]) -> None:
    """The entries a commit could not store, one JSON object per line with every field of
    the LogEntry as received (read back with :func:`read_quarantined_entries`), plus a
    pending note for the audit chain."""
    lines = [json.dumps({"ids": e.ids, "ts": e.ts, "version": e.version, "role": e.role,
                         "latency_ms": e.latency_ms, "predictions": e.predictions,
                         "cols": e.cols, "key": e.key, "probabilities": e.probabilities,
                         "classes": e.classes, "reason": why}, default=_jsonable)
             for e, why in zip(entries, reasons, strict=True)]
    store.write_bytes(name, ("\n".join(lines) + "\n").encode())
    rows = sum(len(e.ids) for e in entries)
    write_note(store, name, "rows_quarantined",
               {"rows": rows, "entries": len(entries), "reasons": sorted(set(reasons))[:10],
                "request_ids": [i for e in entries for i in e.ids][:20]})
    log.error("inference log: %d row(s) could not be stored and were set aside in %s: %s",
              rows, store.uri_for(name), reasons[0])


def _jsonable(value: Any) -> Any:
    """What JSON cannot hold as is: numpy scalars as Python numbers, the rest as text."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    return repr(value)


def read_quarantined_entries(store: ObjectStore, rel: str) -> list[LogEntry]:
    """The entries in a rows quarantine file, as they were appended (to fix and append
    again)."""
    out = []
    for line in store.read_bytes(rel).decode().splitlines():
        if line.strip():
            fields = json.loads(line)
            fields.pop("reason", None)
            out.append(LogEntry(**fields))
    return out


def _to_table(entries: list[LogEntry]) -> pa.Table:
    """Entries of one (day, version) → one table, column by column.

    Built with C-level loops (``chain``, ``itemgetter``) where the common case allows: the
    writer shares the GIL with the event loop, and at a few thousand one-row requests a
    second its per-value Python loops cost the server ~9 µs of CPU per request."""
    ids = list(chain.from_iterable(e.ids for e in entries))
    single = len(ids) == len(entries)  # every entry one row (the usual one-row requests)

    def rep(get: Callable[[LogEntry], Any]) -> list:
        if single:
            return list(map(get, entries))
        return [get(e) for e in entries for _ in e.ids]

    columns: dict[str, pa.Array] = {
        "_request_id": pa.array(ids, pa.string()),
        "_ts": pa.array([int(ts * 1_000_000) for ts in rep(attrgetter("ts"))], pa.int64()).cast(
            pa.timestamp("us", tz="UTC")),
        "_version": pa.array(rep(attrgetter("version")), pa.int64()),
        "_role": pa.array(rep(attrgetter("role")), pa.string()),
        "_latency_ms": pa.array(rep(attrgetter("latency_ms")), pa.float64()),
        "_prediction": pa.array(list(chain.from_iterable(e.predictions for e in entries))),
        "_key": pa.array(rep(attrgetter("key")), pa.string()),
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
    for name, values in zip(names, _input_columns(entries, names), strict=True):
        columns[name] = _column(name, values)
    return pa.table(columns)


def _input_columns(entries: list[LogEntry], names: list[str]) -> list[list]:
    """Per name, the values of every entry in row order (None for an entry without it)."""
    if not names:
        return []
    take = itemgetter(*names)
    try:
        per_entry = [take(e.cols) for e in entries]  # KeyError: an entry lacks a name
    except KeyError:
        return [[v for e in entries for v in e.cols.get(name, [None] * len(e.ids))]
                for name in names]
    if len(names) == 1:
        return [list(chain.from_iterable(per_entry))]
    return [list(chain.from_iterable(lists)) for lists in zip(*per_entry, strict=True)]


def _column(name: str, values: list) -> pa.Array:
    try:
        return pa.array(values)
    except _CONVERT_ERRORS as exc:  # the same error, naming the input
        raise type(exc)(f"input '{name}': {exc}") from exc


def segment_files(store: ObjectStore, *, first_day: str | None = None,
                  last_day: str | None = None) -> list[str]:
    """Full paths of the committed answer segments (not labels, not quarantine, not temporary
    files), only from the ``day=`` folders within [first_day, last_day] when given: the one
    place that knows the log's layout."""
    out = []
    for day in log_days(store):
        if (first_day and day < first_day) or (last_day and day > last_day):
            continue
        out += parquet_files(store, f"day={day}")
    return sorted(out)


def parquet_files(store: ObjectStore, rel: str) -> list[str]:
    """Full paths of the Parquet files under ``rel`` (recursively), temporary names skipped.
    The listing also tells the segment cache which files changed since it read them (a
    purge rewrites a segment under its own name)."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(store.path(rel), recursive=True, allow_not_found=True)
    infos = [i for i in store.fs.get_file_info(sel)
             if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
             and not i.base_name.startswith(".tmp-")]
    _SEGMENTS.observe(store, infos)
    return sorted(i.path for i in infos)


def _stamp(info: Any) -> tuple[int, int]:
    return (int(info.size or 0), int(info.mtime_ns or 0))


class _SegmentCache:
    """Segments already read, by full path, least recently used dropped beyond a byte budget
    (``MLOOP_SEGMENT_CACHE_MB``, default 256). A segment is written once under a unique name;
    the one exception, a purge rewriting it, changes its size and modification time, which
    the next listing sees (:meth:`observe`) and drops the stale copy. So a controller pass or
    a monitor that rereads the log only pays for the segments committed since its last read.

    A copy is stamped with the size and time its listing showed (no extra request per file
    on an object store), or, for a file read without a listing just before, with a fresh
    look at the file, taken before reading: a rewrite in between leaves the stamp old, never
    the copy.

    A segment that cannot be read is moved to quarantine (mloop.traffic.quarantine) and
    skipped: one damaged file never stops a reader."""

    LISTED_MAX = 200_000  # stamps of listed, not yet read files kept for their first read

    def __init__(self) -> None:
        from collections import OrderedDict

        Stamp = tuple[int, int]
        self.tables: OrderedDict[tuple[str, str], tuple[pa.Table, Stamp]] = OrderedDict()
        self.listed: OrderedDict[tuple[str, str], Stamp] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def observe(self, store: ObjectStore, infos: list[Any]) -> None:
        """Note what a listing ``infos`` shows; drop cached copies of files it shows changed."""
        with self.lock:
            for info in infos:
                key, stamp = (store.uri, info.path), _stamp(info)
                hit = self.tables.get(key)
                if hit is None:
                    self.listed[key] = stamp
                    self.listed.move_to_end(key)
                elif hit[1] != stamp:
                    del self.tables[key]
                    self.bytes -= hit[0].nbytes
                    self.listed[key] = stamp
            while len(self.listed) > self.LISTED_MAX:
                self.listed.popitem(last=False)

    def forget(self, store: ObjectStore, path: str) -> None:
        with self.lock:
            self.listed.pop((store.uri, path), None)
            hit = self.tables.pop((store.uri, path), None)
            if hit is not None:
                self.bytes -= hit[0].nbytes

    def read(self, store: ObjectStore, path: str) -> pa.Table | None:
        """The segment's table; None if it is gone or was quarantined as unreadable."""
        import pyarrow.fs as pafs

        key = (store.uri, path)
        with self.lock:
            hit = self.tables.get(key)
            if hit is not None:
                self.tables.move_to_end(key)
                return hit[0]
            stamp = self.listed.pop(key, None)
        if stamp is None:
            info = store.fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                return None
            stamp = _stamp(info)
        table = read_or_quarantine(store, path, lambda: store.read_parquet_at(path))
        if table is None:
            return None
        budget = float(os.environ.get("MLOOP_SEGMENT_CACHE_MB", "256")) * 2**20
        with self.lock:
            if table.nbytes <= budget and key not in self.tables:
                self.tables[key] = (table, stamp)
                self.bytes += table.nbytes
                while self.bytes > budget:
                    _, (old, _) = self.tables.popitem(last=False)
                    self.bytes -= old.nbytes
        return table


_SEGMENTS = _SegmentCache()


def read_segments(store: ObjectStore, files: list[str]) -> list[pa.Table]:
    """The tables of these segment files (log or label segments), from the cache when read
    before. Files that are gone or unreadable are left out (unreadable ones are moved to
    quarantine with a pending note: see mloop.traffic.quarantine)."""
    return [t for t in (_SEGMENTS.read(store, f) for f in files) if t is not None]


def rewrite_segment(store: ObjectStore, rel: str, table: pa.Table | None) -> None:
    """Replace the segment ``rel`` atomically, under its own name, by ``table`` (delete it
    if None): for purges only (committed segments are otherwise never rewritten). This
    process's cached copy is dropped at once; other processes see the new size and time at
    their next listing."""
    if table is None:
        store.delete(rel)
    else:
        store.write_parquet(rel, table)
    _SEGMENTS.forget(store, store.path(rel))


def log_days(store: ObjectStore) -> list[str]:
    """The days (``YYYY-MM-DD``) the log holds answers for, oldest first."""
    return sorted(name.removeprefix("day=") for name in store.listdir()
                  if name.startswith("day="))


def read_log(uri: str | ObjectStore, columns: list[str] | None = None) -> pa.Table:
    """Every committed row (all days, all versions) as one table; columns missing from some
    segments are null there. Partition folders are not added as columns (``_version`` and
    ``_ts`` already carry them)."""

    store = as_store(uri)
    tables = read_segments(store, segment_files(store))
    if not tables:
        return pa.table({c: pa.array([], pa.null()) for c in (columns or META_COLUMNS)})
    table = pa.concat_tables(tables, promote_options="permissive")
    return table.select(columns) if columns else table


@dataclass(frozen=True)
class SegmentUsage:
    """What one committed segment says it cost: its version, rows when written, the
    CPU-seconds charged to them and when it was committed (wall clock, from its name)."""

    version: int
    rows: int
    cpu_seconds: float
    committed_at: datetime



def segment_usage(store: ObjectStore) -> list[SegmentUsage]:
    """The recorded serving usage of every answer segment, oldest commit first; segments
    written before mloop recorded it (no ``mloop.cpu_seconds`` in their metadata) are left
    out. Reads only the files' footers."""
    import re

    import pyarrow.parquet as pq

    part = re.compile(r"/version=(-?\d+)/part-(\d{13})-")
    out: list[SegmentUsage] = []
    for path in segment_files(store):
        found = part.search(path)
        if found is None:
            continue
        try:
            meta = pq.read_metadata(path, filesystem=store.fs).metadata or {}
        except (OSError, pa.ArrowException):
            continue  # gone (purged) or unreadable: the readers quarantine it
        if CPU_KEY not in meta or ROWS_KEY not in meta:
            continue
        out.append(SegmentUsage(
            version=int(found.group(1)), rows=int(meta[ROWS_KEY]),
            cpu_seconds=float(meta[CPU_KEY]),
            committed_at=datetime.fromtimestamp(int(found.group(2)) / 1000, UTC)))
    return sorted(out, key=attrgetter("committed_at"))
