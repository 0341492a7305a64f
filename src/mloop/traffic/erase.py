"""Erasure: take one person's rows out of the inference log, and their labels, for good.

``erase_rows`` finds the answered rows whose input ``COLUMN`` equals a value (for a column
``security.pii`` hashes, the value is hashed with the same key first, so a request to erase
"ann@example.com" finds the rows that logged its digest), or whose request id is given.
Every segment holding such rows, in the log and in purged rows kept under
``quarantine/purges``, is replaced atomically, under its own name, by the rows it keeps (or
deleted); then the labels of the erased request ids are removed the same way.

All segments are read and matched before the first one is rewritten, so a bad request (an
unknown column, a value the column's type cannot hold) changes nothing. A crash part way
leaves some segments erased and the rest whole: running the same erasure again finishes it.

One ``data.erased`` event records the erasure: how it matched (the column, or request ids),
the counts and the segments, and a keyed digest of each value (``value_hmacs``) so that the
erasure of a given value can be proven later by whoever holds the key, never the value.
Rows still in a running server's buffer are not committed yet: flush it first
(``POST /flush``). Rows set aside under ``quarantine/rows`` (values Arrow could not store)
are not searched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mloop.errors import MloopError
from mloop.project import Project
from mloop.security.audit import append_event
from mloop.security.pii import PiiPolicy, keyed_digest, load_pii_key
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import (
    id_day,
    parquet_files,
    read_segments,
    rewrite_segment,
    segment_files,
)
from mloop.traffic.labels import forget_latest_labels, label_files
from mloop.traffic.purge import PURGES_DIR

Matcher = Callable[[pa.Table], Any]


@dataclass
class EraseResult:
    """What an erasure removed. ``column`` is None for an erasure by request id."""

    column: str | None
    values: int  # how many values (or request ids) were asked for
    rows: int = 0
    segments: list[str] = field(default_factory=list)
    label_rows: int = 0
    label_segments: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"by": "request_id" if self.column is None else "column",
                "column": self.column, "values": self.values, "rows": self.rows,
                "segments": self.segments, "label_rows": self.label_rows,
                "label_segments": self.label_segments}


def parse_key(text: str) -> tuple[str, str]:
    """``COLUMN=VALUE`` → (column, value); MloopError naming the malformed argument."""
    column, sep, value = text.partition("=")
    if not sep or not column.strip():
        raise MloopError(f"--key '{text}': expected COLUMN=VALUE (e.g. --key "
                         f"email=ann@example.com)")
    return column.strip(), value


def erase_rows(project: Project, *, keys: Sequence[str] = (),
               request_ids: Sequence[str] = (), reason: str = "",
               actor: str | None = None) -> EraseResult:
    """Erase the rows matching every ``COLUMN=VALUE`` of ``keys`` (one column per call; the
    values are alternatives) or every id of ``request_ids`` (not both), and their labels;
    record a ``data.erased`` event (also when nothing matched: the request was handled).
    MloopError, with nothing changed, for a malformed key or id, an unknown column, a
    column whose values ``security.pii`` never logs, or a value its type cannot hold."""
    if bool(keys) == bool(request_ids):
        raise MloopError("erase: give --key COLUMN=VALUE or --request-id ID (either may "
                         "repeat), not both and not neither")
    log = ObjectStore(project.uris["inference_log_uri"])
    if keys:
        pairs = [parse_key(k) for k in keys]
        columns = sorted({c for c, _ in pairs})
        if len(columns) > 1:
            raise MloopError(f"erase: one column per erasure, got {', '.join(columns)}")
        column = columns[0]
        values = [v for _, v in pairs]
        files = segment_files(log)
        match = _by_value(project, column, values)
        secret = load_pii_key(project.root)
        digests = [keyed_digest(secret, f"erase:{column}", v) for v in values]
    else:
        column = None
        bad = [i for i in request_ids if id_day(i) is None]
        if bad:
            raise MloopError(f"--request-id '{bad[0]}': not a request id (24 hex digits, as "
                             f"the server answers in 'request_ids')")
        days = sorted({d for d in map(id_day, request_ids) if d is not None})
        files = [f for d in days for f in segment_files(log, first_day=d, last_day=d)]
        wanted = pa.array(sorted(set(request_ids)), pa.string())
        values = list(request_ids)
        secret = load_pii_key(project.root)
        digests = [keyed_digest(secret, "erase:_request_id", i) for i in request_ids]

        def match(t: pa.Table) -> Any:
            return pc.is_in(t.column("_request_id"), value_set=wanted)

    files += parquet_files(log, PURGES_DIR)
    plan, seen = _plan(log, files, match, column)
    if column is not None and files and not seen:
        raise MloopError(f"erase: no column '{column}' in the inference log; its inputs: "
                         f"{', '.join(_inputs(log, files))}")
    result = EraseResult(column, len(values))
    erased_ids: set[str] = set()
    for path, table, mask in plan:
        erased_ids.update(table.filter(mask).column("_request_id").to_pylist())
        kept = table.filter(pc.invert(mask))
        rewrite_segment(log, log.relative(path), kept if kept.num_rows else None)
        result.rows += table.num_rows - kept.num_rows
        result.segments.append(log.relative(path))
    if column is None:
        erased_ids.update(request_ids)  # a label may outlive its row (purged, aged out)
    if erased_ids:
        ids = pa.array(sorted(erased_ids), pa.string())
        label_plan, _ = _plan(log, label_files(log),
                              lambda t: pc.is_in(t.column("_request_id"), value_set=ids), None)
        for path, table, mask in label_plan:
            kept = table.filter(pc.invert(mask))
            rewrite_segment(log, log.relative(path), kept if kept.num_rows else None)
            result.label_rows += table.num_rows - kept.num_rows
            result.label_segments.append(log.relative(path))
        if label_plan:
            forget_latest_labels(log.uri)
    append_event(project.store, "data.erased",
                 {**result.to_dict(), "value_hmacs": digests, "reason": reason}, actor=actor)
    return result


def _by_value(project: Project, column: str, values: list[str]) -> Matcher:
    """The rows whose ``column`` holds one of ``values`` as the log stores it."""
    # the servers' key, never a new one: a new key would silently match nothing
    policy = PiiPolicy.of(project.config, project.root, create_key=False, key_required=False)
    action = policy.actions.get(column) if policy is not None else None
    if action in ("drop", "mask"):
        raise MloopError(f"erase: security.pii.{column} is '{action}': the log never held "
                         f"its values, so no row can be found by them (erase by "
                         f"--request-id, or by another column)")
    if action == "hash" and policy is not None:
        if policy.key is None:
            load_pii_key(project.root, create=False)  # raises, naming where the key belongs
        values = [policy.digest(column, v) for v in values]

    def match(t: pa.Table) -> Any:
        col = t.column(column)
        return pc.is_in(col, value_set=_typed(column, values, col.type))

    return match


def _typed(column: str, values: list[str], typ: pa.DataType) -> pa.Array:
    """``values`` (command-line text) as ``typ``; MloopError naming a value it cannot hold."""
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ):
        return pa.array(values, pa.string())
    out: list[Any] = []
    for v in values:
        try:
            if pa.types.is_integer(typ):
                out.append(int(v))
            elif pa.types.is_floating(typ):
                out.append(float(v))
            elif pa.types.is_boolean(typ):
                if v.lower() not in ("true", "false"):
                    raise ValueError(v)
                out.append(v.lower() == "true")
            else:
                raise ValueError(v)
        except ValueError:
            raise MloopError(f"--key {column}={v}: column '{column}' holds {typ} values, "
                             f"and '{v}' is not one") from None
    return pa.array(out, typ)


def _plan(log: ObjectStore, files: list[str], match: Matcher, column: str | None
          ) -> tuple[list[tuple[str, pa.Table, Any]], bool]:
    """(the segments with matching rows: path, table, mask), and whether any segment had
    ``column``. Read only: nothing is rewritten until every segment has been matched."""
    plan = []
    seen = column is None
    for path in files:  # one at a time: only the matching segments stay in memory
        table = _table(log, path)
        if table is None:
            continue
        if column is not None:
            if column not in table.column_names:
                continue
            seen = True
        mask = pc.fill_null(match(table), False)
        if pc.any(mask).as_py():
            plan.append((path, table, mask))
    return plan, seen


def _table(log: ObjectStore, path: str) -> pa.Table | None:
    tables = read_segments(log, [path])  # an unreadable one is quarantined, skipped
    return tables[0] if tables else None


def _inputs(log: ObjectStore, files: list[str]) -> list[str]:
    names: list[str] = []
    for path in files[-5:]:
        t = _table(log, path)
        for n in (t.column_names if t is not None else []):
            if not n.startswith("_") and n not in names:
                names.append(n)
    return names
