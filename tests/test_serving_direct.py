"""The scoring endpoints' short way (``ServingApp`` hands POST /predict and /invocations
straight to ``edge.answer``) answers exactly as the app's router and handlers do; the one-row
check answers as the general one; the inference log's column building and request ids keep
their contract."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from mloop.project import open_project
from mloop.registry.promotion import change_alias
from mloop.serving.schema import Column, InputError, InputSchema
from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_ids, read_log

from .helpers import copy_project
from .serving_util import ServerThread, metric, project_server, request_rows

# ------------------------------------------------------------------- the short way, over HTTP


@pytest.fixture
def proj(serving_registry: Path, tmp_path: Path) -> Path:
    return copy_project(serving_registry, tmp_path)


def _two_servers(root: Path) -> tuple[ServerThread, ServerThread]:
    """The same project twice: scoring requests on the short way, and (behind a root_path,
    which the short way leaves to the router) through FastAPI's middleware and router."""
    direct = project_server(root, max_body_bytes=4096)
    routed = project_server(root, max_body_bytes=4096)
    routed.server.config.root_path = "/m"
    return direct, routed


def _answer(r: requests.Response) -> tuple[int, Any, dict[str, str]]:
    try:
        body = r.json()
    except ValueError:
        body = r.text
    if isinstance(body, dict):
        body.pop("request_ids", None)
    headers = {k: v for k, v in r.headers.items()
               if k.lower() in ("content-type", "x-mloop-version", "x-mloop-ignored-columns",
                                "allow")}
    return r.status_code, body, headers


@pytest.mark.slow
def test_scoring_endpoints_answer_alike_on_the_short_way_and_through_the_router(
        proj: Path) -> None:
    row = request_rows(1)[0]
    json_ = {"content-type": "application/json"}
    cases: list[tuple[str, str, bytes | None, dict[str, str]]] = [
        ("POST", "/predict", json.dumps({"records": [row]}).encode(),
         json_),
        ("POST", "/predict", json.dumps(
            {"records": [{**row, "colour": "red"}]}).encode(), json_),
        ("POST", "/predict", b'{"records": [{"hour": "noon", "weather": null}]}', json_),
        ("POST", "/predict", b'{"records": [', json_),
        ("POST", "/predict", b'{"records": []}', {"content-type": "text/plain"}),
        ("POST", "/predict", b'{"records": [' + b" " * 5000 + b"]}", json_),
        ("POST", "/predict", b'{"columns": {"hour": [1]}, "records": []}', json_),
        ("POST", "/invocations", json.dumps(
            {"dataframe_split": {"columns": list(row), "data": [list(row.values())]}}
        ).encode(), json_),
        ("POST", "/invocations", b"hour,weather,temp\n6,Clear,abc\n",
         {"content-type": "text/csv"}),
        ("POST", "/invocations", b"<x/>", {"content-type": "application/xml"}),
        ("GET", "/predict", None, {}),
    ]
    direct, routed = _two_servers(proj)
    with direct, routed:
        answers = []
        for srv in (direct, routed):
            answers.append([_answer(requests.request(method, srv.url + path, data=data,
                                                     headers=headers, timeout=30))
                            for method, path, data, headers in cases])
        assert [a[0] for a in answers[0]] == [200, 200, 422, 400, 415, 413, 422, 200, 422,
                                              415, 405]
        assert answers[0] == answers[1]
        assert answers[0][1][2]["x-mloop-ignored-columns"] == "colour"
        texts = [srv.get("/metrics").text for srv in (direct, routed)]
    for endpoint, status, count in (("predict", "200", 2), ("predict", "422", 2),
                                    ("predict", "400", 1), ("predict", "415", 1),
                                    ("predict", "413", 1), ("predict", "405", 1),
                                    ("invocations", "200", 1),
                                    ("invocations", "422", 1), ("invocations", "415", 1)):
        for text in texts:
            assert metric(text, "mloop_requests_total", endpoint=endpoint,
                          status=status) == count, (endpoint, status)
            if status == "200":
                assert metric(text, "mloop_requests_total", endpoint=endpoint, status=status,
                              version="1") == count
    for text in texts:
        assert metric(text, "mloop_request_latency_seconds_count", endpoint="predict") == 8
        assert metric(text, "mloop_in_flight_requests") == 0


@pytest.mark.slow
def test_a_model_that_fails_is_answered_500_naming_the_error_logged_and_counted(
        proj: Path, caplog: pytest.LogCaptureFixture) -> None:
    # v3 passes its warm-up, then raises on every call
    change_alias(open_project(proj), "champion", 3, expected=1, action="promote",
                 reason="test: a champion that fails")
    row = request_rows(1)[0]
    with project_server(proj) as srv:
        srv.wait_for(lambda: srv.get("/ready").json().get("version") == 3)
        r = srv.post("/predict", {"records": [row]})
        assert r.status_code == 500
        assert r.json() == {"error": "prediction failed: RuntimeError: challenger exploded"}
        r = srv.post("/invocations", {"dataframe_records": [row]})
        assert r.status_code == 500, r.text
        text = srv.get("/metrics").text
    assert metric(text, "mloop_requests_total", endpoint="predict", status="500") == 1
    assert metric(text, "mloop_requests_total", endpoint="invocations", status="500") == 1
    assert metric(text, "mloop_in_flight_requests") == 0
    assert any("predict failed" in rec.getMessage() and rec.exc_info
               for rec in caplog.records)


# ------------------------------------------------------------------------ the one-row check

