"""Retraining on what the model saw in production: labelled traffic, optionally plus the
original training data, snapshotted and run through the project's own pipeline.

The training table is the inference log's answered rows of the most recent ``window`` (event
time, up to the log's watermark) joined with their labels by request id: the model's inputs
under their own names, the label as the target column, the event time as the time column. It
is written as a Parquet file under ``<outputs>/retrain/`` and the unchanged pipeline runs on
it (ingest → validate → snapshot → split → train → evaluate → register), so a retrained
version has the same lineage, gates and reproducibility as any other.

With ``features.store: feast`` the table is an entity table, as ``data`` is: the looked-up
columns the log holds (what the online store answered, as fresh as its last materialization)
are dropped, and the pipeline's ingest step joins them again as of each row's event time
(Feast's point-in-time join, ``mloop.features.training``), so a retrained model learns from
the same join as the first one and the ingest step records the same ``feast.*`` lineage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mloop.errors import MloopError
from mloop.project import Project


@dataclass
class TrainingData:
    path: str  # a local path or an s3:// URI (the outputs store's)
    rows: int
    labelled_rows: int
    original_rows: int
    since: datetime
    until: datetime
    # with a feature store: the point-in-time join the pipeline does on the table
    features: dict[str, Any] | None = None


def labelled_traffic(project: Project, *, until: datetime, window: timedelta) -> pa.Table:
    """Answered rows with ``until - window < _ts <= until`` that have a label, with the label
    as a ``target`` column and the event time as the time column. Inputs ``security.pii``
    names are missing (null) in every row: the log never kept their raw values."""
    from mloop.monitoring.windows import read_rows
    from mloop.traffic.labels import read_labels

    cfg = project.config
    since = until - window
    rows = read_rows(project.log_store, since=since, until=until)
    labels = read_labels(project.log_store)
    if rows.num_rows == 0 or labels.num_rows == 0:
        return pa.table({})
    joined = rows.join(labels, keys="_request_id", join_type="inner")
    features = [c for c in joined.column_names if not c.startswith("_") and c != "label"]
    time_col = cfg.features.time_column or "_ts"
    target = joined.column("label")
    out = {c: joined.column(c) for c in features if c not in (cfg.target, time_col)}
    # security.pii: the log holds digests, masks or nothing for these inputs, while the
    # served model receives raw values. A model retrained on those would learn from
    # stand-ins it never sees again: the traffic rows give it missing values instead.
    for c in cfg.security.pii:
        out[c] = pa.nulls(joined.num_rows)
    out[cfg.target] = target
    out[time_col] = joined.column("_ts")
    return pa.table(out).sort_by([(time_col, "ascending")])


def build_training_data(project: Project, *, until: datetime, champion: int | None
                        ) -> TrainingData:
    """Write the retraining table; MloopError when there are too few labelled rows."""
    cfg = project.config.loop.retrain
    traffic = labelled_traffic(project, until=until, window=cfg.window)
    labelled = traffic.num_rows
    if labelled < cfg.min_labelled_rows:
        raise MloopError(f"only {labelled} labelled row(s) in the last {cfg.window} of "
                         f"traffic; a retrain needs loop.retrain.min_labelled_rows = "
                         f"{cfg.min_labelled_rows}")
    traffic, joined = _as_entity_table(project, traffic)
    table = _original_types(project, champion, traffic) if champion is not None else traffic
    original = 0
    if cfg.include_original and champion is not None:
        table, original = _with_original(project, champion, table)
    # through the outputs store: temp + rename locally, one PUT on s3://
    rel = f"retrain/traffic-{until:%Y%m%dT%H%M%S}-{int(time.time())}.parquet"
    project.outputs.write_parquet(rel, table)
    return TrainingData(project.outputs.uri_for(rel), table.num_rows, labelled, original,
                        until - cfg.window, until, joined)


def _as_entity_table(project: Project, traffic: pa.Table
                     ) -> tuple[pa.Table, dict[str, Any] | None]:
    """With a feature store: ``traffic`` without the looked-up columns (join keys,
    request-time columns, event time and label stay), which the pipeline's ingest step joins
    again as of each row's time; and what that join will be, for the retrain's record.
    Unchanged (and None) without one."""
    if project.config.features.store != "feast":
        return traffic, None
    from mloop.features.service import project_repo

    repo, refs = project_repo(project)
    looked_up = [r.partition(":")[2] for r in refs]
    logged = [c for c in looked_up if c in traffic.column_names]
    keys = sorted({k for view in {r.partition(":")[0] for r in refs}
                   for k in repo.join_keys(view)})
    missing = [k for k in keys if k not in traffic.column_names]
    if missing:
        raise MloopError(f"the labelled traffic has no join key {', '.join(missing)}: the "
                         f"feature store's values cannot be joined onto it for a retrain")
    return traffic.drop_columns(logged), {
        "store": "feast", "feature_refs": refs, "join_keys": keys,
        "time_column": project.config.features.time_column,
        "definitions_hash": repo.definitions_hash, "logged_values_dropped": logged}


def _original_types(project: Project, champion: int, table: pa.Table) -> pa.Table:
    """Columns back to the types of the champion's training data where that is lossless
    (labels are stored as doubles; a count target was an integer, and the project's
    validation rules may say so)."""
    from mloop.registry.candidates import get_version

    digest = dict(get_version(project, champion).tags or {}).get("mloop.snapshot.train")
    if not digest:
        return table
    schema = project.snapshots.profile(digest).get("schema", {})
    for i, name in enumerate(table.column_names):
        want = schema.get(name)
        if not want or want == str(table.schema.field(name).type):
            continue
        try:
            col = table.column(name).cast(pa.type_for_alias(want), safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, KeyError):
            continue
        table = table.set_column(i, name, col)
    return table


def _with_original(project: Project, champion: int, traffic: pa.Table) -> tuple[pa.Table, int]:
    from mloop.registry.candidates import get_version

    tags = dict(get_version(project, champion).tags or {})
    digest = tags.get("mloop.snapshot.train")
    if not digest:
        return traffic, 0
    original = project.snapshots.read_table(digest)
    cols = [c for c in traffic.column_names if c in original.column_names]
    original = original.select(cols)
    original = original.cast(pa.schema([traffic.schema.field(c) for c in cols]), safe=False)
    table = pa.concat_tables([original, traffic.select(cols)])
    time_col = project.config.features.time_column
    if time_col and time_col in table.column_names:
        table = table.sort_by([(time_col, "ascending")])
    return table, original.num_rows


def _schema_of(project: Project, path: str) -> pa.Schema:
    """The retraining table's columns: read through the outputs store that wrote it (which
    opens it when sealed at rest), or from ``path`` itself if it lies elsewhere."""
    import pyarrow.parquet as pq

    from mloop.storage import filesystem

    outputs = project.outputs
    base = outputs.uri_for("").rstrip("/") + "/"
    if path.startswith(base):
        return outputs.read_parquet_schema(path.removeprefix(base))
    fs, where = filesystem(path)
    return pq.read_schema(where, filesystem=fs)


def retrain(project: Project, data: TrainingData, *, on_event: Any = None,
            refit: bool = False) -> dict[str, Any]:
    """Run the project's pipeline on ``data``; returns the new version and what it cost.
    ``refit`` fits on every row, the holdout too (``split.refit``): the held-out fit on the
    same data must have passed its gates first (``mloop.registry.refit``)."""
    from mloop.config import DataConfig
    from mloop.memory import PeakMemory
    from mloop.project import Project as _Project
    from mloop.registry.training import train_candidate

    present = set(_schema_of(project, data.path).names)
    features = project.config.features.model_copy(update={
        "exclude": [c for c in project.config.features.exclude if c in present]})
    split = project.config.split.model_copy(update={"refit": refit})
    config = project.config.model_copy(update={"data": DataConfig(path=str(data.path)),
                                               "features": features, "split": split})
    retrain_project = _Project(project.root, config)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    with PeakMemory() as peak:  # the controller gates and rolls out itself
        trained = train_candidate(retrain_project, on_event=on_event, gate=False)
    return {"version": trained.version, "pipeline_run_id": trained.pipeline_run_id,
            "seconds": round(time.perf_counter() - t0, 2),
            "cpu_seconds": round(time.process_time() - cpu0, 2),
            "peak_memory_mb": round(peak.peak_mb, 1),
            "training_rows": data.rows, "labelled_rows": data.labelled_rows,
            "original_rows": data.original_rows, "features": data.features}


def event_time_now(project: Project) -> datetime | None:
    """The loop's clock: the event clock of the log's answered rows (see
    ``mloop.monitoring.windows.event_clock``: the newest event time, unless fewer than ten
    requests lie after a silence of more than a day, as a smoke test after a replay would).
    Day folders are read newest first until enough distinct event times are in hand, so
    usually only the newest day is read. Segments found unreadable are quarantined and
    recorded in the audit chain."""
    from mloop.monitoring.windows import CLOCK_CONFIRMATIONS, event_clock
    from mloop.traffic.inference_log import log_days, read_segments, segment_files
    from mloop.traffic.quarantine import record_quarantine_events

    store = project.log_store
    chunks: list[pa.Array] = []
    for day in reversed(log_days(store)):
        for t in read_segments(store, segment_files(store, first_day=day, last_day=day)):
            answered = t.filter(pc.not_equal(t.column("_role"), "shadow"))
            chunks += answered.column("_ts").cast(pa.timestamp("us", tz="UTC")).chunks
        if chunks and pc.count_distinct(pa.chunked_array(chunks)).as_py() \
                > 2 * CLOCK_CONFIRMATIONS:
            break
    record_quarantine_events(store, project.store)
    if not chunks:
        return None
    return event_clock(pa.chunked_array(chunks, pa.timestamp("us", tz="UTC")))


def count_labelled_since(project: Project, since: datetime | None) -> int:
    from mloop.monitoring.windows import read_rows
    from mloop.traffic.labels import read_labels

    rows = read_rows(project.log_store, since=since)
    labels = read_labels(project.log_store)
    if rows.num_rows == 0 or labels.num_rows == 0:
        return 0
    return int(pc.sum(pc.is_in(rows.column("_request_id"),
                               value_set=labels.column("_request_id"))).as_py() or 0)
