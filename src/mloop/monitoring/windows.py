"""Windows of the inference log: by event time (``1d``, ``6h``) or by row count (``5000rows``).

Reads go straight to the Parquet segments through pyarrow's dataset API: the ``day=``
partition folders prune whole days, a filter on ``_ts`` keeps the rest to the rows asked for,
so a monitor run reads only data newer than the last window it evaluated. Shadow rows are left
out (they repeat the inputs of the answer they shadowed).

A time window is evaluated once the log's event clock (:func:`event_clock`) has reached its
end, so replayed traffic with old timestamps is windowed like live traffic, and a handful of
stray rows far ahead of the rest (a smoke-test request stamped "now" after a replay of 2011)
does not close every window up to today.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from mloop.monitoring.windows_store import WindowSpec as WindowSpec  # re-exported: its old home
from mloop.storage import ObjectStore, as_store
from mloop.traffic.inference_log import read_segments, segment_files

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def read_rows(uri: str | ObjectStore, *, since: datetime | None = None,
              until: datetime | None = None) -> pa.Table:
    """Answered rows (champion and canary) with ``since < _ts <= until``, ordered by time."""

    store = as_store(uri)
    files = segment_files(
        store, first_day=(since - timedelta(days=1)).strftime("%Y-%m-%d") if since else None,
        last_day=until.strftime("%Y-%m-%d") if until else None)
    tables = read_segments(store, files)  # unreadable segments: quarantined, left out
    if not tables:
        return pa.table({"_request_id": pa.array([], pa.string()),
                         "_ts": pa.array([], pa.timestamp("us", tz="UTC"))})
    table = _concat(tables)
    cond = pc.not_equal(table.column("_role"), "shadow")
    if since is not None:
        cond = pc.and_(cond, pc.greater(table.column("_ts"), pa.scalar(since,
                                                                       table.column("_ts").type)))
    if until is not None:
        cond = pc.and_(cond, pc.less_equal(table.column("_ts"),
                                           pa.scalar(until, table.column("_ts").type)))
    table = table.filter(cond)
    return table.sort_by([("_ts", "ascending"), ("_request_id", "ascending")])


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table from segments of possibly different versions: columns are unified by name;
    a column whose type differs between versions (a retyped feature) becomes text, so the
    quality check reports it instead of the read failing."""
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        types: dict[str, set[pa.DataType]] = {}
        for t in tables:
            for f in t.schema:
                types.setdefault(f.name, set()).add(f.type)
        clash = {n for n, ts in types.items() if len({str(x) for x in ts} - {"null"}) > 1
                 and not n.startswith("_")}
        fixed = []
        for t in tables:
            for n in clash & set(t.column_names):
                i = t.column_names.index(n)
                try:
                    text = t.column(n).cast(pa.string())
                except (pa.ArrowNotImplementedError, pa.ArrowInvalid):  # nested values
                    text = pa.array([None if v is None else str(v)
                                     for v in t.column(n).to_pylist()], pa.string())
                t = t.set_column(i, n, text)
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")


CLOCK_CONFIRMATIONS = 10
CLOCK_MIN_GAP = timedelta(days=1)


def event_clock(ts: pa.Array | pa.ChunkedArray, *, confirmations: int = CLOCK_CONFIRMATIONS,
                min_gap: timedelta = CLOCK_MIN_GAP) -> datetime | None:
    """The event time the log has reached (the clock of monitoring windows and of the loop),
    from the event times ``ts`` of its rows; None when there are none.

    It is the newest event time, except when fewer than ``confirmations`` distinct event
    times (10; a request's rows share one, so this counts requests, not rows) lie after a
    silence longer than both ``min_gap`` (a day) and the time the ``confirmations`` event
    times before that silence spanned: those are taken for stray rows (a smoke test, or any
    request without a timestamp, after a historical replay) and the clock is the newest event
    time before the silence. Once ``confirmations`` requests agree, the clock jumps to them
    (live traffic really began). Ordinary gaps never hold it back: a quiet night is under a
    day, and a replay of daily data with weekend gaps spans more than its gaps."""
    values = pc.drop_null(ts)
    if len(values) == 0:
        return None
    import numpy as np

    every = values.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    every = (every.combine_chunks() if isinstance(every, pa.ChunkedArray) else every).to_numpy()
    want, k = 2 * confirmations, 4 * confirmations
    while True:  # the newest ``want`` distinct times, in O(rows): no sort of the whole log
        top = every if k >= len(every) else np.partition(every, len(every) - k)[-k:]
        micros = np.unique(top)[::-1][:want]  # newest first
        if len(micros) >= want or k >= len(every):
            break
        k *= 4
    gap_floor = min_gap / timedelta(microseconds=1)
    clock = micros[0]
    for m in range(min(confirmations - 1, len(micros) - 1), 0, -1):
        gap = micros[m - 1] - micros[m]
        span = micros[m] - micros[min(m + confirmations - 1, len(micros) - 1)]
        if gap > max(gap_floor, span):
            clock = micros[m]
            break
    return _EPOCH + timedelta(microseconds=int(clock))


def watermark(table: pa.Table) -> datetime | None:
    """The event clock (:func:`event_clock`) of the rows in ``table``."""
    if table.num_rows == 0:
        return None
    return event_clock(table.column("_ts"))


def align(ts: datetime, length: timedelta) -> datetime:
    """The start of the epoch-aligned window of ``length`` holding ``ts``."""
    return _EPOCH + (ts - _EPOCH) // length * length


def time_windows(table: pa.Table, length: timedelta, after: datetime | None,
                 lateness: float = 0.0) -> list[tuple[datetime, datetime, pa.Table]]:
    """Complete windows of ``length`` in ``table`` (whose end the watermark has passed by
    ``lateness`` seconds, so rows committed a little late still land in their window), oldest
    first."""
    mark = watermark(table)
    if mark is None:
        return []
    mark = mark - timedelta(seconds=lateness)
    first = pc.min(table.column("_ts")).as_py()
    first = first if first.tzinfo else first.replace(tzinfo=UTC)
    start = align(first, length) if after is None else max(after, align(first, length))
    out = []
    ts = table.column("_ts")
    while start + length <= mark:
        end = start + length
        lo, hi = pa.scalar(start, ts.type), pa.scalar(end, ts.type)
        part = table.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
        if part.num_rows:
            out.append((start, end, part))
        start = end
    return out


def row_windows(table: pa.Table, rows: int, skip_ids: set[str] | None = None
                ) -> list[tuple[datetime, datetime, pa.Table]]:
    """Consecutive full windows of ``rows`` rows; the remainder waits for more traffic.
    ``skip_ids``: rows at the previous window's last timestamp it already holds (one request
    may be split between two windows; its rows share a timestamp)."""
    if skip_ids:
        keep = pc.invert(pc.is_in(table.column("_request_id"),
                                  value_set=pa.array(sorted(skip_ids), pa.string())))
        table = table.filter(keep)
    out = []
    for i in range(0, table.num_rows - rows + 1, rows):
        part = table.slice(i, rows)
        lo = pc.min(part.column("_ts")).as_py()
        hi = pc.max(part.column("_ts")).as_py()
        out.append((lo if lo.tzinfo else lo.replace(tzinfo=UTC),
                    hi if hi.tzinfo else hi.replace(tzinfo=UTC), part))
    return out
