"""mloop.log_metric from inside steps: buffered, batched, and never lost."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mloop.errors import MloopError, StepFailedError
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project

LOGGING_PIPELINE = """\
import mloop

@mloop.step
def fit(n: int, fail: bool):
    for i in range(n):
        mloop.log_metric("loss", 1.0 / (i + 1), step=i)
    if fail:
        raise ValueError("diverged")
    return {"points": n}

@mloop.pipeline(name="logging")
def pipe(cfg):
    fit(n=2500, fail=cfg.model.params.get("fail", False))
"""

CONFIG = """\
project: logs
data: {path: data/rentals.parquet}
target: cnt
pipeline: {entry: "steps:pipe"}
model: {params: {fail: %s}}
"""


def _loss_points(root: Path, step: str = "fit") -> int:
    project = open_project(root)
    run = project.store.list_pipeline_runs()[0]
    (step_run,) = [s for s in project.store.step_runs(run.id) if s.step == step]
    client = MlflowClient(project.uris["tracking_uri"])
    return len(client.get_metric_history(step_run.mlflow_run_id, "loss"))


def test_every_point_logged_in_a_step_reaches_mlflow(make_project) -> None:
    root = make_project(CONFIG % "false", files={"steps.py": LOGGING_PIPELINE})
    run_pipeline(open_project(root))
    assert _loss_points(root) == 2500


def test_points_logged_before_a_step_fails_are_kept(make_project) -> None:
    root = make_project(CONFIG % "true", files={"steps.py": LOGGING_PIPELINE})
    with pytest.raises(StepFailedError, match="diverged"):
        run_pipeline(open_project(root))
    assert _loss_points(root) == 2500


def test_points_are_flushed_when_the_process_exits_without_close(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = textwrap.dedent(f"""
        from mlflow.tracking import MlflowClient
        from mloop.tracking import BatchLogger
        client = MlflowClient({uri!r})
        run = client.create_run(client.create_experiment("x")).info.run_id
        logger = BatchLogger(client, run, flush_at=100_000, flush_seconds=3600)
        for i in range(1234):
            logger.log_metric("acc", i / 1234, step=i)
        print(run)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    history = MlflowClient(uri).get_metric_history(run_id, "acc")
    assert len(history) == 1234
    assert sorted(m.step for m in history) == list(range(1234))


def test_log_metric_outside_a_step_says_how_to_log() -> None:
    import mloop

    with pytest.raises(MloopError, match="outside a running step"):
        mloop.log_metric("loss", 1.0)


@pytest.fixture
def sqlite_run(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    return uri, client, run_id


@pytest.mark.parametrize("direct_sql", [True, False], ids=["direct-sql", "log-batch"])
def test_bulk_points_read_back_exactly_as_mlflow_stores_them(sqlite_run, direct_sql) -> None:
    uri, client, run_id = sqlite_run
    from mloop.tracking import BatchLogger

    values = [0.5, float("nan"), float("inf"), float("-inf"), 0.25]
    with BatchLogger(client, run_id, tracking_uri=uri, direct_sql=direct_sql) as logger:
        for i, v in enumerate(values):
            logger.log_metric("m", v, step=i, timestamp_ms=1000 + i)
        logger.log_metric("m", 0.5, step=0, timestamp_ms=1000)  # exact duplicate: stored once
        logger.log_metric("other", 3.0)
        # the path asked for is the path taken: one INSERT per flush, or MLflow's log_batch
        assert (logger._sql_writer() is not None) is direct_sql
    # a later flush with an older step must not replace the latest value
    with BatchLogger(client, run_id, tracking_uri=uri, direct_sql=direct_sql) as logger:
        logger.log_metric("m", 9.0, step=1, timestamp_ms=5000)
    history = sorted(client.get_metric_history(run_id, "m"), key=lambda m: (m.step, m.timestamp))
    got = [(m.step, m.value) for m in history]
    assert got[0] == (0, 0.5) and got[2] == (1, 9.0) and got[-1] == (4, 0.25)
    assert str(got[1][1]) == "nan"
    # MLflow stores +/-inf as +/-max double and reads them back that way
    assert got[3] == (2, sys.float_info.max) and got[4] == (3, -sys.float_info.max)
    assert len(history) == 6
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"m": 0.25, "other": 3.0}


def test_logging_to_a_deleted_run_is_refused(sqlite_run) -> None:
    uri, client, run_id = sqlite_run
    from mloop.tracking import BatchLogger

    client.delete_run(run_id)
    logger = BatchLogger(client, run_id, tracking_uri=uri)
    logger.log_metric("m", 1.0)
    with pytest.raises(MloopError, match=f"cannot log metrics to run {run_id}: it is deleted"):
        logger.flush()


@pytest.mark.parametrize("direct_sql", [True, False], ids=["direct-sql", "log-batch"])
def test_a_failed_flush_keeps_every_point_for_the_next_one(sqlite_run, direct_sql) -> None:
    from mlflow.exceptions import MlflowException

    from mloop.tracking import BatchLogger

    uri, client, run_id = sqlite_run
    logger = BatchLogger(client, run_id, tracking_uri=uri, direct_sql=direct_sql)
    for i in range(1500):
        logger.log_metric("loss", 1.0 / (i + 1), step=i)
    client.delete_run(run_id)  # the store now refuses writes to this run
    with pytest.raises((MloopError, MlflowException)):
        logger.flush()
    client.restore_run(run_id)
    logger.log_metric("loss", 0.0, step=1500)
    logger.close()
    assert len(client.get_metric_history(run_id, "loss")) == 1501
