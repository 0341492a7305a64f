"""Temporal calibration of drift on the bike data: days from inside a time-ordered training
period are not drift (they were, judged iid-only), real shifts still are, a reference without
a time column keeps the iid verdicts, and a report carries each threshold or says why one is
missing. Snapshots are stored and profiled by the real SnapshotStore on real files."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from mloop.config import MonitoringConfig
from mloop.data.snapshot import SnapshotStore
from mloop.data.temporal_profile import MIN_CHUNKS
from mloop.monitoring.drift import ColumnReference, detect
from mloop.monitoring.evaluate import evaluate_window
from mloop.monitoring.temporal import TemporalNull
from mloop.storage import ObjectStore

from .bike_windows import BIKE, FEATURES
from .bike_windows import between as _between

START, END = datetime(2011, 1, 1), datetime(2011, 4, 8)  # the demo's training period
CFG = MonitoringConfig(window="1d")


@pytest.fixture(scope="module")
def bike() -> pa.Table:
    return pq.read_table(BIKE).drop_columns(["casual", "registered"])


def _profile(tmp: Path, table: pa.Table, *, time_column: str | None,
             window: str = "1d") -> dict[str, Any]:
    store = SnapshotStore(ObjectStore(str(tmp)), time_column=time_column, window=window)
    snap, _new = store.put(table, source="test")
    return store.profile(snap.digest)


@pytest.fixture(scope="module")
def profiles(bike: pa.Table, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, dict[str, Any]]:
    """The training period profiled with daily chunks, with weekly ones (the demo's window),
    and without a time column (iid)."""
    ref = _between(bike, START, END)
    tmp = tmp_path_factory.mktemp("temporal")
    return {"temporal": _profile(tmp / "t", ref, time_column="datetime"),
            "weekly": _profile(tmp / "w", ref, time_column="datetime", window="7d"),
            "iid": _profile(tmp / "i", ref, time_column=None)}


def _days(bike: pa.Table) -> list[pa.Table]:
    out, day = [], START
    while day < END:
        part = _between(bike, day, day + timedelta(days=1))
        if part.num_rows >= 20:
            out.append(part)
        day += timedelta(days=1)
    return out


def _judge(profile: dict[str, Any], window: pa.Table, size: str | None = "1d", *,
           cache: dict | None = None) -> dict[str, Any]:
    cfg = CFG.model_copy(update={"window": size or "1d"})
    return evaluate_window(profile, window, cfg, columns=FEATURES, size=size,
                           null_cache=cache)["drift"]


def test_snapshot_profile_keeps_daily_chunk_statistics_of_the_training_period(
        profiles: dict[str, dict[str, Any]]) -> None:
    temporal = profiles["temporal"]["temporal"]
    assert temporal["window"] == "1d" and temporal["by"] == "time"
    assert "reason" not in temporal
    # 97 days, a few of them (the data's gaps) under the half-median rule
    assert 85 <= temporal["chunks"] <= 97
    assert set(temporal["columns"]["temp"]) == {"psi", "ks", "wasserstein",
                                                "jensen_shannon", "chisquare"}
    assert set(temporal["columns"]["weathersit"]) == {"psi", "jensen_shannon", "chisquare"}
    ks = temporal["columns"]["temp"]["ks"]
    assert ks == sorted(ks) and len(ks) <= 101
    assert "temporal" not in profiles["iid"]


def test_days_inside_the_training_period_drift_iid_but_not_against_its_own_variation(
        bike: pa.Table, profiles: dict[str, dict[str, Any]]) -> None:
    days = _days(bike)
    cache: dict = {}  # the iid null of a 24-row window, simulated once for every day
    iid = [_judge(profiles["iid"], d, cache=cache)["drifted"] for d in days]
    temporal = [_judge(profiles["temporal"], d, cache=cache)["drifted"] for d in days]
    assert len(days) >= 90
    # iid: the weather of one day is never a random draw of the season's hours
    assert np.mean(iid) >= 0.9, f"iid-only flagged {np.mean(iid):.0%} of the days"
    # each column at the 1% rate against the reference period's own day-to-day variation
    assert np.mean(temporal) <= 0.1, f"temporal flagged {np.mean(temporal):.0%} of the days"


@pytest.mark.parametrize("shift", ["temp +3 sd", "weathersit Light Rain +40 points"])
def test_a_real_shift_is_still_flagged_with_temporal_calibration(
        bike: pa.Table, profiles: dict[str, dict[str, Any]], shift: str) -> None:
    """At the demo's weekly windows. (One day of hourly weather varies so much that a day
    with 40 points more rain is an ordinary rainy day of the period, and a day's temperatures
    sit together so a daily KS saturates near 1: daily windows need a larger shift.)"""
    profile = profiles["weekly"]
    week = _between(bike, datetime(2011, 3, 7), datetime(2011, 3, 14))
    column = shift.split()[0]
    if column == "temp":
        moved = pc.add(week.column("temp"), 3 * profile["columns"]["temp"]["std"])
    else:
        values = np.asarray(week.column(column).to_pylist(), dtype=object)
        before = np.mean(values == "Light Rain")
        others = np.flatnonzero(values != "Light Rain")
        chosen = np.random.default_rng(0).choice(others, size=round(0.4 * week.num_rows),
                                                 replace=False)
        values[chosen] = "Light Rain"
        assert np.mean(values == "Light Rain") - before == pytest.approx(0.4, abs=0.01)
        moved = pa.array(values.tolist(), week.schema.field(column).type)
    assert not _judge(profile, week, "7d")["drifted"]  # the week as it was
    report = _judge(profile, week.set_column(week.column_names.index(column), column, moved),
                    "7d")
    assert report["temporal"]["applied"] is True
    col = next(c for c in report["columns"] if c["column"] == column)
    assert col["drifted"], col
    assert col["score"] > col["temporal_threshold"] > 0
    assert col["score"] > col["threshold"]


def test_without_a_time_column_the_verdicts_are_the_iid_ones(
        bike: pa.Table, profiles: dict[str, dict[str, Any]]) -> None:
    profile = profiles["iid"]
    day = _between(bike, datetime(2011, 2, 10), datetime(2011, 2, 11))
    report = _judge(profile, day)
    assert report["temporal"]["applied"] is False
    assert "no time column" in report["temporal"]["reason"]
    assert all(c["temporal_threshold"] is None for c in report["columns"])
    refs = [ColumnReference.from_profile(c, profile["columns"][c]) for c in FEATURES]
    windows = {r.name: r.bin(day.column(r.name))[0] for r in refs if r is not None}
    plain = detect([r for r in refs if r is not None], windows,
                   false_alarm_rate=CFG.false_alarm_rate, seed=0)
    assert [c["drifted"] for c in report["columns"]] == [c.drifted for c in plain.columns]
    assert report["drifted"] == plain.drifted


def test_the_report_carries_both_thresholds_of_every_column(
        bike: pa.Table, profiles: dict[str, dict[str, Any]]) -> None:
    report = _judge(profiles["temporal"], _between(bike, datetime(2011, 3, 1),
                                                   datetime(2011, 3, 2)))
    assert report["temporal"]["applied"] is True
    assert report["temporal"]["window"] == "1d"
    assert report["temporal"]["chunks"] >= MIN_CHUNKS
    for c in report["columns"]:
        assert c["threshold"] > 0, c["column"]  # iid
        assert c["temporal_threshold"] is not None and c["temporal_threshold"] > 0, c["column"]


def test_a_window_of_another_size_is_judged_iid_only_and_says_why(
        bike: pa.Table, profiles: dict[str, dict[str, Any]]) -> None:
    week = _between(bike, datetime(2011, 3, 7), datetime(2011, 3, 14))
    report = _judge(profiles["temporal"], week, size="7d")
    assert report["temporal"]["applied"] is False
    assert "chunked for 1d windows, this window is 7d" in report["temporal"]["reason"]
    assert all(c["temporal_threshold"] is None for c in report["columns"])
    # the same size written differently is the same chunk size
    day = _between(bike, datetime(2011, 3, 7), datetime(2011, 3, 8))
    assert _judge(profiles["temporal"], day, size="24h")["temporal"]["applied"] is True


def test_too_few_chunks_keep_no_temporal_null_and_the_report_says_so(
        bike: pa.Table, tmp_path: Path) -> None:
    ref = _between(bike, START, START + timedelta(days=50))
    profile = _profile(tmp_path, ref, time_column="datetime", window="7d")
    assert profile["temporal"]["chunks"] < MIN_CHUNKS
    assert "columns" not in profile["temporal"]
    week = _between(bike, datetime(2011, 1, 10), datetime(2011, 1, 17))
    report = _judge(profile, week, size="7d")
    assert report["temporal"]["applied"] is False
    assert "usable 7d chunk(s)" in report["temporal"]["reason"]
    assert f"({MIN_CHUNKS} needed)" in report["temporal"]["reason"]


def test_row_windows_chunk_the_reference_by_rows_in_time_order(
        bike: pa.Table, tmp_path: Path) -> None:
    ref = _between(bike, START, END)
    shuffled = ref.take(np.random.default_rng(0).permutation(ref.num_rows))
    profile = _profile(tmp_path, shuffled, time_column="datetime", window="100rows")
    temporal = profile["temporal"]
    assert temporal["by"] == "rows"
    assert temporal["chunks"] == ref.num_rows // 100  # the partial last chunk left out
    # chunks follow time, not the stored row order: the weather of consecutive hours moves
    # together, so they vary far more than 100 random rows would
    iid = _judge(_profile(tmp_path / "iid", shuffled, time_column=None), ref[:100],
                 size="100rows")
    temp_iid = next(c for c in iid["columns"] if c["column"] == "temp")["threshold"]
    assert TemporalNull(np.asarray(temporal["columns"]["temp"]["ks"]),
                        temporal["chunks"]).threshold(0.01) > 2 * temp_iid


def test_a_rate_finer_than_the_chunks_resolve_is_extrapolated_beyond_the_largest() -> None:
    values = np.sort(np.random.default_rng(0).exponential(1.0, 20))
    null = TemporalNull(values, 20)
    assert null.threshold(0.1) == pytest.approx(np.quantile(values, 0.9))
    assert null.threshold(0.001) > null.threshold(0.01) > values.max() * 0.9
    assert null.threshold(0.001) > values.max()
