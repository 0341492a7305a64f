"""The controller as real `mloop loop` processes on real SQLite and PostgreSQL stores: two
started together, exactly one acts and the other names it; one killed with SIGKILL in the
middle of a retrain is found interrupted by the next (its pipeline run marked failed, no
second retrain, the lease taken over only once expired) and the loop carries on; a second
`mloop loop` stands by while the first holds the lease, takes over when it is killed, and
releases the lease on SIGTERM. The lease itself is tested in test_loop_lease.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mloop.errors import LeaseHeldError
from mloop.loop.lease import LeaseRecord, LoopLease, read_lease
from mloop.loop.state import load_state
from mloop.project import Project, open_project
from mloop.registry.promotion import change_alias
from mloop.security.audit import list_events, verify_chain
from mloop.serving.deploy import desired_state
from mloop.store.db import utcnow

from .helpers import (
    GOOD,
    MLOOP_BIN,
    heat_wave,
    label_rows,
    log_traffic,
    rentals_frame,
    run_cli,
    train_forest,
)

pytestmark = pytest.mark.slow

MODEL = "rentals"
# a short lease, so a test waits seconds (not loop.lease's default 5m) for a killed holder's
LOOP = """
loop:
  lease: 4s
  triggers: {drift: {consecutive: 1}}
  retrain: {window: 3d, min_labelled_rows: 300}
  guards: {cooldown: 3d, max_per_day: 2}
  canary: {weight: 0.5, probation: 1d, min_labelled: 50}
"""

T = TypeVar("T")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of this test and of the `mloop` processes it starts: mloop's store on
    the project's SQLite file, or on a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        monkeypatch.delenv("MLOOP_STORE_URI", raising=False)
        return {}
    url = request.getfixturevalue("pg_url")
    monkeypatch.setenv("MLOOP_STORE_URI", url)
    return {"MLOOP_STORE_URI": url}


@pytest.fixture
def trained(env: dict[str, str], tmp_path: Path) -> Path:
    """v1 (a random forest on rentals_frame) champion and the LOOP policy; no traffic."""
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    assert train_forest(root, GOOD) == 1
    (root / "mloop.yaml").write_text((root / "mloop.yaml").read_text() + LOOP)
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


@pytest.fixture
def root(trained: Path) -> Path:
    """``trained`` with two labelled days of traffic, the second a heat wave: the next pass
    retrains and starts a canary."""
    root = trained
    project = open_project(root)
    normal, hot = rentals_frame(600, seed=40), heat_wave(600, seed=41)
    label_rows(project, log_traffic(project, normal, "2024-06-01"), normal)
    label_rows(project, log_traffic(project, hot, "2024-06-02"), hot)
    log_traffic(project, rentals_frame(5, seed=42), "2024-06-03")  # the watermark
    return root


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still running at its end is killed (by its own PID)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _start(procs: list[subprocess.Popen[str]], root: Path, env: dict[str, str], *args: str,
           log: Path | None = None) -> subprocess.Popen[str]:
    """`mloop -C root ARGS` as its own process; stdout and stderr piped, or both to ``log``."""
    out: Any = log.open("w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen([MLOOP_BIN, "-C", str(root), *args], env={**os.environ, **env},
                            stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE,
                            text=True)
    procs.append(proc)
    return proc


def _wait_for(what: str, probe: Callable[[], T | None], *procs: subprocess.Popen[str],
              timeout: float = 120) -> T:
    """Poll ``probe`` (a read of the store or a log) until it returns something; fail at
    once if one of ``procs`` exits first, else after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        for p in procs:
            if p.poll() is not None:
                out = p.stdout.read() if p.stdout else ""
                raise AssertionError(f"waiting for {what}: `{' '.join(map(str, p.args))}` "
                                     f"exited {p.returncode} first\n{out}")
        time.sleep(0.05)
    raise AssertionError(f"no {what} after {timeout} s")


def _kinds(project: Project, prefix: str = "loop.") -> list[str]:
    return [e.kind for e in reversed(list_events(project.store, limit=500, kind=prefix))]


def _versions(project: Project) -> list[int]:
    return sorted(int(v.version) for v in
                  project.mlflow.search_model_versions(f"name = '{MODEL}'"))


