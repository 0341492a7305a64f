"""mloop's own store: Alembic migrations from empty, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.errors import RunNotFoundError
from mloop.store.db import HEAD_REVISION, Store


def _exercise(store: Store) -> None:
    assert store.current_revision() == HEAD_REVISION
    run = store.create_pipeline_run(project="p", pipeline="tabular", config_hash="c" * 64)
    step_id = store.start_step(pipeline_run_id=run.id, step="train", cache_key="k" * 64,
                               inputs={"data": {"kind": "snapshot", "digest": "d"}})
    store.finish_step(step_id, status="succeeded",
                      outputs={"model": {"kind": "pickle", "digest": "m"}})
    store.update_pipeline_run(run.id, status="succeeded")
    assert store.get_pipeline_run(run.id[:8]).status == "succeeded"
    cached = store.find_cached("train", "k" * 64)
    assert cached is not None and cached.outputs["model"]["digest"] == "m"
    assert store.find_cached("train", "x" * 64) is None
    assert store.step_runs(run.id)[0].duration_s is not None
    with pytest.raises(RunNotFoundError, match="no pipeline run 'nope'"):
        store.get_pipeline_run("nope")


def test_sqlite_store_is_created_from_empty_by_migrations(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'sub' / 'mloop.db'}")
    _exercise(store)


@pytest.mark.postgres
def test_postgres_store_is_created_from_empty_by_migrations(pg_url: str) -> None:
    store = Store(pg_url, upgrade=False)
    assert store.current_revision() is None
    store.upgrade()
    _exercise(store)
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"pipeline_runs", "step_runs", "snapshots", "alembic_version"} <= tables
    store.engine.dispose()


def test_head_revision_constant_matches_the_migration_scripts() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from mloop.store.db import HEAD_REVISION, MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


@pytest.mark.postgres
@pytest.mark.slow
def test_a_pipeline_runs_with_its_store_on_postgres(make_project, pg_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project

    monkeypatch.setenv("MLOOP_STORE_URI", pg_url)
    root = make_project()
    first = run_pipeline(open_project(root))
    second = run_pipeline(open_project(root))
    project = open_project(root)
    assert project.store.url == pg_url
    assert [r.id for r in project.store.list_pipeline_runs()] == [second.run_id, first.run_id]
    assert sum(s.cache_hit for s in second.steps) == 6
    assert not (root / ".mloop" / "mloop.db").exists()
    project.store.engine.dispose()


@pytest.mark.postgres
@pytest.mark.slow
def test_bulk_metric_writer_on_an_mlflow_postgres_tracking_store(pg_url: str) -> None:
    from mlflow.tracking import MlflowClient

    from mloop.tracking import BatchLogger

    client = MlflowClient(pg_url)
    run_id = client.create_run(client.create_experiment("pg")).info.run_id
    logger = BatchLogger(client, run_id, tracking_uri=pg_url)
    for i in range(3000):
        logger.log_metric("loss", 1.0 / (i + 1), step=i)
    logger.flush()
    assert logger._sql_writer() is not None  # the bulk path, not the log_batch fallback
    logger.log_metric("loss", 1.0 / 3000, step=2999, timestamp_ms=1)  # older: not the latest
    logger.close()
    history = client.get_metric_history(run_id, "loss")
    assert len(history) == 3001
    assert client.get_run(run_id).data.metrics["loss"] == pytest.approx(1.0 / 3000)


def _upgrade_from_previous_schema(url: str) -> None:
    old = Store(url, upgrade=False)
    old.upgrade("0001")
    with old.engine.begin() as conn:
        conn.execute(sa.text(
            "insert into pipeline_runs (id, project, pipeline, status, config_hash, params, "
            "started_at) values ('r1', 'p', 'tabular', 'succeeded', 'c', '{}', "
            "CURRENT_TIMESTAMP)"))
        conn.execute(sa.text(
            "insert into step_runs (pipeline_run_id, step, status, cache_key, cache_hit, inputs, "
            "outputs, started_at, attempts) values ('r1', 'train', 'succeeded', 'k', false, "
            "'{}', '{\"model\": {\"kind\": \"pickle\", \"digest\": \"m\"}}', "
            "CURRENT_TIMESTAMP, 1)"))
    old.engine.dispose()
    store = Store(url)  # opening upgrades to head
    assert store.current_revision() == HEAD_REVISION
    (row,) = store.step_runs("r1")
    assert row.outputs == {"model": {"kind": "pickle", "digest": "m"}}
    assert row.effects is None
    assert store.find_cached("train", "k") is not None
    store.engine.dispose()


def test_sqlite_store_upgrades_from_the_previous_schema_keeping_rows(tmp_path: Path) -> None:
    _upgrade_from_previous_schema(f"sqlite:///{tmp_path / 'mloop.db'}")


@pytest.mark.postgres
def test_postgres_store_upgrades_from_the_previous_schema_keeping_rows(pg_url: str) -> None:
    _upgrade_from_previous_schema(pg_url)
