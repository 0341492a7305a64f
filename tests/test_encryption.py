"""Encryption at rest (security.encryption): the bike-sharing project trained and served with
its stores sealed, every file under them checked for plaintext, every reader (monitor,
labels, the retraining table, purges) reading through the key, key rotation re-wrapping
without re-encrypting, and each way a key can be missing or wrong named in the error. The
AWS KMS source and the PostgreSQL + S3 stores run against moto's server on loopback."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mloop.cli.app import main
from mloop.errors import ConfigError, EncryptionKeyError, SealedDataError
from mloop.project import open_project
from mloop.security.audit import list_events
from mloop.security.keys import create_key_file

from .helpers import append_config, copy_bike
from .serving_util import project_server

pytestmark = pytest.mark.slow

SEALED = b"MLOOPENC"
STORES = ("data", "outputs", "inference")
KEY_CONFIG = """
security:
  encryption:
    key_file: keys/master.key
"""
# what the log, labels, snapshots and profiles hold in plain Parquet or JSON: column names
# (in every Parquet footer) and a category of the data
PLAINTEXT = (b"PAR1", b"weathersit", b"windspeed", b"Light Rain")
INPUTS = ("hr", "temp", "atemp", "hum", "windspeed", "season", "holiday", "weekday",
          "workingday", "weathersit")


def _traffic(first: str, hours: int) -> list[dict[str, Any]]:
    """The bike data's rows from ``first`` on, one per hour (the "future" the example
    replays as live traffic): inputs, the true count, and the time."""
    table = pq.read_table(Path(__file__).parents[1] / "examples/bike_sharing/data/"
                          "bike_hourly.parquet")
    rows = [r for r in table.to_pylist() if r["datetime"] >= datetime.fromisoformat(first)]
    return rows[:hours]


def _serve(root: Path, rows: list[dict[str, Any]]) -> list[str]:
    """One request per row, stamped with the row's time; labels for the first half by
    /feedback. Returns the request ids."""
    ids: list[str] = []
    with project_server(root, commit=0.2) as srv:
        for row in rows:
            body = {"records": [{k: row[k] for k in INPUTS}],
                    "timestamp": row["datetime"].isoformat() + "Z"}
            r = srv.post("/predict", body)
            assert r.status_code == 200, r.text
            ids += r.json()["request_ids"]
        srv.post("/flush")
        half = len(rows) // 2
        r = srv.post("/feedback", {"labels": [{"request_id": i, "label": row["cnt"]}
                                              for i, row in zip(ids[:half], rows[:half],
                                                                strict=True)]})
        assert r.status_code == 200 and r.json()["stored"] == half, r.text
    return ids


def _files(root: Path) -> list[Path]:
    return sorted(p for s in STORES for p in (root / ".mloop" / s).rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bike project with encryption on: trained (v1 champion), 72 hours of 2011-08
    served, the first 36 labelled."""
    from mloop.pipeline.runner import run_pipeline

    root = copy_bike(tmp_path_factory.mktemp("crypt") / "bike", KEY_CONFIG)
    create_key_file(root / "keys" / "master.key")
    from mloop.registry.promotion import change_alias

    assert run_pipeline(open_project(root)).status == "succeeded"
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    _serve(root, _traffic("2011-08-01", 72))
    return root


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bike"
    shutil.copytree(trained, root)
    return root


def _set_encryption(root: Path, block: str) -> None:
    """Replace the project's security section by ``block``."""
    cfg = root / "mloop.yaml"
    text = cfg.read_text().split("\nsecurity:")[0]
    cfg.write_text(text + block)


# --------------------------------------------------------------------- sealed at rest

def test_every_file_of_the_log_labels_snapshots_and_outputs_is_sealed(trained: Path) -> None:
    files = _files(trained)
    kinds = {p.relative_to(trained / ".mloop").parts[0] for p in files}
    assert kinds == set(STORES)
    assert any("labels" in p.parts for p in files) and any("day=" in str(p) for p in files)
    for path in files:
        raw = path.read_bytes()
        assert raw.startswith(SEALED), path
        for plain in PLAINTEXT:
            assert plain not in raw, (path, plain)
    segment = next(p for p in files if p.suffix == ".parquet" and "day=" in str(p))
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(segment)


