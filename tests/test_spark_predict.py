"""``mloop predict --engine spark``: the same file scored by the local chunked path and by
``mlflow.pyfunc.spark_udf`` on a real local[2] SparkSession gives the same rows and the same
predictions; bad input is refused before anything is written, naming the problem.

One SparkSession for the whole module (starting the JVM costs seconds on two cores); the CLI
calls in here find it active and use it instead of starting their own. Spark does not keep row
order across partitions, so every input carries an ``id`` column and outputs are joined on it
(the session splits small files into several partitions on purpose, to show it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mloop.cli.app import main
from mloop.errors import MloopError, ModelNotFoundError
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.promotion import change_alias
from mloop.serving.batch import predict_file
from mloop.serving.spark_batch import predict_spark, spark_session

from .helpers import SMALL_CONFIG, missing, rentals_frame, require

# xdist_group: with --dist loadgroup (pyproject's addopts), every test here runs in one
# worker, so the module's one SparkSession serves them all
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("spark")]


@pytest.fixture(autouse=True, scope="module")
def _spark_installed() -> None:
    """Java and pyspark: skipped without them on a developer's machine, failed under CI
    (helpers.missing)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing("Spark needs a Java runtime (17 or 21) on PATH or in JAVA_HOME: "
                "apt-get install openjdk-17-jre-headless (scripts/test_setup.sh does)")
    require("pyspark", install="pip install 'mloop[spark]'")


INPUTS = ["hour", "weather", "temp"]


@pytest.fixture(scope="module")
def proj(tmp_path_factory) -> Path:
    """v1 (gradient boosting on the rentals table), the champion."""
    root = tmp_path_factory.mktemp("spark") / "proj"
    (root / "data").mkdir(parents=True)
    (root / "mloop.yaml").write_text(SMALL_CONFIG)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    run_pipeline(open_project(root))
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    # small input splits: a 4,000-row file becomes several partitions and part files
    session = spark_session("local[2]", {"spark.sql.files.maxPartitionBytes": "16k",
                                         "spark.sql.shuffle.partitions": "2"}, progress=False)
    yield session
    session.stop()


def _inputs(n: int) -> pd.DataFrame:
    frame = rentals_frame(n, seed=11)[INPUTS]
    frame.loc[frame.index[::97], "weather"] = "Snow"  # a category never seen in training
    frame.insert(0, "id", np.arange(n, dtype=np.int64))
    return frame


def _same(local: pd.DataFrame, spark_out: pd.DataFrame) -> None:
    assert list(spark_out.columns) == list(local.columns)
    assert len(spark_out) == len(local)
    assert spark_out["id"].is_unique
    joined = local.merge(spark_out, on="id", suffixes=("_local", "_spark"), validate="1:1")
    assert len(joined) == len(local)
    for c in INPUTS:
        assert (joined[f"{c}_local"] == joined[f"{c}_spark"]).all(), c
        assert local[c].dtype == spark_out[c].dtype, c
    assert spark_out["prediction"].dtype == np.float64
    np.testing.assert_allclose(joined["prediction_spark"], joined["prediction_local"],
                               rtol=0, atol=1e-9)


def test_spark_scores_the_same_file_as_the_local_path(proj: Path, spark: Any,
                                                      tmp_path: Path) -> None:
    project = open_project(proj)
    frame = _inputs(4000)
    src = tmp_path / "big.parquet"
    frame.to_parquet(src, index=False, row_group_size=500)
    local = predict_file(project, src, tmp_path / "local.parquet", progress=False)
    result = predict_spark(project, src, tmp_path / "scored", spark=spark, progress=False)
    assert (result["rows"], result["version"], local["version"]) == (4000, 1, 1)
    assert result["engine"] == "spark" and result["master"] == "local[2]"
    assert result["ignored_columns"] == local["ignored_columns"] == ["id"]  # kept, unscored
    out = tmp_path / "scored"
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) > 1, "expected several partitions (row order is not kept across them)"
    assert (out / "_SUCCESS").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    _same(pd.read_parquet(tmp_path / "local.parquet"), pd.read_parquet(out))

    # the same rows as CSV (Spark infers the column types, as pyarrow does for the local path)
    csv = tmp_path / "big.csv"
    frame.to_csv(csv, index=False)
    predict_file(project, csv, tmp_path / "local_csv.parquet", progress=False)
    predict_spark(project, csv, tmp_path / "scored_csv", spark=spark, progress=False)
    _same(pd.read_parquet(tmp_path / "local_csv.parquet"),
          pd.read_parquet(tmp_path / "scored_csv"))


