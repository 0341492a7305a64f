"""The closed loop (mloop.loop.controller) on a trained project: drift retrains and starts a
canary, probation promotes or rolls back on a paired verdict, a failing canary is rolled back
at once, the guards hold and a killed retrain is recorded; the loop and events CLI; a
promoted canary does not come back after a rollback."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mloop.cli.app import main
from mloop.project import open_project
from mloop.security.audit import list_events
from mloop.serving.deploy import deploy_challenger, desired_state

from .helpers import copy_project, log_traffic, rentals_frame
from .serving_util import metric, project_server, request_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def proj(serving_registry: Path, tmp_path: Path) -> Path:
    return copy_project(serving_registry, tmp_path)


def test_a_promoted_canary_does_not_come_back_after_a_rollback(proj: Path) -> None:
    from mloop.registry.promotion import promote, rollback

    project = open_project(proj)
    deploy_challenger(project, 2, mode="canary", weight=0.2, reason="try v2")
    promote(project, 2, reason="graduate the canary", force=True)
    assert desired_state(project).challenger is None
    rollback(project, reason="v2 misbehaves")
    state = desired_state(project)
    assert (state.champion, state.challenger, state.weight) == (1, None, 0.0)


# ------------------------------------------------------------------------ the closed loop

LOOP = """
loop:
  triggers: {drift: {consecutive: 1}}
  retrain: {window: 3d, min_labelled_rows: 300}
  guards: {cooldown: 3d, max_per_day: 2}
  canary: {weight: 0.5, probation: 1d, min_labelled: 50}
