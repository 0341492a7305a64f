"""Late ground truth, stored by request id next to the inference log.

Labels are Parquet segments under ``<inference_log_uri>/labels/day=<received day>/``, one per
ingest, written atomically like the log itself. An id is accepted only if the log (or, inside
the server, the not-yet-committed buffer) holds it; unknown ids are returned to the caller,
never kept. A later label for the same id supersedes an earlier one (``received_at`` orders).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from mloop.errors import DataSourceError
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import (
    LABELS_DIR,
    id_day,
    parquet_files,
    read_segments,
    segment_files,
)

if TYPE_CHECKING:
    from mloop.project import Project


def known_ids(store: ObjectStore, ids: Iterable[str]) -> set[str]:
    """The subset of ``ids`` present in committed log segments; only the days the ids encode
    are read, and only their id column. A damaged segment is quarantined and skipped."""
    by_day: dict[str, set[str]] = defaultdict(set)
    for i in ids:
        day = id_day(i)
        if day is not None:
            by_day[day].add(i)
    found: set[str] = set()
    for day, wanted in by_day.items():
        files = segment_files(store, first_day=day, last_day=day)
        if files:
            found.update(_ids_in(store, files, wanted))
    return found


def _ids_in(store: ObjectStore, files: list[str], wanted: set[str]) -> list[str]:
    import pyarrow.dataset as ds

    try:  # one scan of the id column, the filter pushed down
        dataset = ds.dataset(files, filesystem=store.fs, format="parquet")
        return dataset.to_table(columns=["_request_id"],
                                filter=pc.field("_request_id").isin(list(wanted))
                                ).column(0).to_pylist()
    except (pa.ArrowException, OSError):
        pass  # a file is damaged or gone: read them one by one (quarantining the bad one)
    value_set = pa.array(sorted(wanted), pa.string())
    out: list[str] = []
    for t in read_segments(store, files):
        ids = t.column("_request_id")
        out += ids.filter(pc.is_in(ids, value_set=value_set)).to_pylist()
    return out


def store_labels(store: ObjectStore, labels: dict[str, Any], *, task: str, source: str,
                 pending: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Keep the labels whose ids the log knows; report the rest. Returns counts and the
    unknown ids (up to 100 listed)."""
    if not labels:
        return {"stored": 0, "unknown": 0, "unknown_ids": []}
    ids = list(labels)
    # The writer's queue first, then the disk: a row the writer commits between the two looks
    # is on disk by the second. The other order misses it (scanned before its segment
    # existed, no longer queued after), and early feedback got a 404 for a row just answered.
    queued = {i for i in ids if pending(i)} if pending is not None else set()
    found = queued | known_ids(store, [i for i in ids if i not in queued])
    unknown = [i for i in ids if i not in found]
    keep = [i for i in ids if i in found]
    if keep:
        now = datetime.now(UTC)
        values = [labels[i] for i in keep]
        typ = pa.float64() if task == "regression" else pa.string()
        if task != "regression":
            values = [None if v is None else str(v) for v in values]
        table = pa.table({"_request_id": pa.array(keep, pa.string()),
                          "label": pa.array(values, typ),
                          "received_at": pa.array([now] * len(keep), pa.timestamp("us", "UTC")),
                          "source": pa.array([source] * len(keep), pa.string())})
        name = (f"{LABELS_DIR}/day={now:%Y-%m-%d}/part-{int(time.time() * 1000):013d}-"
                f"{os.getpid()}-{os.urandom(3).hex()}.parquet")
        store.write_parquet(name, table)
    return {"stored": len(keep), "unknown": len(unknown), "unknown_ids": unknown[:100]}


def parse_feedback(body: Any, task: str) -> dict[str, Any]:
    """``{"labels": [{"request_id": ..., "label": ...}, ...]}`` or a single
    ``{"request_id": ..., "label": ...}`` → {id: label}; ValueError naming the bad item."""
    items = body.get("labels") if isinstance(body, dict) and "labels" in body else [body]
    if not isinstance(items, list) or not items:
        raise ValueError("'labels' must be a non-empty list of {request_id, label}")
    out: dict[str, Any] = {}
    for n, item in enumerate(items):
        if not isinstance(item, dict) or "request_id" not in item or "label" not in item:
            raise ValueError(f"labels[{n}]: needs 'request_id' and 'label'")
        rid, label = item["request_id"], item["label"]
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"labels[{n}].request_id: must be a non-empty string")
        out[rid] = _check_label(label, task, f"labels[{n}].label")
    return out