def test_cli_engine_spark_replaces_the_output_and_reports_json(proj: Path, spark: Any,
                                                               tmp_path: Path,
                                                               capsys) -> None:
    frame = _inputs(600)
    src = tmp_path / "folder"  # a folder of Parquet files, as Spark writes them
    src.mkdir()
    frame.iloc[:300].to_parquet(src / "a.parquet", index=False)
    frame.iloc[300:].to_parquet(src / "b.parquet", index=False)
    out = tmp_path / "scored"
    out.mkdir()
    (out / "stale.parquet").write_text("from an earlier run")
    assert main(["-C", str(proj), "predict", "-i", str(src), "-o", str(out),
                 "--engine", "spark", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["rows"], result["version"], result["engine"]) == (600, 1, "spark")
    assert not (out / "stale.parquet").exists()
    scored = pd.read_parquet(out).sort_values("id", ignore_index=True)
    assert list(scored.columns) == ["id", *INPUTS, "prediction"]
    pd.testing.assert_frame_equal(scored[["id", *INPUTS]], frame, check_dtype=False)
    assert scored["prediction"].notna().all()


def test_spark_bad_input_names_the_problem_and_writes_nothing(proj: Path, spark: Any,
                                                              tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    project = open_project(proj)
    out = tmp_path / "out"
    # a missing input column, through the CLI: exit 1 naming it
    src = tmp_path / "no_temp.parquet"
    _inputs(300).drop(columns=["temp"]).to_parquet(src, index=False)
    assert main(["-C", str(proj), "predict", "-i", str(src), "-o", str(out),
                 "--engine", "spark"]) == 1
    assert "missing column(s) ['temp']" in capsys.readouterr().err
    # a null where the signature requires a value; a value that is no number
    nulls = _inputs(300)
    nulls.loc[nulls.index[250], "weather"] = None
    nulls.to_parquet(tmp_path / "nulls.parquet", index=False)
    with pytest.raises(MloopError, match=r"'weather' is null in 1 row\(s\)"):
        predict_spark(project, tmp_path / "nulls.parquet", out, spark=spark)
    words = _inputs(50).astype({"temp": str})
    words.loc[words.index[3], "temp"] = "warm"
    words.to_parquet(tmp_path / "words.parquet", index=False)
    with pytest.raises(MloopError, match=r"column 'temp' is string, the signature expects "
                                         r"double \(1 value\(s\) cannot be cast, e.g. 'warm'\)"):
        predict_spark(project, tmp_path / "words.parquet", out, spark=spark)
    # a column outside the signature (the id) with serving.strict_columns on
    strict = open_project(proj)
    strict.config.serving.strict_columns = True
    with pytest.raises(MloopError, match=r"column\(s\) \['id'\] are not in the model "
                                         r"signature \(serving\.strict_columns"):
        predict_spark(strict, tmp_path / "nulls.parquet", out, spark=spark)
    # no such input, no such version, no rows, an unsupported file
    with pytest.raises(MloopError, match=r"nowhere\.parquet: no such file or folder"):
        predict_spark(project, tmp_path / "nowhere.parquet", out, spark=spark)
    with pytest.raises(ModelNotFoundError, match="has no version 99"):
        predict_spark(project, tmp_path / "words.parquet", out, version=99, spark=spark)
    _inputs(0).to_parquet(tmp_path / "empty.parquet", index=False)
    with pytest.raises(MloopError, match="no rows to score"):
        predict_spark(project, tmp_path / "empty.parquet", out, spark=spark)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(MloopError, match=r"unsupported input type '\.json'"):
        predict_spark(project, tmp_path / "x.json", out, spark=spark)
    # s3:// needs Hadoop's s3a filesystem (hadoop-aws), which pyspark does not ship
    with pytest.raises(MloopError, match="hadoop-aws"):
        predict_spark(project, "s3://bucket/big/", "s3://bucket/scored/", spark=spark)
    assert not out.exists()
    assert not list(tmp_path.glob(".tmp-*"))
    # flags: an unknown engine, --master without spark
    assert main(["-C", str(proj), "predict", "-i", str(src), "-o", str(out),
                 "--engine", "dask"]) == 1
    assert "--engine 'dask': expected local or spark" in capsys.readouterr().err
    assert main(["-C", str(proj), "predict", "-i", str(src), "-o", str(out),
                 "--master", "local[1]"]) == 1
    assert "--master is for --engine spark" in capsys.readouterr().err
    # without pyspark: the error names the extra
    monkeypatch.setitem(sys.modules, "pyspark", None)
    with pytest.raises(MloopError, match=r"pip install 'mloop\[spark\]'"):
        predict_spark(project, tmp_path / "words.parquet", out)
