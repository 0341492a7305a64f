"""Personal data (security.pii), retention and erasure, on a real trained project served over
real HTTP: raw values never reach a file under .mloop/, hashed values still count as
categories, old rows age out on a loop pass, and an erasure removes one person's rows and
labels without recording the value."""

from __future__ import annotations

import json
import os
import re
import stat
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from .helpers import SMALL_CONFIG, copy_project, rentals_frame, run_cli, train_champion
from .serving_util import project_server

POLICY = """\
security:
  pii: {email: hash, name: drop, phone: mask}
  retention: 180d
"""
TRAIN_EMAILS = [f"user{i}@train.example" for i in range(6)]
# distinctive values only clients send (never in the training data)
ZED = "zed.secret.7731@privacy.test"
ANN = "ann.unique.4410@privacy.test"
NAME = "Zebulon Quartermaine"
PHONE = "+1-555-0199-8823"


def _frame() -> pd.DataFrame:
    frame = rentals_frame(600)
    rng = np.random.default_rng(3)
    frame["email"] = rng.choice(TRAIN_EMAILS, size=len(frame))
    frame["name"] = rng.choice(["Ada", "Bo", "Cy"], size=len(frame))
    frame["phone"] = rng.choice(["111", "222"], size=len(frame))
    return frame


def _record(email: str, *, hour: int = 8) -> dict[str, Any]:
    return {"hour": hour, "weather": "Clear", "temp": 18.5, "email": email, "name": NAME,
            "phone": PHONE}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project with a PII policy, trained once; 3 requests of ZED, 2 of ANN and 2 of a
    training e-mail answered over HTTP and flushed. Tests change copies of it."""
    root = train_champion(tmp_path_factory.mktemp("pii") / "proj", SMALL_CONFIG + POLICY,
                          _frame())
    ids: dict[str, list[str]] = {}
    with project_server(root) as srv:
        srv.wait_for(lambda: srv.get("/ready").ok, timeout=60)
        for email, n in ((ZED, 3), (ANN, 2), (TRAIN_EMAILS[0], 2)):
            for i in range(n):
                r = srv.post("/predict", {"records": [_record(email, hour=i)]})
                assert r.status_code == 200, r.text
                ids.setdefault(email, []).extend(r.json()["request_ids"])
        assert srv.post("/flush").json()["committed_rows"] == 7
    return {"root": root, "ids": ids}


@pytest.fixture
def project_copy(served: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    from mloop.project import open_project

    yield open_project(copy_project(served["root"], tmp_path))


def _files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle`` (Parquet, SQLite, JSON alike;
    UTF-8 and UTF-16, as SQLite may store text)."""
    patterns = [needle.encode(), needle.encode("utf-16-le")]
    return [str(p) for p in root.rglob("*") if p.is_file()
            and any(pat in p.read_bytes() for pat in patterns)]


# ------------------------------------------------------------------------ personal data

def test_raw_personal_values_never_reach_any_file_under_dot_mloop(served: dict[str, Any]
                                                                   ) -> None:
    from mloop.project import open_project
    from mloop.traffic.inference_log import read_log

    root = served["root"]
    table = read_log(open_project(root).uris["inference_log_uri"])
    assert table.num_rows == 7  # the rows were logged: the grep below looks at real data
    for raw in (ZED, ANN, NAME, PHONE, "zed.secret", "Quartermaine", "0199-8823"):
        assert _files_holding(root / ".mloop", raw) == [], raw


def test_the_models_logged_input_example_holds_no_raw_personal_value(
        served: dict[str, Any]) -> None:
    """MLflow keeps five training rows as the model's input example, in the clear; the
    policy columns in it are digests and masks, and the server warmed up on it (it served)."""
    (path,) = [p for p in served["root"].rglob("input_example.json")]
    text = path.read_text()
    for raw in (*TRAIN_EMAILS, "train.example"):
        assert raw not in text, raw
    example = json.loads(text)
    rows = [dict(zip(example["columns"], row, strict=True)) for row in example["data"]]
    assert len(rows) == 5
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["email"]) for r in rows), rows
    assert {r["name"] for r in rows} == {r["phone"] for r in rows} == {"***"}
    assert {r["weather"] for r in rows} <= {"Clear", "Mist", "Rain", "Snow", "Cloudy"}


def test_hashed_column_keeps_equal_values_equal_and_drop_and_mask_keep_nothing(
        served: dict[str, Any]) -> None:
    from mloop.project import open_project
    from mloop.security.pii import PiiPolicy
    from mloop.traffic.inference_log import read_log

    project = open_project(served["root"])
    policy = PiiPolicy.of(project.config, project.root)
    assert policy is not None
    table = read_log(project.uris["inference_log_uri"])
    emails = table.column("email").to_pylist()
    assert emails.count(policy.digest("email", ZED)) == 3
    assert emails.count(policy.digest("email", ANN)) == 2
    assert emails.count(policy.digest("email", TRAIN_EMAILS[0])) == 2
    assert "name" not in table.column_names
    assert set(table.column("phone").to_pylist()) == {"***"}


