"""mloop's own metadata tables (what MLflow does not keep): pipeline runs, step executions and
their cache keys, snapshots. Schema changes go through Alembic (``migrations/``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class PipelineRunRow(Base):
    __tablename__ = "pipeline_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project: Mapped[str] = mapped_column(String(200))
    pipeline: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # created|running|succeeded|failed
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    experiment_id: Mapped[str | None] = mapped_column(String(64))
    config_hash: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)


class StepRunRow(Base):
    __tablename__ = "step_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pipeline_run_id: Mapped[str] = mapped_column(ForeignKey("pipeline_runs.id"))
    step: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))  # running|succeeded|failed|skipped
    cache_key: Mapped[str] = mapped_column(String(64))
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    outputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_s: Mapped[float | None] = mapped_column(Float)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    # what the step recorded on the pipeline's parent run, replayed on cache hits (rev 0002)
    effects: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_step_runs_cache", "step", "cache_key", "status"),
        Index("ix_step_runs_run", "pipeline_run_id"),
    )


class SnapshotRow(Base):
    __tablename__ = "snapshots"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(Text)
    uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class GateRunRow(Base):
    """One evaluation of a version's gates; its results are GateResultRows."""

    __tablename__ = "gate_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    champion_version: Mapped[int | None] = mapped_column(Integer)
    passed: Mapped[bool] = mapped_column(Boolean)
    evaluated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # the gate config (and mloop release) it ran under: a promotion reuses the run only if
    # today's is the same (mloop.registry.gate_report.gates_config_hash); None before 0009
    gates_hash: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index("ix_gate_runs_version", "model", "version"),)


class GateResultRow(Base):
    __tablename__ = "gate_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    gate_run_id: Mapped[int] = mapped_column(ForeignKey("gate_runs.id"))
    gate: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(10))  # pass|fail|skip
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message: Mapped[str | None] = mapped_column(Text)


class EventRow(Base):
    """The audit log: append-only, each row carrying the hash of the one before it."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(50))
    actor: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64))
    # HMAC-SHA256 of ``hash`` under the audit key (kept outside the store); None only for
    # events written before the chain was keyed (migration 0012)
    mac: Mapped[str | None] = mapped_column(String(64), default=None)


class AliasRow(Base):
    """Which version holds an alias now, as mloop last set it. ``revision`` increments on every
    change: a promotion commits only if the revision it read is still current."""

    __tablename__ = "aliases"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    alias: Mapped[str] = mapped_column(String(50), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    revision: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DeploymentRow(Base):
    """Version V held alias A with traffic share W from started_at to ended_at (open: now)."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    alias: Mapped[str] = mapped_column(String(50))
    traffic: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(20))  # promote | rollback | override
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_deployments_model_alias", "model", "alias", "started_at"),)


class AuditHeadRow(Base):
    """The chain's newest hash and length, updated with every event in the same transaction:
    deleting the newest events (which leaves a shorter chain that still verifies) shows up as a
    mismatch against it."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    events: Mapped[int] = mapped_column(Integer)
    head_hash: Mapped[str] = mapped_column(String(64))


class TokenRow(Base):
    """A server API token: only its sha256 is kept (the token is shown once, at creation)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))  # viewer | predict | operator | admin
    # who the token belongs to: the actor of everything done with it (None: not recorded)
    person: Mapped[str | None] = mapped_column(String(200), default=None)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_by: Mapped[str] = mapped_column(String(200))


class MonitorWindowRow(Base):
    """One evaluated window of the inference log: the verdicts in columns (for queries and
    plots), the whole report as JSON. Performance is refreshed when late labels arrive."""

    __tablename__ = "monitor_windows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    spec: Mapped[str] = mapped_column(String(40))  # "1d", "5000rows"
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per (model, spec): one writer wins
    start: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    end: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    rows: Mapped[int] = mapped_column(Integer)
    reference_version: Mapped[int | None] = mapped_column(Integer)
    drifted: Mapped[bool | None] = mapped_column(Boolean)
    drift_share: Mapped[float | None] = mapped_column(Float)
    prediction_drifted: Mapped[bool | None] = mapped_column(Boolean)
    quality_findings: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str | None] = mapped_column(String(50))
    metric_value: Mapped[float | None] = mapped_column(Float)
    reference_metric: Mapped[float | None] = mapped_column(Float)
    labelled_rows: Mapped[int] = mapped_column(Integer)
    label_coverage: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    evaluated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    performance_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("model", "spec", "seq", name="uq_monitor_windows_seq"),
                      Index("ix_monitor_windows_model_end", "model", "spec", "end"),
                      Index("ix_monitor_windows_model_evaluated", "model", "spec",
                            "evaluated_at", "end"),
                      Index("ix_monitor_windows_model_start", "model", "spec", "start"))


class LoopStateRow(Base):
    """The controller's progress for one model, so a restart resumes instead of acting twice.
    ``revision`` increments on every save; a save based on a stale read fails."""

    __tablename__ = "loop_state"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class LoopLeaseRow(Base):
    """Which controller may act for one model, and until when. Taken by compare-and-swap on
    ``generation`` (which grows with every new holder, a fencing token), renewed by its holder
    while it runs, and free once ``expires_at`` has passed or ``released_at`` is set."""

    __tablename__ = "loop_leases"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    generation: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    renewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
