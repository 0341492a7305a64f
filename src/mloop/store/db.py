"""The Store: mloop's metadata in any SQLAlchemy database (SQLite by default, PostgreSQL at
scale). Opening a store brings its schema to the latest Alembic revision."""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import sqlalchemy as sa
from sqlalchemy.orm import Session, load_only, sessionmaker

from mloop.errors import RunNotFoundError
from mloop.store.models import (
    GateResultRow,
    GateRunRow,
    PipelineRunRow,
    SnapshotRow,
    StepRunRow,
)

MIGRATIONS = Path(__file__).parent / "migrations"
HEAD_REVISION = "0012"  # the newest file in migrations/versions (a test keeps them in step)


def utcnow() -> datetime:
    return datetime.now(UTC)


@overload
def as_utc(dt: datetime) -> datetime: ...
@overload
def as_utc(dt: None) -> None: ...
def as_utc(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; every time mloop stores is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def json_safe(value: Any) -> Any:
    """``value`` as the JSON column will return it, with NaN/inf as null (PostgreSQL's json
    type rejects them, and a hash must not depend on how a database spells them)."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(json.dumps(value, default=str)))


def _sqlite_explicit_begin(engine: sa.Engine) -> None:
    """Let mloop open SQLite write transactions with BEGIN IMMEDIATE.

    pysqlite defers BEGIN until the first write, so two processes can both read and then one
    fails with "database is locked" instead of a clear message. With
    ``execution_options(immediate=True)`` the second writer waits for the first, then reads
    what the first committed (recipe from SQLAlchemy's SQLite dialect docs).
    """

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Store:
    def __init__(self, url: str, *, upgrade: bool = True, keys_dir: Path | None = None) -> None:
        """``keys_dir``: where the audit chain's key and checkpoint live, outside the store
        (:mod:`mloop.security.audit_key`). The project passes ``.mloop/keys``; a bare SQLite
        store defaults to ``keys/`` beside its file; another store without one takes its
        key from ``MLOOP_AUDIT_KEY`` and keeps no checkpoint."""
        self.url = url
        if keys_dir is None and url.startswith("sqlite:///") and not url.endswith(":memory:"):
            keys_dir = Path(url[len("sqlite:///") :]).parent / "keys"
        self.keys_dir = keys_dir
        if url.startswith("sqlite:///") and not url.endswith(":memory:"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, connect_args=connect_args)
        if url.startswith("sqlite"):
            _sqlite_explicit_begin(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: a transaction that reads, then writes, must hold the write lock from its
        # BEGIN; see session(write=True)
        self._writes = sessionmaker(self.engine.execution_options(immediate=True),
                                    expire_on_commit=False)
        if upgrade:
            self.upgrade()

    def upgrade(self, revision: str = "head") -> None:
        if revision == "head" and self.current_revision() == HEAD_REVISION:
            return  # the common case; skips loading Alembic's machinery (~1 s per process)
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        # immediate: two processes opening an old store at once migrate it one after the
        # other (the second finds it at head), not both at once
        with self.engine.execution_options(immediate=True).begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("select version_num from alembic_version")).scalar()

    def session(self, *, write: bool = False) -> Session:
        """A session; ``write=True`` for one that will write what it read.

        On SQLite a deferred transaction holds a read lock until its first write; if another
        connection (another controller, or this process's lease renewal) is then waiting to
        commit, SQLite answers "database is locked" at once rather than wait, since each holds
        what the other needs. A write session begins IMMEDIATE: it waits (up to the 30 s busy
        timeout) for the other writer, then reads what that one committed. Read-only sessions
        stay deferred so readers never queue behind each other.
        """
        return self._writes() if write else self._sessions()

    # ------------------------------------------------------------------ pipeline runs
    def create_pipeline_run(self, *, project: str, pipeline: str, config_hash: str,
                            params: dict[str, Any] | None = None) -> PipelineRunRow:
        row = PipelineRunRow(id=uuid.uuid4().hex, project=project, pipeline=pipeline,
                             status="created", config_hash=config_hash, params=params or {},
                             started_at=utcnow())
        with self.session(write=True) as s, s.begin():
            s.add(row)
        return row

    def update_pipeline_run(self, run_id: str, **fields: Any) -> None:
        with self.session(write=True) as s, s.begin():
            row = s.get(PipelineRunRow, run_id)
            if row is None:
                raise RunNotFoundError(f"no pipeline run '{run_id}'")
            for k, v in fields.items():
                setattr(row, k, v)

    def get_pipeline_run(self, run_id: str) -> PipelineRunRow:
        """By full id or a unique prefix (>= 4 chars)."""
        with self.session() as s:
            row = s.get(PipelineRunRow, run_id)
            if row is None and len(run_id) >= 4:
                rows = s.scalars(sa.select(PipelineRunRow).where(
                    PipelineRunRow.id.startswith(run_id)).limit(2)).all()
                row = rows[0] if len(rows) == 1 else None
            if row is None:
                raise RunNotFoundError(f"no pipeline run '{run_id}' (see `mloop runs list`)")
            row.started_at = as_utc(row.started_at)  # type: ignore[assignment]
            row.ended_at = as_utc(row.ended_at)
            return row

    def list_pipeline_runs(self, *, project: str | None = None,
                           limit: int = 20) -> list[PipelineRunRow]:
        q = sa.select(PipelineRunRow).order_by(PipelineRunRow.started_at.desc()).limit(limit)
        if project is not None:
            q = q.where(PipelineRunRow.project == project)
        with self.session() as s:
            rows = list(s.scalars(q).all())
        for r in rows:
            r.started_at = as_utc(r.started_at)  # type: ignore[assignment]
            r.ended_at = as_utc(r.ended_at)
        return rows

    # ------------------------------------------------------------------ step runs
    def start_step(self, *, pipeline_run_id: str, step: str, cache_key: str,
                   inputs: dict[str, Any], mlflow_run_id: str | None = None) -> int:
        row = StepRunRow(pipeline_run_id=pipeline_run_id, step=step, status="running",
                         mlflow_run_id=mlflow_run_id,
                         cache_key=cache_key, cache_hit=False, inputs=inputs, outputs={},
                         started_at=utcnow(), attempts=1)
        with self.session(write=True) as s, s.begin():
            s.add(row)
            s.flush()
            return row.id

    def finish_step(self, step_run_id: int, **fields: Any) -> None:
        with self.session(write=True) as s, s.begin():
            row = s.get(StepRunRow, step_run_id)
            if row is None:
                raise RunNotFoundError(f"no step run {step_run_id}")
            fields.setdefault("ended_at", utcnow())
            for k, v in fields.items():
                setattr(row, k, v)
            started = as_utc(row.started_at)
            if row.duration_s is None and started is not None:
                row.duration_s = (fields["ended_at"] - started).total_seconds()

    def step_runs(self, pipeline_run_id: str) -> list[StepRunRow]:
        q = (sa.select(StepRunRow).where(StepRunRow.pipeline_run_id == pipeline_run_id)
             .order_by(StepRunRow.id))
        with self.session() as s:
            return list(s.scalars(q).all())

    def step_runs_of(self, pipeline_run_ids: list[str]) -> dict[str, list[StepRunRow]]:
        """The steps of several pipeline runs in one query (a list page of runs would
        otherwise ask once per run), each run's in execution order; a run without steps
        maps to an empty list. A summary: ``inputs``, ``effects`` and ``traceback`` (the
        bulk of a row) are not loaded, and reading them raises; :meth:`step_runs` has all."""
        out: dict[str, list[StepRunRow]] = {rid: [] for rid in pipeline_run_ids}
        if not pipeline_run_ids:
            return out
        s_ = StepRunRow
        q = (sa.select(s_).where(s_.pipeline_run_id.in_(pipeline_run_ids)).order_by(s_.id)
             .options(load_only(s_.pipeline_run_id, s_.step, s_.status, s_.cache_key,
                                s_.cache_hit, s_.outputs, s_.mlflow_run_id, s_.started_at,
                                s_.ended_at, s_.duration_s, s_.peak_memory_mb, s_.attempts,
                                s_.error)))
        with self.session() as s:
            for row in s.scalars(q).all():
                out[row.pipeline_run_id].append(row)
        return out

    def latest_step_run(self, pipeline_run_id: str, step: str) -> StepRunRow | None:
        q = (sa.select(StepRunRow)
             .where(StepRunRow.pipeline_run_id == pipeline_run_id, StepRunRow.step == step,
                    StepRunRow.status == "succeeded")
             .order_by(StepRunRow.id.desc()).limit(1))
        with self.session() as s:
            return s.scalars(q).first()

    def find_cached(self, step: str, cache_key: str) -> StepRunRow | None:
        """The newest successful, non-cached execution of ``step`` with this key."""
        q = (sa.select(StepRunRow)
             .where(StepRunRow.step == step, StepRunRow.cache_key == cache_key,
                    StepRunRow.status == "succeeded")
             .order_by(StepRunRow.id.desc()).limit(1))
        with self.session() as s:
            return s.scalars(q).first()

    # ------------------------------------------------------------------ snapshots
    def record_snapshot(self, *, digest: str, rows: int, columns: int, source: str,
                        uri: str) -> None:
        # Another process may record the same digest at the same moment: same content, so
        # losing that race is success.
        with contextlib.suppress(sa.exc.IntegrityError), self.session() as s, s.begin():
            if s.get(SnapshotRow, digest) is None:
                s.add(SnapshotRow(digest=digest, rows=rows, columns=columns, source=source,
                                  uri=uri, created_at=utcnow()))

    def list_snapshots(self, limit: int = 20) -> list[SnapshotRow]:
        q = sa.select(SnapshotRow).order_by(SnapshotRow.created_at.desc()).limit(limit)
        with self.session() as s:
            return list(s.scalars(q).all())

    # ------------------------------------------------------------------ gates
    def record_gate_run(self, report: Any, *, gates_hash: str | None = None) -> int:
        """Store a GateReport (mloop.registry.gates) as one run and its results, atomically."""
        with self.session(write=True) as s, s.begin():
            run = GateRunRow(model=report.model, version=report.version,
                             champion_version=report.champion, passed=report.passed,
                             evaluated_at=utcnow(), gates_hash=gates_hash)
            s.add(run)
            s.flush()
            for r in report.results:
                s.add(GateResultRow(gate_run_id=run.id, gate=r.gate, status=r.status,
                                    value=r.value, threshold=r.threshold,
                                    detail=json_safe(r.detail), message=r.message))
            return run.id

    def latest_gate_runs(self, model: str) -> dict[int, GateRunRow]:
        """The newest gate run of each version of ``model``."""
        q = (sa.select(GateRunRow).where(GateRunRow.model == model)
             .order_by(GateRunRow.id.desc()))
        out: dict[int, GateRunRow] = {}
        with self.session() as s:
            for row in s.scalars(q):
                out.setdefault(row.version, row)
        return out

    def gate_results(self, gate_run_id: int) -> list[GateResultRow]:
        q = (sa.select(GateResultRow).where(GateResultRow.gate_run_id == gate_run_id)
             .order_by(GateResultRow.id))
        with self.session() as s:
            return list(s.scalars(q).all())