def test_readers_see_the_served_rows_and_labels_through_the_key(trained: Path) -> None:
    from mloop.monitoring.windows import read_rows
    from mloop.traffic.inference_log import read_log
    from mloop.traffic.labels import read_labels

    project = open_project(trained)
    log = read_log(project.log_store)
    assert log.num_rows == 72
    seen = set(log.column("weathersit").to_pylist())
    assert "Clear" in seen and seen <= {"Clear", "Mist", "Light Rain", "Heavy Rain", None}
    labels = read_labels(project.log_store)
    assert labels.num_rows == 36
    assert set(labels.column("_request_id").to_pylist()) <= set(
        log.column("_request_id").to_pylist())
    assert read_rows(project.log_store).num_rows == 72
    snap = project.snapshots.list()[0]
    assert project.snapshots.read_table(snap.digest).num_rows == snap.rows


def test_monitoring_a_window_works_on_sealed_segments_and_labels(proj: Path) -> None:
    from mloop.monitoring.service import run_monitor

    result = run_monitor(open_project(proj), window="1d")
    days = [(w["start"][:10], w["rows"], w["label_coverage"]) for w in result["evaluated"]]
    assert days[:2] == [("2011-08-01", 24, 1.0), ("2011-08-02", 24, 0.5)]
    assert result["evaluated"][0]["metric"] == "mae"
    assert result["evaluated"][0]["metric_value"] > 0


def test_the_retraining_table_is_sealed_and_the_loops_retrain_trains_on_it(proj: Path) -> None:
    from datetime import UTC, timedelta

    from mloop.data.source import read_file_table
    from mloop.loop.retrain import build_training_data, retrain

    project = open_project(proj)
    project.config.loop.retrain.min_labelled_rows = 10
    project.config.loop.retrain.window = timedelta(days=30)
    project.config.loop.retrain.include_original = True  # enough rows for validation
    data = build_training_data(project, until=datetime(2011, 8, 4, tzinfo=UTC), champion=1)
    assert Path(data.path).read_bytes().startswith(SEALED)
    table = read_file_table(data.path, codec=project.codec)
    assert table.num_rows == data.rows
    from mloop.storage import ObjectStore

    with pytest.raises(EncryptionKeyError, match=r"no security\.encryption"):
        ObjectStore(project.uris["outputs_uri"]).read_parquet(
            Path(data.path).relative_to(project.uris["outputs_uri"]).as_posix())
    # the loop's retrain: its pipeline's ingest step opens the sealed table
    assert retrain(project, data)["version"] == 2


def test_a_damaged_sealed_segment_is_quarantined_and_the_rest_still_read(proj: Path) -> None:
    from mloop.monitoring.windows import read_rows

    segment = next(p for p in _files(proj) if "day=2011-08-02" in str(p))
    raw = bytearray(segment.read_bytes())
    raw[-20] ^= 0xFF  # one flipped bit inside the ciphertext
    segment.write_bytes(bytes(raw))
    project = open_project(proj)
    with pytest.raises(SealedDataError, match="damaged"):
        project.log_store.read_parquet_at(str(segment))
    rows = read_rows(project.log_store)
    assert 0 < rows.num_rows < 72
    assert not segment.exists()
    assert list((proj / ".mloop/inference/quarantine/segments").rglob("*.parquet"))


# ----------------------------------------------------------------- missing or wrong keys

def test_a_missing_key_file_is_an_error_naming_the_file(proj: Path) -> None:
    from mloop.traffic.labels import read_labels

    (proj / "keys" / "master.key").unlink()
    with pytest.raises(EncryptionKeyError, match=r"key_file: .*keys/master.key does not exist"):
        read_labels(open_project(proj).log_store)
    assert not (proj / ".mloop/inference/quarantine").exists()  # the files are fine


def test_the_server_does_not_start_without_its_key(proj: Path) -> None:
    from mloop.serving.app import create_app

    (proj / "keys" / "master.key").unlink()
    project = open_project(proj)
    with pytest.raises(EncryptionKeyError, match=r"keys/master.key does not exist"):
        create_app(project, project.config.serving)


