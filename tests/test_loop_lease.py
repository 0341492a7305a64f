"""The controller's lease (mloop.loop.lease) on real SQLite and PostgreSQL stores: a second
controller is refused and told who holds it until when, many racing for it get exactly one
holder (for a first lease and for an expired one), a holder that never released it (killed)
is taken over only once it expired and that is recorded, a live holder keeps it past its
length by renewing, and a state save by a controller whose lease was taken over is refused.
The real `mloop loop` processes are in test_loop_processes.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mloop.config import Duration
from mloop.errors import LeaseHeldError, LeaseLostError
from mloop.loop.lease import LoopLease, read_lease
from mloop.loop.state import load_state, save_state
from mloop.project import open_project
from mloop.security.audit import list_events
from mloop.store.db import Store, utcnow

MODEL = "rentals"
LONG = Duration.parse("5m")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mloop.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def stores(store_url: str, tmp_path: Path) -> Iterator[list[Store]]:
    """Eight stores on one database, one per controller: separate engines, separate
    connections, as separate processes would have. They share one keys folder (the audit
    chain's key), as the controllers of one project do."""
    opened = [Store(store_url, keys_dir=tmp_path / "keys") for _ in range(8)]
    yield opened
    for s in opened:
        s.engine.dispose()


def _wait_past(when: datetime) -> None:
    time.sleep(max(0.0, (when - utcnow()).total_seconds()) + 0.05)


def test_a_second_controller_is_refused_and_told_who_holds_the_lease_until_when(
        stores: list[Store]) -> None:
    first = LoopLease(stores[0], MODEL, duration=LONG, holder="host-a:101:aa").acquire()
    second = LoopLease(stores[1], MODEL, duration=LONG, holder="host-b:202:bb")
    with pytest.raises(LeaseHeldError, match=(
            r"^the loop lease of 'rentals' is held by host-a:101:aa until 20\d\d-\d\d-\d\dT"
            r"[\d:]+\+00:00 \((4m 5\d|5m 00)s from now; taken .*\): another controller is "
            r"acting for 'rentals', so this one did nothing\. A holder that was killed frees "
            r"the lease "
            r"when it expires \(loop.lease: 5m\)$")) as refused:
        second.acquire()
    assert refused.value.holder == "host-a:101:aa"
    assert first.expires_at is not None
    assert abs((refused.value.expires_at - first.expires_at).total_seconds()) < 0.001
    assert second.generation is None  # it holds nothing
    row = read_lease(stores[0], MODEL)
    assert row is not None and (row.holder, row.generation) == ("host-a:101:aa", 1)


@pytest.mark.parametrize("lease_before", ["none", "expired"])
def test_of_eight_controllers_racing_for_the_lease_exactly_one_takes_it(
        stores: list[Store], lease_before: str) -> None:
    """The insert-if-absent path (no lease yet) and the compare-and-swap path (an expired
    lease): eight threads, each with its own engine, released together by a barrier."""
    if lease_before == "expired":
        dead = LoopLease(stores[0], MODEL, duration=timedelta(seconds=1), holder="dead:1:00")
        dead.acquire()
        _wait_past(dead.expires_at or utcnow())
    leases = [LoopLease(s, MODEL, duration=LONG, holder=f"racer-{i}") for i, s in
              enumerate(stores)]
    barrier = threading.Barrier(len(leases))
    outcomes: dict[str, object] = {}

    def race(lease: LoopLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            outcomes[lease.holder] = "won"
        except Exception as exc:  # anything but LeaseHeldError fails the assertions below
            outcomes[lease.holder] = exc

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [h for h, o in outcomes.items() if o == "won"]
    assert len(winners) == 1, outcomes
    losers = [o for o in outcomes.values() if o != "won"]
    assert len(losers) == 7 and all(isinstance(o, LeaseHeldError) for o in losers), outcomes
    assert {o.holder for o in losers if isinstance(o, LeaseHeldError)} == set(winners)
    row = read_lease(stores[0], MODEL)
    assert row is not None and row.holder == winners[0]
    assert row.generation == (2 if lease_before == "expired" else 1)
    taken = list_events(stores[0], kind="loop.lease_taken_over")
    assert len(taken) == (1 if lease_before == "expired" else 0)


def test_a_lease_never_released_is_taken_over_only_once_expired_and_that_is_recorded(
        stores: list[Store]) -> None:
    # acquired and then neither renewed nor released: what a controller killed with -9 leaves
    dead = LoopLease(stores[0], MODEL, duration=timedelta(seconds=1.5), holder="pod-1:7:dd")
    dead.acquire()
    heir = LoopLease(stores[1], MODEL, duration=LONG, holder="pod-2:9:ee")
    with pytest.raises(LeaseHeldError, match="held by pod-1:7:dd"):
        heir.acquire()
    _wait_past(dead.expires_at or utcnow())
    heir.acquire()
    assert heir.taken_over is not None and heir.taken_over.holder == "pod-1:7:dd"
    assert heir.generation == 2
    (event,) = list_events(stores[0], kind="loop.lease_taken_over")
    assert event.payload["holder"] == "pod-2:9:ee"
    assert event.payload["previous"]["holder"] == "pod-1:7:dd"
    assert "pod-1:7:dd stopped renewing the lease at" in event.payload["reason"]
    assert "never released it" in event.payload["reason"]
    # the old holder, were it only paused, finds its lease gone and stops acting
    with pytest.raises(LeaseLostError, match="taken by another controller after "
                                             "pod-1:7:dd's lease expired"):
        dead.renew()
    with pytest.raises(LeaseLostError, match="this controller stops acting"):
        dead.ensure()


def test_a_released_lease_is_free_at_once_and_no_takeover_is_recorded(
        stores: list[Store]) -> None:
    with LoopLease(stores[0], MODEL, duration=LONG, holder="first"):
        pass
    row = read_lease(stores[0], MODEL)
    assert row is not None and row.released_at is not None
    nxt = LoopLease(stores[1], MODEL, duration=LONG, holder="next").acquire()
    assert nxt.taken_over is None and nxt.generation == 2
    assert list_events(stores[0], kind="loop.lease_taken_over") == []


def test_a_live_holder_keeps_its_lease_past_its_length_by_renewing(
        stores: list[Store]) -> None:
    lease = LoopLease(stores[0], MODEL, duration=timedelta(seconds=1.5), holder="alive")
    other = LoopLease(stores[1], MODEL, duration=LONG, holder="other")
    with lease:
        first_expiry = lease.expires_at
        assert first_expiry is not None
        _wait_past(first_expiry + timedelta(seconds=1.5))  # two lease lengths after taking it
        with pytest.raises(LeaseHeldError, match="held by alive"):
            other.acquire()
        lease.ensure()
        row = read_lease(stores[0], MODEL)
        assert row is not None and row.expires_at > first_expiry and row.generation == 1
    other.acquire()
    assert other.taken_over is None  # released on the way out, not left to expire


@pytest.fixture
def project_url(store_url: str, make_project, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLOOP_STORE_URI", store_url)
    return make_project()


def test_a_state_save_by_a_controller_whose_lease_was_taken_over_is_refused(
        project_url: Path) -> None:
    project = open_project(project_url)
    stale = LoopLease(project.store, MODEL, duration=timedelta(seconds=1), holder="stale")
    stale.acquire()
    state = load_state(project)
    save_state(project, state, lease=stale)  # while it holds the lease, it saves
    saved = state.revision
    _wait_past(stale.expires_at or utcnow())
    LoopLease(open_project(project_url).store, MODEL, duration=LONG, holder="heir").acquire()
    state.last_window_id = 7
    with pytest.raises(LeaseLostError, match="the loop lease of 'rentals' is now held by heir, "
                                             "not stale: this controller stops acting"):
        save_state(project, state, lease=stale)
    stored = load_state(open_project(project_url))
    assert (stored.revision, stored.last_window_id) == (saved, 0)


def test_state_saves_and_writes_while_the_lease_renews_never_fail_on_a_locked_database(
        project_url: Path) -> None:
    """Found by CI: on SQLite a pass that read and then wrote in one deferred transaction
    (save_state, a step's finish) while its own renewal thread was committing got "database
    is locked" at once (SQLite refuses to wait when two connections each hold what the other
    needs), and the controller died mid-pass. Writers now begin IMMEDIATE and wait instead."""
    project = open_project(project_url)
    lease = LoopLease(project.store, MODEL, duration=LONG, holder="busy").acquire()
    stop = threading.Event()

    def renew_often() -> None:  # the renewal thread, every 5 ms instead of every 100 s
        while not stop.wait(0.005):
            lease.renew()

    renewer = threading.Thread(target=renew_often)
    renewer.start()
    try:
        state = load_state(project)
        run = project.store.create_pipeline_run(project="p", pipeline="train",
                                                config_hash="h")
        for i in range(150):
            state.last_window_id = i
            save_state(project, state, lease=lease)
            project.store.update_pipeline_run(run.id, status=f"step {i}")
    finally:
        stop.set()
        renewer.join()
    assert load_state(project).last_window_id == 149
    assert project.store.get_pipeline_run(run.id).status == "step 149"
