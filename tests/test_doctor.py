"""`mloop doctor` on local projects (the PostgreSQL + S3 + MLflow server case is in
test_scale_out.py), and the S3 settings object stores take from the environment."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from .helpers import SMALL_CONFIG, run_cli
from .serving_util import free_port


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening: connections are refused
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(stores: str = "", port: int | None = None) -> str:
    return (SMALL_CONFIG + f"serving: {{port: {port or free_port()}}}\n"
            + (f"stores:\n{stores}" if stores else ""))


def _doctor(root: Path, *, text: bool = False) -> tuple[int, dict[str, Any], str]:
    """Exit code, checks by name (extras left out), and the text form when asked for."""
    proc = run_cli("-C", str(root), "doctor", "--json", check=False)
    shown = run_cli("-C", str(root), "doctor", check=False).stdout if text else ""
    checks = json.loads(proc.stdout)["checks"]
    by_name = {c["check"]: c for c in checks if c["check"] != "extra"}
    by_name["_count"] = len(checks)
    return proc.returncode, by_name, shown


@pytest.mark.slow
def test_doctor_is_green_on_a_local_project_before_and_after_a_run(make_project) -> None:
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project
    from mloop.store.db import HEAD_REVISION

    root = make_project(_config())
    code, checks, text = _doctor(root, text=True)
    count = checks.pop("_count")
    assert code == 0, text
    assert {c["status"] for c in checks.values()} == {"ok"}, checks
    assert "not created yet" in checks["store"]["detail"]
    assert not (root / ".mloop" / "mloop.db").exists()  # the doctor creates no database
    # one line per check, each naming what it checked
    lines = text.strip().splitlines()
    assert len(lines) == count
    assert any(line.startswith("ok") and "tracking" in line and "mlflow.db" in line
               for line in lines)

    run_pipeline(open_project(root))
    code, checks, _ = _doctor(root)
    checks.pop("_count")
    assert code == 0, checks
    assert {c["status"] for c in checks.values()} == {"ok"}, checks
    assert checks["tracking"]["detail"].startswith("MLflow schema ")
    assert checks["store"]["detail"] == f"schema {HEAD_REVISION} (head)"
    assert checks["artifacts"]["detail"].startswith("experiment 'rentals': write, read")
    assert not list((root / ".mloop" / "outputs").glob(".mloop-doctor*"))


def test_doctor_fails_naming_an_unreachable_tracking_server_and_an_unwritable_store(
        make_project, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    port = _closed_port()
    root = make_project(_config(
        f"  tracking_uri: http://127.0.0.1:{port}\n"
        f"  outputs_uri: {blocker}/outputs\n"
        f"  store_uri: postgresql+psycopg://mloop:hunter2@127.0.0.1:{_closed_port()}/nope\n"))
    code, checks, text = _doctor(root, text=True)
    assert code == 1
    assert checks["tracking"]["status"] == "fail"
    assert checks["tracking"]["target"] == f"http://127.0.0.1:{port}"
    assert "unreachable" in checks["tracking"]["detail"]
    assert checks["outputs"]["status"] == "fail"
    assert checks["outputs"]["target"] == f"{blocker}/outputs"
    assert checks["store"]["status"] == "fail" and "cannot connect" in checks["store"]["detail"]
    assert checks["data"]["status"] == "ok"
    assert checks["driver"] == {"check": "driver", "target": "postgresql+psycopg",
                                "status": "ok", "detail": checks["driver"]["detail"]}
    # the text form: one line per check, naming the URI, the password masked
    assert "hunter2" not in text and "mloop:***@127.0.0.1" in text
    fails = [line for line in text.splitlines() if line.startswith("FAIL")]
    assert any(f"http://127.0.0.1:{port}" in line and "unreachable" in line for line in fails)
    assert any(f"{blocker}/outputs" in line for line in fails)
    # tracking, registry (the same server), artifacts (the server would proxy them), store,
    # outputs
    assert len(fails) == 5, text


def test_doctor_warns_about_a_store_behind_and_fails_on_a_busy_port(make_project) -> None:
    from mloop.store.db import HEAD_REVISION, Store

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        root = make_project(_config(port=port))
        old = Store(f"sqlite:///{root / '.mloop' / 'mloop.db'}", upgrade=False)
        old.upgrade("0008")
        old.engine.dispose()
        (root / ".mloop" / "mlflow.db").write_bytes(b"this is not a database" * 100)
        code, checks, _ = _doctor(root)
    assert code == 1, checks
    assert checks["store"]["status"] == "warn"
    assert checks["store"]["detail"] == (f"behind: schema 0008, head {HEAD_REVISION}: run "
                                         "`mloop db upgrade`")
    assert checks["serving"]["status"] == "fail"
    assert "not mloop serve" in checks["serving"]["detail"]
    assert checks["tracking"]["status"] == "fail"
    assert "cannot be read as SQLite" in checks["tracking"]["detail"]


def test_s3_settings_follow_boto3s_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.storage import S3_ENDPOINT_ENV, _s3_filesystem, s3_settings

    for name in (*S3_ENDPOINT_ENV, "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert s3_settings() == {"endpoint": None, "from": None, "region": None}
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://mlflow-only:9000")
    assert s3_settings()["from"] == "MLFLOW_S3_ENDPOINT_URL"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert s3_settings() == {"endpoint": "http://127.0.0.1:9000", "from": "AWS_ENDPOINT_URL",
                             "region": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:8443")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert s3_settings() == {"endpoint": "https://s3.example:8443",
                             "from": "AWS_ENDPOINT_URL_S3", "region": "eu-central-1"}
    fs = _s3_filesystem("http://127.0.0.1:9000", None)
    assert fs.region == "us-east-1"
    assert _s3_filesystem("http://127.0.0.1:9000", None) is fs  # one per endpoint


def test_data_path_takes_a_file_uri(make_project) -> None:
    from mloop.data.source import read_file_table

    root = make_project()
    uri = (root / "data" / "rentals.parquet").as_uri()
    assert read_file_table(uri).num_rows == 600
    assert read_file_table(str(root / "data")).num_rows == 600


def test_doctor_reports_the_extra_a_lightgbm_model_needs(make_project) -> None:
    """A model named ``lightgbm.LGBMRegressor`` needs the lightgbm extra: the doctor checks
    it, says what in the config wants it, and finds it installed here."""
    import lightgbm

    config = _config().replace("sklearn.ensemble.HistGradientBoostingRegressor",
                               "lightgbm.LGBMRegressor", 1)
    root = make_project(config)
    proc = run_cli("-C", str(root), "doctor", "--json", check=False)
    extras = {c["target"]: c for c in json.loads(proc.stdout)["checks"] if c["check"] == "extra"}
    assert extras["lightgbm"]["status"] == "ok", extras
    assert f"lightgbm {lightgbm.__version__}" in extras["lightgbm"]["detail"]
    assert extras["xgboost"]["status"] != "fail"  # installed or not, nothing here wants it
    assert "?" not in extras["xgboost"]["detail"]  # its version, from the distribution
    # that installed it (the extra's xgboost-cpu), when it is installed