def test_cli_exits_1_naming_the_missing_variable(proj: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLOOP_TEST_KEY", raising=False)
    _set_encryption(proj, "\nsecurity:\n  encryption:\n    env: MLOOP_TEST_KEY\n")
    assert main(["-C", str(proj), "keys", "status"]) == 1
    assert "environment variable MLOOP_TEST_KEY is not set" in capsys.readouterr().err


def test_a_wrong_key_names_the_key_the_file_was_sealed_under(proj: Path) -> None:
    from mloop.monitoring.windows import read_rows

    create_key_file(proj / "keys" / "other.key")
    _set_encryption(proj, "\nsecurity:\n  encryption:\n    key_file: keys/other.key\n")
    with pytest.raises(EncryptionKeyError, match=r"sealed under master key local:[0-9a-f]{16}, "
                                                 r"which is not the configured .*other.key"):
        read_rows(open_project(proj).log_store)
    assert not (proj / ".mloop/inference/quarantine").exists()


def test_sealed_files_without_a_configured_key_are_not_taken_for_damaged(proj: Path) -> None:
    from mloop.monitoring.windows import read_rows

    _set_encryption(proj, "\n")
    with pytest.raises(EncryptionKeyError, match=r"encrypted at rest, but this project has no "
                                                 r"security\.encryption key"):
        read_rows(open_project(proj).log_store)
    assert not (proj / ".mloop/inference/quarantine").exists()


def test_a_key_file_others_can_read_is_refused(proj: Path) -> None:
    from mloop.traffic.labels import read_labels

    (proj / "keys" / "master.key").chmod(0o644)
    with pytest.raises(EncryptionKeyError, match=r"readable by others.*chmod 600"):
        read_labels(open_project(proj).log_store)


@pytest.mark.parametrize(("block", "message"), [
    ("    key_file: a.key\n    env: KEY\n", "exactly one key source.*got key_file, env"),
    ("    previous: []\n", "exactly one key source.*got none"),
    ("    env: 'not a name'\n", "env"),
    ("    key_fle: a.key\n", "key_fle"),
])
def test_a_malformed_encryption_section_names_the_key(proj: Path, block: str,
                                                      message: str) -> None:
    _set_encryption(proj, "\nsecurity:\n  encryption:\n" + block)
    with pytest.raises(ConfigError, match=message) as info:
        open_project(proj)
    assert "security.encryption" in str(info.value)


# --------------------------------------------------------------------------- key admin

def test_keys_init_creates_a_private_key_file_and_refuses_to_overwrite_it(
        proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-C", str(proj), "keys", "init", "--key-file", "keys/new.key", "--json"]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    path = proj / "keys" / "new.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text())) == 32
    assert doc["config"] == {"security": {"encryption": {"key_file": "keys/new.key"}}}
    assert doc["kid"].startswith("local:") and "secret" not in doc
    before = path.read_bytes()
    assert main(["-C", str(proj), "keys", "init", "--key-file", "keys/new.key"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == before
    events = list_events(open_project(proj).store, kind="keys.init")
    assert [e.payload["kid"] for e in events] == [doc["kid"]]
    assert path.read_text().strip() not in str(events[0].payload)


def test_rotation_rewraps_every_data_key_without_reencrypting_and_old_data_still_reads(
        proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mloop.monitoring.windows import read_rows
    from mloop.security.encryption import read_header
    from mloop.traffic.labels import read_labels

    files = _files(proj)
    old_kid = read_header(files[0].read_bytes(), "x").kid
    bodies = {p: p.read_bytes()[read_header(p.read_bytes(), "x").body_offset:] for p in files}
    create_key_file(proj / "keys" / "new.key")
    _set_encryption(proj, "\nsecurity:\n  encryption:\n    key_file: keys/new.key\n"
                          "    previous:\n      - key_file: keys/master.key\n")
    # during the rotation both keys read
    assert read_rows(open_project(proj).log_store).num_rows == 72

    assert main(["-C", str(proj), "keys", "rotate", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["rewrapped"] == len(files) and done["from_kids"] == {old_kid: len(files)}
    for path in files:
        raw = path.read_bytes()
        head = read_header(raw, str(path))
        assert head.kid == done["kid"] != old_kid
        assert raw[head.body_offset:] == bodies[path]  # the ciphertext as it was
    assert main(["-C", str(proj), "keys", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["sealed_other"] == 0 and status["plain"] == 0
    event = list_events(open_project(proj).store, kind="keys.rotated")[0]
    assert event.payload["rewrapped"] == len(files)

    # the old key is no longer needed: gone from the config and from disk, all still reads
    _set_encryption(proj, "\nsecurity:\n  encryption:\n    key_file: keys/new.key\n")
    (proj / "keys" / "master.key").unlink()
    project = open_project(proj)
    assert read_rows(project.log_store).num_rows == 72
    assert read_labels(project.log_store).num_rows == 36
    assert project.snapshots.read_table(project.snapshots.list()[0].digest).num_rows > 0
    assert main(["-C", str(proj), "keys", "rotate", "--json"]) == 0  # nothing left to do
    assert json.loads(capsys.readouterr().out)["rewrapped"] == 0


def test_rotation_stops_before_rewriting_when_a_file_is_under_an_unknown_key(
        proj: Path) -> None:
    from mloop.security.key_admin import rotate_keys

    create_key_file(proj / "keys" / "new.key")
    _set_encryption(proj, "\nsecurity:\n  encryption:\n    key_file: keys/new.key\n")
    before = {p: p.read_bytes() for p in _files(proj)}
    project = open_project(proj)
    with pytest.raises(EncryptionKeyError, match="not the configured"):
        rotate_keys(project.sealed_stores(), project.codec, audit=project.store)
    assert {p: p.read_bytes() for p in _files(proj)} == before


# ---------------------------------------------------------------- AWS KMS and S3 on moto

@pytest.fixture
def moto_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's server (KMS and S3) on a free loopback port, the environment pointing every
    AWS SDK at it (boto3 and pyarrow's alike)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield endpoint
    finally:
        server.stop()


def _kms_key() -> str:
    import boto3

    return str(boto3.client("kms").create_key()["KeyMetadata"]["KeyId"])


def test_a_kms_master_key_seals_and_rotation_moves_local_data_under_it(
        proj: Path, moto_aws: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mloop.monitoring.windows import read_rows
    from mloop.security.encryption import read_header

    key_id = _kms_key()
    assert main(["-C", str(proj), "keys", "init", "--source", "aws-kms", "--kms-key-id",
                 key_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kid"] == f"kms:{key_id}"
    _set_encryption(proj, f"\nsecurity:\n  encryption:\n    aws_kms: {key_id}\n"
                          "    previous:\n      - key_file: keys/master.key\n")
    assert main(["-C", str(proj), "keys", "rotate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rewrapped"] == len(_files(proj))
    _set_encryption(proj, f"\nsecurity:\n  encryption:\n    aws_kms: {key_id}\n")
    project = open_project(proj)
    assert read_rows(project.log_store).num_rows == 72
    # a new segment gets its own KMS data key
    project.log_store.write_parquet("day=2011-09-01/version=1/part-x.parquet",
                                    pa.table({"a": [1]}))
    new = (proj / ".mloop/inference/day=2011-09-01/version=1/part-x.parquet").read_bytes()
    assert read_header(new, "x").kid == f"kms:{key_id}"
    assert project.log_store.read_parquet("day=2011-09-01/version=1/part-x.parquet")[
        "a"].to_pylist() == [1]


def test_a_kms_key_that_does_not_exist_is_an_error_naming_it(proj: Path, moto_aws: str) -> None:
    from mloop.monitoring.windows import read_rows

    _set_encryption(proj, "\nsecurity:\n  encryption:\n    aws_kms: alias/nobody\n"
                          "    previous:\n      - key_file: keys/master.key\n")
    project = open_project(proj)
    assert read_rows(project.log_store).num_rows == 72  # read under the previous key
    with pytest.raises(EncryptionKeyError, match=r"AWS KMS key 'alias/nobody' refused "
                                                 r"generate_data_key \(NotFoundException"):
        project.log_store.write_parquet("x.parquet", pa.table({"a": [1]}))
    assert not (proj / ".mloop/inference/x.parquet").exists()


@pytest.mark.postgres
def test_postgres_and_s3_stores_keep_the_log_sealed_under_kms(
        make_project: Any, moto_aws: str, pg_url: str) -> None:
    import boto3

    from mloop.monitoring.windows import read_rows
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id
    from mloop.traffic.labels import read_labels, store_labels

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="mloop-crypt")
    key_id = _kms_key()
    root = make_project()
    append_config(root, f"""
        stores:
          store_uri: {pg_url}
          data_uri: s3://mloop-crypt/data
          inference_log_uri: s3://mloop-crypt/inference
        security:
          encryption:
            aws_kms: {key_id}
        """)
    project = open_project(root)
    log = InferenceLog(project.log_store, commit_interval=3600)
    ts = datetime(2024, 3, 1, 12).timestamp()
    ids = [new_request_id(ts + i) for i in range(5)]
    for i, rid in enumerate(ids):
        log.append(LogEntry([rid], ts + i, 1, "champion", 1.0, [10.0 + i],
                            {"weather": ["Light Rain"], "temp": [3.5]}))
    log.close()
    assert store_labels(project.log_store, {ids[0]: 11.0}, task="regression",
                        source="test")["stored"] == 1
    snap, _ = project.snapshots.put(pa.table({"weather": ["Light Rain"] * 3}), source="t")

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mloop-crypt")["Contents"]]
    assert any("/labels/" in k for k in keys) and any("/day=" in k for k in keys)
    assert any(k.startswith("data/") for k in keys)
    for key in keys:
        raw = s3.get_object(Bucket="mloop-crypt", Key=key)["Body"].read()
        assert raw.startswith(SEALED) and b"Light Rain" not in raw and b"PAR1" not in raw, key
    fresh = open_project(root)
    assert read_rows(fresh.log_store).column("_request_id").to_pylist() == ids
    assert read_labels(fresh.log_store).column("label").to_pylist() == [11.0]
    assert fresh.snapshots.read_table(snap.digest).num_rows == 3
    assert os.environ["AWS_ENDPOINT_URL"] == moto_aws


# ------------------------------------------------------- erasure and retention, sealed

def test_erasure_and_retention_rewrite_sealed_segments_and_keep_them_sealed(proj: Path) -> None:
    """``mloop data erase`` and ``security.retention`` read the sealed log through the key
    and write what they keep sealed again (never a plain segment beside sealed ones)."""
    from datetime import UTC

    from mloop.traffic.erase import erase_rows
    from mloop.traffic.inference_log import read_log
    from mloop.traffic.labels import read_labels
    from mloop.traffic.retention import apply_retention

    project = open_project(proj)
    log = read_log(project.log_store)
    labelled = set(read_labels(project.log_store).column("_request_id").to_pylist())
    gone = sorted(labelled)[:3]
    result = erase_rows(project, request_ids=gone, reason="subject access request")
    assert (result.rows, result.label_rows) == (3, 3)
    left = read_log(project.log_store)
    assert left.num_rows == log.num_rows - 3
    assert not set(gone) & set(left.column("_request_id").to_pylist())
    assert not set(gone) & set(read_labels(project.log_store).column("_request_id").to_pylist())
    for path in _files(proj):
        assert path.read_bytes().startswith(SEALED), path

    # every served row is from 2011-08-01..03: a retention reaching 2011-08-02 drops the first day
    (proj / "mloop.yaml").write_text((proj / "mloop.yaml").read_text().replace(
        "security:\n", "security:\n  retention: 1d\n", 1))
    project = open_project(proj)
    apply_retention(project, now=datetime(2011, 8, 3, tzinfo=UTC))
    days = {t.date().isoformat() for t in read_log(project.log_store).column("_ts").to_pylist()}
    assert days == {"2011-08-02", "2011-08-03"}
    for path in _files(proj):
        assert path.read_bytes().startswith(SEALED), path
