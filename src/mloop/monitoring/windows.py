"""Windows of the inference log: by event time (``1d``, ``6h``) or by row count (``5000rows``).

Reads go straight to the Parquet segments through pyarrow's dataset API: the ``day=``
partition folders prune whole days, a filter on ``_ts`` keeps the rest to the rows asked for,
so a monitor run reads only data newer than the last window it evaluated. Shadow rows are left
out (they repeat the inputs of the answer they shadowed).

A time window is evaluated once the log holds an event at or after its end (the event-time
watermark), so replayed traffic with old timestamps is windowed like live traffic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from mloop.errors import MloopError
from mloop.serving.inference_log import read_segments, segment_files
from mloop.storage import ObjectStore

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class WindowSpec:
    text: str
    seconds: int | None = None
    rows: int | None = None

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        m = re.fullmatch(r"(\d+)(rows|[smhd])", text.strip())
        if not m or int(m.group(1)) <= 0:
            raise MloopError(f"window '{text}': expected a size like 1d, 6h, 30m or 5000rows")
        n, unit = int(m.group(1)), m.group(2)
        if unit == "rows":
            return cls(text, rows=n)
        return cls(text, seconds=n * _UNITS[unit])


def read_rows(uri: str, *, since: datetime | None = None, until: datetime | None = None
              ) -> pa.Table:
    """Answered rows (champion and canary) with ``since < _ts <= until``, ordered by time."""

    store = ObjectStore(uri)
    files = segment_files(
        store, first_day=(since - timedelta(days=1)).strftime("%Y-%m-%d") if since else None,
        last_day=until.strftime("%Y-%m-%d") if until else None)
    if not files:
        return pa.table({"_request_id": pa.array([], pa.string()),
                         "_ts": pa.array([], pa.timestamp("us", tz="UTC"))})
    table = _concat(read_segments(store, files))
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
                t = t.set_column(i, n, t.column(n).cast(pa.string()))
            fixed.append(t)
        return pa.concat_tables(fixed, promote_options="permissive")


def watermark(table: pa.Table) -> datetime | None:
    if table.num_rows == 0:
        return None
    value = pc.max(table.column("_ts")).as_py()
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def align(ts: datetime, seconds: int) -> datetime:
    """The start of the epoch-aligned window of ``seconds`` holding ``ts``."""
    epoch = int(ts.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, UTC)


def time_windows(table: pa.Table, seconds: int, after: datetime | None,
                 lateness: float = 0.0) -> list[tuple[datetime, datetime, pa.Table]]:
    """Complete windows in ``table`` (whose end the watermark has passed by ``lateness``
    seconds, so rows committed a little late still land in their window), oldest first."""
    mark = watermark(table)
    if mark is None:
        return []
    mark = mark - timedelta(seconds=lateness)
    first = pc.min(table.column("_ts")).as_py()
    first = first if first.tzinfo else first.replace(tzinfo=UTC)
    start = align(first, seconds) if after is None else max(after, align(first, seconds))
    out = []
    ts = table.column("_ts")
    while start + timedelta(seconds=seconds) <= mark:
        end = start + timedelta(seconds=seconds)
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
