"""The closed loop (mloop.loop.controller) on a trained project: end to end through `mloop
serve`, the controller retrains on drift or on schedule and starts a canary, which is rolled
back at once when it fails on live traffic, promoted after its probation on a paired verdict,
or rolled back on it; the guards hold and a killed retrain is recorded; the loop and events
CLI; a promoted canary does not come back after a rollback."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from mloop.cli.app import main
from mloop.loop.controller import loop_metrics
from mloop.project import open_project
from mloop.security.audit import list_events
from mloop.serving.deploy import deploy_challenger, desired_state
from mloop.store.models import GateRunRow

from .helpers import GOOD, WORSE, copy_project, heat_wave, label_rows, log_traffic, rentals_frame
from .serving_util import ServeProcess, metric, request_rows

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


def test_the_loop_guards_failures_and_restarts(proj: Path) -> None:
    from mloop.loop.controller import load_state, run_once, save_state
    from mloop.loop.state import InFlight

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP.replace(
        "min_labelled_rows: 300", "min_labelled_rows: 100000"))
    project = open_project(proj)
    normal, hot = rentals_frame(600, seed=50), heat_wave(600, seed=51)
    label_rows(project, log_traffic(project, normal, "2024-07-01"), normal)
    label_rows(project, log_traffic(project, hot, "2024-07-02"), hot)
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
    label_rows(project, log_traffic(project, heat_wave(600, seed=53), "2024-07-03"),
               heat_wave(600, 53))
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


# ------------------------------------------------------------------ the loop, end to end
# `mloop serve` in its own process answers every request over HTTP and takes the labels back
# on /feedback; the controller (`mloop loop --once`) does everything else: it detects the
# drift, retrains, gates, starts the canary and judges it. Nothing is seeded by hand: no
# loop state written, no deployment made, no row written to the inference log.

E2E = """
serving: {poll_seconds: 0.2, inference_log: {commit_interval_seconds: 0.2}}
loop:
  triggers: {drift: {consecutive: 1}, schedule: 3d}
  retrain: {window: 3d, min_labelled_rows: 300}
  guards: {cooldown: 1d, max_per_day: 2}
  canary: {weight: 0.5, probation: 1d, min_labelled: 50}
