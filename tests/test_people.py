"""People and roles: one role table for the server, the dashboard and the CLI; the CLI acts as
the person of ``MLOOP_TOKEN`` against a central store (PostgreSQL here) and refuses what their
role does not allow, before changing anything; tokens from before people keep working."""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.cli.app import main
from mloop.errors import PermissionDeniedError
from mloop.project import Project, open_project
from mloop.security.audit import list_events
from mloop.security.roles import ROLES, role_allows
from mloop.security.tokens import create_token, token_identity
from mloop.store.db import Store


@pytest.mark.parametrize(("role", "action", "allowed"), [
    ("viewer", "read", True), ("viewer", "predict", False),
    ("predict", "predict", True), ("predict", "promote", False),
    ("predict", "feedback", False),
    ("operator", "promote", True), ("operator", "rollback", True),
    ("operator", "deploy", True), ("operator", "loop", True), ("operator", "tokens", False),
    ("operator", "keys", False),
    ("admin", "promote", True), ("admin", "tokens", True), ("admin", "keys", True),
    (None, "read", False), ("root", "read", False),
])
def test_the_role_table_orders_viewer_predict_operator_admin(role, action, allowed) -> None:
    assert ROLES == ("viewer", "predict", "operator", "admin")
    assert role_allows(role, action) is allowed


# ------------------------------------------------------------- the CLI against a central store

@pytest.fixture
def central(make_project, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Project]:
    """A project whose store is a PostgreSQL database (a central store), no token set."""
    monkeypatch.setenv("MLOOP_STORE_URI", pg_url)
    monkeypatch.delenv("MLOOP_TOKEN", raising=False)
    monkeypatch.delenv("MLOOP_ACTOR", raising=False)
    project = open_project(make_project())
    yield project
    project.store.engine.dispose()


def _cli(project: Project, *args: str) -> int:
    return main(["-C", str(project.root), *args])


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())


@pytest.mark.postgres
def test_central_store_refuses_a_mutating_command_without_a_token(central, capsys) -> None:
    create_token(central.store, role="admin", person="alice")  # roles hold from here on
    before = list_events(central.store)
    assert _cli(central, "deploy", "stop-challenger", "--reason", "x") == 1
    said = _err(capsys)
    assert "this store is central: set MLOOP_TOKEN to your token to 'deploy' (needs role " \
           "'operator')" in said
    assert [e.id for e in list_events(central.store)] == [e.id for e in before]


