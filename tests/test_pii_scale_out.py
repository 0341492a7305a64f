"""Personal data, erasure and retention on the scaled-out path: the inference log and labels on
S3 (moto's server on loopback), mloop's store (the audit chain) on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SMALL_CONFIG, stop_process_group
from tests.serving_util import free_port

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

BUCKET = "mloop-pii"
SECRET = "Sleet-7731-secret-weather"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mloop-test", "AWS_SECRET_ACCESS_KEY": "mloop-test",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port with an empty bucket; its endpoint."""
    import boto3
    import requests

    port = free_port()
    while port == 5000:
        port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with (tmp_path / "moto.log").open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                                 "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(300):
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.RequestException:
                if proc.poll() is not None:
                    raise AssertionError((tmp_path / "moto.log").read_text()) from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="mloop-test",
                     aws_secret_access_key="mloop-test", region_name="us-east-1"
                     ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_process_group(proc)


def _objects(endpoint: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="mloop-test",
                          aws_secret_access_key="mloop-test", region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_hash_erase_and_retention_on_s3_and_postgresql(
        s3: str, pg_url: str, make_project: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.project import open_project
    from mloop.security.audit import list_events, verify_chain
    from mloop.security.pii import PiiPolicy
    from mloop.storage import ObjectStore
    from mloop.traffic.erase import erase_rows
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id, read_log
    from mloop.traffic.labels import read_labels, store_labels
    from mloop.traffic.retention import apply_retention

    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": s3, "MLOOP_STORE_URI": pg_url,
                 "MLOOP_INFERENCE_LOG_URI": f"s3://{BUCKET}/inference",
                 "MLOOP_PII_KEY": "a-key-every-server-of-the-fleet-shares"}.items():
        monkeypatch.setenv(k, v)
    root = make_project(SMALL_CONFIG + "security:\n  pii: {weather: hash}\n  retention: 180d\n")
    project = open_project(root)
    policy = PiiPolicy.of(project.config, project.root)
    assert policy is not None
    now = datetime(2026, 6, 1, tzinfo=UTC)
    times = [now - timedelta(days=300), now - timedelta(days=2), now - timedelta(days=1),
             now - timedelta(hours=1)]
    weathers = ["Clear", SECRET, "Rain", SECRET]
    log = InferenceLog(project.uris["inference_log_uri"], commit_interval=3600)
    ids = []
    for t, w in zip(times, weathers, strict=True):
        rid = new_request_id(t.timestamp())
        ids.append(rid)
        cols: dict[str, list[Any]] = {"hour": [7], "weather": [w], "temp": [12.5]}
        log.append(LogEntry([rid], t.timestamp(), 1, "champion", 1.0, [40.0],
                            policy.apply(cols)))
    log.close()
    uri = project.uris["inference_log_uri"]
    store_labels(ObjectStore(uri), dict.fromkeys(ids, 30.0), task="regression", source="t")
    objects = _objects(s3)
    assert any(k.startswith("inference/day=") for k in objects)
    assert not [k for k, body in objects.items() if SECRET.encode() in body]
    assert read_log(uri).column("weather").to_pylist().count(
        policy.digest("weather", SECRET)) == 2

    erased = erase_rows(project, keys=[f"weather={SECRET}"])
    assert (erased.rows, erased.label_rows) == (2, 2)
    assert sorted(read_log(uri).column("_request_id").to_pylist()) == sorted([ids[0], ids[2]])

    kept = apply_retention(project, now=now)
    assert kept is not None and (kept.log_rows, kept.label_rows) == (1, 1)
    assert read_log(uri).column("_request_id").to_pylist() == [ids[2]]
    assert read_labels(uri).column("_request_id").to_pylist() == [ids[2]]
    assert [e.kind for e in list_events(project.store, kinds=["data.erased",
                                                              "data.retention"])] == [
        "data.retention", "data.erased"]
    assert verify_chain(project.store).ok
