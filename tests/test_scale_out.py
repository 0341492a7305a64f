"""Scale-out for real: an MLflow tracking server on PostgreSQL with its artifacts on S3 (moto's
S3 HTTP server on loopback), mloop's own store on PostgreSQL, snapshots, outputs and the
inference log on ``s3://``. The bike example runs end to end against it: pipeline, promotion,
serving, feedback, monitoring, ``mloop doctor``.

Every engine (tests/cluster.py) is started on 127.0.0.1 (free ports, never MLflow's 5000) and
stopped by its PID; the databases are created fresh and dropped. PostgreSQL itself must be up (see
tests/test_store.py).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.cluster import BIN, BUCKET, Cluster, Databases, start_process, wait_http
from tests.helpers import BIKE, run_cli, stop_process_group
from tests.serving_util import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.postgres]


def _project(tmp_path: Path) -> Path:
    """A copy of the bike example; its serving port made free (doctor checks it)."""
    root = tmp_path / "bike_sharing"
    shutil.copytree(BIKE, root, ignore=shutil.ignore_patterns(".mloop"))
    cfg = root / "mloop.yaml"
    text = cfg.read_text()
    assert "\nserving:\n" in text
    cfg.write_text(text.replace("\nserving:\n", f"\nserving:\n  port: {free_port()}\n", 1))
    return root


def _doctor(root: Path, env: dict[str, str]) -> dict[str, Any]:
    proc = run_cli("-C", str(root), "doctor", "--json", env=env, check=False)
    result = json.loads(proc.stdout)
    assert proc.returncode == (0 if result["ok"] else 1), proc.stderr
    return {c["check"]: c for c in result["checks"] if c["check"] != "extra"}


# ------------------------------------------------------------------------------ tests

def test_bike_loop_on_mlflow_server_postgres_and_s3(cluster: Cluster, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    root = _project(tmp_path)
    env = cluster.env
    run = json.loads(run_cli("-C", str(root), "run", "--json", env=env).stdout)
    timings["run"] = time.monotonic() - t0
    assert run["status"] == "succeeded"
    assert run["registered"]["version"] == 1
    assert run["gates"]["passed"]
    assert run["promotion"]["version"] == 1 and run["promotion"]["replaced"] is None
    assert not (root / ".mloop").exists()  # nothing local: every store is remote

    # serve the champion (from the registry, artifacts via the server) while checking the rest
    t1 = time.monotonic()
    port = free_port()
    log = tmp_path / "serve.log"
    serve = start_process([str(BIN / "mloop"), "-C", str(root), "serve", "--port", str(port)], log,
                   env=env)
    try:
        # snapshots are objects in the bucket, and say so (read in this process, through the
        # same environment)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        from mloop.project import open_project

        project = open_project(root)
        snaps = project.snapshots.list()
        assert len(snaps) == 3  # ingested, train, holdout
        data_keys = set(cluster.s3_keys("data/"))
        for snap in snaps:
            assert snap.uri == f"s3://{BUCKET}/data/{snap.digest}/data.parquet"
            assert {f"data/{snap.digest}/{f}" for f in ("data.parquet", "profile.json",
                                                        "snapshot.json")} <= data_keys
            assert project.snapshots.read_table(snap.digest).num_rows == snap.rows
        assert cluster.s3_keys("outputs/")
        from mloop.registry.aliases import stored_alias

        assert stored_alias(project) == 1  # the champion, in mloop's PostgreSQL store
        # MLflow's artifacts went through the server into S3 (the client never spoke S3)
        assert any(k.endswith("/MLmodel") for k in cluster.s3_keys("mlflow/"))

        wait_http(f"http://127.0.0.1:{port}/health", serve, log, 120)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        timings["serve_ready"] = time.monotonic() - t1
        import pyarrow.parquet as pq

        frame = pq.read_table(root / "data" / "bike_hourly.parquet").slice(6000, 24).to_pandas()
        truth = frame["cnt"].tolist()
        records = json.loads(frame.drop(columns=["datetime", "cnt", "casual", "registered"])
                             .to_json(orient="records"))
        ids: list[str] = []
        for chunk in (records[:8], records[8:16], records[16:]):
            r = requests.post(f"{url}/predict", json={"records": chunk}, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 1
            ids += r.json()["request_ids"]
        r = requests.post(f"{url}/feedback", timeout=30, json={"labels": [
            {"request_id": i, "label": float(y)} for i, y in zip(ids, truth, strict=True)]})
        assert r.status_code == 200 and r.json()["stored"] == 24, r.text
        assert requests.post(f"{url}/flush", timeout=30).status_code == 200
    finally:
        stop_process_group(serve)
    # uvicorn shuts down gracefully, then re-raises SIGTERM
    assert serve.returncode in (0, -signal.SIGTERM), log.read_text()[-3000:]

    segments = [k for k in cluster.s3_keys("inference/") if not k.startswith("inference/labels")]
    labels = cluster.s3_keys("inference/labels/")
    assert segments and all("/version=1/part-" in k and k.endswith(".parquet")
                            for k in segments)
    assert labels and all(k.endswith(".parquet") for k in labels)

    from mloop.traffic.inference_log import read_log
    from mloop.traffic.labels import read_labels

    log_table = read_log(cluster.env["MLOOP_INFERENCE_LOG_URI"])
    assert sorted(log_table.column("_request_id").to_pylist()) == sorted(ids)
    assert read_labels(cluster.env["MLOOP_INFERENCE_LOG_URI"]).num_rows == 24
    # data.path may be an s3:// file or prefix too (a retrain table under the outputs store)
    from mloop.data.source import read_file_table

    assert read_file_table(f"s3://{BUCKET}/inference/labels").num_rows == 24
    assert read_file_table(snaps[0].uri).num_rows == snaps[0].rows

    t2 = time.monotonic()
    from mloop.monitoring.service import run_monitor

    mon = run_monitor(project, window="12rows")
    timings["monitor"] = time.monotonic() - t2
    windows = mon["evaluated"]
    assert [w["rows"] for w in windows] == [12, 12]
    assert all(w["label_coverage"] == 1.0 and w["metric_value"] is not None for w in windows)

    # doctor: every store green against this setup
    t3 = time.monotonic()
    checks = _doctor(root, env)
    timings["doctor"] = time.monotonic() - t3
    assert {k: c["status"] for k, c in checks.items()} == {
        "tracking": "ok", "registry": "ok", "artifacts": "ok", "store": "ok", "data": "ok",
        "outputs": "ok", "inference_log": "ok", "driver": "ok", "serving": "ok"}, checks
    assert checks["tracking"]["detail"].startswith("MLflow server ")
    assert "proxied by the tracking server" in checks["artifacts"]["detail"]
    assert checks["data"]["target"] == f"s3://{BUCKET}/data"
    assert not any(".mloop-doctor" in k for k in cluster.s3_keys())
    print("timings:", {k: round(v, 1) for k, v in timings.items()})


def test_mloop_store_on_postgres_created_and_upgraded_by_the_cli(
        databases: Databases, tmp_path: Path) -> None:
    from mloop.store.db import HEAD_REVISION, Store

    root = _project(tmp_path)
    # from empty
    empty = databases.create("empty")
    env = {"MLOOP_STORE_URI": empty}
    assert _doctor(root, env)["store"]["status"] == "warn"  # empty: run mloop db upgrade
    up = json.loads(run_cli("-C", str(root), "db", "upgrade", "--json", env=env).stdout)
    assert up == {"store_uri": empty, "from": None, "to": HEAD_REVISION}
    assert _doctor(root, env)["store"]["status"] == "ok"

    # from the previous schema, keeping its rows
    old = databases.create("old")
    store = Store(old, upgrade=False)
    store.upgrade("0007")
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            "insert into pipeline_runs (id, project, pipeline, status, config_hash, params, "
            "started_at) values ('r1', 'bike-sharing', 'tabular', 'succeeded', 'c', '{}', "
            "CURRENT_TIMESTAMP)"))
    store.engine.dispose()
    env = {"MLOOP_STORE_URI": old}
    store_check = _doctor(root, env)["store"]
    assert store_check["status"] == "warn"
    assert "behind" in store_check["detail"] and "mloop db upgrade" in store_check["detail"]
    up = json.loads(run_cli("-C", str(root), "db", "upgrade", "--json", env=env).stdout)
    assert up == {"store_uri": old, "from": "0007", "to": HEAD_REVISION}
    store = Store(old, upgrade=False)
    assert store.current_revision() == HEAD_REVISION
    assert store.get_pipeline_run("r1").project == "bike-sharing"
    assert "loop_state" in sa.inspect(store.engine).get_table_names()
    store.engine.dispose()
