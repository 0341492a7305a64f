"""``monitoring.reference`` (mloop.monitoring.reference): windows of real served traffic (the
rentals project's v1 through the inference-log writer) judged against the training profile,
the traffic just before them (``rolling``) or the same period a year earlier (``seasonal``,
falling back to training when the log does not reach back that far); bad values refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mloop.config import parse_config
from mloop.errors import ConfigError
from mloop.project import open_project

from .helpers import append_config, copy_project, log_traffic, rentals_frame

pytestmark = pytest.mark.slow


def _project(serving_registry: Path, folder: Path, reference: str | None) -> Path:
    folder.mkdir()
    root = copy_project(serving_registry, folder)
    if reference is not None:
        append_config(root, f"monitoring:\n  reference: {reference}\n")
    return root


def _day(n: int, seed: int, *, warm: float = 0.0) -> pd.DataFrame:
    frame = rentals_frame(n, seed=seed)
    frame["temp"] = frame["temp"] + warm
    return frame


def _by_day(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {w["start"][:10]: w for w in result["evaluated"]}


def test_rolling_reference_is_built_only_from_rows_before_the_window(
        serving_registry: Path, tmp_path: Path) -> None:
    from mloop.monitoring.reference import choose_reference
    from mloop.monitoring.service import reference_for

    project = open_project(_project(serving_registry, tmp_path / "p", "{rolling: 3d}"))
    for d in range(1, 5):
        log_traffic(project, _day(200, seed=d), f"2024-03-0{d}")
    start, end = datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 5, tzinfo=UTC)
    base = reference_for(project, 1)
    first = choose_reference(project, base, start, end)
    assert first.record == {"kind": "rolling", "length": "3d", "version": 1,
                            "since": "2024-03-01T00:00:00+00:00",
                            "until": "2024-03-04T00:00:00+00:00", "rows": 600,
                            "cached": False}
    assert first.reference.profile["rows"] == 600
    assert first.reference.profile["temporal"]["reason"].startswith(
        "the reference is rolling traffic from the inference log")  # judged iid-only
    assert first.reference.prediction_profile is not None

    # a heat wave inside the window, its first row at the window's very start: not read
    log_traffic(project, _day(200, seed=9, warm=15), "2024-03-04")
    again = choose_reference(project, base, start, end)
    assert again.record["cached"] is True
    for name in project.outputs.listdir("monitoring/reference"):
        project.outputs.delete(f"monitoring/reference/{name}")
    fresh = choose_reference(project, base, start, end)
    assert fresh.record["cached"] is False
    assert fresh.reference.profile == first.reference.profile
    assert fresh.reference.prediction_profile == first.reference.prediction_profile


def test_slow_drift_flagged_against_training_not_against_rolling_and_a_sudden_shift_by_both(
        serving_registry: Path, tmp_path: Path) -> None:
    """Half-day windows, so both references are judged on the iid calibration alone (the
    training profile's chunks are of 1d; a rolling reference never uses them): the
    comparison is of references, not of calibrations."""
    from mloop.monitoring.report import window_section
    from mloop.monitoring.service import run_monitor
    from mloop.monitoring.windows_store import get_window

    results = {}
    for name, reference in (("training", None), ("rolling", "{rolling: 3d}")):
        project = open_project(_project(serving_registry, tmp_path / name, reference))
        for d in range(1, 13):  # warming half a degree a day: 5.5 degrees (0.7 sd) by day 12
            log_traffic(project, _day(300, seed=d, warm=0.5 * (d - 1)), f"2024-03-{d:02d}")
        log_traffic(project, _day(300, seed=13, warm=5.5 + 15), "2024-03-13")  # sudden
        log_traffic(project, _day(5, seed=14), "2024-03-14")  # moves the watermark
        results[name] = {w["start"][:13]: w for w in
                         run_monitor(project, window="12h")["evaluated"]}
    training, rolling = results["training"], results["rolling"]
    assert training["2024-03-01T00"]["reference"]["kind"] == "training"
    assert rolling["2024-03-01T00"]["reference"]["fallback"].startswith(
        "the inference log holds 0 row(s)")
    late = [f"2024-03-{d:02d}T{h}" for d in range(10, 13) for h in ("00", "12")]
    assert [training[w]["drifted"] for w in late] == [True] * 6
    assert [rolling[w]["drifted"] for w in late] == [False] * 6
    assert [rolling[w]["reference"]["rows"] for w in late] == [900] * 6
    assert training["2024-03-13T00"]["drifted"] and rolling["2024-03-13T00"]["drifted"]
    page = window_section(get_window(project, rolling["2024-03-12T00"]["id"])["report"], "w")
    assert ("reference: rolling traffic, 900 rows logged from 2024-03-09T00:00:00+00:00 to "
            "2024-03-12T00:00:00+00:00") in page
    assert "the reference is rolling traffic from the inference log" in page  # iid only


@pytest.fixture(scope="module")
def seasonal(serving_registry: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, dict[str, Any]]:
    """Two springs of traffic under ``seasonal: 1y``: March 2023 (nothing a year before it)
    and March 2024, whose second day is as hot as the same day of 2023."""
    from mloop.monitoring.service import run_monitor

    root = _project(serving_registry, tmp_path_factory.mktemp("seasonal") / "p",
                    "{seasonal: 1y}")
    project = open_project(root)
    for year in (2023, 2024):
        log_traffic(project, _day(300, seed=year), f"{year}-03-01")
        log_traffic(project, _day(300, seed=year + 1, warm=15), f"{year}-03-02")
    log_traffic(project, _day(5, seed=1), "2024-03-03")
    return _by_day(run_monitor(project, window="1d"))


def test_seasonal_reference_falls_back_to_training_when_the_log_is_too_short(
        seasonal: dict[str, dict[str, Any]]) -> None:
    for day in ("2023-03-01", "2023-03-02"):
        ref = seasonal[day]["reference"]
        assert ref["kind"] == "training" and ref["requested"] == "seasonal 1y"
        assert ref["requested_since"].startswith(f"2022-{day[5:]}")
        assert "does not reach back that far" in ref["fallback"]
    assert seasonal["2023-03-02"]["drifted"]  # a hot day against training


def test_seasonal_reference_uses_the_same_period_a_year_earlier(
        seasonal: dict[str, dict[str, Any]]) -> None:
    hot = seasonal["2024-03-02"]
    assert hot["reference"]["kind"] == "seasonal"
    assert (hot["reference"]["since"], hot["reference"]["until"], hot["reference"]["rows"]) \
        == ("2023-03-02T00:00:00+00:00", "2023-03-03T00:00:00+00:00", 300)
    assert not hot["drifted"]  # as hot as last year's same day
    assert seasonal["2024-03-01"]["reference"]["kind"] == "seasonal"
    assert not seasonal["2024-03-01"]["drifted"]


def test_monitor_json_shows_each_windows_reference(serving_registry: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.cli.app import main

    root = _project(serving_registry, tmp_path / "p", "{seasonal: 1y}")
    project = open_project(root)
    log_traffic(project, _day(200, seed=1), "2024-03-01")
    log_traffic(project, _day(5, seed=2), "2024-03-02")
    capsys.readouterr()
    assert main(["-C", str(root), "monitor", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = out["evaluated"][0]["reference"]
    assert ref["kind"] == "training" and ref["requested"] == "seasonal 1y"
    assert "does not reach back" in ref["fallback"]
    assert out["reference"] == "seasonal 1y"
    log_traffic(project, _day(200, seed=3), "2024-03-02")
    log_traffic(project, _day(5, seed=4), "2024-03-03")
    assert main(["-C", str(root), "monitor"]) == 0  # the table says it, in words
    assert "1 window(s) judged against training instead of seasonal 1y" in \
        " ".join(capsys.readouterr().out.split())


BASE = "project: p\ndata: {path: d.parquet}\ntarget: y\nmonitoring:\n  reference: %s\n"


@pytest.mark.parametrize(("value", "message"), [
    ("rolling", r"expected training, \{rolling: 28d\} or \{seasonal: 1y\}, got \"rolling\""),
    ("{rolling: 28x}", r"rolling: '28x' is not a duration"),
    ("{rolling: 0d}", r"rolling: '0d' must be longer than zero"),
    ("{seasonal: 0y}", r"seasonal: '0y' is not a cycle"),
    ("{seasonal: yearly}", r"seasonal: 'yearly' is not a cycle"),
    ("{rolling: 28d, seasonal: 1y}", r"expected training, .* got \{\"rolling\": \"28d\", "),
    ("{weekly: 7d}", r"expected training, .* got \{\"weekly\": \"7d\"\}"),
])
def test_bad_reference_values_are_refused_naming_file_line_and_key(value: str,
                                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=r"^mloop\.yaml:5: 'monitoring\.reference': "
                       + message):
        parse_config(BASE % value)


@pytest.mark.parametrize(("value", "text"), [
    ("training", "training"), ("{rolling: 28d}", "rolling 28d"),
    ("{seasonal: 1y}", "seasonal 1y"), ("{seasonal: 364d}", "seasonal 364d")])
def test_reference_values_parse(value: str, text: str) -> None:
    ref = parse_config(BASE % value).monitoring.reference
    assert (ref if isinstance(ref, str) else ref.text) == text


def test_seasonal_years_keep_the_calendar_date() -> None:
    from mloop.config import SeasonalReference

    cycle = SeasonalReference(seasonal="1y")
    assert cycle.earlier(datetime(2024, 2, 29, 6, tzinfo=UTC)) == datetime(2023, 2, 28, 6,
                                                                            tzinfo=UTC)
    assert cycle.earlier(datetime(2024, 3, 2, tzinfo=UTC)) == datetime(2023, 3, 2, tzinfo=UTC)
