"""The model server over real HTTP on 127.0.0.1: endpoints, bad input, micro-batching, canary,
shadow, hot swap, the inference log, labels, auth, TLS; batch scoring; the deploy and tokens
CLI; /invocations parity with ``mlflow models serve`` on the same registered model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests

from mloop.cli.app import main
from mloop.errors import MloopError, PromotionError
from mloop.project import open_project
from mloop.registry.promotion import change_alias, history
from mloop.security.audit import list_events
from mloop.serving.app import create_app
from mloop.serving.batch import predict_file
from mloop.serving.deploy import deploy_challenger, desired_state, stop_challenger
from mloop.serving.model import load_served
from mloop.traffic.inference_log import read_log
from mloop.traffic.labels import read_labels

from .helpers import copy_project, rentals_frame, self_signed_cert
from .serving_util import FAST, ServerThread, free_port, metric, project_server, request_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def proj(serving_registry: Path, tmp_path: Path) -> Path:
    return copy_project(serving_registry, tmp_path)


def _local(root: Path, version: int, rows: list[dict[str, Any]]) -> list[float]:
    """What the server's engine answers for ``rows`` scored one call (compiled, if verified)."""
    project = open_project(root)
    model = load_served(project, version, compile=project.config.serving.compile)
    return model.predict_columns({k: [r[k] for r in rows] for k in ("hour", "weather", "temp")})


# ------------------------------------------------------------------------------ endpoints