def _check_label(label: Any, task: str, where: str) -> Any:
    if task == "regression":
        if isinstance(label, bool) or not isinstance(label, int | float) \
                or not math.isfinite(label):
            raise ValueError(f"{where}: a regression label must be a finite number, got "
                             f"{label!r}")
        return float(label)
    if label is None or isinstance(label, dict | list):
        raise ValueError(f"{where}: a class label must be a string or number, got {label!r}")
    return label


def read_label_file(path: Path, task: str) -> dict[str, Any]:
    """``request_id,label`` CSV or Parquet → {id: label}; DataSourceError naming the file and the
    place of the first bad value as a person finds it: in a CSV the line number (the header
    is line 1, so the first label is on line 2), in Parquet the row number (the first row is
    row 1). Regression labels written as text in a CSV ("3.5") are read as numbers, so one
    bad value is named instead of the first row of a column parsed as text."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataSourceError(f"{path}: no such file")
    csv = path.suffix.lower() != ".parquet"
    try:
        if not csv:
            table = pq.read_table(path)
        else:  # blank lines are kept (and skipped below) so that line numbers stay true
            table = pacsv.read_csv(
                path, parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(column_types={"request_id": pa.string()}))
    except Exception as exc:
        raise DataSourceError(f"{path}: cannot be read as {path.suffix or 'CSV'} ({exc})") from exc
    missing = [c for c in ("request_id", "label") if c not in table.column_names]
    if missing:
        raise DataSourceError(f"{path}: missing column(s) {missing}; expected request_id,label "
                              f"(found {table.column_names})")
    out: dict[str, Any] = {}
    for n, (rid, label) in enumerate(zip(table.column("request_id").to_pylist(),
                                         table.column("label").to_pylist(), strict=True)):
        where = f"line {n + 2}" if csv else f"row {n + 1}"
        if csv and not rid and label in (None, ""):
            continue  # a blank line
        if not rid:
            raise DataSourceError(f"{path}: {where}: empty request_id")
        if task == "regression" and isinstance(label, str):
            with contextlib.suppress(ValueError):  # not a number: named just below
                label = float(label)
        try:
            out[str(rid)] = _check_label(label, task, "label")
        except ValueError as exc:
            raise DataSourceError(f"{path}: {where}: {exc}") from None
    return out


def ingest_label_file(project: Project, path: Path, *, source: str | None = None
                      ) -> dict[str, Any]:
    """``mloop labels ingest FILE``: read the file, keep the labels whose ids the log holds,
    and record in the audit chain any segment found unreadable on the way (it was moved to
    quarantine; the rest were read). Returns the counts of :func:`store_labels`, plus the
    quarantine events written."""
    from mloop.traffic.quarantine import record_quarantine_events

    task = project.config.task or "regression"
    labels = read_label_file(path, task)
    store = ObjectStore(project.uris["inference_log_uri"])
    result = store_labels(store, labels, task=task, source=source or f"file:{path.name}")
    result["quarantined"] = record_quarantine_events(store, project.store)
    return result


def label_files(store: ObjectStore) -> list[str]:
    """Full paths of the committed label segments."""
    return parquet_files(store, LABELS_DIR)


_LATEST: dict[str, tuple[tuple[str, ...], pa.Table]] = {}  # uri -> (files, labels)


def read_labels(uri: str) -> pa.Table:
    """All stored labels, the latest per request id. One controller pass asks three times
    (monitor, trigger counts, probation): while no label segment has been added, the last
    answer is returned as it is (segments are immutable)."""
    store = ObjectStore(uri)
    files = label_files(store)
    if not files:
        return pa.table({"_request_id": pa.array([], pa.string()),
                         "label": pa.array([], pa.float64())})
    hit = _LATEST.get(uri)
    if hit is not None and hit[0] == tuple(files):
        return hit[1]
    latest = _latest_labels(store, files)
    _LATEST[uri] = (tuple(files), latest)
    return latest


def forget_latest_labels(uri: str) -> None:
    """Drop the cached latest labels of ``uri``: a retention or an erasure rewrote label
    segments under their own names, which the file list alone does not show."""
    _LATEST.pop(uri, None)


def _latest_labels(store: ObjectStore, files: list[str]) -> pa.Table:
    cols = ["_request_id", "label", "received_at"]
    tables = [t.select(cols) for t in read_segments(store, files)]
    if not tables:  # every label segment was unreadable (now in quarantine)
        return pa.table({"_request_id": pa.array([], pa.string()),
                         "label": pa.array([], pa.float64())})
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.sort_by([("_request_id", "ascending"), ("received_at", "descending")])
    ids = table.column("_request_id").combine_chunks()
    if table.num_rows > 1:  # the first row of each id is its latest label
        later = pc.not_equal(ids.slice(1), ids.slice(0, table.num_rows - 1))
        table = table.filter(pa.concat_arrays([pa.array([True]), later]))
    return table.select(["_request_id", "label"])