def test_monitoring_counts_hashed_categories_against_the_hashed_reference(
        served: dict[str, Any]) -> None:
    from mloop.monitoring.evaluate import evaluate_window
    from mloop.monitoring.service import reference_for
    from mloop.project import open_project
    from mloop.security.pii import PiiPolicy
    from mloop.traffic.inference_log import read_log

    project = open_project(served["root"])
    policy = PiiPolicy.of(project.config, project.root)
    assert policy is not None
    ref = reference_for(project, 1)
    assert ref.skipped.keys() == {"name", "phone"}
    assert "email" in ref.features
    assert set(ref.profile["columns"]["email"]["top"]) == {
        policy.digest("email", e) for e in TRAIN_EMAILS}
    report = evaluate_window(ref.profile, read_log(project.uris["inference_log_uri"]),
                             project.config.monitoring, columns=ref.features)
    email = next(c for c in report["drift"]["columns"] if c["column"] == "email")
    seen = email["labels"].index(policy.digest("email", TRAIN_EMAILS[0]))
    # the reference held every category (no "other" bucket): the two training e-mails
    # count in their own category, the five never seen are the quality check's
    assert email["window_hist"][seen] == pytest.approx(1.0)
    unseen = [f for f in report["quality"] if f["column"] == "email"]
    assert [(f["check"], f["count"]) for f in unseen] == [("unseen_category", 5)]


def test_a_policy_naming_no_input_of_the_version_fails_its_load_naming_the_key(
        served: dict[str, Any], tmp_path: Path) -> None:
    root = copy_project(served["root"], tmp_path)
    text = (root / "mloop.yaml").read_text().replace("email: hash", "emial: hash")
    (root / "mloop.yaml").write_text(text)
    line = text.splitlines().index("  pii: {emial: hash, name: drop, phone: mask}") + 1
    with project_server(root) as srv:
        srv.wait_for(lambda: 1 in srv.state.failed, timeout=60)
        why = srv.state.failed[1]
        assert f"mloop.yaml:{line}: 'security.pii.emial': v1 has no input 'emial'" in why
        assert srv.post("/predict", {"records": [_record(ZED)]}).status_code == 503


@pytest.mark.parametrize(("policy", "message"), [
    ("pii: {email: encrypt}", r"mloop.yaml:\d+: 'security.pii.email': Input should be "
                              r"'drop', 'hash' or 'mask'"),
    ("pii: {cnt: hash}", r"mloop.yaml:\d+: 'security.pii.cnt': column 'cnt' is the target"),
    ("pii: {_key: drop}", r"'security.pii._key': column '_key' starts with '_'"),
    ("retention: 0d", r"'security.retention': '0d': a retention must be longer than zero"),
    ("retention: 180", r"'security.retention': 180 is not a duration"),
])
def test_bad_security_config_is_an_error_naming_file_line_and_key(policy: str,
                                                                  message: str) -> None:
    from mloop.config import parse_config
    from mloop.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config(SMALL_CONFIG + f"security:\n  {policy}\n")


def test_pii_column_outside_listed_features_is_a_config_error() -> None:
    from mloop.config import parse_config
    from mloop.errors import ConfigError

    text = SMALL_CONFIG.replace("  time_column: ts\n", "  time_column: ts\n  numeric: [hour, "
                                "temp]\n  categorical: [weather]\n")
    with pytest.raises(ConfigError, match=r"'security.pii.email': column 'email' is not among "
                                          r"features.numeric/features.categorical"):
        parse_config(text + "security:\n  pii: {email: hash}\n")


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.security.pii import KEY_FILE, load_pii_key

    monkeypatch.delenv("MLOOP_PII_KEY", raising=False)
    key = load_pii_key(tmp_path)
    assert len(key) == 32 and load_pii_key(tmp_path) == key
    assert stat.S_IMODE(os.stat(tmp_path / KEY_FILE).st_mode) == 0o600


def test_the_key_comes_from_the_environment_when_set_and_a_short_one_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.errors import MloopError
    from mloop.security.pii import KEY_FILE, load_pii_key

    monkeypatch.setenv("MLOOP_PII_KEY", "a-shared-secret-of-the-fleet")
    assert load_pii_key(tmp_path) == b"a-shared-secret-of-the-fleet"
    assert not (tmp_path / KEY_FILE).exists()
    monkeypatch.setenv("MLOOP_PII_KEY", "short")
    with pytest.raises(MloopError, match="MLOOP_PII_KEY is set but holds 5 characters"):
        load_pii_key(tmp_path)


