"""Metric rows written straight into an MLflow SQL tracking database.

MLflow's ``log_batch`` builds one ORM object per point and caps a call at 1,000 points; on
SQLite that is ~0.2 s per 1,000 here, so a training loop logging 10,000 points spends seconds
in it. When the tracking URI is a database MLflow itself writes to (sqlite, postgresql,
mysql), mloop inserts the same rows MLflow would (``metrics`` plus the per-key
``latest_metrics`` row, NaN/inf encoded as MLflow encodes them) with one executemany in one
transaction. The schema is checked on first use; if it is not the one this code knows, or the
URI is an HTTP tracking server, the caller falls back to ``log_batch``. The rows read back with
``MlflowClient`` unchanged (tests check it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from mloop.errors import MloopError, ModelNotFoundError

_SCHEMES = ("sqlite", "postgresql", "mysql")
_METRICS = {"key", "value", "timestamp", "run_uuid", "step", "is_nan"}
_LATEST = {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}
_MAX = 1.7976931348623157e308
_CHUNK = 500


def _encode(value: float) -> tuple[float, bool]:
    """MLflow's encoding: NaN is stored as 0 with is_nan; +/-inf as +/-max double."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (_MAX if value > 0 else -_MAX), False
    return value, False


class SqlMetricWriter:
    def __init__(self, engine: sa.Engine, metrics: sa.Table, latest: sa.Table,
                 runs: sa.Table) -> None:
        self.engine = engine
        self.metrics = metrics
        self.latest = latest
        self.runs = runs

    @classmethod
    def for_uri(cls, uri: str | None) -> SqlMetricWriter | None:
        """A writer for ``uri`` when it is an MLflow SQL database of the known schema."""
        if not uri or uri.split(":", 1)[0].split("+", 1)[0] not in _SCHEMES:
            return None
        args = {"timeout": 30} if uri.startswith("sqlite") else {}
        engine = sa.create_engine(uri, connect_args=args)
        try:
            meta = sa.MetaData()
            meta.reflect(engine, only=["metrics", "latest_metrics", "runs"])
        except sa.exc.SQLAlchemyError:
            engine.dispose()
            return None
        metrics, latest = meta.tables["metrics"], meta.tables["latest_metrics"]
        if {c.name for c in metrics.c} != _METRICS or {c.name for c in latest.c} != _LATEST:
            engine.dispose()
            return None
        return cls(engine, metrics, latest, meta.tables["runs"])

    def _insert_ignore(self, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
        from sqlalchemy.dialects import postgresql, sqlite

        dialect = conn.dialect.name
        if dialect == "sqlite":
            stmt: Any = sqlite.insert(self.metrics).on_conflict_do_nothing()
        elif dialect == "postgresql":
            stmt = postgresql.insert(self.metrics).on_conflict_do_nothing()
        else:
            stmt = self.metrics.insert().prefix_with("IGNORE")
        conn.execute(stmt, rows)

    def write(self, run_id: str, points: Sequence[tuple[str, float, int, int]]) -> None:
        """Insert ``(key, value, timestamp_ms, step)`` points for an active run, atomically."""
        if not points:
            return
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        newest: dict[str, dict[str, Any]] = {}
        for key, raw, ts, step in points:
            value, is_nan = _encode(float(raw))
            row = {"key": key, "value": value, "timestamp": int(ts), "run_uuid": run_id,
                   "step": int(step), "is_nan": is_nan}
            rows[(key, value, ts, step, is_nan)] = row
            best = newest.get(key)
            if best is None or (row["step"], row["timestamp"], row["value"]) > (
                    best["step"], best["timestamp"], best["value"]):
                newest[key] = row
        with self.engine.begin() as conn:
            stage = conn.execute(sa.select(self.runs.c.lifecycle_stage).where(
                self.runs.c.run_uuid == run_id)).scalar()
            if stage != "active":
                raise MloopError(f"cannot log metrics to run {run_id}: it is "
                                 f"{stage or 'missing'}, not active")
            self._insert_ignore(conn, list(rows.values()))
            keys = sorted(newest)
            existing: dict[str, Any] = {}
            for i in range(0, len(keys), _CHUNK):
                q = sa.select(self.latest).where(self.latest.c.run_uuid == run_id,
                                                 self.latest.c.key.in_(keys[i : i + _CHUNK]))
                if conn.dialect.name != "sqlite":
                    q = q.with_for_update()
                existing.update({r.key: r for r in conn.execute(q)})
            fresh = [newest[k] for k in keys if k not in existing]
            if fresh:
                conn.execute(self.latest.insert(), fresh)
            for k in keys:
                old, new = existing.get(k), newest[k]
                if old is not None and (new["step"], new["timestamp"], new["value"]) > (
                        old.step, old.timestamp, old.value):
                    conn.execute(self.latest.update().where(
                        self.latest.c.run_uuid == run_id, self.latest.c.key == k).values(
                        value=new["value"], timestamp=new["timestamp"], step=new["step"],
                        is_nan=new["is_nan"]))

    def close(self) -> None:
        self.engine.dispose()


_ALIAS_NAME = re.compile(r"^[A-Za-z_][\w\-]{0,255}$")


def set_model_alias(engine: sa.Engine, model: str, alias: str, version: int | None) -> None:
    """Point ``alias`` of ``model`` at ``version`` (None: remove it) in an MLflow database of
    a known revision, writing the row ``MlflowClient.set_registered_model_alias`` writes.

    Only for an engine a :class:`~mloop.tracking_read.SqlTrackingReader` opened (so the schema
    was checked). Like MLflow it refuses a version that does not exist or was deleted, and
    removing an alias that is not set is not an error.
    """
    from mloop.tracking_read import ALIASES, DEFAULT_WORKSPACE

    if not _ALIAS_NAME.match(alias) or alias.lower() == "latest" or re.match(r"^v\d+$", alias):
        raise MloopError(f"'{alias}' is not an alias MLflow accepts (letters, digits, _ and -; "
                         f"not 'latest' or v<number>)")
    here = sa.and_(ALIASES.c.workspace == DEFAULT_WORKSPACE, ALIASES.c.name == model,
                   ALIASES.c.alias == alias)
    with engine.begin() as conn:
        if version is None:
            conn.execute(ALIASES.delete().where(here))
            return
        _require_version(conn, model, version)
        conn.execute(ALIASES.delete().where(here))
        conn.execute(ALIASES.insert().values(workspace=DEFAULT_WORKSPACE, name=model,
                                             alias=alias, version=int(version)))


def set_model_version_tags(engine: sa.Engine, model: str, version: int,
                           tags: dict[str, str]) -> None:
    """Set tags on a registered version in one transaction, writing the rows
    ``MlflowClient.set_model_version_tag`` writes (an existing key is replaced). Only for an
    engine a :class:`~mloop.tracking_read.SqlTrackingReader` opened (schema checked)."""
    from mloop.tracking_read import DEFAULT_WORKSPACE, VERSION_TAGS

    vt = VERSION_TAGS
    with engine.begin() as conn:
        _require_version(conn, model, version)
        here = sa.and_(vt.c.workspace == DEFAULT_WORKSPACE, vt.c.name == model,
                       vt.c.version == int(version))
        conn.execute(vt.delete().where(here, vt.c.key.in_(list(tags))))
        conn.execute(vt.insert(), [{"workspace": DEFAULT_WORKSPACE, "name": model,
                                    "version": int(version), "key": k, "value": str(v)}
                                   for k, v in tags.items()])


def _require_version(conn: sa.Connection, model: str, version: int) -> None:
    """Refuse, as MLflow does, a version that does not exist or was deleted."""
    from mloop.tracking_read import DEFAULT_WORKSPACE, DELETED_STAGE, MODEL_VERSIONS

    mv = MODEL_VERSIONS
    found = conn.execute(sa.select(mv.c.version).where(
        mv.c.workspace == DEFAULT_WORKSPACE, mv.c.name == model,
        mv.c.version == int(version), mv.c.current_stage != DELETED_STAGE)).first()
    if found is None:
        raise ModelNotFoundError(f"model '{model}' has no version {version} in MLflow",
                                 model=model, version=int(version))