"""


def _hot(n: int, seed: int) -> pd.DataFrame:
    """A heat wave: temperatures up 15 degrees, and rentals with them (the same relation the
    training data follows: 2.5 rentals per degree)."""
    frame = rentals_frame(n, seed=seed)
    frame["temp"] = frame["temp"] + 15
    frame["cnt"] = frame["cnt"] + 37
    return frame


def _label(project: Any, ids: list[str], frame: pd.DataFrame) -> None:
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    store_labels(ObjectStore(project.uris["inference_log_uri"]),
                 dict(zip(ids, frame["cnt"].astype(float), strict=True)), task="regression",
                 source="test")


def test_the_loop_retrains_on_drift_canaries_then_promotes_after_probation(proj: Path) -> None:
    from mloop.loop.controller import load_state, loop_metrics, run_once

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP)
    project = open_project(proj)
    normal, hot = rentals_frame(600, seed=40), _hot(600, seed=41)
    _label(project, log_traffic(project, normal, "2024-06-01"), normal)
    _label(project, log_traffic(project, hot, "2024-06-02"), hot)
    log_traffic(project, rentals_frame(5, seed=42), "2024-06-03")  # watermark

    first = run_once(project)
    acts = [a["action"] for a in first["actions"]]
    assert acts == ["canary_started"], first["actions"]
    new = first["actions"][0]["version"]
    assert new == 5 and first["triggers"][0]["trigger"] == "drift"
    state = desired_state(project)
    assert (state.champion, state.challenger, state.mode, state.weight) == (1, 5, "canary", 0.5)
    kinds = [e.kind for e in list_events(project.store, limit=20)]
    assert "loop.retrain_started" in kinds and "loop.canary_started" in kinds

    # nothing new and probation not over: the next pass does nothing (no second retrain)
    again = run_once(open_project(proj))
    assert [(a["action"], a.get("guard")) for a in again["actions"]] == [
        ("held", "a challenger is on probation")], again["actions"]
    assert desired_state(project).challenger == 5

    # a day of split traffic, labelled: the retrained canary knows the heat wave
    hot2 = _hot(400, seed=43)
    _label(project, log_traffic(project, hot2.iloc[:200], "2024-06-04", version=5,
                                 role="canary"), hot2.iloc[:200])
    _label(project, log_traffic(project, hot2.iloc[200:], "2024-06-04", version=1),
           hot2.iloc[200:])
    log_traffic(project, _hot(5, seed=44), "2024-06-05")
    verdict = run_once(open_project(proj))
    assert [a["action"] for a in verdict["actions"]][:1] == ["promote"], verdict["actions"]
    assert desired_state(project).champion == 5 and desired_state(project).challenger is None
    assert load_state(project).probation is None
    metrics = loop_metrics(project)
    assert metrics["retrains"] == 1 and metrics["promoted"] == 1
    # gated once, before the canary: the promotion reused that report (same gate config)
    import sqlalchemy as sa

    from mloop.store.models import GateRunRow

    with project.store.session() as s:
        assert len(s.scalars(sa.select(GateRunRow).where(GateRunRow.version == 5)).all()) == 1
    assert metrics["time_to_deploy_hours"] > 24  # the probation day, in event time
    promote_event = list_events(project.store, kind="loop.probation_promote")[0].payload
    assert promote_event["challenger"]["labelled"] == 200  # what the canary answered live
    # the verdict is paired: both versions scored on the same 400 labelled rows
    paired = promote_event["paired"]
    assert paired["rows"] == 400 and paired["metric"] == "mae"
    assert paired["values"]["5"] < paired["values"]["1"]

    # the rollback path: a challenger that does not know the heat wave (v2, trained on normal
    # weather) is judged on the same labelled rows as the champion, and loses
    from mloop.loop.controller import save_state
    from mloop.loop.state import Probation

    deploy_challenger(project, 2, mode="canary", weight=0.5, reason="test: a weaker canary")
    state = load_state(project)
    state.probation = Probation(version=2, champion=5,
                                started_at=datetime(2024, 6, 5, 12, tzinfo=UTC),
                                started_wall=datetime.now(UTC) - timedelta(seconds=5))
    save_state(project, state)
    hot3 = _hot(400, seed=45)
    _label(project, log_traffic(project, hot3.iloc[:200], "2024-06-06", version=2,
                                 role="canary"), hot3.iloc[:200])
    _label(project, log_traffic(project, hot3.iloc[200:], "2024-06-06", version=5),
           hot3.iloc[200:])
    log_traffic(project, _hot(5, seed=46), "2024-06-07", version=5)
    judged = run_once(open_project(proj))
    assert [a["action"] for a in judged["actions"]][:1] == ["rollback"], judged["actions"]
    # v2 is gone (the same pass may start a new retrain: the drift goes on)
    assert desired_state(project).champion == 5 and desired_state(project).challenger != 2
    rolled = list_events(project.store, kind="loop.probation_rollback")[0].payload
    assert rolled["paired"]["values"]["2"] > rolled["paired"]["values"]["5"]

    # the loop's numbers and the serving cost on the server's /metrics
    with project_server(proj) as srv:
        for i in range(5):
            assert srv.post("/predict", {"records": request_rows(2, seed=i)}).status_code == 200
        text = srv.get("/metrics").text
    assert metric(text, "mloop_loop_retrains", model="rentals", outcome="promoted") == 1
    assert metric(text, "mloop_loop_retrains", outcome="failed") == 0
    assert metric(text, "mloop_loop_time_to_deploy_hours") == metrics["time_to_deploy_hours"]
    assert metric(text, "mloop_loop_retrain_cpu_seconds_total") > 0
    assert metric(text, "mloop_serving_cpu_seconds_per_1k_predictions") > 0


def test_a_failing_canary_never_fails_a_client_and_is_rolled_back_at_once(proj: Path) -> None:
    """v3 passes warm-up, then raises on every call: the champion answers its share, the
    failure is counted and recorded, and the controller's next pass rolls it back without
    waiting for the probation to end."""
    from mloop.loop.controller import load_state, run_once, save_state
    from mloop.loop.state import Probation

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP)
    project = open_project(proj)
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    deploy_challenger(project, 3, mode="canary", weight=0.5, reason="test: a broken canary")
    with project_server(proj, commit=0.2) as srv:
        srv.wait_for(lambda: srv.get("/model").json()["challenger"] is not None)
        answers = [srv.post("/predict", {"records": request_rows(1, seed=i), "key": f"k{i}",
                                         "timestamp": "2024-09-01T10:00:00Z"})
                   for i in range(40)]
        assert [r.status_code for r in answers] == [200] * 40
        assert {r.json()["version"] for r in answers} == {1}  # the champion took over
        failed = metric(srv.get("/metrics").text, "mloop_challenger_errors_total", version="3")
        assert 5 <= failed < 40  # about half the keys route to the canary
        srv.wait_for(lambda: list_events(project.store, kind="serve.challenger_error"))
    event = list_events(project.store, kind="serve.challenger_error")[-1].payload
    assert event["version"] == 3 and "challenger exploded" in event["error"]
    state = load_state(project)
    state.probation = Probation(version=3, champion=1,
                                started_at=datetime(2024, 9, 1, 9, tzinfo=UTC), started_wall=t0)
    save_state(project, state)
    out = run_once(open_project(proj))  # probation (1d) far from over: rolled back anyway
    assert out["actions"][0]["action"] == "rollback", out["actions"]
    assert "failed to predict" in out["actions"][0]["reason"]
    assert desired_state(project).challenger is None and desired_state(project).champion == 1


def test_the_loop_guards_failures_and_restarts(proj: Path) -> None:
    from mloop.loop.controller import load_state, run_once, save_state
    from mloop.loop.state import InFlight

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP.replace(
        "min_labelled_rows: 300", "min_labelled_rows: 100000"))
    project = open_project(proj)
    normal, hot = rentals_frame(600, seed=50), _hot(600, seed=51)
    _label(project, log_traffic(project, normal, "2024-07-01"), normal)
    _label(project, log_traffic(project, hot, "2024-07-02"), hot)
    log_traffic(project, rentals_frame(5, seed=52), "2024-07-03")

    # too few labelled rows: held before anything starts (no cooldown consumed)
    out = run_once(project)
    assert [a["action"] for a in out["actions"]] == ["held"]
    assert "min_labelled_rows" in out["actions"][0]["guard"]
    # a retrain that fails (an estimator parameter sklearn refuses): the champion stays
    text = (proj / "mloop.yaml").read_text().replace("min_labelled_rows: 100000",
                                                      "min_labelled_rows: 300")
    (proj / "mloop.yaml").write_text(text.replace("n_estimators: 40", "n_estimators: -5"))
    # the drift streak from the first pass still stands, so the trigger fires again
    out = run_once(open_project(proj))
    assert [a["action"] for a in out["actions"]] == ["retrain_failed"], out["actions"]
    assert "n_estimators" in out["actions"][0]["error"]
    assert desired_state(project).champion == 1
    # more drift the next day: held by the cooldown (event time), not retried at once
    _label(project, log_traffic(project, _hot(600, seed=53), "2024-07-03"), _hot(600, 53))
    log_traffic(project, rentals_frame(5, seed=54), "2024-07-03T12:00:00")
    held = run_once(open_project(proj))
    assert held["actions"] and held["actions"][0]["action"] == "held"
    # a controller killed mid-retrain: the next pass records it instead of redoing it
    state = load_state(project)
    state.in_flight = InFlight(triggered_at=datetime(2024, 7, 3, tzinfo=UTC),
                               triggers=["drift"])
    save_state(project, state)
    resumed = run_once(open_project(proj))
    assert resumed["actions"][0]["action"] == "retrain_interrupted"
    assert load_state(project).in_flight is None
    kinds = [e.kind for e in list_events(project.store, limit=30)]
    assert "loop.retrain_interrupted" in kinds and "loop.trigger_held" in kinds


def test_loop_and_events_cli(proj: Path, capsys) -> None:
    assert main(["-C", str(proj), "loop", "--once", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["now"] is None and "no traffic" in first["message"]
    project = open_project(proj)
    log_traffic(project, rentals_frame(50, seed=60), "2024-08-01")
    assert main(["-C", str(proj), "loop", "--once"]) == 0
    assert "event time 2024-08-01" in capsys.readouterr().out
    assert main(["-C", str(proj), "events", "--type", "promote", "--json"]) == 0
    events = json.loads(capsys.readouterr().out)["events"]  # one document (not --follow)
    assert [e["kind"] for e in events] == ["promote"]  # the fixture's promotion of v1
    assert events[0]["payload"]["version"] == 1
    assert main(["-C", str(proj), "events", "--since", "not-a-time"]) == 1
    assert "--since 'not-a-time'" in capsys.readouterr().err
