"""The detection-quality benchmark (benchmarks/monitoring_quality.py): its windows, injected
shifts and trial counting, and a ``--quick`` run end to end without NannyML (whose venv the
full run needs). The published figures come from the full run, not from here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "monitoring_quality.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_monitoring_quality", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def _bike() -> pa.Table:
    return pq.read_table(REPO / "examples" / "bike_sharing" / "data" / "bike_hourly.parquet")


def test_reference_windows_are_the_whole_epoch_aligned_weeks_inside_the_period() -> None:
    table = bench._whole_windows(_bike(), "datetime", "2011-01-01", "2012-01-01")
    weeks = sorted(set(table.column("__window").to_pylist()))
    # 1970-01-01 was a Thursday: whole weeks of 2011 run from Thu 6 Jan to Wed 28 Dec
    assert len(weeks) == 51
    first, last = pc.min_max(table.column("datetime")).values()
    assert first.as_py().isoformat() == "2011-01-06T00:00:00"
    assert last.as_py() < datetime(2011, 12, 29)


def test_share_shift_moves_twenty_points_of_every_window_to_the_level() -> None:
    table = bench._whole_windows(_bike(), "datetime", "2011-01-01", "2011-03-01")
    shifted = bench._shift_share(table, "weathersit", "Mist", seed=1)
    for w in set(table.column("__window").to_pylist()):
        rows = pc.equal(table.column("__window"), w)
        before = table.filter(rows).column("weathersit").to_pylist()
        after = shifted.filter(rows).column("weathersit").to_pylist()
        gained = after.count("Mist") - before.count("Mist")
        assert gained == round(0.2 * len(before))
        # only rows of other levels were moved, each to the level
        assert all(a == b or a == "Mist" for a, b in zip(after, before, strict=True))


def test_a_trial_is_detected_when_the_column_drifts_in_its_onset_week_or_the_next() -> None:
    rows = [{"key": f"2011-01-{d:02d}", "alerted": alerted} for d, alerted in
            [(6, []), (13, ["hum"]), (20, ["temp"]), (27, []), (3, ["hum"])]]
    rows[-1]["key"] = "2011-02-03"
    result = bench._detection(rows, "hum")
    # onsets 6, 13, 20, 27 Jan: weeks (6,13) yes, (13,20) yes, (20,27) no, (27,3 Feb) yes
    assert (result["detected"], result["trials"]) == (3, 4)
    assert result["single_window"] == pytest.approx(2 / 5)


@pytest.mark.slow
def test_quick_run_judges_windows_with_temporal_calibration_and_records_them(
        tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--results", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Targets" in proc.stdout and "false alarms inside the reference" in proc.stdout
    results = json.loads(out.read_text())
    bike = results["datasets"]["bike"]
    meta, ml, agg = bike["meta"], bike["mloop"], bike["aggregate"]
    assert meta["reference_windows"] == 12 and not bike["nannyml"]
    assert ml["temporal_profile"]["chunks"] == 12 and "reason" not in ml["temporal_profile"]
    temporal = ml["temporal"]["verdicts"]
    assert all(r["temporal_applied"] for rows in temporal.values() for r in rows)
    assert not any(r["temporal_applied"] for rows in ml["iid"]["verdicts"].values()
                   for r in rows)
    # the temporal null only ever removes verdicts the iid one gave
    for key, rows in temporal.items():
        for t, i in zip(rows, ml["iid"]["verdicts"][key], strict=True):
            assert set(t["alerted"]) <= set(i["alerted"])
    inside = agg["periods"]["mloop temporal"]["inside"]
    assert inside["windows"] == 12
    assert inside["share"] <= agg["periods"]["mloop iid-only"]["inside"]["share"]
    pooled = agg["detection"]["mloop temporal"]["pooled"]
    assert {k: v["trials"] for k, v in pooled.items()} == {"mean +0.5 sd": 11,
                                                           "share +20 points": 11}
    # the multivariate check: one verdict per week, both thresholds, beside the per-column ones
    joint = ml["multivariate"]
    assert joint["profile"]["temporal"]["chunks"] == 12
    weeks = [r for rows in joint["verdicts"].values() for r in rows]
    assert len(weeks) == 15 and all(r["skipped"] is None for r in weeks)
    assert all(r["threshold_iid"] > 0 and r["threshold_temporal"] is not None for r in weeks)
    assert agg["periods"]["mloop multivariate"]["later"]["windows"] == 3
    assert "mloop multivariate" in proc.stdout
    # the rolling side: weeks with 28 days before them; 12 weeks leave 8 chunks with a whole
    # 28 days before them, too few for a rolling null, so they are judged iid-only, saying so
    rolling = ml["rolling"]
    assert rolling["null"]["reason"].startswith("only 8 chunk(s) have a whole 28d")
    assert agg["periods"]["mloop rolling 28d"]["inside"]["windows"] == 12 - 4
    assert not any(r["temporal_applied"] for rows in rolling["verdicts"].values() for r in rows)
    assert {t["trials"] for t in rolling["trials"].values()} == {12 - 4 - 1}
    # how detectable each shift is: 12 weeks leave 12 - 4 - 1 probe trials per column
    dt = bike["detectability"]
    assert set(dt) == {"hum", "weathersit"} and "how detectable each shift is" in proc.stdout
    assert all(v["probe"]["trials"] == 7 and v["week_to_week_sd"] > 0 for v in dt.values())
    assert results["git"]["commit"] and np.isfinite(results["total_s"])


def _weekly_file(path: Path, means: list[float], levels: list[str]) -> None:
    """Hourly rows, one week per mean: x ~ N(mean, 1), c cycling through ``levels``."""
    rng = np.random.default_rng(7)
    start = datetime(2021, 1, 7)  # a Thursday: epoch-aligned 7-day windows start on one
    rows = len(means) * 7 * 24
    ts = pa.array(np.datetime64(start) + np.arange(rows).astype("timedelta64[h]"))
    x = np.concatenate([rng.normal(m, 1.0, 7 * 24) for m in means])
    c = [levels[i % len(levels)] for i in range(rows)]
    pq.write_table(pa.table({"t": ts, "x": x, "c": c}), path)


def test_detectability_tells_a_shift_beyond_the_weekly_noise_from_one_inside_it(
        tmp_path: Path) -> None:
    detectability = bench.detectability
    weekly = [float(v) for v in np.random.default_rng(1).normal(0, 0.1, 20)]  # calm weeks
    _weekly_file(tmp_path / "reference.parquet", weekly, ["a", "b"])
    _weekly_file(tmp_path / "big.parquet", [m + 2.0 for m in weekly], ["a", "b"])
    _weekly_file(tmp_path / "small.parquet", [m + 0.02 for m in weekly], ["a", "b"])
    meta = {"time_column": "t", "window_days": 7, "reference": "reference.parquet",
            "shifts": [{"file": "big.parquet", "column": "x", "kind": "mean +0.5 sd",
                        "detail": "+2.0 (sd 4.0)"}]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    big = detectability(tmp_path)["x"]
    assert big["ratio"] > 10 and big["mean_test_power_5pct"] > 0.99
    assert big["probe"]["share"] == 1.0 and big["probe"]["trials"] == 20 - 4 - 1
    meta["shifts"][0].update(file="small.parquet", detail="+0.02 (sd 4.0)")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    small = detectability(tmp_path)["x"]
    assert small["ratio"] < 1 and small["mean_test_power_5pct"] < 0.3
    assert small["probe"]["share"] < 0.5