SCHEMA = InputSchema([Column("x", "double", True), Column("n", "long", True),
                      Column("s", "string", True), Column("b", "boolean", False),
                      Column("t", "datetime", False)])

_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.sampled_from(["2024-05-01T10:00:00+02:00", "2024-05-01 10:00", "1500-01-01"]),
    st.lists(st.integers(), max_size=2))
# per field: a value its type takes (often), or anything at all
_FIELDS = {
    "x": st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.integers(-2 ** 53, 2 ** 53), _ANY),
    "n": st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.integers(-99, 99).map(float), _ANY),
    "s": st.one_of(st.text(max_size=5), _ANY),
    "b": st.one_of(st.booleans(), _ANY),
    "t": st.one_of(st.sampled_from(["2024-05-01T10:00:00+02:00", "2024-05-01T10:00:00"]),
                   _ANY),
}


@st.composite
def _records(draw: st.DrawFn) -> dict[str, Any]:
    record = {k: draw(v) for k, v in _FIELDS.items()}
    for name in draw(st.sets(st.sampled_from(sorted(_FIELDS)), max_size=2)):
        del record[name]
    if draw(st.booleans()):
        record["extra"] = draw(_ANY)
    return record


def _outcome(records: list[Any]) -> tuple[str, Any]:
    try:
        rows = SCHEMA.from_records(records)
    except InputError as exc:
        return "error", [e.to_dict() for e in exc.errors]
    return "rows", rows


@settings(max_examples=400, deadline=None)
@given(_records())
def test_one_record_is_checked_as_the_same_record_among_others(record: dict[str, Any]) -> None:
    """A one-row request takes a shorter check; it must accept, convert and refuse exactly
    what a request of two copies of that row does for each copy."""
    one_kind, one = _outcome([record])
    two_kind, two = _outcome([record, record])
    assert one_kind == two_kind
    if one_kind == "error":
        assert one == [e for e in two if e.get("row") in (0, None)]
        return
    assert one.n == 1 and two.n == 2
    assert {k: 2 * v for k, v in one.ignored.items()} == two.ignored
    for name in SCHEMA.names:
        (a,), (b, c) = one.columns[name], two.columns[name]
        assert type(a) is type(b) is type(c)
        assert a == b == c or (isinstance(a, float) and math.isnan(a))


def test_one_valid_record_is_converted_to_the_types_the_log_stores() -> None:
    rows = SCHEMA.from_records([{"x": 3, "n": 4.0, "s": "a", "b": True,
                                 "t": "2024-05-01T10:00:00+02:00"}])
    assert rows.columns == {"x": [3.0], "n": [4], "s": ["a"], "b": [True],
                            "t": ["2024-05-01T08:00:00"]}
    assert type(rows.columns["x"][0]) is float and type(rows.columns["n"][0]) is int


def test_one_record_with_a_null_optional_field_keeps_it_null_and_a_required_one_is_named(
        ) -> None:
    rows = SCHEMA.from_records([{"x": 1.0, "n": 1, "s": "a", "b": None, "t": float("nan")}])
    assert rows.columns["b"] == [None] and rows.columns["t"] == [None]
    with pytest.raises(InputError) as info:
        SCHEMA.from_records([{"x": None, "n": 1, "s": "a", "b": True, "t": None}])
    assert [e.to_dict() for e in info.value.errors] == [
        {"field": "x", "problem": "null where the signature requires a value", "row": 0}]


# ------------------------------------------------------------------------- the inference log

def test_entries_of_any_shape_commit_row_by_row_with_inputs_in_place(tmp_path: Path) -> None:
    """One-row and many-row entries, and an entry without one of the inputs (its cells are
    null), commit to the same rows the entries describe."""
    log = InferenceLog(str(tmp_path / "log"), commit_interval=3600)
    ts = 1_700_000_000.0
    entries = [
        LogEntry(["a" * 24], ts, 1, "champion", 0.5, [1.5], {"x": [1.0], "s": ["p"]}),
        LogEntry(["b" * 24, "c" * 24], ts + 1, 1, "canary", 0.7, [2.5, 3.5],
                 {"x": [2.0, 3.0], "s": ["q", "r"]}, key="k"),
        LogEntry(["d" * 24], ts + 2, 1, "champion", 0.9, [4.5], {"x": [4.0]}),
    ]
    for e in entries:
        assert log.append(e)
    assert log.commit() == 4
    frame = read_log(str(tmp_path / "log")).to_pandas().sort_values("_request_id")
    assert frame["_request_id"].tolist() == ["a" * 24, "b" * 24, "c" * 24, "d" * 24]
    assert frame["_prediction"].tolist() == [1.5, 2.5, 3.5, 4.5]
    assert frame["_role"].tolist() == ["champion", "canary", "canary", "champion"]
    assert frame["_latency_ms"].tolist() == [0.5, 0.7, 0.7, 0.9]
    assert frame["_key"].tolist()[1:3] == ["k", "k"]
    assert frame["x"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert frame["s"].tolist()[:3] == ["p", "q", "r"] and frame["s"].isna().tolist()[3]
    assert [t.timestamp() for t in frame["_ts"]] == [ts, ts + 1, ts + 1, ts + 2]


def test_request_ids_drawn_in_a_forked_child_differ_from_the_parents() -> None:
    new_request_ids(0.0, 3)  # the parent's buffer holds random digits before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write_end, ",".join(new_request_ids(0.0, 50)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        child = set(f.read().split(","))
    os.waitpid(pid, 0)
    parent = set(new_request_ids(0.0, 50))
    assert len(child) == len(parent) == 50
    assert not child & parent
