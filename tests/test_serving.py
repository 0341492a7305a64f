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
from datetime import UTC, datetime, timedelta
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
from mloop.server import default_collectors
from mloop.serving.app import create_app
from mloop.serving.batch import predict_file
from mloop.serving.deploy import deploy_challenger, desired_state, stop_challenger
from mloop.serving.model import load_served
from mloop.traffic.inference_log import read_log
from mloop.traffic.labels import read_labels

from .helpers import (
    GOOD,
    RESEED,
    copy_project,
    rentals_frame,
    train_forest,
    write_forest_config,
)
from .serving_util import ServerThread, free_port, metric

pytestmark = pytest.mark.slow

FAST = {"poll_seconds": 0.2}


def _register_pyfunc(root: Path, model: Any) -> int:
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import get_model_info

    project = open_project(root)
    client = project.mlflow
    name = project.config.model_name
    sig = get_model_info(f"models:/{name}/1").signature
    example = rentals_frame(5)[["hour", "weather", "temp"]].astype({"hour": "float64"})
    with mlflow.start_run(experiment_id=project.experiment_id) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=model, signature=sig,
                                       input_example=example, pip_requirements=["mlflow"])
    mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                     model_id=info.model_id, tags={"mloop.task": "regression"})
    return int(mv.version)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """v1 champion (random forest), v2 reseeded, v3 crashes on traffic, v4 fails to load."""
    from .serving_models import CrashOnTraffic, FailsToLoad

    root = tmp_path_factory.mktemp("serving") / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    assert [train_forest(root, GOOD), train_forest(root, RESEED)] == [1, 2]
    assert _register_pyfunc(root, CrashOnTraffic()) == 3
    assert _register_pyfunc(root, FailsToLoad()) == 4
    write_forest_config(root, params=GOOD)
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    return copy_project(trained, tmp_path)


def _server(root: Path, *, auth: Any = None, **serving: Any) -> ServerThread:
    project = open_project(root)
    commit = serving.pop("commit", None)
    compile_ = serving.pop("compile", None)
    ilog = serving.pop("inference_log", None)
    cfg = project.config.serving.model_copy(update={**FAST, **serving}, deep=True)
    if compile_ is not None:
        cfg.compile = cfg.compile.model_copy(update=compile_)
    if ilog is not None:
        cfg.inference_log = cfg.inference_log.model_copy(update=ilog)
    if commit is not None:
        cfg.inference_log.commit_interval_seconds = commit
    return ServerThread(create_app(project, cfg, auth=auth,
                                   collectors=default_collectors(project)))


def _rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    frame = rentals_frame(n, seed=seed)
    return [{"hour": int(h), "weather": w, "temp": float(t)}
            for h, w, t in zip(frame["hour"], frame["weather"], frame["temp"], strict=True)]


def _local(root: Path, version: int, rows: list[dict[str, Any]]) -> list[float]:
    """What the server's engine answers for ``rows`` scored one call (compiled, if verified)."""
    project = open_project(root)
    model = load_served(project, version, compile=project.config.serving.compile)
    return model.predict_columns({k: [r[k] for r in rows] for k in ("hour", "weather", "temp")})


# ------------------------------------------------------------------------------ endpoints

def test_endpoints_answer_with_the_champion(proj: Path) -> None:
    rows = _rows(5)
    expected = _local(proj, 1, rows)
    with _server(proj) as srv:
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
    good = _rows(1)[0]
    with _server(proj, max_body_bytes=4096) as srv:
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
    rows = _rows(96, seed=7)
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

    with _server(proj) as srv:
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
    rows = _rows(30, seed=4)
    original = load_served(project, 1)
    with _server(proj) as srv:
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
    with _server(proj, compile={"atol": 0.0, "rtol": 0.0}) as srv:
        info = srv.get("/model").json()["champion"]
        assert info["engine"] == "original" and info["compiled"]["status"] == "mismatch"
        got = srv.post("/predict", {"records": rows}).json()["predictions"]
    assert got == reference
    with _server(proj, compile={"enabled": False}) as srv:
        assert srv.get("/model").json()["champion"]["engine"] == "original"


# --------------------------------------------------------------------- canary and shadow