"""
STRICT = "pipeline: {steps: {train: 'strict:train'}}\n"
STRICT_TRAIN = '''\
"""The team's new training code: the fitted one-hot encoder refuses a category it never saw,
where mloop's ignores it. Every gate passes on the holdout; a new weather type in live
traffic makes the model fail."""
from mloop.tabular.steps import train as builtin_train


def train(ctx, data, target, task, features, model):
    estimator, spec = builtin_train.fn(ctx, data, target, task, features, model)
    categorical = estimator.named_steps["preprocess"].named_transformers_["categorical"]
    categorical.named_steps["encode"].handle_unknown = "error"
    return estimator, spec
'''


def _send(srv: ServeProcess, frame: pd.DataFrame, start: str, *, label: bool = True,
          rows_per_request: int = 10) -> list[dict[str, Any]]:
    """``frame``'s rows as one day of traffic from ``start`` (event time), a few rows per
    request, each request with its own routing key; with ``label``, the true counts sent
    back on /feedback at once. Returns the answers (every one a 200)."""
    t0 = pd.Timestamp(start, tz="UTC")
    answers = []
    for first in range(0, len(frame), rows_per_request):
        chunk = frame.iloc[first:first + rows_per_request]
        at = t0 + pd.Timedelta(seconds=86_000 * first / len(frame))
        resp = srv.post("/predict", {
            "records": [{"hour": int(h), "weather": w, "temp": float(x)} for h, w, x
                        in zip(chunk["hour"], chunk["weather"], chunk["temp"], strict=True)],
            "timestamp": at.isoformat(), "key": f"{start}/{first}"})
        assert resp.status_code == 200, resp.text
        answers.append(resp.json())
        if label:
            fed = srv.post("/feedback", {"labels": [
                {"request_id": rid, "label": float(cnt)}
                for rid, cnt in zip(resp.json()["request_ids"], chunk["cnt"], strict=True)]})
            assert fed.status_code == 200, fed.text
    return answers


def _loop_pass(root: Path, srv: ServeProcess, capsys: pytest.CaptureFixture[str]
               ) -> dict[str, Any]:
    """`mloop loop --once --json` (in this process) once the server has committed every row
    it answered to the inference log."""
    srv.wait_for(lambda: metric(srv.get("/metrics").text, "mloop_inference_log_queue") == 0)
    time.sleep(0.5)  # two commit intervals: the writer's last batch is on disk
    capsys.readouterr()
    assert main(["-C", str(root), "loop", "--once", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _check_refit(project: Any, version: int) -> None:
    """``version`` is the refit of the held-out fit before it: trained on that fit's training
    rows plus its holdout, carrying its holdout metrics and gate results, named as such."""
    from mloop.registry.candidates import get_version
    from mloop.registry.gate_report import latest_gate_report

    tags = dict(get_version(project, version).tags or {})
    held = dict(get_version(project, version - 1).tags or {})
    assert tags["mloop.refit_of"] == str(version - 1) and tags["mloop.refit"] == "true"
    assert "mloop.refit" not in held
    train_rows = project.snapshots.read_table(tags["mloop.snapshot.train"]).num_rows
    assert train_rows == (project.snapshots.read_table(held["mloop.snapshot.train"]).num_rows
                          + project.snapshots.read_table(held["mloop.snapshot.holdout"]).num_rows)
    assert tags["mloop.snapshot.holdout"] == held["mloop.snapshot.holdout"]
    metrics = {k: v for k, v in tags.items() if k.startswith("mloop.metric.")}
    assert metrics and metrics == {k: v for k, v in held.items() if k.startswith("mloop.metric.")}
    assert float(tags["mloop.in_sample.mae"]) < float(tags["mloop.metric.mae"])
    carried, gated = latest_gate_report(project, version), latest_gate_report(project, version - 1)
    assert carried is not None and gated is not None and carried.passed
    assert carried.results[0].gate == "refit" and f"v{version - 1}" in carried.results[0].message
    assert [(r.gate, r.value) for r in carried.results[1:]] == [
        (r.gate, r.value) for r in gated.results]


def _serving(srv: ServeProcess) -> tuple[int | None, int | None]:
    model = srv.get("/model").json()
    return tuple((model[role] or {}).get("version") for role in ("champion", "challenger"))


def test_served_traffic_drives_the_loop_through_every_canary_outcome(
        proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three retrains, each started by the controller on its own: one whose model fails on
    live traffic (rolled back at once), one that knows the heat wave (promoted after its
    probation), one badly tuned (rolled back on the paired verdict)."""
    config = (proj / "mloop.yaml").read_text() + E2E
    (proj / "mloop.yaml").write_text(config + STRICT)
    (proj / "strict.py").write_text(STRICT_TRAIN)
    project = open_project(proj)
    with ServeProcess(proj, tmp_path / "serve.log") as srv:
        # a normal day, then a heat wave; the next day's first requests move the event clock
        _send(srv, rentals_frame(600, seed=40), "2024-06-01")
        _send(srv, heat_wave(600, seed=41), "2024-06-02")
        _send(srv, heat_wave(20, seed=42), "2024-06-03", label=False)
        first = _loop_pass(proj, srv, capsys)
        assert [a["action"] for a in first["actions"]] == ["canary_started"], first
        assert first["triggers"][0]["trigger"] == "drift"
        strict = first["actions"][0]["version"]
        # v1-v4 are the fixture's; v5 is the held-out fit that passed the gates, v6 its refit
        # on the whole window (loop.retrain.refit), the version the canary serves
        assert strict == 6
        srv.wait_for(lambda: _serving(srv) == (1, strict))
        kinds = [e.kind for e in list_events(project.store, limit=20)]
        assert "loop.retrain_started" in kinds and "loop.canary_started" in kinds
        # nothing new and the probation not over: held, no second retrain
        again = _loop_pass(proj, srv, capsys)
        assert [(a["action"], a.get("guard")) for a in again["actions"]] == [
            ("held", "a challenger is on probation")], again

        # 1. snow, a weather type no version was trained on: the strict canary fails on every
        # request routed to it, the champion answers those too, and no client sees an error
        snow = heat_wave(200, seed=43).assign(weather="Snow")
        answers = _send(srv, snow, "2024-06-03T06:00:00", label=False, rows_per_request=5)
        assert {a["version"] for a in answers} == {1}
        failed = metric(srv.get("/metrics").text, "mloop_challenger_errors_total",
                        version=str(strict))
        assert 0 < failed < 200 and failed % 5 == 0  # whole requests, about half of them
        srv.wait_for(lambda: list_events(project.store, kind="serve.challenger_error"))
        error = list_events(project.store, kind="serve.challenger_error")[0].payload
        # (onnxruntime's words when the compiled graph serves, scikit-learn's otherwise)
        assert error["version"] == strict and "unknown categor" in error["error"].lower()
        # the next pass rolls it back at once, a day before its probation would end, and
        # the cooldown keeps the same broken code from being retrained at once
        second = _loop_pass(proj, srv, capsys)
        assert [a["action"] for a in second["actions"]] == ["rollback", "held"], second
        assert "failed to predict" in second["actions"][0]["reason"]
        assert second["actions"][1]["guard"].startswith("cooldown")
        srv.wait_for(lambda: _serving(srv) == (1, None))

        # 2. the team restores its training code; the heat wave goes on
        (proj / "mloop.yaml").write_text(config)
        _send(srv, heat_wave(400, seed=44), "2024-06-04")
        _send(srv, heat_wave(20, seed=45), "2024-06-05", label=False)
        third = _loop_pass(proj, srv, capsys)
        assert [a["action"] for a in third["actions"]] == ["canary_started"], third
        good = third["actions"][0]["version"]
        assert good == strict + 2
        srv.wait_for(lambda: _serving(srv) == (1, good))
        # a day of split traffic, labelled as it comes; then the probation (1d) is over
        day = _send(srv, heat_wave(400, seed=46), "2024-06-06")
        by_good = sum(len(a["request_ids"]) for a in day if a["version"] == good)
        assert 0 < by_good < 400
        _send(srv, heat_wave(20, seed=47), "2024-06-07", label=False)
        fourth = _loop_pass(proj, srv, capsys)
        assert [a["action"] for a in fourth["actions"]] == ["promote"], fourth
        srv.wait_for(lambda: _serving(srv) == (good, None))

        # 3. a badly tuned retrain, started by the schedule (3d since the last one): it
        # passes the gates this project sets (none but the defaults), then loses the verdict
        (proj / "mloop.yaml").write_text(config.replace(GOOD, WORSE))
        _send(srv, heat_wave(400, seed=48), "2024-06-08")
        _send(srv, heat_wave(20, seed=49), "2024-06-09", label=False)
        fifth = _loop_pass(proj, srv, capsys)
        assert [a["action"] for a in fifth["actions"]] == ["canary_started"], fifth
        assert "schedule" in [t["trigger"] for t in fifth["triggers"]]
        worse = fifth["actions"][0]["version"]
        assert worse == good + 2
        srv.wait_for(lambda: _serving(srv) == (good, worse))
        day = _send(srv, heat_wave(400, seed=50), "2024-06-10")
        assert 0 < sum(len(a["request_ids"]) for a in day if a["version"] == worse) < 400
        _send(srv, heat_wave(20, seed=51), "2024-06-11", label=False)
        sixth = _loop_pass(proj, srv, capsys)
        assert [a["action"] for a in sixth["actions"]][:1] == ["rollback"], sixth
        srv.wait_for(lambda: _serving(srv)[1] != worse)
        for i in range(5):  # the serving cost needs rows scored since the server started
            assert srv.post("/predict", {"records": request_rows(2, seed=i)}).ok
        text = srv.get("/metrics").text

    assert desired_state(project).champion == good
    _check_refit(project, good)
    promoted = list_events(project.store, kind="loop.probation_promote")[0].payload
    assert promoted["version"] == good
    assert promoted["challenger"]["labelled"] == by_good  # what the canary answered live
    # the verdict is paired: both versions scored on the same 400 labelled rows of the day
    paired = promoted["paired"]
    assert paired["rows"] == 400 and paired["metric"] == "mae"
    assert paired["values"][str(good)] < paired["values"]["1"]
    rolled = list_events(project.store, kind="loop.probation_rollback")[0].payload
    assert rolled["version"] == worse and rolled["paired"]["rows"] == 400
    assert rolled["paired"]["values"][str(worse)] > rolled["paired"]["values"][str(good)]
    # gated once, before the canary: the promotion reused that report (same gate config)
    with project.store.session() as s:
        assert len(s.scalars(sa.select(GateRunRow).where(GateRunRow.version == good)).all()) == 1
    metrics = loop_metrics(project)
    assert (metrics["retrains"], metrics["promoted"], metrics["rolled_back"]) == (3, 1, 2)
    assert metrics["time_to_deploy_hours"] > 24  # the probation day, in event time
    # the loop's numbers and the serving cost on the server's /metrics
    assert metric(text, "mloop_loop_retrains", model="rentals", outcome="promoted") == 1
    assert metric(text, "mloop_loop_retrains", outcome="rolled_back") == 2
    assert metric(text, "mloop_loop_retrains", outcome="failed") == 0
    assert metric(text, "mloop_loop_time_to_deploy_hours") == metrics["time_to_deploy_hours"]
    assert metric(text, "mloop_loop_retrain_cpu_seconds_total") > 0
    assert metric(text, "mloop_serving_cpu_seconds_per_1k_predictions") > 0
