"""The Feast scale-out with a PostgreSQL offline store: the flights_feast example's daily
aggregates loaded into PostgreSQL tables (``PostgreSQLSource``), the registry in the same
throwaway database (Feast's SQL registry), the online store in Redis. Through mloop's CLI:
`mloop run` trains on a point-in-time join PostgreSQL computes, identical to the file offline
store's; materialize + check find no skew; `mloop predict` completes a keys-only file as the
file store would; a view whose table does not exist exits 1 naming it, registering nothing."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa

from mloop.cli.app import main
from tests.helpers import FLIGHTS, REPO, copy_flights_feast, copy_project, model_on, require_feast

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

PG_HOST = "127.0.0.1:5432"
REDIS = "127.0.0.1:6379"
DATA = REPO / "examples" / "flights_feast" / "feature_repo" / "data"
VIEWS = ["carrier_daily", "origin_daily"]
LOOKED_UP = ["carrier_flights_1d", "carrier_delay_rate_1d", "origin_flights_1d",
             "origin_delay_rate_1d"]
KEYS_ONLY = ["datetime", "weekday", "hour", "sched_dep_time", "sched_arr_time", "carrier",
             "origin", "dest", "distance"]


def _require_services() -> None:
    import psycopg
    import redis

    try:
        psycopg.connect(f"postgresql://postgres@{PG_HOST}/test", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not running on {PG_HOST} ({exc}): start it with "
                    f"`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                    pytrace=False)
    try:
        redis.Redis.from_url(f"redis://{REDIS}", socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not running on {REDIS} ({exc}): start it with "
                    f"`redis-server --daemonize yes`", pytrace=False)


def _to_postgres(root: Path, database: str, *, tables: dict[str, str] | None = None) -> Path:
    """Point the flights_feast copy at ``root`` to PostgreSQL: its feature views read the
    tables named in ``tables`` (view -> table; default: the view's name), the offline store
    and the SQL registry are ``database``, the online store Redis under a Feast project of its
    own (so no two runs share keys). The Parquet files go: nothing can be read from them."""
    tables = {v: v for v in VIEWS} | (tables or {})
    repo = root / "feature_repo"
    shutil.rmtree(repo / "data")
    defs = (repo / "flights.py").read_text().replace("FileSource, ", "").replace(
        "from feast.types", "from feast.infra.offline_stores.contrib.postgres_offline_store."
        "postgres_source import PostgreSQLSource\nfrom feast.types")
    for view, table in tables.items():
        defs = defs.replace(f'FileSource(path="data/{view}.parquet"',
                            f'PostgreSQLSource(name="{view}_source", table="{table}"')
    assert "FileSource" not in defs and "PostgreSQLSource(" in defs
    (repo / "flights.py").write_text(defs)
    url = f"postgresql+psycopg://postgres@{PG_HOST}/{database}"
    host, port = PG_HOST.split(":")
    (repo / "feature_store.yaml").write_text(f"""\
project: mloop_pg_{uuid.uuid4().hex[:12]}
registry: {{registry_type: sql, path: "{url}", cache_ttl_seconds: 60}}
provider: local
online_store: {{type: redis, connection_string: "{REDIS}"}}
offline_store:
  type: postgres
  host: {host}
  port: {port}
  database: {database}
  db_schema: public
  user: postgres
  password: ""
  sslmode: disable
entity_key_serialization_version: 3
""")
    return root


def _short(root: Path) -> Path:
    """Two days of flights in the entity table (Jan 2-4), as the other feature tests train."""
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace('until: "2013-01-16"', 'until: "2013-01-05"'))
    return root


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A throwaway PostgreSQL database holding the example's aggregates as tables (the same
    rows as its Parquet files), dropped at the end."""
    require_feast()
    _require_services()
    name = f"mloop_feast_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"postgresql+psycopg://postgres@{PG_HOST}/test",
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        engine = sa.create_engine(f"postgresql+psycopg://postgres@{PG_HOST}/{name}")
        for view in VIEWS:
            pd.read_parquet(DATA / f"{view}.parquet").to_sql(view, engine, index=False)
        engine.dispose()
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _teardown_online(root: Path) -> None:
    """Drop the project's keys from the shared Redis. Not ``FeatureStore.teardown()``: on
    Feast 0.67's SQL registry that deletes every project's rows in the database, and the
    other projects sharing it here could not re-apply their views afterwards."""
    from mloop.features.service import project_repo
    from mloop.project import open_project

    store = project_repo(open_project(root))[0].store
    store._get_provider().teardown_infra(store.project, store.list_feature_views(),
                                         store.list_entities())


@pytest.fixture(scope="module")
def trained(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The PostgreSQL-backed copy of flights_feast, trained by `mloop run`."""
    root = _to_postgres(_short(copy_flights_feast(
        tmp_path_factory.mktemp("feast-pg") / "flights_feast")), database)
    code = main(["-C", str(root), "run"])
    assert code == 0, "mloop run failed on the PostgreSQL offline store"
    yield root
    _teardown_online(root)


@pytest.fixture(scope="module")
def file_repo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The embedded example (file offline store) on the same entity table: the reference."""
    from mloop.features.service import project_repo
    from mloop.project import open_project

    require_feast()
    root = _short(copy_flights_feast(tmp_path_factory.mktemp("feast-file") / "flights_feast"))
    return open_project(root), *project_repo(open_project(root))


def _version_tags(root: Path, version: int = 1) -> dict[str, str]:
    from mloop.project import open_project
    from mloop.registry.candidates import get_version

    return dict(get_version(open_project(root), version).tags or {})


def test_training_joins_in_postgresql_and_equals_the_file_stores_table_row_for_row(
        trained: Path, file_repo: Any) -> None:
    from mloop.data.source import read_source
    from mloop.features.service import project_repo
    from mloop.features.training import training_table
    from mloop.project import open_project
    from mloop.registry.lineage import lineage

    project = open_project(trained)
    repo, _ = project_repo(project)
    assert type(repo.store._get_provider().offline_store).__name__ == "PostgreSQLOfflineStore"
    assert {type(repo.store.get_feature_view(v).batch_source).__name__ for v in VIEWS} == {
        "PostgreSQLSource"}
    assert not (trained / "feature_repo" / "data").exists()
    steps = {s["step"]: s["params"] for s in lineage(project, 1)["pipeline_run"]["steps"]}
    assert steps["ingest"]["feast.feature_views"] == "carrier_daily,origin_daily"

    joined = project.snapshots.read_table(_version_tags(trained)["mloop.snapshot.source"])
    file_project, frepo, refs = file_repo
    entities, _ = read_source(file_project.config.data, file_project.root, "datetime")
    want, _ = training_table(frepo, entities, time_column="datetime", refs=refs)
    assert joined.num_rows == want.num_rows > 2000
    assert joined.schema.remove_metadata() == want.schema.remove_metadata()
    got, exp = joined.to_pandas(), want.to_pandas()
    assert got[LOOKED_UP].notna().sum().min() > 0.99 * len(got)
    pd.testing.assert_frame_equal(got, exp, check_exact=True)


def test_materialize_from_postgresql_then_check_finds_no_skew(
        trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a Feast project of its own: its teardown (Redis keys, registry rows) must not touch the
    # trained project's (Feast 0.67's SQL registry then refuses to re-apply the same views)
    root = copy_project(trained, trained.parent / "materialized")
    conf = root / "feature_repo" / "feature_store.yaml"
    conf.write_text(re.sub(r"(?m)^project: .*$", f"project: mloop_pg_{uuid.uuid4().hex[:12]}",
                           conf.read_text()))
    try:
        capsys.readouterr()
        code = main(["-C", str(root), "features", "materialize", "--until", "2013-01-05",
                     "--json"])
        text = capsys.readouterr().out
        assert code == 0, text
        assert json.loads(text)["materialized"] == VIEWS
        code = main(["-C", str(root), "features", "check", "--limit", "100", "--json"])
        text = capsys.readouterr().out
        assert code == 0, text
        result = json.loads(text)
        assert result["entities"] > 10 and result["compared"] == 4 * result["entities"]
        assert result["mismatches"] == []
    finally:
        _teardown_online(root)


def test_point_in_time_predict_completes_a_keys_only_file_as_the_file_store_would(
        trained: Path, file_repo: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.features.training import training_table

    frame = pd.read_parquet(FLIGHTS)
    days = frame[(frame["datetime"] >= "2013-01-05") & (frame["datetime"] < "2013-01-07")]
    frame = days.sample(n=120, random_state=0).reset_index(drop=True)[KEYS_ONLY]
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    frame.to_parquet(src, index=False)
    capsys.readouterr()
    code = main(["-C", str(trained), "predict", "-i", str(src), "-o", str(dst), "--json",
                 "--chunk-rows", "50"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert json.loads(text)["features"]["mode"] == "point-in-time"
    out = pd.read_parquet(dst)

    _, frepo, refs = file_repo  # the same rows completed by the file offline store
    table, _ = training_table(frepo, pa.Table.from_pandas(frame, preserve_index=False),
                              time_column="datetime", refs=refs)
    completed = table.to_pandas()
    for name in LOOKED_UP:
        assert out[name].tolist() == completed[name].tolist(), name
    label, proba = model_on(trained, completed)
    assert out["prediction"].tolist() == label.tolist()
    assert np.allclose(out[["proba_0", "proba_1"]].to_numpy(), proba, atol=1e-12)


@pytest.mark.parametrize("command, doing", [
    (["run"], "read from"),
    (["features", "materialize", "--until", "2013-01-05"], "materialized from"),
])
def test_a_view_whose_table_is_missing_exits_1_naming_it_and_changes_nothing(
        database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        command: list[str], doing: str) -> None:
    from mloop.project import open_project
    from mloop.security.audit import list_events

    root = _to_postgres(_short(copy_flights_feast(tmp_path / "flights_feast")), database,
                        tables={"origin_daily": "origin_weekly"})
    capsys.readouterr()
    code = main(["-C", str(root), *command])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 1, text
    message = " ".join(text.split())
    assert (f"feature view 'origin_daily' could not be {doing} the postgres offline store "
            f"(table 'origin_weekly')") in message
    assert 'UndefinedTable: relation "origin_weekly" does not exist' in message
    assert "LINE" not in text and "^" not in text  # no SQL excerpt, no caret
    project = open_project(root)
    assert project.mlflow.search_model_versions(f"name='{project.config.model_name}'") == []
    assert list_events(project.store, kind="features.materialize") == []
    if command[0] == "features":  # no view copied before the missing table was found
        from mloop.features.service import project_repo

        repo, _ = project_repo(project)
        assert [repo.store.get_feature_view(v).materialization_intervals for v in VIEWS] == [
            [], []]
    engine = sa.create_engine(f"postgresql+psycopg://postgres@{PG_HOST}/{database}")
    with engine.connect() as conn:  # Feast's temporary entity tables are gone
        left = conn.execute(sa.text("select tablename from pg_tables where schemaname = "
                                    "'public' order by tablename")).scalars().all()
    engine.dispose()
    assert set(VIEWS) <= set(left)
    assert not [t for t in left if t.startswith("feast_entity_df")], left


def test_narrower_postgresql_column_types_come_back_as_the_views_declared_types(
        database: str, file_repo: Any, tmp_path: Path) -> None:
    """integer, real, numeric and timestamp-without-zone columns (what a hand-made table often
    has) give the training table the file store's schema: the views declare Int64/Float64."""
    from mloop.features.service import project_repo
    from mloop.features.training import training_table
    from mloop.project import open_project

    engine = sa.create_engine(f"postgresql+psycopg://postgres@{PG_HOST}/{database}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA narrow"))
        for view, key in [("carrier_daily", "carrier"), ("origin_daily", "origin")]:
            conn.execute(sa.text(
                f"CREATE TABLE narrow.{view} AS SELECT {key}::varchar(3) AS {key}, "
                f"{key}_flights_1d::integer AS {key}_flights_1d, "
                f"{key}_delay_rate_1d::{'numeric(12, 9)' if key == 'carrier' else 'real'} "
                f"AS {key}_delay_rate_1d, (event_timestamp AT TIME ZONE 'UTC')::timestamp "
                f"AS event_timestamp FROM public.{view}"))
    engine.dispose()
    root = _to_postgres(_short(copy_flights_feast(tmp_path / "flights_feast")), database)
    conf = root / "feature_repo" / "feature_store.yaml"
    conf.write_text(conf.read_text().replace("db_schema: public", "db_schema: narrow"))
    repo, refs = project_repo(open_project(root))
    frame = pd.read_parquet(FLIGHTS)
    day = frame[(frame["datetime"] >= "2013-01-03") & (frame["datetime"] < "2013-01-04")]
    entities = pa.Table.from_pandas(day.head(300)[KEYS_ONLY], preserve_index=False)
    got, _ = training_table(repo, entities, time_column="datetime", refs=refs)
    want, _ = training_table(file_repo[1], entities, time_column="datetime", refs=refs)
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    g, w = got.to_pandas(), want.to_pandas()
    assert g[["carrier_flights_1d", "origin_flights_1d"]].equals(
        w[["carrier_flights_1d", "origin_flights_1d"]])
    for name in ["carrier_delay_rate_1d", "origin_delay_rate_1d"]:  # real: 7 digits
        assert np.allclose(g[name], w[name], rtol=1e-6, atol=0), name