# ------------------------------------------------------------------------------ erasure

def _label(project: Any, ids: list[str]) -> None:
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    store_labels(ObjectStore(project.uris["inference_log_uri"]), dict.fromkeys(ids, 10.0),
                 task="regression", source="test")


def test_erase_by_the_raw_value_of_a_hashed_column_removes_its_rows_and_labels(
        project_copy: Any, served: dict[str, Any]) -> None:
    from mloop.security.audit import list_events
    from mloop.traffic.erase import erase_rows
    from mloop.traffic.inference_log import read_log
    from mloop.traffic.labels import read_labels

    ids = served["ids"]
    uri = project_copy.uris["inference_log_uri"]
    _label(project_copy, ids[ZED] + ids[ANN])
    assert read_labels(uri).num_rows == 5  # cached: the erasure must drop that copy too
    result = erase_rows(project_copy, keys=[f"email={ZED}"], reason="GDPR art. 17 request")
    assert (result.rows, result.label_rows) == (3, 3)
    left = read_log(uri)
    assert left.num_rows == 4 and not set(ids[ZED]) & set(left.column("_request_id").to_pylist())
    assert sorted(read_labels(uri).column("_request_id").to_pylist()) == sorted(ids[ANN])
    event = list_events(project_copy.store, kind="data.erased")[0]
    assert event.payload["column"] == "email" and event.payload["rows"] == 3
    assert len(event.payload["value_hmacs"]) == 1
    assert ZED not in json.dumps(event.payload) and "zed.secret" not in json.dumps(event.payload)
    assert _files_holding(project_copy.root / ".mloop", ZED) == []


def test_erase_by_request_id_removes_that_row_only(project_copy: Any,
                                                   served: dict[str, Any]) -> None:
    from mloop.traffic.erase import erase_rows
    from mloop.traffic.inference_log import read_log

    one = served["ids"][ANN][0]
    result = erase_rows(project_copy, request_ids=[one])
    assert result.rows == 1 and result.column is None
    left = read_log(project_copy.uris["inference_log_uri"]).column("_request_id").to_pylist()
    assert len(left) == 6 and one not in left


def test_erase_of_a_value_no_row_holds_erases_nothing_and_is_still_recorded(
        project_copy: Any) -> None:
    from mloop.security.audit import list_events
    from mloop.traffic.erase import erase_rows
    from mloop.traffic.inference_log import read_log

    result = erase_rows(project_copy, keys=["email=nobody@nowhere.test"])
    assert (result.rows, result.segments) == (0, [])
    assert read_log(project_copy.uris["inference_log_uri"]).num_rows == 7
    assert list_events(project_copy.store, kind="data.erased")[0].payload["rows"] == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keys": ["nope=1"]}, r"no column 'nope' in the inference log; its inputs: hour, "
                           r"temp, weather, email, phone"),
    ({"keys": ["email"]}, r"--key 'email': expected COLUMN=VALUE"),
    ({"keys": ["=x"]}, r"--key '=x': expected COLUMN=VALUE"),
    ({"keys": ["temp=warm"]}, r"--key temp=warm: column 'temp' holds double values, and "
                              r"'warm' is not one"),
    ({"keys": ["name=Ada"]}, r"security.pii.name is 'drop': the log never held its values"),
    ({"keys": ["email=a", "hour=1"]}, r"one column per erasure, got email, hour"),
    ({"request_ids": ["not-an-id"]}, r"--request-id 'not-an-id': not a request id"),
    ({}, r"give --key COLUMN=VALUE or --request-id ID"),
])
def test_bad_erasure_requests_are_refused_and_change_nothing(project_copy: Any,
                                                             kwargs: dict[str, Any],
                                                             message: str) -> None:
    from mloop.errors import MloopError
    from mloop.security.audit import list_events
    from mloop.traffic.erase import erase_rows
    from mloop.traffic.inference_log import read_log

    with pytest.raises(MloopError, match=message):
        erase_rows(project_copy, **kwargs)
    assert read_log(project_copy.uris["inference_log_uri"]).num_rows == 7
    assert list_events(project_copy.store, kind="data.erased") == []


def test_cli_erase_prints_counts_as_json_and_a_malformed_key_exits_1(
        project_copy: Any) -> None:
    done = run_cli("-C", str(project_copy.root), "data", "erase", "--key", f"email={ANN}",
                   "--json")
    assert json.loads(done.stdout)["rows"] == 2
    bad = run_cli("-C", str(project_copy.root), "data", "erase", "--key", "email", check=False)
    assert bad.returncode == 1 and "expected COLUMN=VALUE" in bad.stderr