def test_canary_takes_its_weight_and_a_key_sticks_to_one_version(proj: Path) -> None:
    project = open_project(proj)
    deploy_challenger(project, 2, mode="canary", weight=0.3, reason="try v2")
    row = _rows(1)[0]
    with _server(proj) as srv:
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
    rows = _rows(20, seed=3)
    expected = _local(proj, 1, rows)
    deploy_challenger(project, 3, mode="shadow", reason="crashes on traffic")
    with _server(proj, commit=0.2) as srv:
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
    rows = _rows(32, seed=5)
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

    with _server(proj) as srv:
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
    with _server(proj) as srv:
        change_alias(project, "champion", 4, expected=1, action="promote", reason="bad")
        srv.wait_for(lambda: "4" in srv.get("/model").json()["failed_versions"])
        assert "corrupt weights" in srv.get("/model").json()["failed_versions"]["4"]
        assert srv.post("/predict", {"records": _rows(1)}).json()["version"] == 1
        assert srv.get("/ready").status_code == 200
        assert metric(srv.get("/metrics").text, "mloop_model_load_failures_total",
                      version="4") == 1
    events = [e for e in list_events(project.store, kind="serve.load_failed")]
    assert events and events[0].payload["version"] == 4
    assert "corrupt weights" in events[0].payload["error"]


# ------------------------------------------------------------------ inference log, labels