@pytest.mark.postgres
def test_central_store_without_tokens_lets_whoever_reaches_it_act_until_the_first(
        central, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cli(central, "tokens", "create", "--person", "alice", "--role", "admin",
                "--json") == 0
    alice = json.loads(capsys.readouterr().out)
    assert (alice["person"], alice["role"]) == ("alice", "admin")
    (event,) = list_events(central.store)
    assert event.actor == f"{getpass.getuser()}@{socket.gethostname()} (no token exists yet)"
    # a second token without one is refused: the bootstrap is over
    assert _cli(central, "tokens", "create", "--person", "mallory", "--role", "admin") == 1
    assert "this store is central: set MLOOP_TOKEN" in _err(capsys)
    # as alice: recorded as alice
    monkeypatch.setenv("MLOOP_TOKEN", alice["token"])
    assert _cli(central, "tokens", "create", "--person", "bob", "--role", "operator") == 0
    newest = list_events(central.store, limit=1)[0]
    assert newest.actor == f"alice (token #{alice['id']}, cli)"
    assert newest.payload["person"] == "bob"


@pytest.mark.postgres
@pytest.mark.parametrize(("role", "args", "action", "needed"), [
    ("viewer", ("models", "promote", "1", "--reason", "x"), "promote", "operator"),
    ("predict", ("models", "rollback", "--reason", "x"), "rollback", "operator"),
    ("predict", ("deploy", "canary", "2", "--reason", "x"), "deploy", "operator"),
    ("viewer", ("loop", "--once"), "loop", "operator"),
    ("operator", ("tokens", "create", "--role", "admin"), "tokens", "admin"),
    ("operator", ("tokens", "revoke", "1"), "tokens", "admin"),
    ("operator", ("db", "upgrade"), "store", "admin"),
])
def test_a_role_below_the_command_is_refused_naming_person_and_role_needed(
        central, capsys, monkeypatch: pytest.MonkeyPatch, role, args, action, needed) -> None:
    tok = create_token(central.store, role=role, person="carol")
    monkeypatch.setenv("MLOOP_TOKEN", tok.token)
    before = len(list_events(central.store, limit=100))
    assert _cli(central, *args) == 1
    assert (f"carol has role '{role}' (token #{tok.id}): '{action}' needs role '{needed}' or "
            f"above; nothing was changed") in _err(capsys)
    assert len(list_events(central.store, limit=100)) == before


@pytest.mark.postgres
def test_an_operator_passes_the_role_check_of_promote(central, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the check the command runs: here it fails for want of a model, not of a role."""
    tok = create_token(central.store, role="operator", person="dave")
    monkeypatch.setenv("MLOOP_TOKEN", tok.token)
    assert _cli(central, "models", "promote", "1", "--reason", "x") == 1
    said = _err(capsys)
    assert "needs role" not in said and "rentals" in said


@pytest.mark.postgres
def test_an_unknown_or_revoked_token_is_refused(central, capsys,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.security.tokens import revoke_token

    tok = create_token(central.store, role="admin", person="erin")
    revoke_token(central.store, tok.id)
    for value in ("mlp_not-a-token", tok.token):
        monkeypatch.setenv("MLOOP_TOKEN", value)
        assert _cli(central, "tokens", "list") == 1
        assert "MLOOP_TOKEN is not a working token (unknown or revoked)" in _err(capsys)


# ------------------------------------------------------------- the embedded default

def test_embedded_store_acts_as_the_os_user_with_every_right(make_project, capsys,
                                                             monkeypatch) -> None:
    monkeypatch.delenv("MLOOP_TOKEN", raising=False)
    monkeypatch.delenv("MLOOP_ACTOR", raising=False)
    root = make_project()
    assert main(["-C", str(root), "tokens", "create", "--person", "frank", "--role",
                 "viewer"]) == 0
    (event,) = list_events(open_project(root).store)
    assert event.actor == f"{getpass.getuser()}@{socket.gethostname()}"


def test_embedded_store_with_mloop_token_set_acts_as_its_person(make_project, capsys,
                                                                monkeypatch) -> None:
    root = make_project()
    viewer = create_token(open_project(root).store, role="viewer", person="gina")
    monkeypatch.setenv("MLOOP_TOKEN", viewer.token)
    assert main(["-C", str(root), "deploy", "stop-challenger"]) == 1
    assert "gina has role 'viewer'" in _err(capsys)


def test_the_actor_does_not_leak_into_the_next_command_of_the_process(
        make_project, capsys, monkeypatch) -> None:
    monkeypatch.delenv("MLOOP_ACTOR", raising=False)
    root = make_project()
    admin = create_token(open_project(root).store, role="admin", person="hana")
    monkeypatch.setenv("MLOOP_TOKEN", admin.token)
    assert main(["-C", str(root), "tokens", "create", "--person", "ivan"]) == 0
    monkeypatch.delenv("MLOOP_TOKEN")
    assert main(["-C", str(root), "tokens", "create", "--person", "jo"]) == 0
    actors = [e.actor for e in list_events(open_project(root).store, limit=2)]
    assert actors == [f"{getpass.getuser()}@{socket.gethostname()}",
                      f"hana (token #{admin.id}, cli)"]


def test_authorize_raises_a_permission_error_with_its_fields(make_project) -> None:
    from mloop.security.people import authorize

    store = open_project(make_project()).store
    tok = create_token(store, role="predict", person="kim")
    with pytest.raises(PermissionDeniedError, match="kim has role 'predict'") as info:
        authorize(store, "deploy", token=tok.token)
    assert (info.value.person, info.value.role, info.value.action, info.value.needed) == (
        "kim", "predict", "deploy", "operator")


# ------------------------------------------------------------- server, dashboard, old tokens

@pytest.mark.parametrize(("role", "action", "status"), [
    ("predict", "predict", None), ("predict", "deploy", 403), ("predict", "feedback", 403),
    ("operator", "deploy", None), ("operator", "feedback", None), ("admin", "deploy", None),
    ("viewer", "predict", 403),
])
def test_server_checks_the_same_role_table(make_project, role, action, status) -> None:
    from mloop.serving.auth import TokenAuth
    from mloop.serving.edge import HTTPError

    store = open_project(make_project()).store
    tok = create_token(store, role=role, person="lee")
    auth = TokenAuth(store, refresh_seconds=0.0)
    if status is None:
        auth.check(f"Bearer {tok.token}", action)
        return
    with pytest.raises(HTTPError) as info:
        auth.check(f"Bearer {tok.token}", action)
    assert info.value.status == status
    assert f"this token's role '{role}' may not {action}" in json.dumps(info.value.body)


@pytest.mark.parametrize(("role", "can_act"), [("viewer", False), ("predict", False),
                                               ("operator", True), ("admin", True)])
def test_dashboard_lets_operators_and_admins_act(role, can_act) -> None:
    from mloop.ui.auth import User

    user = User(3, "laptop", role, "mia")
    assert user.can_act is can_act
    assert user.actor == "mia (token #3, ui)"


def _old_store_with_an_admin_token(url: str) -> None:
    old = Store(url, upgrade=False)
    old.upgrade("0011")
    with old.engine.begin() as conn:
        conn.execute(sa.text(
            "insert into api_tokens (name, role, token_hash, created_at, created_by) values "
            "('ops', 'admin', :h, CURRENT_TIMESTAMP, 'root@box')"),
            {"h": __import__("hashlib").sha256(b"mlp_old").hexdigest()})
    old.engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                            marks=pytest.mark.postgres)])
def test_tokens_from_before_people_keep_their_role_and_take_their_name_as_person(
        backend, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    from mloop.security.people import authorize

    url = (f"sqlite:///{tmp_path / 'mloop.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))
    _old_store_with_an_admin_token(url)
    store = Store(url, keys_dir=tmp_path / "keys")  # opening upgrades to 0012
    ident = token_identity(store, "mlp_old")
    assert ident is not None and (ident.role, ident.person) == ("admin", "ops")
    assert authorize(store, "tokens", token="mlp_old").actor == f"ops (token #{ident.id}, cli)"
    store.engine.dispose()