def test_two_controllers_started_together_exactly_one_acts(
        root: Path, env: dict[str, str], started: list[subprocess.Popen[str]]) -> None:
    procs = [_start(started, root, env, "loop", "--once", "--json") for _ in range(2)]
    results = [(p.returncode, out, err) for p in procs
               for out, err in [p.communicate(timeout=600)]]
    # as text, so a failure shows each process's whole stderr (a repr is cut at 240 chars)
    assert sorted(code for code, _, _ in results) == [0, 3], "\n\n".join(
        f"exit {code}\nstdout:\n{out}\nstderr:\n{err}" for code, out, err in results)
    (_, won_out, _), = [r for r in results if r[0] == 0]
    (_, lost_out, lost_err), = [r for r in results if r[0] == 3]
    won = json.loads(won_out)
    assert [a["action"] for a in won["actions"]] == ["canary_started"], won["actions"]
    holder, version = won["lease"]["holder"], won["actions"][0]["version"]
    # the loser tried while the winner held the lease (the windows overlapped) and says so
    assert re.search(rf"the loop lease of 'rentals' is held by {re.escape(holder)} until "
                     rf"20\d\d-[\d-]+T[\d:]+\+00:00 .*so this one did nothing", lost_err), lost_err
    lost = json.loads(lost_out)
    assert (lost["actions"], lost["lease"]["holder"]) == ([], holder)
    # one retrain (its held-out fit, then the refit on canary), one canary: nothing done twice
    project = open_project(root)
    assert _kinds(project) == ["loop.retrain_started", "loop.refit", "loop.canary_started"]
    assert _versions(project) == [1, version - 1, version]
    state = desired_state(project)
    assert (state.champion, state.challenger) == (1, version)
    saved = load_state(project)
    assert saved.in_flight is None
    assert [(h.version, h.outcome) for h in saved.history] == [(version, "canary")]
    lease = read_lease(project.store, MODEL)
    assert lease is not None and lease.holder == holder and lease.released_at is not None
    assert verify_chain(project.store).ok


def test_a_controller_killed_mid_retrain_is_found_interrupted_and_the_loop_carries_on(
        root: Path, env: dict[str, str], started: list[subprocess.Popen[str]]) -> None:
    project = open_project(root)
    proc = _start(started, root, env, "loop", "--once")

    def retraining() -> str | None:
        """The retrain's pipeline run, once the controller recorded it and it is running."""
        flight = load_state(project).in_flight
        if flight is None or flight.pipeline_run_id is None:
            return None
        run = project.store.get_pipeline_run(flight.pipeline_run_id)
        return run.id if run.status == "running" else None

    run_id = _wait_for("a retrain in progress", retraining, proc)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    # what the kill left: a retrain in flight, its run still "running", the lease unreleased
    flight = load_state(project).in_flight
    assert flight is not None and flight.pipeline_run_id == run_id and flight.holder
    assert project.store.get_pipeline_run(run_id).status == "running"
    dead = read_lease(project.store, MODEL)
    assert dead is not None and (dead.holder, dead.released_at) == (flight.holder, None)
    versions_left = _versions(project)
    # until the dead holder's lease expires, no controller may act
    with pytest.raises(LeaseHeldError, match=f"held by {re.escape(flight.holder)} until"):
        LoopLease.of(open_project(root)).acquire()
    time.sleep(max(0.0, (dead.expires_at - utcnow()).total_seconds()) + 0.1)

    restart = json.loads(run_cli("-C", str(root), "loop", "--once", "--json", env=env).stdout)
    acts = [a["action"] for a in restart["actions"]]
    # recorded, not redone: the drift trigger still fires and the cooldown (counted from the
    # interrupted retrain's start) holds it
    assert acts == ["retrain_interrupted", "held"], restart["actions"]
    interrupted, held = restart["actions"]
    assert interrupted["in_flight"]["holder"] == flight.holder
    assert interrupted["pipeline_run"] == {"id": run_id, "was": "running", "status": "failed"}
    assert interrupted["reason"].startswith(f"interrupted: {flight.holder} stopped "
                                            f"mid-retrain without releasing its lease")
    assert "cooldown" in held["guard"]
    assert project.store.get_pipeline_run(run_id).status == "failed"
    assert all(s.status != "running" for s in project.store.step_runs(run_id))
    saved = load_state(project)
    assert saved.in_flight is None
    assert [(h.outcome, h.pipeline_run_id) for h in saved.history] == [("failed", run_id)]
    assert _kinds(project) == ["loop.retrain_started", "loop.lease_taken_over",
                               "loop.retrain_interrupted", "loop.trigger_held"]
    taken = list_events(project.store, kind="loop.lease_taken_over")[0].payload
    assert (taken["previous"]["holder"], taken["holder"]) == (flight.holder,
                                                             restart["lease"]["holder"])
    state = desired_state(project)
    assert (state.champion, state.challenger) == (1, None)
    assert _versions(project) == versions_left

    # past the cooldown, more drift: the loop retrains once and starts a canary
    hot = heat_wave(600, seed=43)
    label_rows(project, log_traffic(project, hot, "2024-06-06"), hot)
    log_traffic(project, heat_wave(5, seed=44), "2024-06-07")
    again = json.loads(run_cli("-C", str(root), "loop", "--once", "--json", env=env).stdout)
    assert [a["action"] for a in again["actions"]] == ["canary_started"], again["actions"]
    version = again["actions"][0]["version"]
    assert version == max(versions_left) + 2  # the held-out fit, then its refit on canary
    state = desired_state(project)
    assert (state.champion, state.challenger) == (1, version)
    assert [h.outcome for h in load_state(project).history] == ["failed", "canary"]
    assert _kinds(project).count("loop.retrain_started") == 2
    assert verify_chain(project.store).ok