# ---------------------------------------------------------------------------- retention

def _old_rows(project: Any, when: list[datetime]) -> list[str]:
    """One answered row per time in ``when``, written as the server writes them."""
    from mloop.security.pii import PiiPolicy
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    policy = PiiPolicy.of(project.config, project.root)
    assert policy is not None
    log = InferenceLog(project.uris["inference_log_uri"], commit_interval=3600)
    ids = []
    for t in when:
        rid = new_request_id(t.timestamp())
        ids.append(rid)
        cols = {k: [v] for k, v in _record(ZED).items()}
        log.append(LogEntry([rid], t.timestamp(), 1, "champion", 1.0, [50.0],
                            policy.apply(cols)))
    log.close()
    return ids


def test_retention_deletes_rows_and_labels_older_than_the_cutoff_and_records_counts(
        project_copy: Any) -> None:
    from mloop.security.audit import list_events
    from mloop.traffic.inference_log import read_log
    from mloop.traffic.labels import read_labels
    from mloop.traffic.retention import apply_retention

    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    cutoff = now - timedelta(days=180)
    old = _old_rows(project_copy, [cutoff - timedelta(days=30), cutoff - timedelta(hours=1)])
    young = _old_rows(project_copy, [cutoff + timedelta(hours=1), now - timedelta(days=1)])
    _label(project_copy, old + young)
    uri = project_copy.uris["inference_log_uri"]
    dry = apply_retention(project_copy, now=now, apply=False)
    assert dry is not None and (dry.log_rows, dry.label_rows) == (2, 2)
    assert read_log(uri).num_rows == 11  # a dry run deletes nothing
    done = apply_retention(project_copy, now=now)
    assert done is not None and (done.log_rows, done.label_rows) == (2, 2)
    left = set(read_log(uri).column("_request_id").to_pylist())
    assert not left & set(old) and set(young) <= left
    assert set(read_labels(uri).column("_request_id").to_pylist()) == set(young)
    event = list_events(project_copy.store, kind="data.retention")[0]
    assert event.payload["cutoff"] == cutoff.isoformat()
    assert (event.payload["log_rows"], event.payload["label_rows"]) == (2, 2)
    again = apply_retention(project_copy, now=now)
    assert again is not None and again.log_rows == 0
    assert len(list_events(project_copy.store, kind="data.retention")) == 1  # nothing new


def test_a_loop_pass_applies_the_retention_first(project_copy: Any) -> None:
    from mloop.loop.controller import run_once
    from mloop.traffic.inference_log import read_log

    old = _old_rows(project_copy, [datetime.now(UTC) - timedelta(days=400)])
    result = run_once(project_copy)
    assert result["retention"]["log_rows"] == 1
    left = read_log(project_copy.uris["inference_log_uri"]).column("_request_id").to_pylist()
    assert old[0] not in left and len(left) == 7


def test_cli_retention_without_a_retention_set_names_the_key(make_project: Any) -> None:
    root = make_project()
    bad = run_cli("-C", str(root), "data", "retention", check=False)
    assert bad.returncode == 1 and "security.retention" in bad.stderr
    assert textwrap.dedent(SMALL_CONFIG) == (root / "mloop.yaml").read_text()


def test_retraining_on_traffic_sees_personal_inputs_as_missing_never_their_digests(
        project_copy: Any, served: dict[str, Any]) -> None:
    from mloop.loop.retrain import labelled_traffic

    ids = served["ids"]
    _label(project_copy, ids[ZED] + ids[TRAIN_EMAILS[0]])
    table = labelled_traffic(project_copy, until=datetime.now(UTC) + timedelta(minutes=1),
                             window=timedelta(days=1))
    assert table.num_rows == 5
    for column in ("email", "name", "phone"):
        assert table.column(column).null_count == 5, column
    assert table.column("weather").null_count == 0


def test_without_the_servers_key_erasure_by_a_hashed_value_refuses_and_monitoring_says_why(
        project_copy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.errors import MloopError
    from mloop.monitoring.service import reference_for
    from mloop.security.pii import KEY_FILE
    from mloop.traffic.erase import erase_rows

    monkeypatch.delenv("MLOOP_PII_KEY", raising=False)
    (project_copy.root / KEY_FILE).unlink()
    with pytest.raises(MloopError, match=r"no PII key here: MLOOP_PII_KEY is not set and "
                                         r".*pii.key does not exist"):
        erase_rows(project_copy, keys=[f"email={ZED}"])
    assert not (project_copy.root / KEY_FILE).exists()  # never a new key that matches nothing
    ref = reference_for(project_copy, 1)
    assert "email" not in ref.features
    assert "no PII key in this process" in ref.skipped["email"]
