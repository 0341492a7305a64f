"""The monitor over served traffic (mloop.monitoring.service): each complete window of the
inference log evaluated once, late labels re-scoring their window, windows by rows, the HTML
report in a real browser, the CLI's refusals, and a drifting window alerting a webhook and
showing on the server's /metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mloop.cli.app import main
from mloop.project import open_project
from mloop.security.audit import list_events

from .helpers import copy_project, log_traffic, rentals_frame
from .serving_util import metric, project_server

pytestmark = pytest.mark.slow


@pytest.fixture
def proj(serving_registry: Path, tmp_path: Path) -> Path:
    return copy_project(serving_registry, tmp_path)


def test_monitor_evaluates_each_new_day_once_and_rescores_late_labels(proj: Path) -> None:
    from mloop.monitoring.service import run_monitor
    from mloop.monitoring.windows_store import list_windows
    from mloop.serving.model import load_served
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    project = open_project(proj)
    same1, same2 = rentals_frame(600, seed=21), rentals_frame(600, seed=22)
    hot = rentals_frame(600, seed=23)
    hot["temp"] = hot["temp"] + 15  # a heat wave: temperature shifted by ~2 sd
    ids1 = log_traffic(project, same1, "2024-03-01")
    ids2 = log_traffic(project, same2, "2024-03-02")
    log_traffic(project, hot, "2024-03-03")
    log_traffic(project, rentals_frame(5, seed=24), "2024-03-04")  # moves the watermark
    store = ObjectStore(project.uris["inference_log_uri"])
    assert store_labels(store, dict(zip(ids1, same1["cnt"].astype(float), strict=True)),
                        task="regression", source="test")["stored"] == 600

    result = run_monitor(project, window="1d")
    days = [(w["start"][:10], w["drifted"], w["label_coverage"]) for w in result["evaluated"]]
    assert days == [("2024-03-01", False, 1.0), ("2024-03-02", False, 0.0),
                    ("2024-03-03", True, 0.0)]
    # day 1's MAE is v1's error on exactly those rows and labels, scored here independently
    served = load_served(project, 1).predict_columns(
        {c: same1[c].tolist() for c in ("hour", "weather", "temp")})
    first = result["evaluated"][0]
    assert first["metric"] == "mae"
    assert first["metric_value"] == pytest.approx(
        float(np.mean(np.abs(np.asarray(served) - same1["cnt"].to_numpy()))), rel=1e-9)
    # the heat wave moves the inputs and, through temp, the predictions; the normal days move
    # neither
    assert [w["prediction_drifted"] for w in result["evaluated"]] == [False, False, True]
    assert [w["drift_share"] > 0 for w in result["evaluated"]] == [False, False, True]
    assert run_monitor(project, window="1d")["evaluated"] == []  # each window once

    # labels for day 2 arrive late: the next run re-scores that window only
    store_labels(store, dict(zip(ids2[:300], same2["cnt"][:300].astype(float), strict=True)),
                 task="regression", source="test")
    again = run_monitor(project, window="1d")
    assert again["evaluated"] == []
    assert [(w["start"][:10], w["label_coverage"]) for w in again["refreshed"]] == [
        ("2024-03-02", 0.5)]
    stored = list_windows(project, window="1d")
    assert [w["label_coverage"] for w in stored] == [1.0, 0.5, 0.0]

    # the same log in windows of 500 rows: full windows only, the rest waits
    by_rows = run_monitor(project, window="500rows")["evaluated"]
    assert [w["rows"] for w in by_rows] == [500, 500, 500]
    # one 1,200-row request (one timestamp) split across windows: nothing counted twice
    log_traffic(project, rentals_frame(1200, seed=25), "2024-03-05")
    more = run_monitor(project, window="500rows")["evaluated"]
    assert [w["rows"] for w in more] == [500, 500, 500]  # 305 waiting + 1,200 new = 1,505
    assert sum(w["rows"] for w in list_windows(project, window="500rows")) == 3000

    # the HTML report: history plots and the hot day in detail, rendered by a real browser
    from .browser import is_blank, render

    page = proj / "monitoring.html"
    hot_id = str(result["evaluated"][2]["id"])
    assert main(["-C", str(proj), "monitor", "report", hot_id, "--html", str(page)]) == 0
    dom, console, shot = render(page, proj)
    # drift share, per-feature scores, performance over time + 3 features + predictions
    assert dom.count("<svg") == 7
    assert "Performance on labelled traffic" in dom and "temp: ks" in dom  # 600 rows: KS
    assert not [line for line in console if "rror" in line], console
    assert not is_blank(shot)
    assert main(["-C", str(proj), "monitor", "report", "999", "--html", str(page)]) == 1


def test_inputs_that_move_without_moving_the_predictions_are_not_prediction_drift(proj: Path
                                                                                 ) -> None:
    """Prediction drift is judged on the predictions, not inherited from the inputs: at night
    (before 6 and after 18) rentals do not depend on the hour, so moving every night row to
    2 am shifts the hour column hard while the model answers as before."""
    from mloop.monitoring.service import run_monitor

    project = open_project(proj)
    night = rentals_frame(600, seed=31)
    flat = (night["hour"] < 6) | (night["hour"] > 18)
    night.loc[flat, "hour"] = 2
    log_traffic(project, night, "2024-05-01")
    log_traffic(project, rentals_frame(5, seed=32), "2024-05-02")  # moves the watermark
    [window] = run_monitor(project, window="1d")["evaluated"]
    assert window["drifted"] and window["drift_share"] > 0  # the hour column moved
    assert window["prediction_drifted"] is False


def test_each_stored_window_report_carries_the_iid_and_temporal_thresholds(proj: Path
                                                                          ) -> None:
    from mloop.monitoring.service import run_monitor
    from mloop.monitoring.windows_store import list_windows

    project = open_project(proj)
    log_traffic(project, rentals_frame(600, seed=41), "2024-04-01")
    log_traffic(project, rentals_frame(5, seed=42), "2024-04-02")  # moves the watermark
    assert len(run_monitor(project, window="1d")["evaluated"]) == 1
    drift = list_windows(project, window="1d", with_reports=True)[-1]["report"]["drift"]
    # the training snapshot (ts hourly, 600 rows) was chunked by day when it was stored
    assert drift["temporal"]["applied"] is True
    assert drift["temporal"]["window"] == "1d" and drift["temporal"]["chunks"] >= 20
    assert {c["column"] for c in drift["columns"]} == {"hour", "weather", "temp"}
    for c in drift["columns"]:
        assert c["threshold"] > 0 and c["temporal_threshold"] > 0, c
    # the multivariate check beside them, on the same two nulls
    joint = list_windows(project, window="1d", with_reports=True)[-1]["report"]["multivariate"]
    assert joint["method"] == "out_of_support_share" and "skipped" not in joint, joint
    assert joint["drifted"] is not None and 0 <= joint["value"] <= 1
    assert joint["threshold_iid"] > 0 and joint["threshold_temporal"] is not None
    assert joint["temporal"]["applied"] is True
    # windows of another size than the chunks: iid-only, and the report says why
    run_monitor(project, window="300rows")
    rows = list_windows(project, window="300rows", with_reports=True)[-1]["report"]["drift"]
    assert rows["temporal"]["applied"] is False
    assert "chunked for 1d windows, this window is 300rows" in rows["temporal"]["reason"]
    assert all(c["temporal_threshold"] is None for c in rows["columns"])
    joint = list_windows(project, window="300rows", with_reports=True)[-1]["report"][
        "multivariate"]
    assert joint["threshold_temporal"] is None and joint["drifted"] is not None
    assert "chunked for 1d windows, this window is 300rows" in joint["temporal"]["reason"]


def test_monitor_cli_reports_nothing_new_and_bad_window_specs(proj: Path, capsys) -> None:
    assert main(["-C", str(proj), "monitor"]) == 0
    assert "no new complete 1d window" in capsys.readouterr().out
    assert main(["-C", str(proj), "monitor", "--window", "fortnight"]) == 1
    assert "window 'fortnight'" in capsys.readouterr().err
    assert main(["-C", str(proj), "monitor", "--since", "yesterday"]) == 1
    assert "--since 'yesterday'" in capsys.readouterr().err


def test_a_drifting_window_alerts_the_webhook_and_shows_on_the_servers_metrics(
        proj: Path) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mloop.monitoring.service import run_monitor

    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    cfg = (proj / "mloop.yaml").read_text()
    (proj / "mloop.yaml").write_text(
        cfg + f"monitoring:\n  webhook: {{url: 'http://127.0.0.1:{hook.server_address[1]}/h', "
              f"backoff_seconds: 0.01}}\n")
    try:
        project = open_project(proj)
        hot = rentals_frame(600, seed=31)
        hot["temp"] = hot["temp"] + 15
        log_traffic(project, rentals_frame(600, seed=30), "2024-05-01")
        log_traffic(project, hot, "2024-05-02")
        log_traffic(project, rentals_frame(5, seed=32), "2024-05-03")
        result = run_monitor(project, window="1d")
    finally:
        hook.shutdown()
    assert [a["window"]["start"][:10] for a in result["alerts"]] == ["2024-05-02"]
    assert result["alerts"][0]["webhook"]["delivered"] is True
    assert len(received) == 1 and "input drift" in received[0]["reasons"][0]
    assert [e.payload["window"]["start"][:10]
            for e in list_events(project.store, kind="monitor.alert")] == ["2024-05-02"]
    with project_server(proj) as srv:
        text = srv.get("/metrics").text
    assert metric(text, "mloop_monitor_drifted", model="rentals", window="1d") == 1
    assert metric(text, "mloop_monitor_feature_drifted", feature="temp") == 1
    assert metric(text, "mloop_monitor_feature_drifted", feature="hour") == 0
    # both thresholds: the iid one and the training period's own day-to-day variation
    assert metric(text, "mloop_monitor_feature_drift_threshold", feature="temp") > 0
    assert metric(text, "mloop_monitor_feature_drift_temporal_threshold", feature="temp") > 0
    assert metric(text, "mloop_monitor_window_rows") == 600


def test_a_fresh_monitor_process_finds_the_models_inputs_in_the_projects_own_registry(
        proj: Path, tmp_path: Path) -> None:
    """Found trying mloop as a new user: `mloop monitor` in a fresh process asked MLflow's
    fluent API for the signature, which followed the default tracking URI (./mlflow.db): it
    failed with "Registered Model ... not found" and left an empty mlflow.db behind."""
    import subprocess
    import sys

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    code = ("from mloop.project import open_project\n"
            "from mloop.monitoring.service import reference_for\n"
            f"print(reference_for(open_project({str(proj)!r}), 1).features)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in __import__("os").environ
                                                      .items() if k != "MLFLOW_TRACKING_URI"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "temp" in out.stdout
    assert list(elsewhere.iterdir()) == []  # no mlflow.db (nor anything) left behind
