"""`mloop audit report`: a period's decisions (who, why), what served with the data behind it,
and the chain's verification, as JSON and as one HTML page, on a project with real trained
versions, real gates, promotions, an override and a rollback."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.cli.app import main
from mloop.errors import GateFailedError
from mloop.project import open_project
from mloop.registry.promotion import promote, rollback
from mloop.security.audit import append_event, current_actor

from .helpers import GOOD, RESEED, WORSE, rentals_frame, train_forest, write_forest_config

pytestmark = pytest.mark.slow

NI = "gates:\n  non_inferiority: {margin: 1.0}\n"


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    """v1 good, v2 reseeded, v3 worse; then: v1 and v2 promoted, v3 refused by its gate,
    forced through, rolled back; one monitoring alert and one held loop trigger."""
    root = tmp_path_factory.mktemp("audit_report") / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    assert [train_forest(root, p) for p in (GOOD, RESEED, WORSE)] == [1, 2, 3]
    write_forest_config(root, params=GOOD, gates=NI)
    project = open_project(root)
    promote(project, 1, reason="first model")
    promote(project, 2, reason="reseeded, as good")
    with pytest.raises(GateFailedError):
        promote(project, 3, reason="try the worse one")
    promote(project, 3, reason="customer asked for v3", force=True)
    rollback(project, reason="v3 too slow in the afternoon")
    # the payloads monitoring and the controller write (monitoring/service.py, controller.py)
    append_event(project.store, "monitor.alert", {
        "model": "rentals", "window": {"start": "2012-01-01"},
        "reasons": ["drift: temp (psi 0.31 > 0.2)"]})
    append_event(project.store, "loop.trigger_held", {
        "model": "rentals", "triggers": [{"trigger": "drift"}], "guard": "cooldown 1d"})
    append_event(project.store, "gate", {"model": "rentals", "version": 2, "passed": True,
                                         "results": {}})  # a passed gate: not a decision
    append_event(project.store, "serve.load_failed", {"version": 4})  # nor is this
    return root


@pytest.fixture
def proj(history: Path, tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(history, root)
    return root


def _report(root: Path, capsys, *args: str) -> tuple[int, dict]:
    code = main(["-C", str(root), "audit", "report", "--json", *args])
    said = capsys.readouterr()
    assert said.out, f"exit {code}, no report: {said.err}"
    return code, json.loads(said.out)


def test_report_lists_every_decision_with_who_and_why(proj: Path, capsys) -> None:
    code, doc = _report(proj, capsys)
    assert code == 0 and doc["chain"]["ok"] is True
    counts = doc["counts"]
    assert (counts["promotion"], counts["forced override"], counts["rollback"],
            counts["alert"], counts["loop decision"]) == (2, 1, 1, 1, 1)
    assert counts["gate failure"] >= 1  # v3 against v2 (the forced promotion reuses it)
    assert counts["personal data"] == 0 and "serve.load_failed" not in {
        d["kind"] for d in doc["decisions"]}
    assert not any(d["kind"] == "gate" and d["version"] == 2 for d in doc["decisions"])
    whys = {(d["kind"], d["version"]): d["why"] for d in doc["decisions"]}
    assert whys[("promote", 1)] == "first model"
    assert whys[("override", 3)] == "customer asked for v3"
    assert whys[("rollback", 2)] == "v3 too slow in the afternoon"
    assert whys[("monitor.alert", None)] == "drift: temp (psi 0.31 > 0.2)"
    assert whys[("loop.trigger_held", None)] == "triggers: drift; held by guard: cooldown 1d"
    gate = next(d for d in doc["decisions"] if d["category"] == "gate failure")
    assert gate["version"] == 3 and gate["why"].startswith("failed non_inferiority.mae (")
    assert {d["who"] for d in doc["decisions"]} == {current_actor()}
    assert doc["people"] == [{"who": current_actor(), "decisions": len(doc["decisions"])}]


def test_report_names_the_snapshots_behind_each_served_version(proj: Path, capsys) -> None:
    _, doc = _report(proj, capsys)
    served = [(s["version"], s["alias"], s["action"]) for s in doc["served"]]
    assert served == [(1, "champion", "promote"), (2, "champion", "promote"),
                      (3, "champion", "override"), (2, "champion", "rollback")]
    assert doc["served"][-1]["to"] is None  # v2 still serving
    project = open_project(proj)
    for s in doc["served"]:
        tags = project.mlflow.get_model_version("rentals", str(s["version"])).tags
        assert s["data"]["train"]["digest"] == tags["mloop.snapshot.train"]
        assert s["data"]["holdout"]["rows"] == 240
        assert s["data"]["source"]["source"] == "data/rentals.parquet"


def test_html_report_is_one_page_with_the_verdict_decisions_and_data(proj: Path, capsys,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "audit.html"
    code, doc = _report(proj, capsys, "--html", str(out))
    page = out.read_text()
    assert code == 0 and page.startswith("<!doctype html>")
    assert "Audit chain intact" in page and "customer asked for v3" in page
    assert doc["served"][0]["data"]["train"]["digest"][:12] in page
    assert "<script" not in page  # self-contained, nothing to run


def test_a_period_keeps_only_its_decisions_and_what_served_in_it(proj: Path, capsys) -> None:
    _, doc = _report(proj, capsys, "--since", datetime.now(UTC).isoformat())
    assert doc["decisions"] == [] and set(doc["counts"].values()) == {0}
    assert [(s["version"], s["to"]) for s in doc["served"]] == [(2, None)]
    _, everything = _report(proj, capsys)
    first = everything["decisions"][0]
    _, upto = _report(proj, capsys, "--until", first["at"])
    assert [d["id"] for d in upto["decisions"]] == [first["id"]]


def test_a_broken_chain_is_reported_and_exits_1(proj: Path, capsys, tmp_path: Path) -> None:
    project = open_project(proj)
    with project.store.engine.begin() as conn:
        conn.execute(sa.text("update events set payload = '{}' where kind = 'override'"))
    out = tmp_path / "audit.html"
    code, doc = _report(proj, capsys, "--html", str(out))
    assert code == 1 and doc["chain"]["ok"] is False
    assert "was modified after it was written" in doc["chain"]["problem"]
    assert "Audit chain BROKEN" in out.read_text()


@pytest.mark.parametrize(("args", "message"), [
    (("--since", "yesterday"), "--since 'yesterday': not an ISO 8601 time"),
    (("--until", "2026-13-01"), "--until '2026-13-01': not an ISO 8601 time"),
    (("--since", "2026-02-01", "--until", "2026-01-01"),
     "--since 2026-02-01T00:00:00+00:00 is after --until 2026-01-01T00:00:00+00:00"),
])
def test_a_bad_period_is_refused_naming_the_option(proj: Path, capsys, tmp_path: Path,
                                                   args, message) -> None:
    out = tmp_path / "audit.html"
    assert main(["-C", str(proj), "audit", "report", *args, "--html", str(out)]) == 1
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


@pytest.mark.parametrize(("kind", "payload", "expected"), [
    ("promote", {}, "promotion"), ("override", {}, "forced override"),
    ("rollback", {}, "rollback"), ("loop.probation_rollback", {}, "rollback"),
    ("gate", {"passed": False}, "gate failure"), ("gate", {"passed": True}, None),
    ("monitor.alert", {}, "alert"), ("loop.alert", {}, "alert"),
    ("loop.retrain_started", {}, "retrain"), ("loop.candidate_rejected", {}, "loop decision"),
    ("canary", {}, "deployment"), ("data.erased", {}, "personal data"),
    ("data.retention", {}, "personal data"), ("keys.rotated", {}, "access"),
    ("token.create", {}, "access"), ("serve.load_failed", {}, None), ("log.purged", {}, None),
])
def test_each_event_kind_falls_in_one_decision_category(kind, payload, expected) -> None:
    from mloop.loop.audit_report import category

    assert category(kind, payload) == expected
