"""The online side: materializing feature views into the online store, and the skew check
that the online store serves what the offline point-in-time join would give.

Feast's materialization copies, per feature view, the latest value of each entity with an
event timestamp up to ``until`` (inclusive) into the online store. So for an entity looked up
at the instant the last materialization ended, the offline join and the online store must
agree value for value; :func:`check_skew` asks both and lists every difference.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from mloop.errors import MloopError
from mloop.features.repo import FeatureRepo
from mloop.features.training import online_values, training_table


def materialize(repo: FeatureRepo, *, until: datetime) -> dict[str, Any]:
    """Bring the online store up to ``until`` (a timezone-aware instant; naive is UTC) for
    every feature view, from where the last materialization ended (or the view's TTL before
    ``until``). Returns what was done, for the event and ``--json``: ``materialized`` lists
    the views that had anything to copy (empty when every view already reached ``until``)."""
    if until.tzinfo is None:
        until = until.replace(tzinfo=UTC)
    # per view, like Feast's materialize_incremental, except that a view never materialized
    # starts at ``until`` minus its TTL, not at now minus its TTL: ``until`` may be in the past
    # (a backfill, a replay of historical data) and then Feast's default copies nothing
    due = []
    for fv in repo.store.list_feature_views():
        ends = [end for _start, end in fv.materialization_intervals]
        start = max(ends) if ends else (until - fv.ttl if fv.ttl else datetime(1970, 1, 1,
                                                                               tzinfo=UTC))
        if start.tzinfo is None:
            start = start.replace(tzinfo=UTC)
        if start < until:
            due.append((fv, start))
    # every source readable before any view is copied: a missing table (file) fails the
    # command with the online store, the views' intervals and the audit log untouched
    for fv, _start in due:
        try:
            list(fv.batch_source.get_table_column_names_and_types(repo.store.config))
        except Exception as exc:  # psycopg, pyarrow, Feast: the offline store is the boundary
            raise repo.offline_error(fv.name, exc, materializing=True) from exc
    copied: list[str] = []
    for fv, start in due:
        # Feast prints its progress on stdout: stderr keeps `--json`'s stdout one document
        with contextlib.redirect_stdout(sys.stderr):
            try:
                repo.store.materialize(start_date=start, end_date=until,
                                       feature_views=[fv.name])
            except Exception as exc:  # psycopg, redis, Feast: either store
                raise repo.offline_error(fv.name, exc, materializing=True) from exc
        copied.append(fv.name)
    return {"until": until.isoformat(), "feature_views": repo.feature_views,
            "materialized": sorted(copied), "definitions_hash": repo.definitions_hash}


def materialized_until(repo: FeatureRepo, views: list[str]) -> datetime:
    """The instant up to which every one of ``views`` is in the online store."""
    ends = []
    for name in views:
        intervals = repo.store.get_feature_view(name).materialization_intervals
        if not intervals:
            raise MloopError(f"feature view '{name}' was never materialized: run "
                             f"`mloop features materialize` first")
        ends.append(max(end for _start, end in intervals))
    return min(ends)


@dataclass
class SkewReport:
    at: str
    entities: int
    compared: int  # values compared
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b)
    return bool(a == b)


def _native(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def check_skew(repo: FeatureRepo, entities: list[dict[str, Any]], refs: list[str], *,
               at: datetime | None = None) -> SkewReport:
    """Compare the offline join at ``at`` (default: where the materialization ended) with the
    online store for each entity row (a dict of join keys); every differing value is listed
    with both sides."""
    if not entities:
        raise MloopError("no entities to check: the entity table has no rows")
    views = sorted({r.partition(":")[0] for r in refs})
    when = at or materialized_until(repo, views)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    names = [r.partition(":")[2] for r in refs]
    table = pa.Table.from_pylist([{**e, "event_timestamp": when} for e in entities])
    offline, _ = training_table(repo, table, time_column="event_timestamp", refs=refs)
    off_rows = offline.to_pylist()
    on_rows = online_values(repo, entities, refs)
    report = SkewReport(at=when.isoformat(), entities=len(entities),
                        compared=len(entities) * len(names))
    for entity, off, on in zip(entities, off_rows, on_rows, strict=True):
        for name in names:
            a, b = _native(off[name]), _native(on[name])
            if not _same(a, b):
                report.mismatches.append({"entity": entity, "feature": name,
                                          "offline": a, "online": b})
    return report
