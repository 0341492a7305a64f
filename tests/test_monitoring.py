"""Drift and quality: calibration (false alarms on no-change windows), power (injected shifts
of stated sizes are caught), practical size, each quality check, the compare CLI, and the bike
data's 2011 -> 2012 change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from mloop.cli.app import main
from mloop.config import MonitoringConfig
from mloop.data.profile import compute_profile
from mloop.monitoring.evaluate import evaluate_window

REPO = Path(__file__).resolve().parents[1]
LEVELS = {"weather": ["Clear", "Mist", "Light Rain", "Heavy Rain", "Fog"],
          "station": [f"s{i:02d}" for i in range(12)],
          "route": [f"r{i:02d}" for i in range(40)]}


def population(n: int, rng: np.random.Generator, *, shift: dict | None = None) -> pa.Table:
    """Nine columns of different shapes: normal, skewed, discrete, bounded, heavy-tailed, and
    categoricals with 5, 12 and 40 levels. ``shift`` perturbs one aspect by a stated size."""
    shift = shift or {}
    temp = rng.normal(15 + shift.get("temp_mean", 0) * 8, 8 * shift.get("temp_scale", 1), n)
    cols = {
        "temp": temp,
        "income": rng.lognormal(10, 0.6, n),
        "hum": rng.integers(20, 100, n).astype(float),  # discrete, many ties
        "share": rng.beta(2, 5, n),
        "wait": rng.standard_t(3, n) * 2 + 10,
        "count": rng.poisson(4, n).astype(float),
    }
    for name, levels in LEVELS.items():
        w = np.linspace(3, 1, len(levels))
        w = w / w.sum()
        if name == "weather" and "weather_boost" in shift:
            w = w * (1 - shift["weather_boost"])
            w[-1] += shift["weather_boost"]  # a rare level becomes common
        cols[name] = rng.choice(levels, size=n, p=w)
    table = pa.table(cols)
    if "missing_temp" in shift:
        mask = rng.random(n) < shift["missing_temp"]
        table = table.set_column(0, "temp", pa.array(np.where(mask, np.nan, temp),
                                                     from_pandas=True))
    return table


@pytest.fixture(scope="module")
def profile() -> dict:
    return compute_profile(population(20_000, np.random.default_rng(0)))


CFG = MonitoringConfig()


def _verdicts(report: dict) -> dict[str, bool]:
    return {c["column"]: c["drifted"] for c in report["drift"]["columns"]}


def test_no_change_windows_stay_under_the_false_alarm_rate(profile: dict) -> None:
    rng = np.random.default_rng(1)
    cache: dict = {}
    alarms = 0
    windows = 300
    for i in range(windows):
        report = evaluate_window(profile, population(2_000, rng), CFG, null_cache=cache,
                                 seed=i)
        alarms += report["drift"]["drifted"]
    # configured 1%: expect ~3 of 300; P(binomial(300, 0.01) >= 8) < 0.5%
    assert alarms <= 7, f"{alarms} false alarms in {windows} no-change windows"


@pytest.mark.parametrize(("shift", "column"), [
    ({"temp_mean": 0.25}, "temp"),          # mean moved by a quarter of a standard deviation
    ({"temp_scale": 1.6}, "temp"),          # spread 60% wider
    ({"weather_boost": 0.12}, "weather"),   # 12 points of probability to a rare level
])
def test_injected_shifts_of_a_stated_size_are_detected(profile: dict, shift: dict,
                                                       column: str) -> None:
    rng = np.random.default_rng(2)
    cache: dict = {}
    hits, others = 0, 0
    for i in range(20):
        v = _verdicts(evaluate_window(profile, population(5_000, rng, shift=shift), CFG,
                                      null_cache=cache, seed=i))
        hits += v[column]
        others += sum(flag for c, flag in v.items() if c != column)
    assert hits >= 19, f"{column} drift caught in {hits}/20 windows"
    assert others <= 1, "unshifted columns were flagged"


def test_a_tiny_shift_in_a_huge_window_is_significant_but_not_practical(profile: dict) -> None:
    rng = np.random.default_rng(3)
    report = evaluate_window(profile, population(400_000, rng, shift={"temp_mean": 0.03}), CFG,
                             columns=["temp"])
    col = report["drift"]["columns"][0]
    assert col["p_value"] < 0.01  # a real shift, measurably
    assert col["score"] < col["min_effect"] and not col["drifted"]  # but too small to matter
    big = evaluate_window(profile, population(400_000, rng, shift={"temp_mean": 0.5}), CFG,
                          columns=["temp"])
    assert big["drift"]["columns"][0]["drifted"]


def test_quality_findings_name_column_check_count_and_examples(profile: dict) -> None:
    rng = np.random.default_rng(4)
    window = population(3_000, rng, shift={"missing_temp": 0.3})
    window = window.drop_columns(["share"])  # a column gone
    hum = pc.cast(window.column("hum"), pa.string()).to_pylist()
    hum[:40] = ["n/a"] * 40  # text in a numeric column
    window = window.set_column(window.column_names.index("hum"), "hum", pa.array(hum))
    income = window.column("income").to_numpy().copy()
    income[:90] = 1e9  # far outside the reference range
    window = window.set_column(window.column_names.index("income"), "income", pa.array(income))
    weather = window.column("weather").to_pylist()
    weather[:60] = ["Tornado"] * 60  # a category the reference never had
    window = window.set_column(window.column_names.index("weather"), "weather",
                               pa.array(weather))
    report = evaluate_window(profile, window, CFG)
    found = {(f["column"], f["check"]): f for f in report["quality"]}
    assert found[("share", "missing_column")]["count"] == 3_000
    assert found[("hum", "type_error")]["count"] == 40
    assert found[("hum", "type_error")]["examples"] == ["n/a"]
    assert found[("income", "out_of_range")]["count"] == 90
    assert found[("income", "out_of_range")]["examples"] == [1e9]
    assert found[("weather", "unseen_category")]["examples"] == ["Tornado"]
    assert 0.25 < found[("temp", "missing_rate")]["rate"] < 0.35
    assert "share" not in _verdicts(report)  # not comparable, so not in the drift verdicts
    assert {"hum", "income", "temp", "weather"} <= set(_verdicts(report))


def test_an_empty_window_is_reported_as_empty(profile: dict) -> None:
    report = evaluate_window(profile, population(0, np.random.default_rng(5)), CFG)
    assert report["empty"] and report["rows"] == 0 and report["drift"] is None


def test_compare_cli_on_the_bike_data_flags_2012_and_not_a_random_half_of_2011(
        tmp_path: Path, capsys) -> None:
    import pyarrow.parquet as pq

    bike = pq.read_table(REPO / "examples" / "bike_sharing" / "data" / "bike_hourly.parquet")
    year = pc.year(bike.column("datetime"))
    y2011 = bike.filter(pc.equal(year, 2011))
    y2012 = bike.filter(pc.equal(year, 2012))
    rng = np.random.default_rng(6)
    half = rng.random(y2011.num_rows) < 0.5
    a, b = y2011.filter(pa.array(half)), y2011.filter(pa.array(~half))
    for name, t in (("a", a), ("b", b), ("y2012", y2012)):
        pq.write_table(t, tmp_path / f"{name}.parquet")
    assert main(["monitor", "compare", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                 "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["drift"]["drifted"] is False, [
        c for c in same["drift"]["columns"] if c["drifted"]]
    assert main(["monitor", "compare", str(tmp_path / "a.parquet"),
                 str(tmp_path / "y2012.parquet"), "--json"]) == 0
    changed = json.loads(capsys.readouterr().out)
    flagged = {c["column"] for c in changed["drift"]["columns"] if c["drifted"]}
    assert {"cnt", "registered"} <= flagged
    assert main(["monitor", "compare", str(tmp_path / "a.parquet"),
                 str(tmp_path / "missing.parquet")]) == 1
    assert "missing.parquet: no such file" in capsys.readouterr().err


def test_compare_html_report_renders_its_plots_in_chromium(profile: dict, tmp_path: Path
                                                           ) -> None:
    import pyarrow.parquet as pq

    from .browser import is_blank, render

    rng = np.random.default_rng(7)
    pq.write_table(population(5_000, rng), tmp_path / "ref.parquet")
    shifted = population(5_000, rng, shift={"temp_mean": 0.5})
    pq.write_table(shifted, tmp_path / "cur.parquet")
    page = tmp_path / "drift.html"
    assert main(["monitor", "compare", str(tmp_path / "ref.parquet"),
                 str(tmp_path / "cur.parquet"), "--html", str(page), "--json"]) == 0
    text = page.read_text()
    import re

    assert "<script" not in text  # nothing runs, nothing is fetched when viewed
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    dom, console, shot = render(page, tmp_path)
    assert dom.count("<svg") == 9  # one distribution plot per column
    assert "temp: wasserstein" in dom and "drift" in dom
    assert not [line for line in console if "rror" in line], console
    assert not is_blank(shot)


_DESCRIPTION = "Plots and numbers: `mloop monitor report --html monitoring.html`"
_SERIES = {"mloop_monitor_drifted": "0 0 1 1 1", "mloop_monitor_metric_value": "10 10 10 14 14",
           "mloop_monitor_reference_metric": "10 10 10 10 10",
           # the label-free estimate: worse by 20% from 2m, no longer calibrated from 4m
           "mloop_monitor_estimated_metric_value": "10 10 12 12 12",
           "mloop_monitor_estimate_reference_metric": "10 10 10 10 10",
           "mloop_monitor_estimate_calibrated": "1 1 1 1 0"}
PROMTOOL_TEST = {
    "rule_files": ["alerts.yml"], "evaluation_interval": "1m",
    "tests": [{
        "interval": "1m",
        "input_series": [*({"series": f'{name}{{model="rentals", window="1d"}}', "values": v}
                           for name, v in _SERIES.items()),
                         {"series": "mloop_inference_log_quarantined_segments",
                          "values": "0 0 0 1 1"}],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "MloopDatasetDrift", "exp_alerts": []},
            {"eval_time": "3m", "alertname": "MloopDatasetDrift", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "model": "rentals", "window": "1d"},
                "exp_annotations": {"summary": "Input drift on rentals: 1 (newest window)",
                                    "description": _DESCRIPTION}}]},
            {"eval_time": "4m", "alertname": "MloopPerformanceDegraded", "exp_alerts": [{
                "exp_labels": {"severity": "critical", "model": "rentals", "window": "1d"},
                "exp_annotations": {"summary": "mae of rentals on labelled traffic is more "
                                               "than 10% worse than its holdout value",
                                    "description": _DESCRIPTION}}]},
            {"eval_time": "1m", "alertname": "MloopEstimatedPerformanceDegraded",
             "exp_alerts": []},
            {"eval_time": "3m", "alertname": "MloopEstimatedPerformanceDegraded",
             "exp_alerts": [{
                 "exp_labels": {"severity": "warning", "model": "rentals", "window": "1d"},
                 "exp_annotations": {"summary": "mae of rentals estimated without labels is "
                                                "more than 10% worse than its holdout value "
                                                "(a calibrated estimate)",
                                     "description": _DESCRIPTION}}]},
            {"eval_time": "4m", "alertname": "MloopEstimatedPerformanceDegraded",
             "exp_alerts": []},  # an uncalibrated estimate does not alert
            {"eval_time": "2m", "alertname": "MloopInferenceLogQuarantine", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "MloopInferenceLogQuarantine", "exp_alerts": [{
                "exp_labels": {"severity": "warning", "model": "rentals"},
                "exp_annotations": {"summary": "Inference-log rows or segments could not be "
                                               "stored or read and were set aside in the "
                                               "log's quarantine folder (see `mloop events "
                                               "--type log.`)",
                                    "description": _DESCRIPTION}}]},
        ]}],
}


def test_promtool_accepts_the_rules_and_they_fire_on_the_metrics(make_project, tmp_path: Path
                                                                 ) -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install -y prometheus (.ci/run does this)"
    root = make_project()
    assert main(["-C", str(root), "monitor", "rules", "--out",
                 str(tmp_path / "alerts.yml")]) == 0
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "alerts.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 13 rules found" in check.stdout
    import yaml

    (tmp_path / "test.yml").write_text(yaml.safe_dump(PROMTOOL_TEST))
    run = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert main(["-C", str(root), "monitor", "dashboard", "--out",
                 str(tmp_path / "grafana.json")]) == 0
    board = json.loads((tmp_path / "grafana.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert 'mloop_monitor_drift_share{model="rentals"}' in exprs
    assert any("mloop_request_latency_seconds_bucket" in e for e in exprs)


def test_the_webhook_is_retried_until_the_receiver_takes_it() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mloop.config import WebhookConfig
    from mloop.monitoring.alerts import post_webhook

    received: list[dict] = []
    statuses = [503, 500, 200]

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(statuses.pop(0))
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        cfg = WebhookConfig(url=url, retries=3, backoff_seconds=0.01)
        result = post_webhook(cfg, {"model": "rentals", "reasons": ["input drift"]})
        assert result == {"delivered": True, "status": 200, "attempts": 3}
        assert len(received) == 3 and received[-1]["reasons"] == ["input drift"]
    finally:
        server.shutdown()
    down = post_webhook(WebhookConfig(url=url, retries=1, backoff_seconds=0.01), {"x": 1})
    assert down["delivered"] is False and down["attempts"] == 2


def test_a_flag_column_moving_from_30_to_90_percent_drifts() -> None:
    rng = np.random.default_rng(8)
    prof = compute_profile(pa.table({"flag": (rng.random(5000) < 0.3).astype(float),
                                     "level": rng.integers(0, 3, 5000).astype(float)}))
    assert prof["columns"]["flag"]["bin_edges"] == [0.0, 0.5, 1.0]  # one bin per value
    window = pa.table({"flag": (rng.random(2000) < 0.9).astype(float),
                       "level": rng.integers(0, 3, 2000).astype(float)})
    assert _verdicts(evaluate_window(prof, window, CFG)) == {"flag": True, "level": False}


def test_a_few_unseen_categories_are_a_quality_finding_not_drift(profile: dict) -> None:
    rng = np.random.default_rng(9)
    window = population(200, rng)
    weather = window.column("weather").to_pylist()
    weather[:3] = ["Tornado"] * 3  # 1.5%: over the 1% quality threshold
    window = window.set_column(window.column_names.index("weather"), "weather",
                               pa.array(weather))
    report = evaluate_window(profile, window, CFG)
    assert _verdicts(report)["weather"] is False
    assert [f["check"] for f in report["quality"] if f["column"] == "weather"] == [
        "unseen_category"]


def test_a_windows_traffic_counts_requests_not_rows_and_their_latency_quantiles() -> None:
    from mloop.monitoring.service import traffic_summary

    # three requests: one of 3 rows (one log entry: one _ts, one latency), two of one row
    window = pa.table({"_ts": [1.0, 1.0, 1.0, 2.0, 3.0], "_request_id": list("abcde"),
                       "_latency_ms": [9.0, 9.0, 9.0, 1.0, 5.0]})
    out = traffic_summary(window)
    assert out["requests"] == 3
    assert out["latency_ms"]["p50"] == 5.0  # per request: 1, 5, 9 (per row it would be 9)
    assert out["latency_ms"]["p99"] == pytest.approx(float(np.percentile([1, 5, 9], 99)))
    assert traffic_summary(window.slice(0, 0)) == {"requests": None, "latency_ms": None}
