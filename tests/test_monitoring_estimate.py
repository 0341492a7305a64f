"""Performance before labels: a classifier's accuracy estimated per monitoring window from the
probabilities the server logged (CBPE-style), checked against its holdout calibration, shown
beside the realized metric once labels arrive; regression windows carry DLE's estimate instead."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mloop.cli.app import main
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.promotion import change_alias

from .helpers import busy_config, copy_project, log_traffic, rentals_frame

pytestmark = pytest.mark.slow

BUSY = busy_config(params="{max_iter: 300}", metrics="[accuracy]",
                   extra="monitoring: {window: 1d}\n")
THRESHOLD = 74  # rentals above which an hour is "busy"


def busy_frame(n: int, seed: int = 0) -> pd.DataFrame:
    frame = rentals_frame(n, seed=seed)
    frame["busy"] = (frame["cnt"] > THRESHOLD).astype(int)
    return frame


@pytest.fixture
def busy(make_project) -> Path:
    return _trained(make_project, BUSY)


def _trained(make_project, config: str) -> Path:
    root = make_project(config, frame=busy_frame(1200))
    assert run_pipeline(open_project(root)).status == "succeeded"
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


def test_a_calibrated_classifiers_estimate_is_within_005_of_the_realized_accuracy(
        busy: Path) -> None:
    from mloop.monitoring.service import run_monitor
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    project = open_project(busy)
    day1 = busy_frame(600, seed=31)
    ids = log_traffic(project, day1, "2024-03-01", probabilities=True)
    log_traffic(project, busy_frame(5, seed=32), "2024-03-02", probabilities=True)
    store_labels(ObjectStore(project.uris["inference_log_uri"]),
                 dict(zip(ids, day1["busy"].tolist(), strict=True)),
                 task="classification", source="test")
    [window] = run_monitor(project, window="1d")["evaluated"]
    assert window["metric"] == "accuracy" and window["label_coverage"] == 1.0
    est = window["estimated"]
    assert est["metric"] == "accuracy" and est["status"] == "calibrated", est
    assert abs(est["value"] - window["metric_value"]) < 0.05
    assert window["estimate_error"] == pytest.approx(est["value"] - window["metric_value"])
    # the holdout check: the version's own expected vs realized accuracy, within tolerance
    cal = est["calibration"]
    assert abs(cal["expected"] - cal["realized"]) <= cal["tolerance"]


def test_a_window_without_labels_has_its_estimate_in_the_listing_and_the_gauges(
        busy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mloop.monitoring.alerts import MonitorCollector
    from mloop.monitoring.service import run_monitor
    from mloop.serving.model import load_served

    project = open_project(busy)
    day1 = busy_frame(400, seed=41)
    log_traffic(project, day1, "2024-03-01", probabilities=True)
    log_traffic(project, busy_frame(5, seed=42), "2024-03-02", probabilities=True)
    [window] = run_monitor(project, window="1d")["evaluated"]
    assert window["label_coverage"] == 0.0 and window["metric_value"] is None
    _, proba = load_served(project, 1).score_arrays(
        {c: day1[c].tolist() for c in ("hour", "weather", "temp")})
    assert window["estimated"]["value"] == pytest.approx(float(np.mean(proba.max(axis=1))))
    assert window["estimate_error"] is None  # nothing to compare with yet

    capsys.readouterr()
    assert main(["-C", str(busy), "monitor", "windows", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)["windows"]
    assert listed["estimated"]["value"] == pytest.approx(window["estimated"]["value"])
    assert main(["-C", str(busy), "monitor", "windows"]) == 0
    assert f"accuracy {window['estimated']['value']:.4g}" in capsys.readouterr().out

    gauges = {f.name: f.samples[0].value for f in MonitorCollector(project).collect()
              if f.samples}
    assert gauges["mloop_monitor_estimated_metric_value"] == pytest.approx(
        window["estimated"]["value"])
    assert gauges["mloop_monitor_estimate_calibrated"] == 1.0

    # the dashboard's timeline draws it in the performance lane, before any label
    from mloop.loop.timeline import timeline
    from mloop.ui.charts import timeline_svg

    svg = str(timeline_svg(timeline(project)))
    assert svg.count("class='mark est'") == 1
    assert f"estimated accuracy {window['estimated']['value']:.4g} from the served " \
           f"probabilities" in svg
    assert "class='mark perf'" not in svg  # no realized point: no labels yet
    assert "mloop_monitor_metric_value" not in gauges


def test_an_overconfident_models_estimate_is_reported_uncalibrated_with_both_numbers(
        make_project, capsys: pytest.CaptureFixture[str]) -> None:
    """A fully grown tree answers probabilities of 0 or 1: it expects to be always right and
    is not, on the holdout; its windows' estimates say so instead of passing for truth."""
    from mloop.monitoring.service import run_monitor

    config = BUSY.replace("sklearn.linear_model.LogisticRegression",
                          "sklearn.tree.DecisionTreeClassifier").replace(
        "{max_iter: 300}", "{random_state: 0}")
    root = _trained(make_project, config)
    project = open_project(root)
    log_traffic(project, busy_frame(300, seed=61), "2024-03-01", probabilities=True)
    log_traffic(project, busy_frame(5, seed=62), "2024-03-02", probabilities=True)
    [window] = run_monitor(project, window="1d")["evaluated"]
    est = window["estimated"]
    assert est["status"] == "uncalibrated"
    cal = est["calibration"]
    assert cal["expected"] > 0.95 and cal["expected"] - cal["realized"] > cal["tolerance"]
    capsys.readouterr()
    assert main(["-C", str(root), "monitor", "windows"]) == 0
    assert "uncalibrated" in capsys.readouterr().out


def test_regression_windows_carry_a_dle_estimate_not_a_cbpe_one(serving_registry: Path,
                                                                 tmp_path: Path) -> None:
    """A regression model logs no probabilities: its windows' estimate is DLE's (from the
    served inputs and predictions, tests/test_monitoring_loss_estimate.py), never CBPE's."""
    from mloop.monitoring.service import run_monitor
    from mloop.monitoring.windows_store import get_window

    proj = copy_project(serving_registry, tmp_path)
    project = open_project(proj)
    log_traffic(project, rentals_frame(200, seed=51), "2024-03-01")
    log_traffic(project, rentals_frame(5, seed=52), "2024-03-02")
    [window] = run_monitor(project, window="1d")["evaluated"]
    est = get_window(project, window["id"])["report"]["estimated"]
    assert est["method"] == "dle" and est["metric"] == "mae" and est["rows"] == 200
    assert window["estimate_error"] is None  # no labels yet
    assert not project.outputs.exists("monitoring/calibration-v1.json")


def test_expected_roc_auc_matches_the_auc_of_labels_drawn_from_the_probabilities() -> None:
    """Labels drawn from calibrated probabilities: their realized ROC AUC is what the expected
    confusion matrices predicted (20,000 rows: sampling error ~0.004)."""
    from sklearn.metrics import roc_auc_score

    from mloop.monitoring.estimate import expected_metrics

    rng = np.random.default_rng(0)
    p = rng.beta(2, 3, 20_000).round(2)  # ties, as a tree's probabilities have
    y = rng.random(p.size) < p
    est = expected_metrics(np.column_stack([1 - p, p]))
    assert est["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=0.015)
    assert est["accuracy"] == pytest.approx(np.mean((p > 0.5) == y), abs=0.015)