def test_inference_log_and_feedback_by_request_id(proj: Path) -> None:
    rows = _rows(6)
    with _server(proj, commit=0.2) as srv:
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
    with _server(proj, commit=3600) as srv:
        ids = srv.post("/predict", {"records": _rows(3)}).json()["request_ids"]
        assert read_log(uri).num_rows == 0  # an hour until the next commit
        r = srv.post("/flush")
        assert r.status_code == 200 and r.json() == {"committed_rows": 3, "quarantined_rows": 0}
        assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted(ids)
        assert srv.post("/flush").json() == {"committed_rows": 0, "quarantined_rows": 0}
    with _server(proj, inference_log={"enabled": False}) as srv:
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
        for row in _rows(40):
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
        for row in _rows(30):  # a new connection each: the kernel spreads them over workers
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
        rows = _rows(50)
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
    body = {"records": _rows(1)}
    with _server(proj, auth=auth) as srv:
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
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    project = open_project(proj)
    app = create_app(project, project.config.serving.model_copy(update=FAST))
    with ServerThread(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as srv:
        r = requests.post(srv.url + "/predict", json={"records": _rows(1)}, verify=str(cert),
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
        rows = _rows(25, seed=9)
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
    rows = _rows(5)
    with _server(proj, commit=3600, inference_log={"max_queue_rows": 3, "commit_interval_seconds":
                                                   3600}) as srv:
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


# ------------------------------------------------------------------------------ monitoring

def _log_traffic(project: Any, frame: pd.DataFrame, day: str, version: int = 1,
                 role: str = "champion") -> list[str]:
    """Rows answered by ``version`` on ``day`` (spread over the day), through the same writer
    the server uses; returns their request ids."""
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    model = load_served(project, version)
    cols = {c: frame[c].tolist() for c in ("hour", "weather", "temp")}
    preds = model.predict_columns(cols)
    start = pd.Timestamp(day, tz="UTC").timestamp()
    log = InferenceLog(project.uris["inference_log_uri"], commit_interval=3600)
    ids = []
    for i in range(len(frame)):
        ts = start + i * 86_000 / len(frame)
        rid = new_request_id(ts)
        ids.append(rid)
        log.append(LogEntry([rid], ts, version, role, 1.0, [preds[i]],
                            {c: [v[i]] for c, v in cols.items()}))
    log.close()
    return ids


def test_monitor_evaluates_each_new_day_once_and_rescores_late_labels(proj: Path) -> None:
    from mloop.monitoring.service import run_monitor
    from mloop.monitoring.windows_store import list_windows
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    project = open_project(proj)
    same1, same2 = rentals_frame(600, seed=21), rentals_frame(600, seed=22)
    hot = rentals_frame(600, seed=23)
    hot["temp"] = hot["temp"] + 15  # a heat wave: temperature shifted by ~2 sd
    ids1 = _log_traffic(project, same1, "2024-03-01")
    ids2 = _log_traffic(project, same2, "2024-03-02")
    _log_traffic(project, hot, "2024-03-03")
    _log_traffic(project, rentals_frame(5, seed=24), "2024-03-04")  # moves the watermark
    store = ObjectStore(project.uris["inference_log_uri"])
    assert store_labels(store, dict(zip(ids1, same1["cnt"].astype(float), strict=True)),
                        task="regression", source="test")["stored"] == 600

    result = run_monitor(project, window="1d")
    days = [(w["start"][:10], w["drifted"], w["label_coverage"]) for w in result["evaluated"]]
    assert days == [("2024-03-01", False, 1.0), ("2024-03-02", False, 0.0),
                    ("2024-03-03", True, 0.0)]
    first = result["evaluated"][0]
    assert first["metric"] == "mae" and 0 < first["metric_value"] < 40
    hot_report = result["evaluated"][2]
    assert hot_report["drift_share"] > 0 and hot_report["prediction_drifted"] in (True, False)
    assert run_monitor(project, window="1d")["evaluated"] == []  # each window once

    # labels for day 2 arrive late: the next run re-scores that window only
    store_labels(store, dict(zip(ids2[:300], same2["cnt"][:300].astype(float), strict=True)),
                 task="regression", source="test")
    again = run_monitor(project, window="1d")
    assert again["evaluated"] == []
    assert [(w["start"][:10], w["label_coverage"]) for w in again["refreshed"]] == [
        ("2024-03-02", 0.5)]
    stored = list_windows(project, window="1d")
    assert [w["label_coverage"] for w in stored] == [1.0, 0.5, 0.0]

    # the same log in windows of 500 rows: full windows only, the rest waits
    by_rows = run_monitor(project, window="500rows")["evaluated"]
    assert [w["rows"] for w in by_rows] == [500, 500, 500]
    # one 1,200-row request (one timestamp) split across windows: nothing counted twice
    _log_traffic(project, rentals_frame(1200, seed=25), "2024-03-05")
    more = run_monitor(project, window="500rows")["evaluated"]
    assert [w["rows"] for w in more] == [500, 500, 500]  # 305 waiting + 1,200 new = 1,505
    assert sum(w["rows"] for w in list_windows(project, window="500rows")) == 3000

    # the HTML report: history plots and the hot day in detail, rendered by a real browser
    from .browser import is_blank, render

    page = proj / "monitoring.html"
    hot_id = str(result["evaluated"][2]["id"])
    assert main(["-C", str(proj), "monitor", "report", hot_id, "--html", str(page)]) == 0
    dom, console, shot = render(page, proj)
    # drift share, per-feature scores, performance over time + 3 features + predictions
    assert dom.count("<svg") == 7
    assert "Performance on labelled traffic" in dom and "temp: ks" in dom  # 600 rows: KS
    assert not [line for line in console if "rror" in line], console
    assert not is_blank(shot)
    assert main(["-C", str(proj), "monitor", "report", "999", "--html", str(page)]) == 1


def test_monitor_cli_reports_nothing_new_and_bad_window_specs(proj: Path, capsys) -> None:
    assert main(["-C", str(proj), "monitor"]) == 0
    assert "no new complete 1d window" in capsys.readouterr().out
    assert main(["-C", str(proj), "monitor", "--window", "fortnight"]) == 1
    assert "window 'fortnight'" in capsys.readouterr().err
    assert main(["-C", str(proj), "monitor", "--since", "yesterday"]) == 1
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_a_drifting_window_alerts_the_webhook_and_shows_on_the_servers_metrics(
        proj: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mloop.monitoring.service import run_monitor

    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    cfg = (proj / "mloop.yaml").read_text()
    (proj / "mloop.yaml").write_text(
        cfg + f"monitoring:\n  webhook: {{url: 'http://127.0.0.1:{hook.server_address[1]}/h', "
              f"backoff_seconds: 0.01}}\n")
    try:
        project = open_project(proj)
        hot = rentals_frame(600, seed=31)
        hot["temp"] = hot["temp"] + 15
        _log_traffic(project, rentals_frame(600, seed=30), "2024-05-01")
        _log_traffic(project, hot, "2024-05-02")
        _log_traffic(project, rentals_frame(5, seed=32), "2024-05-03")
        result = run_monitor(project, window="1d")
    finally:
        hook.shutdown()
    assert [a["window"]["start"][:10] for a in result["alerts"]] == ["2024-05-02"]
    assert result["alerts"][0]["webhook"]["delivered"] is True
    assert len(received) == 1 and "input drift" in received[0]["reasons"][0]
    assert [e.payload["window"]["start"][:10]
            for e in list_events(project.store, kind="monitor.alert")] == ["2024-05-02"]
    with _server(proj) as srv:
        text = srv.get("/metrics").text
    assert metric(text, "mloop_monitor_drifted", model="rentals", window="1d") == 1
    assert metric(text, "mloop_monitor_feature_drifted", feature="temp") == 1
    assert metric(text, "mloop_monitor_feature_drifted", feature="hour") == 0
    assert metric(text, "mloop_monitor_window_rows") == 600


def test_a_promoted_canary_does_not_come_back_after_a_rollback(proj: Path) -> None:
    from mloop.registry.promotion import promote, rollback

    project = open_project(proj)
    deploy_challenger(project, 2, mode="canary", weight=0.2, reason="try v2")
    promote(project, 2, reason="graduate the canary", force=True)
    assert desired_state(project).challenger is None
    rollback(project, reason="v2 misbehaves")
    state = desired_state(project)
    assert (state.champion, state.challenger, state.weight) == (1, None, 0.0)


# ------------------------------------------------------------------------ the closed loop

LOOP = """
loop:
  triggers: {drift: {consecutive: 1}}
  retrain: {window: 3d, min_labelled_rows: 300}
  guards: {cooldown: 3d, max_per_day: 2}
  canary: {weight: 0.5, probation: 1d, min_labelled: 50}
"""


def _hot(n: int, seed: int) -> pd.DataFrame:
    """A heat wave: temperatures up 15 degrees, and rentals with them (the same relation the
    training data follows: 2.5 rentals per degree)."""
    frame = rentals_frame(n, seed=seed)
    frame["temp"] = frame["temp"] + 15
    frame["cnt"] = frame["cnt"] + 37
    return frame


def _label(project: Any, ids: list[str], frame: pd.DataFrame) -> None:
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    store_labels(ObjectStore(project.uris["inference_log_uri"]),
                 dict(zip(ids, frame["cnt"].astype(float), strict=True)), task="regression",
                 source="test")


def test_the_loop_retrains_on_drift_canaries_then_promotes_after_probation(proj: Path) -> None:
    from mloop.loop.controller import load_state, loop_metrics, run_once

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP)
    project = open_project(proj)
    normal, hot = rentals_frame(600, seed=40), _hot(600, seed=41)
    _label(project, _log_traffic(project, normal, "2024-06-01"), normal)
    _label(project, _log_traffic(project, hot, "2024-06-02"), hot)
    _log_traffic(project, rentals_frame(5, seed=42), "2024-06-03")  # watermark

    first = run_once(project)
    acts = [a["action"] for a in first["actions"]]
    assert acts == ["canary_started"], first["actions"]
    new = first["actions"][0]["version"]
    assert new == 5 and first["triggers"][0]["trigger"] == "drift"
    state = desired_state(project)
    assert (state.champion, state.challenger, state.mode, state.weight) == (1, 5, "canary", 0.5)
    kinds = [e.kind for e in list_events(project.store, limit=20)]
    assert "loop.retrain_started" in kinds and "loop.canary_started" in kinds

    # nothing new and probation not over: the next pass does nothing (no second retrain)
    again = run_once(open_project(proj))
    assert [a["action"] for a in again["actions"]] in ([], ["held"])
    assert desired_state(project).challenger == 5

    # a day of split traffic, labelled: the retrained canary knows the heat wave
    hot2 = _hot(400, seed=43)
    _label(project, _log_traffic(project, hot2.iloc[:200], "2024-06-04", version=5,
                                 role="canary"), hot2.iloc[:200])
    _label(project, _log_traffic(project, hot2.iloc[200:], "2024-06-04", version=1),
           hot2.iloc[200:])
    _log_traffic(project, _hot(5, seed=44), "2024-06-05")
    verdict = run_once(open_project(proj))
    assert [a["action"] for a in verdict["actions"]][:1] == ["promote"], verdict["actions"]
    assert desired_state(project).champion == 5 and desired_state(project).challenger is None
    assert load_state(project).probation is None
    metrics = loop_metrics(project)
    assert metrics["retrains"] == 1 and metrics["promoted"] == 1
    # gated once, before the canary: the promotion reused that report (same gate config)
    import sqlalchemy as sa

    from mloop.store.models import GateRunRow

    with project.store.session() as s:
        assert len(s.scalars(sa.select(GateRunRow).where(GateRunRow.version == 5)).all()) == 1
    assert metrics["time_to_deploy_hours"] > 24  # the probation day, in event time
    promote_event = list_events(project.store, kind="loop.probation_promote")[0].payload
    assert promote_event["challenger"]["labelled"] == 200  # what the canary answered live
    # the verdict is paired: both versions scored on the same 400 labelled rows
    paired = promote_event["paired"]
    assert paired["rows"] == 400 and paired["metric"] == "mae"
    assert paired["values"]["5"] < paired["values"]["1"]

    # the rollback path: a challenger that does not know the heat wave (v2, trained on normal
    # weather) is judged on the same labelled rows as the champion, and loses
    from mloop.loop.controller import save_state
    from mloop.loop.state import Probation

    deploy_challenger(project, 2, mode="canary", weight=0.5, reason="test: a weaker canary")
    state = load_state(project)
    state.probation = Probation(version=2, champion=5,
                                started_at=datetime(2024, 6, 5, 12, tzinfo=UTC),
                                started_wall=datetime.now(UTC) - timedelta(seconds=5))
    save_state(project, state)
    hot3 = _hot(400, seed=45)
    _label(project, _log_traffic(project, hot3.iloc[:200], "2024-06-06", version=2,
                                 role="canary"), hot3.iloc[:200])
    _label(project, _log_traffic(project, hot3.iloc[200:], "2024-06-06", version=5),
           hot3.iloc[200:])
    _log_traffic(project, _hot(5, seed=46), "2024-06-07", version=5)
    judged = run_once(open_project(proj))
    assert [a["action"] for a in judged["actions"]][:1] == ["rollback"], judged["actions"]
    # v2 is gone (the same pass may start a new retrain: the drift goes on)
    assert desired_state(project).champion == 5 and desired_state(project).challenger != 2
    rolled = list_events(project.store, kind="loop.probation_rollback")[0].payload
    assert rolled["paired"]["values"]["2"] > rolled["paired"]["values"]["5"]

    # the loop's numbers and the serving cost on the server's /metrics
    with _server(proj) as srv:
        for i in range(5):
            assert srv.post("/predict", {"records": _rows(2, seed=i)}).status_code == 200
        text = srv.get("/metrics").text
    assert metric(text, "mloop_loop_retrains", model="rentals", outcome="promoted") == 1
    assert metric(text, "mloop_loop_retrains", outcome="failed") == 0
    assert metric(text, "mloop_loop_time_to_deploy_hours") == metrics["time_to_deploy_hours"]
    assert metric(text, "mloop_loop_retrain_cpu_seconds_total") > 0
    assert metric(text, "mloop_serving_cpu_seconds_per_1k_predictions") > 0


def test_a_failing_canary_never_fails_a_client_and_is_rolled_back_at_once(proj: Path) -> None:
    """v3 passes warm-up, then raises on every call: the champion answers its share, the
    failure is counted and recorded, and the controller's next pass rolls it back without
    waiting for the probation to end."""
    from mloop.loop.controller import load_state, run_once, save_state
    from mloop.loop.state import Probation

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP)
    project = open_project(proj)
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    deploy_challenger(project, 3, mode="canary", weight=0.5, reason="test: a broken canary")
    with _server(proj, commit=0.2) as srv:
        srv.wait_for(lambda: srv.get("/model").json()["challenger"] is not None)
        answers = [srv.post("/predict", {"records": _rows(1, seed=i), "key": f"k{i}",
                                         "timestamp": "2024-09-01T10:00:00Z"})
                   for i in range(40)]
        assert [r.status_code for r in answers] == [200] * 40
        assert {r.json()["version"] for r in answers} == {1}  # the champion took over
        failed = metric(srv.get("/metrics").text, "mloop_challenger_errors_total", version="3")
        assert 5 <= failed < 40  # about half the keys route to the canary
        srv.wait_for(lambda: list_events(project.store, kind="serve.challenger_error"))
    event = list_events(project.store, kind="serve.challenger_error")[-1].payload
    assert event["version"] == 3 and "challenger exploded" in event["error"]
    state = load_state(project)
    state.probation = Probation(version=3, champion=1,
                                started_at=datetime(2024, 9, 1, 9, tzinfo=UTC), started_wall=t0)
    save_state(project, state)
    out = run_once(open_project(proj))  # probation (1d) far from over: rolled back anyway
    assert out["actions"][0]["action"] == "rollback", out["actions"]
    assert "failed to predict" in out["actions"][0]["reason"]
    assert desired_state(project).challenger is None and desired_state(project).champion == 1


def test_the_loop_guards_failures_and_restarts(proj: Path) -> None:
    from mloop.loop.controller import load_state, run_once, save_state
    from mloop.loop.state import InFlight

    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text() + LOOP.replace(
        "min_labelled_rows: 300", "min_labelled_rows: 100000"))
    project = open_project(proj)
    normal, hot = rentals_frame(600, seed=50), _hot(600, seed=51)
    _label(project, _log_traffic(project, normal, "2024-07-01"), normal)
    _label(project, _log_traffic(project, hot, "2024-07-02"), hot)
    _log_traffic(project, rentals_frame(5, seed=52), "2024-07-03")

    # too few labelled rows: held before anything starts (no cooldown consumed)
    out = run_once(project)
    assert [a["action"] for a in out["actions"]] == ["held"]
    assert "min_labelled_rows" in out["actions"][0]["guard"]
    # a retrain that fails (an estimator parameter sklearn refuses): the champion stays
    text = (proj / "mloop.yaml").read_text().replace("min_labelled_rows: 100000",
                                                      "min_labelled_rows: 300")
    (proj / "mloop.yaml").write_text(text.replace("n_estimators: 40", "n_estimators: -5"))
    # the drift streak from the first pass still stands, so the trigger fires again
    out = run_once(open_project(proj))
    assert [a["action"] for a in out["actions"]] == ["retrain_failed"], out["actions"]
    assert "n_estimators" in out["actions"][0]["error"]
    assert desired_state(project).champion == 1
    # more drift the next day: held by the cooldown (event time), not retried at once
    _label(project, _log_traffic(project, _hot(600, seed=53), "2024-07-03"), _hot(600, 53))
    _log_traffic(project, rentals_frame(5, seed=54), "2024-07-03T12:00:00")
    held = run_once(open_project(proj))
    assert held["actions"] and held["actions"][0]["action"] == "held"
    # a controller killed mid-retrain: the next pass records it instead of redoing it
    state = load_state(project)
    state.in_flight = InFlight(triggered_at=datetime(2024, 7, 3, tzinfo=UTC),
                               triggers=["drift"])
    save_state(project, state)
    resumed = run_once(open_project(proj))
    assert resumed["actions"][0]["action"] == "retrain_interrupted"
    assert load_state(project).in_flight is None
    kinds = [e.kind for e in list_events(project.store, limit=30)]
    assert "loop.retrain_interrupted" in kinds and "loop.trigger_held" in kinds


def test_loop_and_events_cli(proj: Path, capsys) -> None:
    assert main(["-C", str(proj), "loop", "--once", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["now"] is None and "no traffic" in first["message"]
    project = open_project(proj)
    _log_traffic(project, rentals_frame(50, seed=60), "2024-08-01")
    assert main(["-C", str(proj), "loop", "--once"]) == 0
    assert "event time 2024-08-01" in capsys.readouterr().out
    assert main(["-C", str(proj), "events", "--type", "promote", "--json"]) == 0
    events = json.loads(capsys.readouterr().out)["events"]  # one document (not --follow)
    assert [e["kind"] for e in events] == ["promote"]  # the fixture's promotion of v1
    assert events[0]["payload"]["version"] == 1
    assert main(["-C", str(proj), "events", "--since", "not-a-time"]) == 1
    assert "--since 'not-a-time'" in capsys.readouterr().err
