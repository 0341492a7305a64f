"""A rolling reference's own temporal null (``monitoring.reference: {rolling: 28d}``) on the
bike data: the training snapshot keeps each week's statistics against the 28 days before it,
and a week judged against the traffic just before it is then drift only when it is beyond
that ordinary week-to-week change. Judged iid-only (as before), nearly every week of a real
year was flagged; a sudden shift still is. Snapshots are stored by the real SnapshotStore."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mloop.config import MonitoringConfig, RollingReference, SeasonalReference
from mloop.data.divergence import NUMERIC_METHODS
from mloop.data.profile import compute_profile
from mloop.data.snapshot import SnapshotStore
from mloop.data.temporal_profile import MIN_CHUNKS
from mloop.monitoring.evaluate import evaluate_window
from mloop.monitoring.reference import log_temporal
from mloop.storage import ObjectStore

from .bike_windows import BIKE, FEATURES
from .bike_windows import between as _between

# epoch-aligned weeks start on a Thursday: 2011-01-06 .. 2011-12-29 holds 51 whole weeks
START, END = datetime(2011, 1, 6), datetime(2011, 12, 29)
CFG = MonitoringConfig(window="7d")
ROLLING = RollingReference(rolling="28d")  # type: ignore[arg-type]  # pydantic parses it


@pytest.fixture(scope="module")
def bike() -> pa.Table:
    return pq.read_table(BIKE).drop_columns(["casual", "registered", "cnt"])


def _profile(tmp: Path, table: pa.Table, rolling: str | None, window: str = "7d"
             ) -> dict[str, Any]:
    store = SnapshotStore(ObjectStore(str(tmp)), time_column="datetime", window=window,
                          rolling=rolling)
    snap, _new = store.put(table, source="test")
    return store.profile(snap.digest)


@pytest.fixture(scope="module")
def training(bike: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """2011 profiled for weekly windows and a 28-day rolling reference."""
    return _profile(tmp_path_factory.mktemp("rolling"), _between(bike, START, END), "28d")


def _weeks(year: int) -> Iterator[tuple[datetime, datetime]]:
    """(start, end) of the epoch-aligned weeks of ``year`` with 28 days of it before them."""
    day = START.replace(year=year) + timedelta(days=28)
    while day.weekday() != 3:  # a Thursday
        day += timedelta(days=1)
    while day + timedelta(days=7) <= datetime(year, 12, 28):
        yield day, day + timedelta(days=7)
        day += timedelta(days=7)


def _judge(training: dict[str, Any], before: pa.Table, week: pa.Table, *,
           rolling_null: bool = True) -> dict[str, Any]:
    """What ``mloop monitor`` does for a rolling reference: the rows before the window
    profiled on their own bins, with the training snapshot's rolling null (or iid-only)."""
    reference = compute_profile(before.select(FEATURES))
    reference["temporal"] = (log_temporal(training, ROLLING, "rolling") if rolling_null
                             else {"reason": "iid-only"})
    return evaluate_window(reference, week, CFG, columns=FEATURES, size="7d")["drift"]


def test_the_snapshot_keeps_each_weeks_statistics_against_the_28_days_before_it(
        training: dict[str, Any]) -> None:
    rolling = training["temporal"]["rolling"]
    assert rolling["length"] == "28d" and "reason" not in rolling
    assert training["temporal"]["chunks"] == 51
    assert rolling["chunks"] == 51 - 4  # the first four weeks have no 28 days before them
    assert set(rolling["columns"]) == set(FEATURES)
    assert set(rolling["columns"]["temp"]) == set(NUMERIC_METHODS)
    assert set(rolling["columns"]["season"]) == {"psi", "jensen_shannon", "chisquare"}
    ks = rolling["columns"]["temp"]["ks"]
    assert len(ks) == 47 and ks == sorted(ks) and 0 < ks[0] < ks[-1] <= 1
    # a week against the month before it moves less than against the whole year
    assert np.median(ks) < np.median(training["temporal"]["columns"]["temp"]["ks"])