def test_a_standing_by_controller_takes_over_from_a_killed_one_and_sigterm_releases(
        trained: Path, env: dict[str, str], started: list[subprocess.Popen[str]],
        tmp_path: Path) -> None:
    root = trained  # no traffic: each pass only looks, so the test is about the lease
    project = open_project(root)
    first = _start(started, root, env, "loop", "--every", "1", log=tmp_path / "first.log")

    def holder() -> LeaseRecord | None:
        row = read_lease(project.store, MODEL)
        return row if row is not None and row.live(utcnow()) else None

    leader = _wait_for("the first controller's lease", holder, first)
    second_log = tmp_path / "second.log"
    second = _start(started, root, env, "loop", "--every", "1", log=second_log)
    _wait_for("the second controller standing by", lambda: re.search(
        rf"standing by: the loop lease of 'rentals' is held by {re.escape(leader.holder)}",
        second_log.read_text()), second)
    assert read_lease(project.store, MODEL).holder == leader.holder  # type: ignore[union-attr]
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)

    def new_holder() -> LeaseRecord | None:
        row = read_lease(project.store, MODEL)
        return row if row is not None and row.holder != leader.holder else None

    heir = _wait_for("the second controller taking over", new_holder, second)
    assert heir.generation == leader.generation + 1
    _wait_for("the takeover message", lambda: re.search(
        rf"took the loop lease of 'rentals' as {re.escape(heir.holder)} \(loop.lease 4s\), "
        rf"after {re.escape(leader.holder)} left it unreleased", second_log.read_text()),
              second)
    # recorded (before the message), and taken only once the killed holder's lease expired
    (taken,) = list_events(project.store, kind="loop.lease_taken_over")
    assert taken.payload["previous"]["holder"] == leader.holder
    assert heir.acquired_at >= datetime.fromisoformat(taken.payload["previous"]["expires_at"])
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 128 + signal.SIGTERM
    row = read_lease(project.store, MODEL)
    assert row is not None and row.holder == heir.holder and row.released_at is not None


def test_held_ok_makes_a_pass_that_finds_the_lease_held_exit_0_and_still_say_so(
        trained: Path, env: dict[str, str]) -> None:
    """A Kubernetes CronJob counts exit 3 as a failed Job; its export passes --held-ok."""
    from datetime import timedelta

    held = LoopLease(open_project(trained).store, MODEL, duration=timedelta(minutes=5),
                     holder="another-controller").acquire()
    try:
        plain = subprocess.run([MLOOP_BIN, "-C", str(trained), "loop", "--once"],
                               env={**os.environ, **env}, capture_output=True, text=True,
                               timeout=300)
        ok = subprocess.run([MLOOP_BIN, "-C", str(trained), "loop", "--once", "--held-ok"],
                            env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=300)
    finally:
        held.release()
    assert plain.returncode == 3, plain.stderr
    assert ok.returncode == 0, ok.stderr
    for out in (plain, ok):
        assert "is held by another-controller" in out.stderr
        assert "so this one did nothing" in out.stderr
    assert _kinds(open_project(trained)) == []  # neither acted
