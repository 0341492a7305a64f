"""The multivariate check on the bike data: weeks whose columns are re-paired inside the week
(every marginal unchanged, the pairs new) are flagged while per-column drift is not; weeks of
the reference period left out of it are not; a reference without a time column is judged
against the iid bound alone and says so; old profiles and unusable windows are skipped with a
reason, never an error. Snapshots are stored and profiled by the real SnapshotStore."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mloop.config import MonitoringConfig
from mloop.data.joint_profile import SAMPLE_KEY
from mloop.data.snapshot import SnapshotStore
from mloop.monitoring.evaluate import evaluate_window
from mloop.monitoring.joint import check_joint, iid_threshold, joint_reference
from mloop.monitoring.report import joint_note
from mloop.storage import ObjectStore

from .bike_windows import BIKE, FEATURES
from .bike_windows import between as _between

# the demo's training period; weeks are epoch-aligned (Thursdays), as monitoring aligns them
START, END = datetime(2011, 1, 6), datetime(2011, 4, 7)
CFG = MonitoringConfig(window="7d")
RATE = CFG.false_alarm_rate


def _store(tmp: Path, table: pa.Table, *, time_column: str | None) -> tuple[SnapshotStore, str]:
    store = SnapshotStore(ObjectStore(str(tmp)), time_column=time_column, window="7d",
                          exclude=("cnt",))
    snap, _new = store.put(table, source="test")
    return store, snap.digest


def _reference(store: SnapshotStore, digest: str) -> Any:
    return joint_reference(store.profile(digest), store.joint_sample(digest))


def _judge(reference: Any, window: pa.Table) -> dict[str, Any]:
    return check_joint(reference, window, false_alarm_rate=RATE, size="7d", features=FEATURES)


def _weeks(table: pa.Table, start: datetime, end: datetime) -> list[pa.Table]:
    out, day = [], start
    while day + timedelta(days=7) <= end:
        week = _between(table, day, day + timedelta(days=7))
        if week.num_rows >= 100:
            out.append(week)
        day += timedelta(days=7)
    return out


def _repaired(week: pa.Table, column: str, seed: int = 0) -> pa.Table:
    """``column`` shuffled against the others within the week: its marginal unchanged."""
    order = np.random.default_rng(seed).permutation(week.num_rows)
    return week.set_column(week.column_names.index(column), column,
                           week.column(column).take(pa.array(order)))


@pytest.fixture(scope="module")
def bike() -> pa.Table:
    return pq.read_table(BIKE).drop_columns(["casual", "registered"])


@pytest.fixture(scope="module")
def weekly(bike: pa.Table, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[SnapshotStore, str]:
    return _store(tmp_path_factory.mktemp("joint"), _between(bike, START, END),
                  time_column="datetime")


def test_snapshot_keeps_the_joint_reference_beside_its_profile(
        weekly: tuple[SnapshotStore, str]) -> None:
    store, digest = weekly
    joint = store.profile(digest)["joint"]
    assert joint["method"] == "out_of_support_share"
    assert joint["columns"] == FEATURES  # neither the target nor the time column
    assert 0.005 <= joint["base_rate"] <= 0.02 and joint["radius"] > 0
    temporal = joint["temporal"]
    assert "reason" not in temporal and temporal["window"] == "7d"
    assert temporal["chunks"] == 13 and temporal["values"] == sorted(temporal["values"])
    sample = store.joint_sample(digest)
    assert sample is not None and sample.shape[0] == joint["sample_rows"] <= 5000
    assert store.objects.exists(f"{digest}/{SAMPLE_KEY}")


@pytest.fixture(scope="module")
def left_out(bike: pa.Table, tmp_path_factory: pytest.TempPathFactory
             ) -> list[tuple[pa.Table, dict[str, Any], Any]]:
    """Seven weeks of the reference period, each with the reference period stored without
    it (its profile and joint reference): a live week is never part of its reference."""
    tmp = tmp_path_factory.mktemp("left-out")
    out = []
    for n, week in enumerate(_weeks(bike, START, END)[::2][:7]):
        first = week.column("datetime")[0].as_py().replace(hour=0)
        rest = pa.concat_tables([_between(bike, START, first),
                                 _between(bike, first + timedelta(days=7), END)])
        store, digest = _store(tmp / str(n), rest, time_column="datetime")
        out.append((week, store.profile(digest), _reference(store, digest)))
    return out


def test_weeks_of_the_reference_period_left_out_of_it_are_not_flagged(
        left_out: list[tuple[pa.Table, dict[str, Any], Any]]) -> None:
    """The false-alarm share stays within the configured rate plus the slack of a handful
    of weeks (one false alarm in seven)."""
    flagged = []
    for week, _profile, reference in left_out:
        verdict = _judge(reference, week)
        assert verdict["temporal"]["applied"] and verdict["threshold_iid"] > 0
        flagged.append(verdict["drifted"])
    assert len(flagged) == 7
    assert np.mean(flagged) <= RATE + 1 / 7, f"flagged {sum(flagged)} of {len(flagged)}"


def test_re_paired_weeks_are_raised_while_per_column_drift_does_not_move(
        left_out: list[tuple[pa.Table, dict[str, Any], Any]]) -> None:
    """``atemp`` shuffled against ``temp`` within the week (hot hours that feel freezing):
    every marginal, so every per-column statistic and verdict, is exactly as it was; the
    out-of-support share rises in every week and crosses both thresholds in at least three
    of the seven (measured: four; the reference period's own week-to-week variation is wide,
    so a re-pairing inside a narrow week's temperatures is not always beyond it)."""
    raised = []
    for seed, (week, profile, reference) in enumerate(left_out):
        moved = _repaired(week, "atemp", seed)
        before = evaluate_window(profile, week, CFG, columns=FEATURES, size="7d")["drift"]
        after = evaluate_window(profile, moved, CFG, columns=FEATURES, size="7d")["drift"]
        assert after["drifted"] == before["drifted"]
        assert [c["score"] for c in after["columns"]] == \
            [c["score"] for c in before["columns"]]
        untouched, verdict = _judge(reference, week), _judge(reference, moved)
        assert verdict["value"] > untouched["value"]
        assert not untouched["drifted"] or verdict["drifted"]
        raised.append(verdict["drifted"] and not untouched["drifted"])
    assert sum(raised) >= 3, f"raised {sum(raised)} of {len(raised)} re-paired weeks"


def test_without_a_time_column_only_the_iid_bound_applies_and_holds(
        bike: pa.Table, tmp_path: Path) -> None:
    """Half the reference period's hours (at random) as the reference, windows of a week's
    size drawn at random from the other half: an iid window is flagged at about the rate."""
    period = _between(bike, START, END)
    rng = np.random.default_rng(1)
    half = rng.permutation(period.num_rows)
    store, digest = _store(tmp_path, period.take(pa.array(np.sort(half[::2]))),
                           time_column=None)
    reference = _reference(store, digest)
    assert "temporal" not in store.profile(digest)["joint"]
    other = period.take(pa.array(half[1::2]))
    flagged = []
    for _ in range(100):
        window = other.take(pa.array(rng.choice(other.num_rows, 168, replace=False)))
        verdict = check_joint(reference, window, false_alarm_rate=RATE, size="7d")
        assert verdict["threshold_temporal"] is None
        assert verdict["temporal"] == {"applied": False, "reason": "the reference has no "
                                       "time column: iid bound only"}
        flagged.append(verdict["drifted"])
    assert np.mean(flagged) <= RATE + 0.04, f"flagged {np.mean(flagged):.0%} of iid windows"


@pytest.mark.parametrize(("rows", "base_rate", "rate"),
                         [(168, 0.01, 0.01), (1000, 0.01, 0.05), (24, 0.02, 0.01),
                          (100_000, 0.013, 0.001)])
def test_iid_bound_is_the_binomial_quantile_at_the_base_rate(
        rows: int, base_rate: float, rate: float) -> None:
    from scipy.stats import binom

    assert iid_threshold(rows, base_rate, rate) == pytest.approx(
        binom.ppf(1 - rate, rows, base_rate) / rows)


def test_a_profile_stored_before_the_check_is_skipped_with_a_reason(
        bike: pa.Table, weekly: tuple[SnapshotStore, str]) -> None:
    store, digest = weekly
    old = {k: v for k, v in store.profile(digest).items() if k != "joint"}
    verdict = _judge(joint_reference(old, None), _weeks(bike, END, datetime(2011, 6, 1))[0])
    assert verdict["drifted"] is None and verdict["value"] is None
    assert "stored before the multivariate check existed" in verdict["skipped"]


def test_a_missing_sample_file_is_skipped_with_a_reason(
        weekly: tuple[SnapshotStore, str]) -> None:
    store, digest = weekly
    reference = joint_reference(store.profile(digest), None)
    assert reference == "the reference's encoded sample (joint_sample.npy) is missing"


def test_a_sample_of_another_shape_is_skipped_with_a_reason(
        weekly: tuple[SnapshotStore, str]) -> None:
    store, digest = weekly
    sample = store.joint_sample(digest)
    assert sample is not None
    reference = joint_reference(store.profile(digest), sample[:, :3])
    assert isinstance(reference, str) and "shape" in reference and "encoding" in reference


@pytest.mark.parametrize("drop", ["atemp", "weekday"])
def test_a_window_lacking_an_encoded_column_is_skipped_naming_it(
        bike: pa.Table, weekly: tuple[SnapshotStore, str], drop: str) -> None:
    store, digest = weekly
    week = _weeks(bike, END, datetime(2011, 6, 1))[0].drop_columns([drop])
    verdict = check_joint(_reference(store, digest), week, false_alarm_rate=RATE, size="7d")
    assert verdict["drifted"] is None and f"'{drop}'" in verdict["skipped"]


def test_a_window_of_another_size_gets_the_iid_bound_only_and_says_why(
        bike: pa.Table, weekly: tuple[SnapshotStore, str]) -> None:
    store, digest = weekly
    day = _between(bike, datetime(2011, 5, 2), datetime(2011, 5, 3))
    verdict = check_joint(_reference(store, digest), day, false_alarm_rate=RATE, size="1d")
    assert verdict["threshold_temporal"] is None and verdict["drifted"] is not None
    assert "chunked for 7d windows, this window is 1d" in verdict["temporal"]["reason"]


def test_an_empty_window_is_skipped(weekly: tuple[SnapshotStore, str], bike: pa.Table) -> None:
    store, digest = weekly
    verdict = _judge(_reference(store, digest), bike.slice(0, 0))
    assert verdict["drifted"] is None and verdict["skipped"] == "the window is empty"


def test_the_report_line_gives_the_share_and_both_thresholds_or_why_not(
        bike: pa.Table, weekly: tuple[SnapshotStore, str]) -> None:
    store, digest = weekly
    week = _weeks(bike, END, datetime(2011, 6, 1))[0]
    line = joint_note({"multivariate": _judge(_reference(store, digest), week)})
    assert "of rows outside the reference's joint support (iid threshold" in line
    assert "temporal threshold" in line
    day = _between(bike, datetime(2011, 5, 2), datetime(2011, 5, 3))
    iid = check_joint(_reference(store, digest), day, false_alarm_rate=RATE, size="1d")
    assert "chunked for 7d windows" in joint_note({"multivariate": iid})
    assert joint_note({"multivariate": _judge("no sample", week)}) == \
        "multivariate check skipped: no sample"
    assert "report written before it existed" in joint_note({})


def test_a_snapshot_copied_to_another_environment_keeps_its_joint_sample(
        weekly: tuple[SnapshotStore, str], tmp_path: Path) -> None:
    store, digest = weekly
    other = SnapshotStore(ObjectStore(str(tmp_path / "staging")))
    assert store.copy_to(other, digest)
    copied, original = other.joint_sample(digest), store.joint_sample(digest)
    assert copied is not None and original is not None
    assert np.array_equal(copied, original)
    assert isinstance(joint_reference(other.profile(digest), copied), type(
        _reference(store, digest)))