@pytest.mark.parametrize(("rolling", "window", "reason"), [
    ("10d", "7d", "a rolling 10d reference is measured in whole chunks of event time"),
    ("28d", "500rows", "a rolling 28d reference is measured in whole chunks of event time"),
    ("364d", "7d", "only 0 chunk(s) have a whole 364d of usable chunks before them"),
])
def test_a_span_the_chunks_cannot_measure_says_why(bike: pa.Table, tmp_path: Path,
                                                   rolling: str, window: str,
                                                   reason: str) -> None:
    profile = _profile(tmp_path, _between(bike, START, END), rolling, window)
    assert profile["temporal"]["rolling"]["reason"].startswith(reason)
    assert "columns" in profile["temporal"]  # the training null is unaffected


def test_ordinary_weeks_are_not_drift_against_the_weeks_before_them(
        bike: pa.Table, training: dict[str, Any]) -> None:
    """2012, out of sample: each week against its own 28 days before it."""
    raised = {"rolling null": 0, "iid-only": 0}
    weeks = list(_weeks(2012))
    for start, end in weeks:
        before = _between(bike, start - timedelta(days=28), start)
        week = _between(bike, start, end)
        drift = _judge(training, before, week)
        assert drift["temporal"]["applied"] is True and drift["temporal"]["window"] == "7d"
        raised["rolling null"] += drift["drifted"]
        raised["iid-only"] += _judge(training, before, week, rolling_null=False)["drifted"]
    assert len(weeks) == 46
    assert raised["iid-only"] >= 0.8 * len(weeks)  # measured 45 of 46
    assert raised["rolling null"] <= 0.1 * len(weeks)  # measured 3 of 46


def test_a_sudden_shift_is_still_flagged_against_the_weeks_before_it(
        bike: pa.Table, training: dict[str, Any]) -> None:
    """Every 2012 week with its hour moved +0.5 sd (3.5 h), the 28 days before it not."""
    sd = float(np.std(_between(bike, START, END).column("hr").to_numpy(), ddof=1))
    flagged = {"shifted": 0, "as logged": 0}
    weeks = list(_weeks(2012))
    for start, end in weeks:
        before = _between(bike, start - timedelta(days=28), start)
        week = _between(bike, start, end)
        moved = week.set_column(week.column_names.index("hr"), "hr",
                                pc.add(week.column("hr").cast(pa.float64()), 0.5 * sd))
        for key, table in (("shifted", moved), ("as logged", week)):
            drift = _judge(training, before, table)
            flagged[key] += any(c["column"] == "hr" and c["drifted"] for c in drift["columns"])
    assert flagged["as logged"] == 0
    assert flagged["shifted"] >= 0.4 * len(weeks)  # measured 27 of 46, one week each


def test_a_rolling_null_serves_only_its_own_span(training: dict[str, Any]) -> None:
    mine = log_temporal(training, ROLLING, "rolling")
    assert mine["window"] == "7d" and mine["chunks"] == 47 and mine["rolling"] == "28d"
    assert set(mine["columns"]) == set(FEATURES)
    other = log_temporal(training, RollingReference(rolling="14d"),  # type: ignore[arg-type]
                          "rolling")
    assert other == {"reason": "the training snapshot's rolling null is for 28d, this "
                               "reference is rolling 14d (the next training snapshot is "
                               "profiled for it)"}
    seasonal = log_temporal(training, SeasonalReference(seasonal="1y"),  # type: ignore[arg-type]
                             "seasonal")
    assert seasonal["reason"].startswith("the reference is seasonal traffic from the inference "
                                         "log")
    old = {k: v for k, v in training.items() if k != "temporal"}
    assert log_temporal(old, ROLLING, "rolling")["reason"].startswith(
        "the reference is rolling traffic")
    assert len(mine["columns"]["hr"]["ks"]) >= MIN_CHUNKS


def test_a_project_under_a_rolling_reference_profiles_its_snapshots_for_it(
        tmp_path: Path) -> None:
    from mloop.project import open_project

    config = BIKE.parents[1] / "mloop.yaml"
    (tmp_path / "data").symlink_to(BIKE.parent)
    text = config.read_text()
    (tmp_path / "mloop.yaml").write_text(text)
    assert open_project(tmp_path).snapshots.rolling is None
    assert "monitoring:\n  window: 7d\n" in text
    (tmp_path / "mloop.yaml").write_text(text.replace(
        "monitoring:\n  window: 7d\n", "monitoring:\n  window: 7d\n  reference: {rolling: 28d}\n"))
    assert open_project(tmp_path).snapshots.rolling == "28d"
