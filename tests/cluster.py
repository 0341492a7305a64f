"""The scale-out engines tests start for real on 127.0.0.1: moto's S3 HTTP server, an MLflow
tracking server on PostgreSQL with its artifacts proxied to that S3, and fresh PostgreSQL
databases (dropped at close). Each server runs in its own session and is stopped by its
process group. The ``cluster`` and ``databases`` fixtures (conftest.py) wrap them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests
import sqlalchemy as sa

from .helpers import stop_process_group
from .serving_util import free_port

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
BIN = Path(sys.executable).parent
BUCKET = "mloop-scale-out"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "mloop-test", "AWS_SECRET_ACCESS_KEY": "mloop-test",
                  "AWS_DEFAULT_REGION": "us-east-1"}


# ------------------------------------------------------------------------------ engines

def start_process(args: list[str], log: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A server in its own session, so stopping its PID's group ends its children too (the
    MLflow CLI runs uvicorn in a child process)."""
    with log.open("wb") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")


class Databases:
    """Fresh PostgreSQL databases, dropped (even when still connected) at close."""

    def __init__(self) -> None:
        self.admin = sa.create_engine(f"{PG}/test", isolation_level="AUTOCOMMIT")
        self.names: list[str] = []

    def create(self, label: str) -> str:
        name = f"mloop_{label}_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return f"{PG}/{name}"

    def close(self) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()


@dataclass
class Cluster:
    s3_endpoint: str
    tracking_uri: str
    mloop_store_uri: str
    env: dict[str, str]  # what a process of the project needs: S3 settings + MLOOP_*_URI

    def s3_keys(self, prefix: str = "") -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_credentials())
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]}


@contextlib.contextmanager
def running_cluster(tmp_path: Path, databases: Databases) -> Iterator[Cluster]:
    """moto's S3 server and an MLflow server (PostgreSQL backend, artifacts proxied to S3)."""
    import boto3

    s3_port, mlflow_port = free_port(), free_port()
    while 5000 in (s3_port, mlflow_port) or s3_port == mlflow_port:
        s3_port, mlflow_port = free_port(), free_port()
    endpoint = f"http://127.0.0.1:{s3_port}"
    # One setting for everyone: boto3 (in the MLflow server) and pyarrow (in mloop) both read
    # AWS_ENDPOINT_URL; the MLflow server's job runner (GenAI jobs) is not needed here.
    s3_env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        moto = start_process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p",
                              str(s3_port)], logs / "moto.log")
        procs.append(moto)
        backend = databases.create("mlflow")
        mlflow = start_process([str(BIN / "mlflow"), "server", "--workers", "1",
                                "--host", "127.0.0.1", "--port", str(mlflow_port),
                                "--backend-store-uri", backend,
                                "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
                               logs / "mlflow.log", cwd=tmp_path,
                               env={**s3_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        procs.append(mlflow)
        wait_http(f"{endpoint}/", moto, logs / "moto.log", 60)
        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(
            Bucket=BUCKET)
        store = databases.create("store")
        tracking = f"http://127.0.0.1:{mlflow_port}"
        wait_http(f"{tracking}/health", mlflow, logs / "mlflow.log", 150)
        env = {**s3_env, "MLOOP_TRACKING_URI": tracking, "MLOOP_STORE_URI": store,
               "MLOOP_DATA_URI": f"s3://{BUCKET}/data",
               "MLOOP_OUTPUTS_URI": f"s3://{BUCKET}/outputs",
               "MLOOP_INFERENCE_LOG_URI": f"s3://{BUCKET}/inference"}
        yield Cluster(endpoint, tracking, store, env)
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)
