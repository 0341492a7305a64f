"""Reading MLflow's registry and runs: straight from its SQL schema when it is one mloop knows.

``import mlflow`` and opening an ``MlflowClient`` on a SQL store cost seconds per process
(MLflow's modules, its ORM mappers, its schema check), and a read command only needs a few
rows. When the tracking and registry URIs are databases MLflow writes to (sqlite, postgresql,
mysql) and their ``alembic_version`` is a revision this module was checked against (those
listed in ``KNOWN_MLFLOW_REVISIONS``; ``tests/test_tracking_read.py`` compares every reading with
``MlflowClient`` on a real store), :class:`SqlTrackingReader` runs a handful of SQLAlchemy Core
queries over the columns it names below, without reflection. Anything else (an HTTP tracking
server, a file store, a newer or older MLflow schema, MLflow workspaces switched on) gets
:class:`ClientTrackingReader`, the same answers through ``MlflowClient``. The one write that
takes the same road is an alias change (``tracking_sql.set_model_alias``, on this reader's
engine).

The schema check is one indexed query per database per process: cheaper than a cached verdict
would be to look up, and it cannot go stale when someone runs ``mlflow db upgrade``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import sqlalchemy as sa

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# MLflow schema revisions (alembic_version of MLflow's own database) whose tables and meaning
# this module reproduces. 3.17.x's head; add a revision only after the comparison tests pass
# on it.
KNOWN_MLFLOW_REVISIONS = frozenset({"dc11669786a5"})
SQL_SCHEMES = ("sqlite", "postgresql", "mysql")
DEFAULT_WORKSPACE = "default"
DELETED_STAGE = "Deleted_Internal"  # MLflow's soft-deleted model versions
_METRIC_TAG = "mloop.metric."
_CHUNK = 500

# The columns of MLflow's tables that mloop reads (and, for aliases, writes: tracking_sql).
_meta = sa.MetaData()
MODEL_VERSIONS = sa.Table(
    "model_versions", _meta,
    sa.Column("workspace", sa.String), sa.Column("name", sa.String),
    sa.Column("version", sa.Integer), sa.Column("creation_time", sa.BigInteger),
    sa.Column("last_updated_time", sa.BigInteger), sa.Column("description", sa.String),
    sa.Column("user_id", sa.String), sa.Column("current_stage", sa.String),
    sa.Column("source", sa.String), sa.Column("run_id", sa.String),
    sa.Column("status", sa.String), sa.Column("status_message", sa.String),
    sa.Column("run_link", sa.String), sa.Column("storage_location", sa.String))
VERSION_TAGS = sa.Table(
    "model_version_tags", _meta,
    sa.Column("workspace", sa.String), sa.Column("name", sa.String),
    sa.Column("version", sa.Integer), sa.Column("key", sa.String), sa.Column("value", sa.String))
ALIASES = sa.Table(
    "registered_model_aliases", _meta,
    sa.Column("workspace", sa.String), sa.Column("name", sa.String),
    sa.Column("alias", sa.String), sa.Column("version", sa.Integer))
RUNS = sa.Table(
    "runs", _meta,
    sa.Column("run_uuid", sa.String), sa.Column("name", sa.String),
    sa.Column("experiment_id", sa.Integer), sa.Column("user_id", sa.String),
    sa.Column("status", sa.String), sa.Column("start_time", sa.BigInteger),
    sa.Column("end_time", sa.BigInteger), sa.Column("lifecycle_stage", sa.String),
    sa.Column("artifact_uri", sa.String))
PARAMS = sa.Table("params", _meta, sa.Column("run_uuid", sa.String),
                   sa.Column("key", sa.String), sa.Column("value", sa.String))
TAGS = sa.Table("tags", _meta, sa.Column("run_uuid", sa.String),
                 sa.Column("key", sa.String), sa.Column("value", sa.String))
LATEST_METRICS = sa.Table(
    "latest_metrics", _meta, sa.Column("run_uuid", sa.String), sa.Column("key", sa.String),
    sa.Column("value", sa.Float), sa.Column("is_nan", sa.Boolean))
ALEMBIC_VERSION = sa.Table("alembic_version", _meta, sa.Column("version_num", sa.String))


@dataclass(frozen=True)
class ModelVersionRecord:
    """One registered version as MLflow stores it (``creation_timestamp`` in ms since the
    epoch, as MLflow's entity names it), with every alias pointing at it."""

    name: str
    version: int
    creation_timestamp: int | None
    last_updated_timestamp: int | None
    description: str | None
    user_id: str | None
    current_stage: str | None
    source: str | None
    run_id: str | None
    status: str | None
    status_message: str | None
    run_link: str | None
    aliases: tuple[str, ...] = ()  # sorted
    tags: dict[str, str] = field(default_factory=dict)
    # where the model's files are (MLflow 3 keeps it beside ``source``, a ``models:/m-...``
    # URI); None when read through MlflowClient, which does not expose it. A locator, not
    # part of what the version is: left out of equality between the two readers' records
    storage_location: str | None = field(default=None, compare=False)

    @property
    def metrics(self) -> dict[str, float]:
        """The holdout metrics mloop tagged the version with at registration."""
        return {k[len(_METRIC_TAG):]: float(v) for k, v in self.tags.items()
                if k.startswith(_METRIC_TAG)}


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run: its info, params, tags and latest metric values (NaN kept as NaN)."""

    run_id: str
    run_name: str | None
    experiment_id: str
    user_id: str | None
    status: str | None
    start_time: int | None
    end_time: int | None
    lifecycle_stage: str | None
    artifact_uri: str | None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class TrackingReader(Protocol):
    """What the read services ask of MLflow. Missing things are ``None`` or empty, never an
    exception: a read command shows what is recorded."""

    kind: str  # "sql" (MLflow's schema, directly) | "client" (MlflowClient)

    def model_versions(self, model: str, *, limit: int = 1000) -> list[ModelVersionRecord]:
        """Newest version first."""
        ...

    def model_version(self, model: str, version: int) -> ModelVersionRecord | None: ...

    def aliases(self, model: str) -> dict[str, int]: ...

    def alias(self, model: str, alias: str) -> int | None: ...

    def run(self, run_id: str) -> RunRecord | None: ...


class SqlTrackingReader:
    """Reads MLflow's tables with SQLAlchemy Core; build it with :func:`sql_reader`."""

    kind = "sql"

    def __init__(self, registry: sa.Engine, tracking: sa.Engine) -> None:
        self.registry = registry
        self.tracking = tracking

    # ------------------------------------------------------------------ registry
    def _version_rows(self, conn: sa.Connection, model: str, where: Any,
                      limit: int) -> list[ModelVersionRecord]:
        mv = MODEL_VERSIONS
        rows = conn.execute(sa.select(mv).where(
            mv.c.workspace == DEFAULT_WORKSPACE, mv.c.name == model,
            mv.c.current_stage != DELETED_STAGE, where)
            .order_by(mv.c.version.desc()).limit(limit)).all()
        if not rows:
            return []
        numbers = [r.version for r in rows]
        tags: dict[int, dict[str, str]] = {n: {} for n in numbers}
        tq = sa.select(VERSION_TAGS.c.version, VERSION_TAGS.c.key, VERSION_TAGS.c.value
                       ).where(VERSION_TAGS.c.workspace == DEFAULT_WORKSPACE,
                               VERSION_TAGS.c.name == model)
        for i in range(0, len(numbers), _CHUNK):
            for t in conn.execute(tq.where(VERSION_TAGS.c.version.in_(
                    numbers[i : i + _CHUNK]))):
                tags[t.version][t.key] = t.value
        by_version: dict[int, list[str]] = {}
        for alias, version in self._alias_rows(conn, model).items():
            by_version.setdefault(version, []).append(alias)
        return [ModelVersionRecord(
            name=r.name, version=int(r.version), creation_timestamp=r.creation_time,
            last_updated_timestamp=r.last_updated_time, description=r.description,
            user_id=r.user_id, current_stage=r.current_stage, source=r.source,
            run_id=r.run_id, status=r.status, status_message=r.status_message,
            run_link=r.run_link, aliases=tuple(sorted(by_version.get(r.version, []))),
            tags=tags[r.version], storage_location=r.storage_location) for r in rows]

    def _alias_rows(self, conn: sa.Connection, model: str) -> dict[str, int]:
        a = ALIASES
        return {r.alias: int(r.version) for r in conn.execute(
            sa.select(a.c.alias, a.c.version).where(a.c.workspace == DEFAULT_WORKSPACE,
                                                    a.c.name == model))}

    def model_versions(self, model: str, *, limit: int = 1000) -> list[ModelVersionRecord]:
        with self.registry.connect() as conn:
            return self._version_rows(conn, model, sa.true(), limit)

    def model_version(self, model: str, version: int) -> ModelVersionRecord | None:
        with self.registry.connect() as conn:
            rows = self._version_rows(conn, model, MODEL_VERSIONS.c.version == int(version), 1)
        return rows[0] if rows else None

    def aliases(self, model: str) -> dict[str, int]:
        with self.registry.connect() as conn:
            return self._alias_rows(conn, model)

    def alias(self, model: str, alias: str) -> int | None:
        # MLflow answers only when the version the alias names still exists (not deleted)
        a, mv = ALIASES, MODEL_VERSIONS
        q = (sa.select(a.c.version).select_from(a.join(mv, sa.and_(
            mv.c.workspace == a.c.workspace, mv.c.name == a.c.name,
            mv.c.version == a.c.version)))
            .where(a.c.workspace == DEFAULT_WORKSPACE, a.c.name == model, a.c.alias == alias,
                   mv.c.current_stage != DELETED_STAGE))
        with self.registry.connect() as conn:
            version = conn.execute(q).scalar()
        return int(version) if version is not None else None

    # ------------------------------------------------------------------ runs
    def run(self, run_id: str) -> RunRecord | None:
        with self.tracking.connect() as conn:
            r = conn.execute(sa.select(RUNS).where(RUNS.c.run_uuid == run_id)).first()
            if r is None:
                return None
            params = {p.key: p.value for p in conn.execute(
                sa.select(PARAMS.c.key, PARAMS.c.value).where(PARAMS.c.run_uuid == run_id))}
            tags = {t.key: t.value for t in conn.execute(
                sa.select(TAGS.c.key, TAGS.c.value).where(TAGS.c.run_uuid == run_id))}
            metrics = {m.key: (math.nan if m.is_nan else float(m.value)) for m in conn.execute(
                sa.select(LATEST_METRICS.c.key, LATEST_METRICS.c.value,
                          LATEST_METRICS.c.is_nan).where(LATEST_METRICS.c.run_uuid == run_id))}
        return RunRecord(run_id=r.run_uuid, run_name=r.name or tags.get("mlflow.runName"),
                         experiment_id=str(r.experiment_id), user_id=r.user_id,
                         status=r.status, start_time=r.start_time, end_time=r.end_time,
                         lifecycle_stage=r.lifecycle_stage, artifact_uri=r.artifact_uri,
                         params=params, tags=tags, metrics=metrics)

    def close(self) -> None:
        self.registry.dispose()
        if self.tracking is not self.registry:
            self.tracking.dispose()


class ClientTrackingReader:
    """The same answers through ``MlflowClient`` (created on first use: importing MLflow is
    the expensive part this reader exists to avoid when it can)."""

    kind = "client"

    def __init__(self, client: Callable[[], MlflowClient]) -> None:
        self._client_factory = client

    @functools.cached_property
    def client(self) -> MlflowClient:
        return self._client_factory()

    @staticmethod
    def _record(mv: Any, aliases: dict[str, int]) -> ModelVersionRecord:
        version = int(mv.version)
        return ModelVersionRecord(
            name=mv.name, version=version, creation_timestamp=mv.creation_timestamp,
            last_updated_timestamp=mv.last_updated_timestamp, description=mv.description,
            user_id=mv.user_id, current_stage=mv.current_stage, source=mv.source,
            run_id=mv.run_id, status=mv.status, status_message=mv.status_message,
            run_link=mv.run_link,
            aliases=tuple(sorted(a for a, v in aliases.items() if v == version)),
            tags=dict(mv.tags or {}))

    def model_versions(self, model: str, *, limit: int = 1000) -> list[ModelVersionRecord]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(
                f"name='{model}'", max_results=limit, order_by=["version_number DESC"])
        except MlflowException:
            return []
        aliases = self.aliases(model)
        return [self._record(mv, aliases) for mv in found]

    def model_version(self, model: str, version: int) -> ModelVersionRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(model, str(version))
        except MlflowException:
            return None
        return self._record(mv, {a: int(mv.version) for a in mv.aliases or []})

    def aliases(self, model: str) -> dict[str, int]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_registered_model(model).aliases or {}
        except MlflowException:
            return {}
        return {alias: int(version) for alias, version in found.items()}

    def alias(self, model: str, alias: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            return int(self.client.get_model_version_by_alias(model, alias).version)
        except MlflowException:
            return None

    def run(self, run_id: str) -> RunRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            r = self.client.get_run(run_id)
        except MlflowException:
            return None
        info, data = r.info, r.data
        return RunRecord(run_id=info.run_id, run_name=info.run_name,
                         experiment_id=str(info.experiment_id), user_id=info.user_id,
                         status=info.status, start_time=info.start_time,
                         end_time=info.end_time, lifecycle_stage=info.lifecycle_stage,
                         artifact_uri=info.artifact_uri, params=dict(data.params),
                         tags=dict(data.tags), metrics=dict(data.metrics))

    def close(self) -> None:
        pass


def is_sql_uri(uri: str | None) -> bool:
    """A database URI MLflow's SQL store writes to (``sqlite:``, ``postgresql+psycopg:``...)."""
    return uri is not None and uri.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES


def mlflow_schema_revision(engine: sa.Engine) -> str | None:
    """The Alembic revision of an MLflow database, or None if it has none (or is not one)."""
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(ALEMBIC_VERSION.c.version_num)).scalar()
    except sa.exc.SQLAlchemyError:
        return None


def _workspaces_on() -> bool:
    on = os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").strip().lower() in ("1", "true", "yes")
    chosen = os.environ.get("MLFLOW_WORKSPACE", "").strip()
    return on or chosen not in ("", DEFAULT_WORKSPACE)


def _engine(uri: str) -> sa.Engine:
    return sa.create_engine(uri, connect_args={"timeout": 30} if uri.startswith("sqlite") else {})


def _missing_sqlite_file(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):])


def sql_reader(tracking_uri: str, registry_uri: str | None = None) -> SqlTrackingReader | None:
    """A direct reader when both URIs are MLflow databases of a known revision, else None
    (a SQLite file that does not exist yet is left for MLflow to create)."""
    registry_uri = registry_uri or tracking_uri
    uris = {tracking_uri, registry_uri}
    if (not all(is_sql_uri(u) for u in uris) or any(_missing_sqlite_file(u) for u in uris)
            or _workspaces_on()):
        return None
    try:
        engines = {uri: _engine(uri) for uri in uris}
    except (ImportError, sa.exc.SQLAlchemyError):  # e.g. no driver: MLflow's error is clearer
        return None
    if all(mlflow_schema_revision(e) in KNOWN_MLFLOW_REVISIONS for e in engines.values()):
        return SqlTrackingReader(engines[registry_uri], engines[tracking_uri])
    for engine in engines.values():
        engine.dispose()
    return None


def open_reader(tracking_uri: str, registry_uri: str | None,
                client: Callable[[], MlflowClient]) -> TrackingReader:
    """The direct reader when the store allows it, else one that asks ``client()``."""
    return sql_reader(tracking_uri, registry_uri) or ClientTrackingReader(client)