def test_endpoints_answer_with_the_champion(proj: Path) -> None:
    rows = request_rows(5)
    expected = _local(proj, 1, rows)
    with project_server(proj) as srv:
        assert srv.get("/health").json() == {"status": "alive"}
        assert srv.get("/ready").json() == {"status": "ready", "version": 1}
        r = srv.post("/predict", {"records": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == 1 and body["role"] == "champion"
        assert body["predictions"] == pytest.approx(expected)
        assert len(set(body["request_ids"])) == 5
        cols = {k: [row[k] for row in rows] for k in rows[0]}
        assert srv.post("/predict", {"columns": cols}).json()["predictions"] == \
            pytest.approx(expected)
        # MLflow's scoring protocol, every JSON shape and CSV
        split = {"columns": list(cols), "data": [[row[c] for c in cols] for row in rows]}
        for payload in ({"dataframe_split": split}, {"dataframe_records": rows},
                        {"inputs": cols}, {"instances": rows}):
            r = srv.post("/invocations", payload)
            assert r.status_code == 200, (payload, r.text)
            assert r.json()["predictions"] == pytest.approx(expected)
        csv_text = "hour,weather,temp\n" + "".join(
            f"{row['hour']},{row['weather']},{row['temp']}\n" for row in rows)
        r = requests.post(srv.url + "/invocations", data=csv_text,
                          headers={"content-type": "text/csv"}, timeout=30)
        assert r.json()["predictions"] == pytest.approx(expected)
        info = srv.get("/model").json()
        assert info["champion"]["version"] == 1
        assert {c["name"] for c in info["champion"]["signature"]} == {"hour", "weather", "temp"}
        assert info["traffic"] == {"champion": 1.0, "challenger": 0.0}
        assert "/predict" in srv.get("/openapi.json").json()["paths"]
        text = srv.get("/metrics").text
        assert metric(text, "mloop_requests_total", endpoint="predict", status="200",
                      version="1") == 2
        assert metric(text, "mloop_request_latency_seconds_count", endpoint="invocations") == 5
        assert metric(text, "mloop_model_loads_total", version="1") == 1
        assert metric(text, "mloop_prediction_value_count", version="1") == 35
        assert "mloop_in_flight_requests" in text


def test_bad_input_is_a_4xx_naming_each_field_and_never_reaches_the_model(proj: Path) -> None:
    good = request_rows(1)[0]
    with project_server(proj, max_body_bytes=4096) as srv:
        before = metric(srv.get("/metrics").text, "mloop_batch_rows_count")
        r = srv.post("/predict", {"records": [{"hour": "noon", "weather": None, "temp": 3.0,
                                               "humidity": 0.4}]})
        assert r.status_code == 422
        problems = {(f["field"], f["problem"].split(" ")[0]) for f in r.json()["fields"]}
        assert problems == {("hour", "expected"), ("weather", "null")}  # humidity: left out
        r = srv.post("/predict", {"records": [{"hour": 3, "temp": 1.0}]})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "weather"
        assert r.json()["fields"][0]["problem"] == "missing"
        r = srv.post("/predict", {"records": [{**good, "temp": True}]})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "temp"
        r = srv.post("/predict", {"records": [{**good, "temp": 2 ** 64 - 1}]})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "temp"
        for when in (1_700_000_000_000, "9999-12-31T23:59:00-05:00", "yesterday"):
            r = srv.post("/predict", {"records": [good], "timestamp": when})
            assert r.status_code == 422 and r.json()["fields"][0]["field"] == "timestamp"
        assert srv.post("/predict", {"rows": [good]}).status_code == 422
        assert srv.post("/predict", {"columns": {"hour": [1, 2], "weather": ["Clear"],
                                                 "temp": [1.0, 2.0]}}).status_code == 422
        r = requests.post(srv.url + "/predict", data=b'{"records": [', timeout=30,
                          headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
        r = srv.post("/predict", {"records": [good] * 200})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
        r = requests.post(srv.url + "/invocations", data=b"x", timeout=30,
                          headers={"content-type": "application/xml"})
        assert r.status_code == 415
        r = requests.post(srv.url + "/invocations", data="hour,weather,temp\nx,Clear,1\n",
                          headers={"content-type": "text/csv"}, timeout=30)
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "hour"
        assert srv.post("/invocations", {"dataframe_records": [good],
                                         "inputs": {}}).status_code == 422
        after = metric(srv.get("/metrics").text, "mloop_batch_rows_count")
        assert after == before, "a bad request reached the model"
        assert srv.post("/predict", {"records": [good]}).status_code == 200


def test_micro_batching_returns_each_request_its_own_answer(proj: Path) -> None:
    rows = request_rows(96, seed=7)
    expected = _local(proj, 1, rows)
    # the one-by-one answers of the same engine
    one_by_one = [_local(proj, 1, [r])[0] for r in rows[:8]]
    assert one_by_one == expected[:8]
    answers: dict[int, float] = {}
    errors: list[str] = []

    def client(idx: list[int]) -> None:
        with requests.Session() as s:
            for i in idx:
                r = s.post(srv.url + "/predict", json={"records": [rows[i]]}, timeout=30)
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    answers[i] = r.json()["predictions"][0]

    with project_server(proj) as srv:
        threads = [threading.Thread(target=client, args=(list(range(k, 96, 16)),))
                   for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = srv.get("/metrics").text
    assert not errors
    assert [answers[i] for i in range(96)] == expected
    calls = metric(text, "mloop_batch_rows_count", version="1")
    assert metric(text, "mloop_batch_rows_sum", version="1") == 96
    assert calls < 96, "concurrent requests were never batched together"


def test_the_compiled_fast_path_serves_only_after_it_verifies(proj: Path) -> None:
    import mlflow

    project = open_project(proj)
    rows = request_rows(30, seed=4)
    original = load_served(project, 1)
    with project_server(proj) as srv:
        info = srv.get("/model").json()["champion"]
        assert info["engine"] == "onnx" and info["compiled"]["status"] == "verified"
        assert info["compiled"]["rows"] == 240  # the holdout snapshot (30% of 800 rows)
        got = srv.post("/predict", {"records": rows}).json()["predictions"]
    reference = original.predict_columns({k: [r[k] for r in rows] for k in rows[0]})
    assert got == pytest.approx(reference, abs=1e-3, rel=1e-4)
    tag = json.loads(mlflow.MlflowClient(project.uris["tracking_uri"])
                     .get_model_version("rentals", "1").tags["mloop.compiled"])
    assert tag["status"] == "verified" and tag["max_abs_diff"] < 1e-3
    # a tolerance no float32 graph can meet: the original serves, and the verdict says why
    with project_server(proj, compile={"atol": 0.0, "rtol": 0.0}) as srv:
        info = srv.get("/model").json()["champion"]
        assert info["engine"] == "original" and info["compiled"]["status"] == "mismatch"
        got = srv.post("/predict", {"records": rows}).json()["predictions"]
    assert got == reference
    with project_server(proj, compile={"enabled": False}) as srv:
        assert srv.get("/model").json()["champion"]["engine"] == "original"


# --------------------------------------------------------------------- canary and shadow

def test_canary_takes_its_weight_and_a_key_sticks_to_one_version(proj: Path) -> None:
    project = open_project(proj)
    deploy_challenger(project, 2, mode="canary", weight=0.3, reason="try v2")
    row = request_rows(1)[0]
    with project_server(proj) as srv:
        assert srv.get("/model").json()["traffic"] == {"champion": 0.7, "challenger": 0.3}
        with requests.Session() as s:
            versions = Counter(s.post(srv.url + "/predict", json={"records": [row]},
                                      timeout=30).json()["version"] for _ in range(400))
            # binomial(400, 0.3): mean 120, sd 9.2; 4 sd either side
            assert 83 <= versions[2] <= 157, versions
            for key in ("alice", "bob", "carol", "dave"):
                seen = {s.post(srv.url + "/predict", json={"records": [row], "key": key},
                               timeout=30).json()["version"] for _ in range(15)}
                assert len(seen) == 1, (key, seen)
            by_key = Counter(s.post(srv.url + "/predict", json={"records": [row],
                                                                "key": f"user-{k}"},
                                    timeout=30).json()["version"] for k in range(300))
            assert 55 <= by_key[2] <= 125, by_key
        stop_challenger(project, reason="done")
        srv.post("/reload")
        assert srv.get("/model").json()["challenger"] is None
    rows = [d for d in history(project)["deployments"] if d["alias"] == "challenger"]
    assert rows[0]["action"] == "canary" and rows[0]["traffic"] == 0.3
    assert rows[0]["ended_at"] is not None


def test_shadow_never_changes_the_answer_and_survives_a_crashing_challenger(
        proj: Path) -> None:
    project = open_project(proj)
    rows = request_rows(20, seed=3)
    expected = _local(proj, 1, rows)
    deploy_challenger(project, 3, mode="shadow", reason="crashes on traffic")
    with project_server(proj, commit=0.2) as srv:
        assert srv.get("/model").json()["mode"] == "shadow"
        got = [srv.post("/predict", {"records": [r]}).json() for r in rows]
        assert [g["version"] for g in got] == [1] * 20
        assert [g["predictions"][0] for g in got] == pytest.approx(expected)
        srv.wait_for(lambda: metric(srv.get("/metrics").text, "mloop_shadow_predictions_total",
                                    version="3", outcome="error") == 20)
        # a healthy shadow: its answers are logged under the same request ids, never returned
        deploy_challenger(project, 2, mode="shadow", reason="healthy shadow")
        srv.post("/reload")
        got = [srv.post("/predict", {"records": [r]}).json() for r in rows[:5]]
        assert {g["version"] for g in got} == {1}
        ids = {g["request_ids"][0] for g in got}
        srv.wait_for(lambda: metric(srv.get("/metrics").text, "mloop_shadow_predictions_total",
                                    version="2", outcome="ok") == 5)
    log = read_log(open_project(proj).uris["inference_log_uri"]).to_pylist()
    shadow = [r for r in log if r["_role"] == "shadow"]
    assert {r["_request_id"] for r in shadow} == ids
    assert {r["_version"] for r in shadow} == {2}
    assert not [r for r in log if r["_version"] == 3], "a failed shadow wrote answers"


# ------------------------------------------------------------------------------ hot swap

def test_hot_swap_under_32_concurrent_clients_fails_no_request(proj: Path) -> None:
    rows = request_rows(32, seed=5)
    stop = threading.Event()
    failures: list[str] = []
    seen: Counter = Counter()

    def client(row: dict[str, Any]) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(srv.url + "/predict", json={"records": [row]}, timeout=30)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    seen[r.json()["version"]] += 1

    with project_server(proj) as srv:
        threads = [threading.Thread(target=client, args=(r,)) for r in rows]
        for t in threads:
            t.start()
        srv.wait_for(lambda: seen[1] > 100)
        change_alias(open_project(proj), "champion", 2, expected=1, action="promote",
                     reason="swap under load")
        srv.wait_for(lambda: seen[2] > 100, timeout=60)
        stop.set()
        for t in threads:
            t.join()
        text = srv.get("/metrics").text
    assert failures == []
    assert metric(text, "mloop_model_loads_total", version="2") == 1


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(proj: Path) -> None:
    project = open_project(proj)
    with project_server(proj) as srv:
        change_alias(project, "champion", 4, expected=1, action="promote", reason="bad")
        srv.wait_for(lambda: "4" in srv.get("/model").json()["failed_versions"])
        assert "corrupt weights" in srv.get("/model").json()["failed_versions"]["4"]
        assert srv.post("/predict", {"records": request_rows(1)}).json()["version"] == 1
        assert srv.get("/ready").status_code == 200
        assert metric(srv.get("/metrics").text, "mloop_model_load_failures_total",
                      version="4") == 1
    events = [e for e in list_events(project.store, kind="serve.load_failed")]
    assert events and events[0].payload["version"] == 4
    assert "corrupt weights" in events[0].payload["error"]


# ------------------------------------------------------------------ inference log, labels

def test_inference_log_and_feedback_by_request_id(proj: Path) -> None:
    rows = request_rows(6)
    with project_server(proj, commit=0.2) as srv:
        body = srv.post("/predict", {"records": rows[:4],
                                     "timestamp": "2012-03-04T05:06:07Z"}).json()
        ids = body["request_ids"]
        # labels may arrive before the segment is committed (the buffer knows the ids)
        r = srv.post("/feedback", {"labels": [{"request_id": ids[0], "label": 10},
                                              {"request_id": "0" * 24, "label": 3}]})
        assert r.status_code == 200, r.text
        assert r.json()["stored"] == 1 and r.json()["unknown_ids"] == ["0" * 24]
        assert srv.post("/feedback", {"request_id": "nope", "label": 1}).status_code == 404
        assert srv.post("/feedback", {"request_id": ids[1], "label": "ten"}).status_code == 422
        srv.post("/predict", {"records": rows[4:]})
    uri = open_project(proj).uris["inference_log_uri"]
    log = read_log(uri)
    assert log.num_rows == 6
    first = [r for r in log.to_pylist() if r["_request_id"] in ids]
    assert {r["_ts"].isoformat() for r in first} == {"2012-03-04T05:06:07+00:00"}
    assert all(r["_version"] == 1 and r["_role"] == "champion" for r in first)
    assert [r["temp"] for r in sorted(first, key=lambda r: ids.index(r["_request_id"]))] == \
        [row["temp"] for row in rows[:4]]
    assert list(Path(uri, "day=2012-03-04", "version=1").glob("part-*.parquet"))
    # a later label file: known ids stored, an unknown one reported with exit code 1
    labels = proj / "labels.csv"
    labels.write_text(f"request_id,label\n{ids[1]},12\n{ids[2]},13\nffffffffffffffffffffffff,1\n")
    from mloop.cli.app import main

    assert main(["-C", str(proj), "labels", "ingest", str(labels)]) == 1
    got = {r["_request_id"]: r["label"] for r in read_labels(uri).to_pylist()}
    assert got == {ids[0]: 10.0, ids[1]: 12.0, ids[2]: 13.0}
    # a correction: the later label of an id supersedes the earlier one
    labels.write_text(f"request_id,label\n{ids[1]},20\n")
    assert main(["-C", str(proj), "labels", "ingest", str(labels)]) == 0
    got = {r["_request_id"]: r["label"] for r in read_labels(uri).to_pylist()}
    assert got == {ids[0]: 10.0, ids[1]: 20.0, ids[2]: 13.0}
    labels.write_text("request_id,label\nabc,not-a-number\n")
    assert main(["-C", str(proj), "labels", "ingest", str(labels)]) == 1


def test_flush_commits_the_log_now(proj: Path) -> None:
    uri = open_project(proj).uris["inference_log_uri"]
    with project_server(proj, commit=3600) as srv:
        ids = srv.post("/predict", {"records": request_rows(3)}).json()["request_ids"]
        assert read_log(uri).num_rows == 0  # an hour until the next commit
        r = srv.post("/flush")
        assert r.status_code == 200 and r.json() == {"committed_rows": 3, "quarantined_rows": 0}
        assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted(ids)
        assert srv.post("/flush").json() == {"committed_rows": 0, "quarantined_rows": 0}
    with project_server(proj, inference_log={"enabled": False}) as srv:
        r = srv.post("/flush")
        assert r.status_code == 409 and "disabled" in r.json()["error"]


def _spawn_server(root: Path, port: int, commit: float, *args: str) -> subprocess.Popen:

    cfg = (root / "mloop.yaml").read_text()
    (root / "mloop.yaml").write_text(cfg + f"serving:\n  inference_log: "
                                           f"{{commit_interval_seconds: {commit}}}\n")
    exe = Path(sys.executable).parent / "mloop"
    proc = subprocess.Popen([str(exe), "-C", str(root), "serve", "--port", str(port), *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"server did not come up: {proc.communicate()[1]}")
        time.sleep(0.3)


def test_sigterm_commits_everything_buffered(proj: Path) -> None:
    port = free_port()
    proc = _spawn_server(proj, port, commit=3600)  # nothing is committed before shutdown
    ids = []
    with requests.Session() as s:
        for row in request_rows(40):
            ids += s.post(f"http://127.0.0.1:{port}/predict", json={"records": [row]},
                          timeout=30).json()["request_ids"]
    proc.terminate()
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
    assert proc.wait(timeout=60) in (0, -15)
    logged = read_log(open_project(proj).uris["inference_log_uri"]).column("_request_id")
    assert sorted(logged.to_pylist()) == sorted(ids)


def test_two_workers_share_the_port_and_report_metrics_together(proj: Path) -> None:
    port = free_port()
    proc = _spawn_server(proj, port, 0.2, "--workers", "2")
    try:
        for row in request_rows(30):  # a new connection each: the kernel spreads them over workers
            r = requests.post(f"http://127.0.0.1:{port}/predict", json={"records": [row]},
                              headers={"Connection": "close"}, timeout=30)
            assert r.status_code == 200
        # whichever worker answers /metrics reports both workers' requests
        for _ in range(4):
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30,
                                headers={"Connection": "close"}).text
            assert metric(text, "mloop_requests_total", endpoint="predict") == 30
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    logged = read_log(open_project(proj).uris["inference_log_uri"])
    assert logged.num_rows == 30


def test_kill_9_loses_at_most_the_last_commit_interval_and_leaves_a_readable_log(
        proj: Path) -> None:
    import pyarrow.parquet as pq

    port = free_port()
    proc = _spawn_server(proj, port, commit=0.2)
    answered: list[tuple[float, str]] = []
    with requests.Session() as s:
        t_end = time.time() + 3
        rows = request_rows(50)
        i = 0
        while time.time() < t_end:
            body = s.post(f"http://127.0.0.1:{port}/predict", json={"records": [rows[i % 50]]},
                          timeout=30).json()
            answered.append((time.time(), body["request_ids"][0]))
            i += 1
    proc.kill()
    killed_at = time.time()
    proc.wait(timeout=30)
    uri = open_project(proj).uris["inference_log_uri"]
    for f in Path(uri).rglob("part-*.parquet"):
        pq.read_table(f)  # every committed segment is whole
    logged = set(read_log(uri).column("_request_id").to_pylist())
    # what was answered more than one commit interval (+ slack for the write) before the kill
    old = {rid for t, rid in answered if t < killed_at - 1.0}
    assert old <= logged, f"{len(old - logged)} rows older than the commit interval were lost"
    assert len(logged) >= len(old) > 20


# --------------------------------------------------------------------------- auth and TLS

def test_auth_refuses_missing_and_wrong_tokens_and_checks_roles(proj: Path) -> None:
    from mloop.security.tokens import create_token, list_tokens, revoke_token
    from mloop.serving.auth import TokenAuth

    project = open_project(proj)
    predict_tok = create_token(project.store, role="predict", name="app")
    admin_tok = create_token(project.store, role="admin", name="ops")
    stored = json.dumps(list_tokens(project.store))
    assert predict_tok.token not in stored and admin_tok.token not in stored
    auth = TokenAuth(project.store, refresh_seconds=0.0)
    body = {"records": request_rows(1)}
    with project_server(proj, auth=auth) as srv:
        assert srv.post("/predict", body).status_code == 401
        assert srv.post("/predict", body, headers={"Authorization": "Bearer mlp_wrong"}
                        ).status_code == 401
        ok = srv.post("/predict", body,
                      headers={"Authorization": f"Bearer {predict_tok.token}"})
        assert ok.status_code == 200
        rid = ok.json()["request_ids"][0]
        fb = {"request_id": rid, "label": 3}
        assert srv.post("/feedback", fb, headers={
            "Authorization": f"Bearer {predict_tok.token}"}).status_code == 403
        assert srv.post("/feedback", fb, headers={
            "Authorization": f"Bearer {admin_tok.token}"}).status_code == 200
        assert srv.post("/reload", headers={
            "Authorization": f"Bearer {predict_tok.token}"}).status_code == 403
        assert srv.get("/health").status_code == 200  # probes stay open
        revoke_token(project.store, predict_tok.id)
        assert srv.post("/predict", body, headers={
            "Authorization": f"Bearer {predict_tok.token}"}).status_code == 401


def test_tls_with_a_cert_and_key(proj: Path, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    project = open_project(proj)
    app = create_app(project, project.config.serving.model_copy(update=FAST))
    with ServerThread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as srv:
        r = requests.post(srv.url + "/predict", json={"records": request_rows(1)}, verify=str(cert),
                          timeout=30)
        assert r.status_code == 200 and r.json()["version"] == 1
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(srv.url + "/health", timeout=30)  # unknown CA: refused


def test_serving_beyond_loopback_without_a_token_is_refused(proj: Path) -> None:
    from mloop.errors import MloopError
    from mloop.server import auth_enabled, serve

    cfg = open_project(proj).config.serving
    assert auth_enabled(cfg, "127.0.0.1") is False
    assert auth_enabled(cfg, "0.0.0.0") is True
    assert auth_enabled(cfg, "0.0.0.0", flag=False) is False
    with pytest.raises(MloopError, match="mloop tokens create"):
        serve(open_project(proj), host="0.0.0.0", port=free_port())


# ------------------------------------------------------------ batch scoring, CLI, parity

def _inputs(n: int) -> pd.DataFrame:
    frame = rentals_frame(n, seed=11)[["hour", "weather", "temp"]]
    frame.loc[frame.index[::97], "weather"] = "Snow"  # a category never seen in training
    return frame


def test_batch_scoring_streams_chunks_and_matches_the_model(proj: Path, tmp_path: Path
                                                             ) -> None:
    frame = _inputs(5000)
    src = tmp_path / "big.parquet"
    frame.to_parquet(src, index=False, row_group_size=1000)
    out = tmp_path / "scored.parquet"
    result = predict_file(open_project(proj), src, out, chunk_rows=700, progress=False)
    assert result["rows"] == 5000 and result["version"] == 1
    scored = pd.read_parquet(out)
    assert list(scored.columns) == ["hour", "weather", "temp", "prediction"]
    model = load_served(open_project(proj), 1)
    expected = model.predict_columns({c: frame[c].tolist() for c in ("hour", "weather", "temp")})
    np.testing.assert_allclose(scored["prediction"].to_numpy(), expected, rtol=1e-12)
    # the same rows as CSV, through the CLI, with an explicit version
    csv = tmp_path / "big.csv"
    frame.to_csv(csv, index=False)
    out2 = tmp_path / "scored2.parquet"
    assert main(["-C", str(proj), "predict", "-i", str(csv), "-o", str(out2), "--version", "2",
                 "--chunk-rows", "1500", "--json"]) == 0
    v2 = load_served(open_project(proj), 2).predict_columns(
        {c: frame[c].tolist() for c in ("hour", "weather", "temp")})
    np.testing.assert_allclose(pd.read_parquet(out2)["prediction"].to_numpy(), v2, rtol=1e-9)
    # the output's format follows its name: a .csv is CSV (a new user's `-o preds.csv` got
    # Parquet bytes under a .csv name)
    out3 = tmp_path / "scored3.csv"
    assert main(["-C", str(proj), "predict", "-i", str(csv), "-o", str(out3), "--version", "2",
                 "--chunk-rows", "1500", "--json"]) == 0
    as_csv = pd.read_csv(out3)
    assert len(as_csv) == len(frame) and list(as_csv.columns[-1:]) == ["prediction"]
    np.testing.assert_allclose(as_csv["prediction"].to_numpy(), v2, rtol=1e-6)
    # rows picked out of a frame and saved with pandas' defaults keep their index, which
    # pandas stores as a column ``__index_level_0__``: it is the frame's index, not an input
    # column, and is not copied into the output (a new user's output had it)
    picked = tmp_path / "picked.parquet"
    frame[frame["hour"] == 8].to_parquet(picked)
    out4 = tmp_path / "picked.csv"
    done = predict_file(open_project(proj), picked, out4, progress=False)
    assert list(pd.read_csv(out4).columns) == ["hour", "weather", "temp", "prediction"]
    assert done["rows"] == int((frame["hour"] == 8).sum()) > 0


def test_batch_scoring_bad_input_names_the_problem_and_writes_nothing(
        proj: Path, tmp_path: Path) -> None:
    project = open_project(proj)
    out = tmp_path / "out.parquet"
    frame = _inputs(300).drop(columns=["temp"])
    src = tmp_path / "no_temp.parquet"
    frame.to_parquet(src, index=False)
    with pytest.raises(MloopError, match=r"no_temp.parquet: missing column\(s\) \['temp'\]"):
        predict_file(project, src, out, progress=False)
    nulls = _inputs(300)
    nulls.loc[nulls.index[250], "weather"] = None
    src2 = tmp_path / "nulls.parquet"
    nulls.to_parquet(src2, index=False)
    with pytest.raises(MloopError, match="'weather' is null at row 250"):
        predict_file(project, src2, out, chunk_rows=100, progress=False)
    txt = tmp_path / "words.parquet"
    bad = _inputs(50).astype({"temp": str})
    bad.loc[bad.index[3], "temp"] = "warm"
    bad.to_parquet(txt, index=False)
    with pytest.raises(MloopError,
                       match=r"column 'temp' is \w*string, the signature expects double.*'warm'"):
        predict_file(project, txt, out, progress=False)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(MloopError, match=r"unsupported input type '\.json'"):
        predict_file(project, tmp_path / "x.json", out, progress=False)
    with pytest.raises(MloopError, match=r"--output .*scored\.txt: name a \.parquet or \.csv "
                                         r"file \(the format follows the extension\)"):
        predict_file(project, src2, tmp_path / "scored.txt", progress=False)
    assert not (tmp_path / "scored.txt").exists()
    assert not out.exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_deploy_cli_records_canary_shadow_and_stop(proj: Path, capsys) -> None:
    assert main(["-C", str(proj), "deploy", "canary", "2", "--weight", "0.25",
                 "--reason", "try it", "--json"]) == 0
    change = json.loads(capsys.readouterr().out)
    assert change["alias"] == "challenger" and change["version"] == 2
    state = desired_state(open_project(proj))
    assert (state.challenger, state.mode, state.weight) == (2, "canary", 0.25)
    assert main(["-C", str(proj), "deploy", "shadow", "2"]) == 0
    assert desired_state(open_project(proj)).mode == "shadow"
    assert main(["-C", str(proj), "deploy", "stop-challenger"]) == 0
    assert desired_state(open_project(proj)).challenger is None
    capsys.readouterr()
    # refusals: the champion as its own challenger, a weight out of range, unknown version
    assert main(["-C", str(proj), "deploy", "canary", "1"]) == 1
    assert "is the champion" in capsys.readouterr().err
    assert main(["-C", str(proj), "deploy", "canary", "2", "--weight", "1.5"]) == 1
    assert "--weight must be between 0 and 1" in capsys.readouterr().err
    assert main(["-C", str(proj), "deploy", "canary", "99"]) == 1
    assert "has no version 99" in capsys.readouterr().err
    with pytest.raises(PromotionError, match="no challenger to stop"):
        from mloop.serving.deploy import stop_challenger

        stop_challenger(open_project(proj), reason="again")
    with pytest.raises(MloopError, match="unknown deployment mode"):
        deploy_challenger(open_project(proj), 2, mode="blue-green", reason="x")


def test_tokens_cli_prints_a_token_once_and_stores_its_hash(proj: Path, capsys
                                                           ) -> None:
    assert main(["-C", str(proj), "tokens", "create", "--role", "admin", "--name", "ci"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("mlp_") and len(token) > 40
    db = (proj / ".mloop" / "mloop.db").read_bytes()
    assert token.encode() not in db
    assert main(["-C", str(proj), "tokens", "create", "--role", "root"]) == 1
    assert "unknown role 'root'" in capsys.readouterr().err
    assert main(["-C", str(proj), "tokens", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["name"], t["role"], t["revoked"]) for t in listed] == [("ci", "admin", False)]


def test_invocations_answer_like_mlflow_models_serve(proj: Path) -> None:
    """The same registered version, the same request bodies: mloop's /invocations and MLflow's
    own scoring server give the same predictions."""
    from mloop.serving.app import create_app

    from .serving_util import ServerThread

    project = open_project(proj)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": project.uris["tracking_uri"],
           "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "mlflow"
    mlflow_srv = subprocess.Popen(
        [str(exe), "models", "serve", "-m", "models:/rentals/1", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        rows = request_rows(25, seed=9)
        cols = list(rows[0])
        bodies = [{"dataframe_split": {"columns": cols,
                                       "data": [[r[c] for c in cols] for r in rows]}},
                  {"dataframe_records": rows}]
        exact = project.config.serving.model_copy(update=FAST, deep=True)
        exact.compile.enabled = False
        with ServerThread(create_app(project, exact)) as ours, \
                ServerThread(create_app(project, project.config.serving.model_copy(
                    update=FAST))) as fast:
            deadline = time.time() + 120
            while True:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                        break
                except requests.RequestException:
                    pass
                if mlflow_srv.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"mlflow models serve did not start: "
                                         f"{mlflow_srv.stderr.read() if mlflow_srv.stderr else ''}")
                time.sleep(0.5)
            for body in bodies:
                theirs = requests.post(f"http://127.0.0.1:{port}/invocations", json=body,
                                       timeout=60)
                assert theirs.status_code == 200, theirs.text
                want = theirs.json()["predictions"]
                mine = ours.post("/invocations", body)
                assert mine.status_code == 200, mine.text
                assert mine.json()["predictions"] == pytest.approx(want, rel=1e-12)
                # the compiled engine: within the tolerance it was verified to
                assert fast.post("/invocations", body).json()["predictions"] == \
                    pytest.approx(want, abs=1e-3, rel=1e-4)
    finally:
        mlflow_srv.terminate()
        try:
            mlflow_srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            mlflow_srv.kill()


def test_a_full_inference_log_drops_and_counts_instead_of_blocking(proj: Path) -> None:
    rows = request_rows(5)
    with project_server(proj, commit=3600, inference_log={"max_queue_rows": 3,
                                                          "commit_interval_seconds": 3600}) as srv:
        codes = [srv.post("/predict", {"records": [r]}).status_code for r in rows]
        text = srv.get("/metrics").text
    assert codes == [200] * 5  # answers never wait for the log
    assert metric(text, "mloop_inference_log_rows_total", outcome="dropped") == 2
    assert read_log(open_project(proj).uris["inference_log_uri"]).num_rows == 3


def test_rows_the_log_cannot_store_are_set_aside_without_blocking_the_rest(
        tmp_path: Path) -> None:
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    log = InferenceLog(str(tmp_path / "log"), commit_interval=3600)
    ts = 1_700_000_000.0
    good = LogEntry([new_request_id(ts)], ts, 1, "champion", 1.0, [1.5], {"temp": [20.0]})
    mixed = [LogEntry([new_request_id(ts)], ts, 2, "champion", 1.0, [p], {"temp": [20.0]})
             for p in (1.5, "oops")]  # one version group Arrow cannot make one column of
    for e in (good, *mixed):
        assert log.append(e)
    assert log.commit() == 2  # only the odd one out is set aside, not its whole group
    assert log.quarantined == 1 and log.queued == 0
    assert log.append(LogEntry([new_request_id(ts)], ts, 1, "champion", 1.0, [2.5],
                               {"temp": [21.0]}))
    assert log.commit() == 1  # later commits are not blocked
    assert read_log(str(tmp_path / "log")).num_rows == 3


def test_the_log_buffer_refuses_beyond_its_limit_and_commits_on_close(tmp_path: Path) -> None:
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    log = InferenceLog(str(tmp_path / "log"), commit_interval=3600, max_queue=4)
    log.start()

    def entry(n: int, version: int, ts: float) -> LogEntry:
        return LogEntry([new_request_id(ts) for _ in range(n)], ts, version, "champion", 1.0,
                        [1.5] * n, {"temp": [20.0] * n, "weather": ["Clear"] * n})

    assert log.append(entry(3, 1, 1_700_000_000.0))
    assert not log.append(entry(2, 1, 1_700_000_000.0))  # 5 > 4: refused whole
    assert log.append(entry(1, 2, 1_700_090_000.0))  # next day, other version
    assert log.dropped == 2 and log.queued == 4
    log.close()
    table = read_log(str(tmp_path / "log"))
    assert table.num_rows == 4
    parts = sorted(p.relative_to(tmp_path / "log").parts[:2]
                   for p in (tmp_path / "log").rglob("part-*.parquet"))
    assert parts == [("day=2023-11-14", "version=1"), ("day=2023-11-15", "version=2")]
