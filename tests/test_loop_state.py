"""The loop controller's typed state: states stored before it was typed load unchanged,
unknown keys survive a save, the revision check stops a second controller, and the
controller's readers (guards, metrics) work on the models. No MLflow: only mloop's store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mloop.errors import MloopError, StaleStateError
from mloop.loop.controller import check_guards, loop_metrics
from mloop.loop.state import (
    DriftTrigger,
    InFlight,
    LoopState,
    Probation,
    load_state,
    save_state,
)
from mloop.project import Project, open_project
from mloop.store.models import LoopStateRow

# saved by run_once before the state had types (see the file's _comment)
STORED = json.loads((Path(__file__).parent / "data" / "loop_states_untyped.json").read_text())


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def project(make_project) -> Project:
    return open_project(make_project())


def _store(project: Project, body: dict[str, Any], revision: int = 1) -> None:
    with project.store.session() as s:
        s.add(LoopStateRow(model=project.config.model_name, revision=revision, state=body,
                           updated_at=datetime.now(UTC)))
        s.commit()


def _stored(project: Project) -> dict[str, Any]:
    with project.store.session() as s:
        row = s.get(LoopStateRow, project.config.model_name)
        assert row is not None
        return dict(row.state)


def test_a_stored_canary_on_probation_loads_into_the_models(project: Project) -> None:
    _store(project, STORED["on_probation"], revision=7)
    state = load_state(project)
    assert (state.model, state.revision) == ("rentals", 7)
    assert (state.last_window_id, state.drift_streak) == (6, 2)
    # SQLite handed the window start back without an offset: it is UTC
    assert state.drift_onset == _utc(2024, 6, 4)
    assert state.last_retrain_at == _utc(2024, 6, 7, 19, 6, 40)
    assert state.last_promotion_at == _utc(2024, 6, 5, 19, 6, 40)
    assert state.retrain_times == [_utc(2024, 6, 3, 19, 6, 40), _utc(2024, 6, 7, 19, 6, 40)]
    assert state.in_flight is None
    prob = state.probation
    assert prob is not None
    assert (prob.version, prob.champion, prob.gates_config) == (6, 5, "f3724206da2c18db")
    assert prob.started_at == _utc(2024, 6, 7, 19, 6, 40)
    # the wall clock was stored as Unix seconds
    assert prob.started_wall == datetime.fromtimestamp(1796035345.5616386, UTC)
    assert prob.gates is not None and prob.gates["results"][1]["gate"] == "sanity"
    promoted, canary = state.history
    assert (promoted.version, promoted.outcome, canary.version, canary.outcome) == (
        5, "promoted", 6, "canary")
    assert promoted.decided_at == _utc(2024, 6, 5, 19, 6, 40)
    assert promoted.reason is not None and promoted.reason.startswith("mae challenger v5")
    assert (promoted.training_rows, promoted.peak_memory_mb, promoted.gates_passed) == (
        1200, 401.5, True)
    [trigger] = promoted.triggers
    assert isinstance(trigger, DriftTrigger)
    assert (trigger.streak, trigger.windows, trigger.onset) == (1, [2], _utc(2024, 6, 2))
    assert state.retrain_of(6) is canary and state.retrain_of(99) is None


def test_a_stored_interrupted_retrain_loads_into_the_models(project: Project) -> None:
    _store(project, STORED["interrupted"])
    state = load_state(project)
    assert state.in_flight == InFlight(triggered_at=_utc(2024, 7, 3), triggers=["drift"])
    assert state.probation is None and state.last_promotion_at is None
    [failed] = state.history
    assert failed.outcome == "failed" and failed.version is None
    assert failed.reason is not None and "n_estimators" in failed.reason
    assert failed.triggers[0].trigger == "drift" and failed.triggers[0].windows == []


@pytest.mark.parametrize("name", ["on_probation", "interrupted"])
def test_a_stored_state_is_saved_back_with_the_same_keys_and_timestamps(
        project: Project, name: str) -> None:
    before = STORED[name]
    _store(project, before)
    state = load_state(project)
    save_state(project, state)
    after = _stored(project)
    assert set(before) <= set(after)
    assert after["started_at"] == before["started_at"]  # written as the controller wrote it
    assert after["retrain_times"] == before["retrain_times"]
    assert after["history"][0]["triggered_at"] == before["history"][0]["triggered_at"]
    assert after["history"][0]["triggers"][0]["trigger"] == "drift"
    again = load_state(project)
    assert again.revision == 2
    assert again.model_dump() == state.model_dump()


def test_keys_the_models_do_not_know_are_kept_on_save(project: Project) -> None:
    body = json.loads(json.dumps(STORED["on_probation"]))
    body["legacy_counter"] = 41
    body["probation"]["legacy_note"] = "from another version"
    _store(project, body)
    state = load_state(project)
    state.drift_streak = 0
    save_state(project, state)
    after = _stored(project)
    assert after["legacy_counter"] == 41
    assert after["probation"]["legacy_note"] == "from another version"
    assert after["drift_streak"] == 0


def test_a_save_after_another_controller_saved_raises_stale_state(project: Project) -> None:
    mine, theirs = load_state(project), load_state(project)
    theirs.drift_streak = 3
    save_state(project, theirs)
    mine.drift_streak = 1
    with pytest.raises(StaleStateError, match=r"the loop state of 'rentals' changed underneath "
                                              r"this pass \(revision 1, expected 0\): another "
                                              r"controller is running"):
        save_state(project, mine)
    assert _stored(project)["drift_streak"] == 3
    assert load_state(project).revision == 1


def test_a_stored_state_that_does_not_fit_names_the_field(project: Project) -> None:
    _store(project, {"drift_streak": 1, "probation": {"version": "six", "champion": 5,
                                                      "started_at": "2024-06-07T19:06:40"}},
           revision=4)
    with pytest.raises(MloopError, match=r"the loop state of 'rentals' \(revision 4, table "
                                         r"loop_state of mloop's store\) cannot be read: "
                                         r"probation\.version: "):
        load_state(project)


def test_a_naive_datetime_set_on_the_state_is_utc() -> None:
    state = LoopState(model="m")
    state.drift_onset = datetime(2024, 1, 1, 6)
    assert state.drift_onset == _utc(2024, 1, 1, 6)
    assert state.model_dump(mode="json")["drift_onset"] == "2024-01-01T06:00:00+00:00"


@pytest.mark.parametrize(("change", "guard"), [
    ({"in_flight": InFlight(triggered_at=_utc(2024, 6, 1))}, "a retrain is already in flight"),
    ({"probation": Probation(version=2, champion=1, started_at=_utc(2024, 6, 1))},
     "a challenger is on probation"),
    ({"last_retrain_at": _utc(2024, 6, 1, 12)},
     "cooldown: last retrain at 2024-06-01T12:00:00+00:00 (cooldown 1d)"),
    ({"retrain_times": [_utc(2024, 6, 1, h) for h in (1, 2, 3)]},
     "3 retrains in the last day (max_per_day 3)"),
    ({"last_retrain_at": _utc(2024, 5, 30), "retrain_times": [_utc(2024, 5, 30)]}, None),
])
def test_the_guards_read_the_typed_state(project: Project, change: dict[str, Any],
                                         guard: str | None) -> None:
    state = LoopState(model="rentals", **change)
    assert check_guards(project, state, _utc(2024, 6, 1, 18)) == guard


def test_loop_metrics_read_a_stored_history(project: Project) -> None:
    _store(project, STORED["on_probation"])
    metrics = loop_metrics(project)
    assert (metrics["retrains"], metrics["promoted"], metrics["rolled_back"]) == (2, 1, 0)
    assert metrics["deployment_success_rate"] == 0.5
    # event time: trigger 06-03 19:06:40 -> promotion 06-05 19:06:40
    assert metrics["time_to_deploy_hours"] == 48.0
    # drift onset (06-02, 06-04) -> trigger (06-03 19:06:40, 06-07 19:06:40)
    detect = [timedelta(days=1, hours=19, minutes=6, seconds=40),
              timedelta(days=3, hours=19, minutes=6, seconds=40)]
    assert metrics["time_to_detect_hours"] == round(
        sum(d.total_seconds() for d in detect) / 2 / 3600, 3)
    assert metrics["retrain_cpu_seconds_total"] == 2.06


@pytest.mark.parametrize(("change", "actions", "due"), [
    ({}, [], None),  # nothing waits on the clock
    # a canary's verdict is due when its probation (the default 3d) ends
    ({"probation": Probation(version=2, champion=1, started_at=_utc(2024, 6, 1))}, [],
     _utc(2024, 6, 4)),
    # a trigger the cooldown (1d) held: the retrain is due when the cooldown ends
    ({"last_retrain_at": _utc(2024, 6, 1, 12)},
     [{"action": "held", "guard": "cooldown: last retrain at ... (cooldown 1d)"}],
     _utc(2024, 6, 2, 12)),
    # held for another reason (too few labels): nothing the clock alone will change
    ({"last_retrain_at": _utc(2024, 6, 1, 12)},
     [{"action": "held", "guard": "12 labelled rows in the last 60d"}], None),
])
def test_next_due_is_when_a_pass_has_something_to_do(project: Project, change: dict[str, Any],
                                                     actions: list[dict[str, Any]],
                                                     due: datetime | None) -> None:
    from mloop.loop.controller import next_due

    assert next_due(project, LoopState(model="rentals", **change), actions) == due
