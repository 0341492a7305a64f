"""Promotion, rollback, history, the race between two promoters, and the audit chain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.errors import GateFailedError, PromotionError
from mloop.project import open_project
from mloop.registry.aliases import stored_alias
from mloop.registry.gates import evaluate_gates
from mloop.registry.promotion import change_alias, history, promote, rollback
from mloop.security.audit import list_events, verify_chain

from .helpers import (
    GOOD,
    RESEED,
    WORSE,
    rentals_frame,
    run_cli,
    train_forest,
    write_forest_config,
)

pytestmark = pytest.mark.slow

NI = "gates:\n  non_inferiority: {margin: 1.0}\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """v1 good, v2 the same config reseeded, v3 clearly worse; no champion yet."""
    root = tmp_path_factory.mktemp("promo") / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    assert [train_forest(root, p) for p in (GOOD, RESEED, WORSE)] == [1, 2, 3]
    return root


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained project (its stores included) for one test to change."""
    root = tmp_path / "proj"
    shutil.copytree(trained, root)
    write_forest_config(root, params=GOOD, gates=NI)
    return root


def _champion_rows(root: Path) -> list:
    project = open_project(root)
    return [d for d in history(project)["deployments"] if d["alias"] == "champion"]


def test_promote_refuses_a_candidate_that_failed_a_gate_and_force_records_it(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    with pytest.raises(GateFailedError, match=r"Version 3 of 'rentals' failed gate\(s\) "
                                              r"'non_inferiority.mae'.*champion unchanged \(v1\)"):
        promote(project, 3, reason="try")
    assert stored_alias(project) == 1
    change = promote(project, 3, reason="incident 42: need the small model", force=True)
    assert (change.action, change.version, change.replaced) == ("override", 3, 1)
    kinds = [e.kind for e in list_events(project.store)]
    assert kinds[0] == "override" and "gate" in kinds
    assert list_events(project.store)[0].payload["forced"] is True
    aliases = project.mlflow.get_registered_model("rentals").aliases
    assert (int(aliases["champion"]), int(aliases["previous"])) == (3, 1)


def test_promote_then_rollback_moves_the_champion_back(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    promote(project, 2, reason="retrained")
    back = rollback(project, reason="latency spike")
    assert (back.action, back.version, back.replaced) == ("rollback", 1, 2)
    assert stored_alias(project) == 1
    assert int(project.mlflow.get_model_version_by_alias("rentals", "champion").version) == 1
    rows = _champion_rows(proj)
    assert [(r["version"], r["action"]) for r in rows] == [(1, "rollback"), (2, "promote"),
                                                           (1, "promote")]
    assert rows[0]["ended_at"] is None and all(r["ended_at"] for r in rows[1:])
    with pytest.raises(PromotionError, match="v3 has never been champion"):
        rollback(project, reason="x", to=3)
    assert verify_chain(project.store).ok


def test_history_answers_what_served_at_a_time(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    time.sleep(1.1)
    between = datetime.now(UTC)
    time.sleep(1.1)
    promote(project, 2, reason="second")
    assert history(project, at=between)["serving"] == {"champion": {"version": 1,
                                                                    "traffic": 1.0}}
    assert history(project, at=datetime.now(UTC))["serving"]["champion"]["version"] == 2
    before = history(project, at=datetime(2000, 1, 1, tzinfo=UTC))
    assert before["serving"] == {}
    out = json.loads(run_cli("models", "history", "--at", between.isoformat(), "--json",
                             cwd=proj).stdout)
    assert out["serving"]["champion"]["version"] == 1


def test_an_alias_moved_behind_mloops_back_is_flagged(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    project.mlflow.set_registered_model_alias("rentals", "champion", "3")
    (drift,) = history(project)["drift"]
    assert (drift["mloop"], drift["mlflow"]) == (1, 3)
    proc = run_cli("models", "history", cwd=proj)
    assert "MLflow says 'champion' is v3 but mloop recorded v1" in " ".join(proc.stderr.split())
    status = json.loads(run_cli("status", "--json", cwd=proj).stdout)
    assert status["drift"][0]["mlflow"] == 3


def test_when_mlflow_refuses_the_alias_the_store_is_rolled_back(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    events_before = len(list_events(project.store, limit=1000))
    with pytest.raises(PromotionError, match="MLflow refused the alias change"):
        change_alias(project, "champion", 99, expected=1, action="promote", reason="ghost")
    assert stored_alias(project) == 1
    assert [r["version"] for r in _champion_rows(proj)] == [1]
    assert len(list_events(project.store, limit=1000)) == events_before
    assert int(project.mlflow.get_model_version_by_alias("rentals", "champion").version) == 1


RACER = """\
import json, sys, time
from pathlib import Path
import sqlalchemy as sa
from mloop.errors import MloopError
from mloop.project import open_project
from mloop.registry.aliases import mlflow_alias, stored_alias
from mloop.registry.candidates import version_record
from mloop.registry.promotion import promote

root, version, expected, gate, racers = sys.argv[1:6]
version, expected = int(version), None if expected == "none" else int(expected)
gate = Path(gate)
project = open_project(root)
# every unique-key collision mloop's store reports to this racer (a retry of promote's
# transaction follows each): how the race was decided, not only who won it
collisions = []
sa.event.listen(project.store.engine, "handle_error", lambda ctx: collisions.append(
    type(ctx.original_exception).__name__) if isinstance(ctx.sqlalchemy_exception,
                                                         sa.exc.IntegrityError) else None)
# connect and import everything promote touches before the barrier, so both racers reach
# the alias row at the same moment rather than after their own start-up costs
stored_alias(project), mlflow_alias(project, "previous"), version_record(project, version)
(gate / f"ready-{version}").touch()
while len(list(gate.glob("ready-*"))) < int(racers):  # the barrier: every racer is ready
    time.sleep(0.0002)
enter = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process on this machine
try:
    change = promote(project, version, reason="race", expected_champion=expected)
    outcome = {"won": True, "version": change.version}
except MloopError as exc:
    outcome = {"won": False, "version": version, "error": str(exc)}
leave = time.monotonic_ns()
record = {**outcome, "enter_ns": enter, "leave_ns": leave, "collisions": collisions}
(gate / f"racer-{version}.json").write_text(json.dumps(record))
print(json.dumps(record))
"""


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
@pytest.mark.parametrize("champion", [1, None], ids=["replacing_v1", "first_promotion"])
def test_two_promotions_racing_exactly_one_wins(proj: Path, tmp_path: Path, store: str,
                                               champion: int | None,
                                               request: pytest.FixtureRequest,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes promote v2 and v3, each naming the same champion (v1, or none yet),
    released by one barrier. The windows must overlap (each entered promote before the
    other left it), or the race never happened and one winner would prove nothing. On
    PostgreSQL the alias row is locked (SELECT ... FOR UPDATE); on SQLite the write
    transaction begins IMMEDIATE; a first promotion has no row to lock and is decided by
    the alias row's primary key."""
    env: dict[str, str] = {}
    if store == "postgres":
        env["MLOOP_STORE_URI"] = request.getfixturevalue("pg_url")
        monkeypatch.setenv("MLOOP_STORE_URI", env["MLOOP_STORE_URI"])
    project = open_project(proj)
    if champion is not None:
        promote(project, champion, reason="first")
    # both candidates pass: only the race decides
    write_forest_config(proj, params=GOOD, gates="")
    for v in (2, 3):
        report = evaluate_gates(open_project(proj), v)
        assert report.passed and report.champion == champion
    events_before = len(list_events(project.store, limit=1000))
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    gate = tmp_path / "gate"
    gate.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(proj), str(v),
                               str(champion or "none"), str(gate), "2"],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for v in (2, 3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    # what each racer wrote itself
    results = [json.loads((gate / f"racer-{v}.json").read_text()) for v in (2, 3)]
    timeline = [(r["version"], r["won"], r["enter_ns"], r["leave_ns"]) for r in results]
    assert max(r["enter_ns"] for r in results) < min(r["leave_ns"] for r in results), (
        f"the promotions did not overlap, so nothing raced: {timeline}")
    winners = [r for r in results if r["won"]]
    losers = [r for r in results if not r["won"]]
    assert len(winners) == 1 and len(losers) == 1, results
    won = winners[0]["version"]
    before = "nothing" if champion is None else f"v{champion}"
    assert f"'champion' of 'rentals' moved from {before} to v{won}" in losers[0]["error"]
    assert "another change won" in losers[0]["error"]
    # decided by the alias row's lock (FOR UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite):
    # the loser waited, read the winner's version and refused, with no unique key colliding
    # (an audit-chain collision would also stop a second winner, and hide a lost lock). Only
    # a first promotion on PostgreSQL has no row to lock: there the alias row's primary key
    # may collide once, then the retry reads the winner's row.
    allowed = 1 if store == "postgres" and champion is None else 0
    assert winners[0]["collisions"] == [] and len(losers[0]["collisions"]) <= allowed, (
        f"unique-key collisions: winner {winners[0]['collisions']}, loser "
        f"{losers[0]['collisions']} (at most {allowed}): the alias row was not locked")
    project = open_project(proj)
    assert stored_alias(project) == won
    aliases = project.mlflow.get_registered_model("rentals").aliases
    assert int(aliases["champion"]) == won
    assert (int(aliases["previous"]) if "previous" in aliases else None) == champion
    open_rows = [r for r in _champion_rows(proj) if r["ended_at"] is None]
    assert [r["version"] for r in open_rows] == [won]
    events = list_events(project.store, limit=1000)  # newest first
    new_events = events[:len(events) - events_before]
    assert [(e.kind, e.payload["version"]) for e in new_events] == [("promote", won)]
    assert verify_chain(project.store).ok


def test_cli_promote_and_rollback(proj) -> None:
    out = json.loads(run_cli("models", "promote", "1", "--reason", "first", "--json",
                             cwd=proj).stdout)
    assert (out["version"], out["action"]) == (1, "promote")
    refused = run_cli("models", "promote", "3", "--reason", "try", cwd=proj, check=False)
    assert refused.returncode == 1
    assert "failed gate(s) 'non_inferiority.mae'" in refused.stderr
    no_reason = run_cli("models", "promote", "2", cwd=proj, check=False)
    assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
    rolled = run_cli("models", "rollback", "--reason", "nothing to go back to", cwd=proj,
                     check=False)
    assert rolled.returncode == 1 and "only version that has been champion" in rolled.stderr


def test_audit_chain_catches_a_deleted_row(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    promote(project, 2, reason="second")
    with project.store.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.text("select id from events order by id"))]
        conn.execute(sa.text("delete from events where id = :i"), {"i": ids[1]})
    report = verify_chain(project.store)
    assert (report.ok, report.first_bad_id) == (False, ids[2])
    assert "does not follow the event before it" in report.problem


def test_audit_chain_catches_deleting_the_newest_events(proj) -> None:
    project = open_project(proj)
    promote(project, 1, reason="first")
    promote(project, 2, reason="second")
    assert verify_chain(project.store).ok
    with project.store.engine.begin() as conn:
        conn.execute(sa.text("delete from events where id = (select max(id) from events)"))
    report = verify_chain(project.store)
    assert report.ok is False
    # the checkpoint outside the store says so first (test_audit_chain.py: even with the
    # head row rewritten)
    assert report.problem.startswith("1 event(s) missing at the end of the chain")
    assert "(the newest were deleted)" in report.problem


def test_lineage_is_read_from_what_was_recorded(trained) -> None:
    from mloop.registry.lineage import lineage

    project = open_project(trained)
    lin = lineage(project, 1)
    tags = project.mlflow.get_model_version("rentals", "1").tags
    assert lin["data"]["train"]["digest"] == tags["mloop.snapshot.train"]
    assert lin["data"]["holdout"]["rows"] == 240  # 30% of 800
    assert lin["data"]["source"]["source"] == "data/rentals.parquet"
    assert lin["pipeline_run"]["run_id"] == tags["mloop.pipeline_run_id"]
    assert lin["pipeline_run"]["status"] == "succeeded"
    steps = {s["step"]: s for s in lin["pipeline_run"]["steps"]}
    assert list(steps) == ["ingest", "validate", "snapshot", "split", "train", "evaluate",
                           "register"]
    assert steps["split"]["outputs"]["train"] == tags["mloop.snapshot.train"]
    assert steps["train"]["params"]["model.params.n_estimators"] == "40"
    assert lin["config_hash"] == tags["mloop.config_hash"]
    assert lin["code"]["git_commit"] is None  # the temp project is not a git work tree


def test_diff_shows_what_changed_between_two_versions(trained) -> None:
    out = json.loads(run_cli("models", "diff", "1", "3", "--json", cwd=trained).stdout)
    params = {r["key"]: r for r in out["params"]}
    assert params["train.model.params.n_estimators"]["a"] == "40"
    assert params["train.model.params.n_estimators"]["b"] == "5"
    assert params["train.model.params.n_estimators"]["same"] is False
    assert params["split.holdout"]["same"] is True
    data = {r["key"]: r for r in out["data"]}
    assert data["train"]["same"] is True  # same data, different model
    metrics = {r["key"]: r for r in out["metrics"]}
    assert metrics["mae"]["b"] > metrics["mae"]["a"]
    assert metrics["mae"]["delta"] == pytest.approx(metrics["mae"]["b"] - metrics["mae"]["a"])
    human = run_cli("models", "diff", "1", "3", cwd=trained).stdout
    assert "train.model.params.max_depth" in human


def test_reproduce_matches_the_recorded_metrics_then_reports_changed_data(proj) -> None:
    from mloop.registry.reproduce import reproduce

    project = open_project(proj)
    ok = reproduce(project, 1)
    assert ok["reproduced"] is True, ok["problems"]
    assert ok["data"]["same"] is True
    assert {c["metric"] for c in ok["metrics"]} == {"mae", "rmse"}
    assert all(c["difference"] == 0.0 for c in ok["metrics"])
    assert ok["reproduced_run_id"] != ok["recorded_run_id"]
    rentals_frame(800, seed=5).to_parquet(proj / "data" / "rentals.parquet", index=False)
    proc = run_cli("models", "reproduce", "1", "--json", cwd=proj, check=False)
    assert proc.returncode == 1
    changed = json.loads(proc.stdout)
    assert changed["data"]["same"] is False
    assert "the data at data/rentals.parquet changed since v1 was trained" in \
        changed["problems"][0]
    # the recorded snapshot is immutable, so the metrics still reproduce exactly
    assert all(c["same"] for c in changed["metrics"])


def test_promote_reuses_a_gate_report_only_for_the_same_champion_and_gate_config(proj) -> None:
    from mloop.registry.candidates import _PYFUNCS

    project = open_project(proj)
    promote(project, 1, reason="first")
    gated = evaluate_gates(project, 2)  # what `mloop run` / `mloop models gate` leave behind
    _PYFUNCS.clear()
    change = promote(project, 2, reason="retrained")
    assert change.gates == {"passed": True, "evaluated_at": gated.evaluated_at, "against": 1,
                            "reused": True, "failed": []}
    assert not _PYFUNCS, "a reused report must not load any model"
    assert list_events(project.store)[0].payload["gates_reused"] is True

    # v3 fails against v2; once the gate config is loosened, the stale refusal must not stick
    assert not evaluate_gates(project, 3).passed
    write_forest_config(proj, params=GOOD, gates="gates:\n  non_inferiority: {margin: 1000.0}\n")
    change = promote(open_project(proj), 3, reason="margin widened")
    assert change.gates is not None
    assert (change.gates["reused"], change.gates["passed"], change.gates["against"]) == (
        False, True, 2)

    # another champion: v1's report against no champion is not reused against v3
    out = run_cli("models", "promote", "1", "--reason", "back to v1", cwd=proj).stdout
    assert "gates passed against v3" in " ".join(out.split()) and "evaluated now" in out
    assert "(reused" not in out
    # gated via the CLI, then promoted: the CLI says the report was reused
    rollback(open_project(proj), reason="v3 again")
    run_cli("models", "gate", "2", cwd=proj)
    out = run_cli("models", "promote", "2", "--reason", "gated a moment ago", cwd=proj).stdout
    assert "reused: same champion and gate config" in " ".join(out.split())


def test_incremental_chain_check_rehashes_only_new_events_and_catches_their_edits(
        proj) -> None:
    from mloop.security.audit import append_event

    project = open_project(proj)
    for i in range(3):
        append_event(project.store, "note", {"i": i})
    first = verify_chain(project.store)
    assert first.ok and first.last_id is not None
    for i in range(3, 5):
        append_event(project.store, "note", {"i": i})
    later = verify_chain(project.store, since=first)
    assert later.ok and later.events == first.events + 2 and later.last_id > first.last_id
    # an appended event edited after it was written: caught by the incremental check
    with project.store.engine.begin() as conn:
        conn.execute(sa.text("update events set payload = '{\"i\": 99}' where id = :i"),
                     {"i": later.last_id})
    report = verify_chain(project.store, since=first)
    assert (report.ok, report.first_bad_id) == (False, later.last_id)
    assert "was modified after it was written" in report.problem
    # the checkpoint's own row replaced: caught without rehashing the prefix
    with project.store.engine.begin() as conn:
        conn.execute(sa.text("update events set hash = :h where id = :i"),
                     {"h": "f" * 64, "i": first.last_id})
    report = verify_chain(project.store, since=first)
    assert (report.ok, report.first_bad_id) == (False, first.last_id)
    assert "verified before, was modified or deleted since" in report.problem
