"""The keyed audit chain: every way of tampering with the events table that someone with
write access to mloop's store (but not to the key beside the project) can try, on SQLite and
on PostgreSQL, and the checkpoint outside the store that catches a truncated tail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.project import Project, open_project
from mloop.security.audit import append_event, event_hash, verify_chain


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def chain(request: pytest.FixtureRequest, make_project,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A project whose store holds five events, on the embedded SQLite store or on a fresh
    PostgreSQL database."""
    monkeypatch.delenv("MLOOP_AUDIT_KEY", raising=False)
    if request.param == "postgres":  # a central store's writers share the key
        monkeypatch.setenv("MLOOP_STORE_URI", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("MLOOP_AUDIT_KEY", "c" * 64)
    yield from _five_events(open_project(make_project()))


@pytest.fixture
def local_chain(make_project, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """Five events on the embedded store, whose key is a file beside the project (a central
    store's comes from MLOOP_AUDIT_KEY only)."""
    monkeypatch.delenv("MLOOP_AUDIT_KEY", raising=False)
    yield from _five_events(open_project(make_project()))


def _five_events(project: Project) -> Iterator[Project]:
    for i in range(5):
        append_event(project.store, "promote", {"version": i + 1, "reason": f"step {i}"})
    yield project
    project.store.engine.dispose()


def _sql(project: Project, statement: str, **params: object) -> list[tuple]:
    with project.store.engine.begin() as conn:
        result = conn.execute(sa.text(statement), params)
        return [tuple(r) for r in result] if result.returns_rows else []


def _ids(project: Project) -> list[int]:
    return [r[0] for r in _sql(project, "select id from events order by id")]


def test_intact_chain_verifies(chain: Project) -> None:
    report = verify_chain(chain.store)
    assert (report.ok, report.events, report.problem) == (True, 5, None)


def test_deleting_the_newest_event_and_rewriting_the_head_is_detected(chain: Project) -> None:
    """The issue's reproduction: delete the last event, point ``audit_head`` at the one before
    it with the count one lower. The store alone agrees with itself; the checkpoint kept
    outside the store does not."""
    ids = _ids(chain)
    (prev_hash,) = _sql(chain, "select hash from events where id = :i", i=ids[-2])[0]
    _sql(chain, "delete from events where id = :i", i=ids[-1])
    _sql(chain, "update audit_head set events = 4, head_hash = :h", h=prev_hash)
    report = verify_chain(chain.store)
    assert report.ok is False
    assert "1 event(s) missing at the end of the chain" in report.problem
    assert "checkpoint" in report.problem


def test_truncating_several_events_and_the_head_is_detected(chain: Project) -> None:
    ids = _ids(chain)
    (keep_hash,) = _sql(chain, "select hash from events where id = :i", i=ids[1])[0]
    _sql(chain, "delete from events where id > :i", i=ids[1])
    _sql(chain, "update audit_head set events = 2, head_hash = :h", h=keep_hash)
    report = verify_chain(chain.store)
    assert report.ok is False and "3 event(s) missing at the end" in report.problem


def test_an_edited_event_rehashed_to_fit_is_detected_by_its_mac(chain: Project) -> None:
    """Whoever edits a payload can recompute the row's sha256 (the recipe is public) and the
    rows after it; without the key they cannot recompute the MAC."""
    from mloop.store.models import EventRow

    ids = _ids(chain)
    payload = {"version": 5, "reason": "nothing to see"}
    with chain.store.session() as s:
        row = s.get(EventRow, ids[-1])
        forged = event_hash(row.prev_hash, row.at, row.kind, row.actor, payload)
    with chain.store.engine.begin() as conn:
        conn.execute(sa.update(EventRow.__table__).where(EventRow.id == ids[-1])
                     .values(payload=payload, hash=forged))
        conn.execute(sa.text("update audit_head set head_hash = :h"), {"h": forged})
    report = verify_chain(chain.store)
    assert (report.ok, report.first_bad_id) == (False, ids[-1])
    assert "MAC" in report.problem


def test_an_edited_event_left_unhashed_is_detected(chain: Project) -> None:
    ids = _ids(chain)
    _sql(chain, "update events set actor = 'mallory' where id = :i", i=ids[2])
    report = verify_chain(chain.store)
    assert (report.ok, report.first_bad_id) == (False, ids[2])
    assert "was modified after it was written" in report.problem


def test_a_deleted_event_in_the_middle_is_detected(chain: Project) -> None:
    ids = _ids(chain)
    _sql(chain, "delete from events where id = :i", i=ids[2])
    report = verify_chain(chain.store)
    assert (report.ok, report.first_bad_id) == (False, ids[3])
    assert "does not follow the event before it" in report.problem


def test_an_inserted_event_without_the_key_is_detected(chain: Project) -> None:
    """An event forged at the end with a correct sha256 chain link and head, but no MAC (the
    forger has no key), or with a made-up one."""
    from datetime import UTC, datetime

    (last_hash,) = _sql(chain, "select hash from events order by id desc limit 1")[0]
    at = datetime.now(UTC)
    payload = {"version": 9, "reason": "forged"}
    forged = event_hash(last_hash, at, "promote", "alice", payload)
    from mloop.store.models import EventRow

    with chain.store.engine.begin() as conn:
        conn.execute(sa.insert(EventRow.__table__).values(
            at=at, kind="promote", actor="alice", payload=payload, prev_hash=last_hash,
            hash=forged, mac="0" * 64))
        conn.execute(sa.text("update audit_head set events = 6, head_hash = :h"),
                     {"h": forged})
    report = verify_chain(chain.store)
    assert report.ok is False and report.first_bad_id == max(_ids(chain))
    assert "MAC" in report.problem


def test_stripping_the_macs_does_not_pass_for_an_unkeyed_chain(chain: Project) -> None:
    ids = _ids(chain)
    _sql(chain, "update events set mac = null where id = :i", i=ids[3])
    report = verify_chain(chain.store)
    assert (report.ok, report.first_bad_id) == (False, ids[3])
    assert "no MAC" in report.problem


def test_an_altered_checkpoint_file_is_detected(chain: Project) -> None:
    import json

    from mloop.security.audit_key import checkpoint_path

    path = checkpoint_path(chain.store)
    data = json.loads(path.read_text())
    data["events"] = 3
    path.write_text(json.dumps(data))
    report = verify_chain(chain.store)
    assert report.ok is False and "checkpoint" in report.problem and "altered" in \
        report.problem


def test_verify_without_the_key_names_where_it_looked(local_chain: Project) -> None:
    chain = local_chain
    from mloop.security.audit_key import key_path

    path = key_path(chain.store)
    path.unlink()
    report = verify_chain(chain.store)
    assert report.ok is False
    assert str(path) in report.problem and "MLOOP_AUDIT_KEY" in report.problem


def test_the_key_file_is_created_readable_by_its_owner_only(local_chain: Project) -> None:
    chain = local_chain
    from mloop.security.audit_key import key_path

    path = key_path(chain.store)
    assert path.parent == chain.root / ".mloop" / "keys"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_key_from_the_environment_is_used_instead_of_the_file(
        make_project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mloop.security.audit_key import key_path

    monkeypatch.setenv("MLOOP_AUDIT_KEY", "k" * 64)
    project = open_project(make_project())
    append_event(project.store, "note", {"i": 1})
    assert not key_path(project.store).exists()
    assert verify_chain(project.store).ok
    monkeypatch.setenv("MLOOP_AUDIT_KEY", "z" * 64)
    report = verify_chain(project.store)
    assert report.ok is False and "MAC" in report.problem


def test_a_short_key_in_the_environment_is_refused(
        make_project, monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.errors import MloopError

    monkeypatch.setenv("MLOOP_AUDIT_KEY", "short")
    project = open_project(make_project())
    with pytest.raises(MloopError, match="MLOOP_AUDIT_KEY must hold at least 32 characters"):
        append_event(project.store, "note", {"i": 1})
    assert _sql(project, "select count(*) from events") == [(0,)]


def test_events_written_before_the_key_existed_verify_as_unkeyed_prefix(
        make_project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events from before this version (no MAC column values) stay valid as a prefix; the
    report says how many are not keyed."""
    monkeypatch.delenv("MLOOP_AUDIT_KEY", raising=False)
    project = open_project(make_project())
    for i in range(3):
        append_event(project.store, "note", {"i": i})
    _sql(project, "update events set mac = null")
    append_event(project.store, "note", {"i": 3})
    report = verify_chain(project.store)
    assert (report.ok, report.events, report.unkeyed) == (True, 4, 3)


def test_cli_audit_verify_says_intact_then_exits_1_after_the_issue_tamper(chain: Project,
                                                                          capsys) -> None:
    import json

    from mloop.cli.app import main

    assert main(["-C", str(chain.root), "audit", "verify"]) == 0
    assert "audit chain intact: 5 events (checkpoint outside the store at 5)" in \
        capsys.readouterr().out
    ids = _ids(chain)
    (prev_hash,) = _sql(chain, "select hash from events where id = :i", i=ids[-2])[0]
    _sql(chain, "delete from events where id = :i", i=ids[-1])
    _sql(chain, "update audit_head set events = 4, head_hash = :h", h=prev_hash)
    assert main(["-C", str(chain.root), "audit", "verify", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert (doc["ok"], doc["events"]) == (False, 4)
    assert doc["problem"].startswith("1 event(s) missing at the end of the chain: the "
                                     "checkpoint outside the store")


def test_writers_in_several_processes_share_one_key_and_the_chain_verifies(
        make_project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four processes write the first events of a fresh project at once: one key file wins
    (none reads a half-written one), the checkpoint ends at the last event."""
    import subprocess
    import sys

    monkeypatch.delenv("MLOOP_AUDIT_KEY", raising=False)
    root = make_project()
    code = ("import sys; from mloop.project import open_project; "
            "from mloop.security.audit import append_event; p = open_project(sys.argv[1]); "
            "[append_event(p.store, 'note', {'writer': sys.argv[2], 'i': i}) for i in range(5)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(w)])
             for w in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    report = verify_chain(open_project(root).store)
    assert (report.ok, report.events, report.checkpoint) == (True, 20, 20)


def test_a_truncated_key_file_is_an_error_naming_it(local_chain: Project) -> None:
    chain = local_chain
    from mloop.errors import MloopError
    from mloop.security.audit_key import key_path

    path = key_path(chain.store)
    path.write_text("abc\n")
    with pytest.raises(MloopError, match=f"the audit key {path} holds 3 characters"):
        append_event(chain.store, "note", {})
    assert "holds 3 characters" in verify_chain(chain.store).problem


@pytest.mark.postgres
def test_a_central_store_without_the_key_chains_unkeyed_and_a_keyless_writer_is_caught(
        make_project, monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    """A PostgreSQL store written from several machines has no key file (each machine would
    make its own): without MLOOP_AUDIT_KEY its events are hash-chained, counted as unkeyed,
    and nothing is written beside the project. Once keyed events exist, one written by a
    process without the key is named."""
    monkeypatch.delenv("MLOOP_AUDIT_KEY", raising=False)
    monkeypatch.setenv("MLOOP_STORE_URI", pg_url)
    project = open_project(make_project())
    for i in range(2):
        append_event(project.store, "note", {"i": i})
    report = verify_chain(project.store)
    assert (report.ok, report.events, report.unkeyed) == (True, 2, 2)
    assert not (project.root / ".mloop" / "keys").exists()

    monkeypatch.setenv("MLOOP_AUDIT_KEY", "k" * 64)
    append_event(project.store, "note", {"i": 2})
    report = verify_chain(project.store)
    assert (report.ok, report.events, report.unkeyed) == (True, 3, 2)

    monkeypatch.delenv("MLOOP_AUDIT_KEY")
    append_event(project.store, "note", {"i": 3})
    monkeypatch.setenv("MLOOP_AUDIT_KEY", "k" * 64)
    report = verify_chain(project.store)
    assert report.ok is False
    assert "has no MAC but events before it have one" in report.problem
    assert "without MLOOP_AUDIT_KEY" in report.problem
    project.store.engine.dispose()
