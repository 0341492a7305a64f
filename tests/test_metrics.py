"""The task-metric table: the same numbers wherever a metric is reported, and defined on the
rows real projects have (a time-ordered holdout that lacks a rare class)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mloop.metrics import compute_metrics
from mloop.project import open_project

from .helpers import run_cli

CLASSES = ["drizzle", "rain", "snow", "sun"]


def _scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.choice(CLASSES, size=n)
    raw = rng.random((n, len(CLASSES))) + 2.0 * (y[:, None] == np.array(CLASSES)[None, :])
    return y, raw / raw.sum(axis=1, keepdims=True)


def test_multiclass_roc_auc_equals_sklearns_one_vs_rest_when_every_class_is_present() -> None:
    y, proba = _scores(400)
    ours = compute_metrics("classification", ["roc_auc"], y, None, proba, classes=CLASSES)
    assert ours["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, proba, multi_class="ovr", labels=CLASSES), abs=1e-12)


def test_multiclass_roc_auc_is_defined_on_rows_that_lack_a_class() -> None:
    y, proba = _scores(400)
    keep = y != "snow"
    value = compute_metrics("classification", ["roc_auc", "log_loss"], y[keep], None,
                            proba[keep], classes=CLASSES)
    present = [c for c in CLASSES if c != "snow"]
    expected = np.mean([skm.roc_auc_score(y[keep] == c, proba[keep, CLASSES.index(c)])
                        for c in present])
    assert value["roc_auc"] == pytest.approx(expected, abs=1e-12)
    assert np.isfinite(value["log_loss"])


def test_roc_auc_on_rows_of_one_class_is_nan_not_an_error() -> None:
    y, proba = _scores(50)
    rain = y == "rain"
    assert np.isnan(compute_metrics("classification", ["roc_auc"], y[rain], None, proba[rain],
                                    classes=CLASSES)["roc_auc"])


WEATHER_CONFIG = """\
project: weather
data:
  path: data/rentals.parquet
target: weather
task: classification
features:
  time_column: ts
split:
  holdout: 0.25
model:
  params: {max_iter: 20, random_state: 0}
metrics: [roc_auc, log_loss, accuracy]
gates:
  auto_promote: true
  absolute:
    - {metric: roc_auc, min: 0.55}
"""


def _weather(n: int = 800, seed: int = 3) -> pd.DataFrame:
    """Daily weather where snow falls only in the first winter: the time-ordered holdout (the
    last quarter) never sees it, as in Seattle's 2012-2015 record."""
    rng = np.random.default_rng(seed)
    day = np.arange(n)
    temp = 12 + 8 * np.sin(day / 365 * 2 * np.pi) + rng.normal(0, 2, n)
    rain = rng.gamma(1.0, 3.0, n) * (rng.random(n) < 0.5)
    weather = np.where(rain > 2, "rain", np.where(rain > 0, "drizzle", "sun")).astype(object)
    weather[(day < 120) & (temp < 8) & (rain > 0)] = "snow"
    return pd.DataFrame({"ts": pd.date_range("2012-01-01", periods=n, freq="D"),
                         "temp": temp.round(1), "precipitation": rain.round(1),
                         "weather": weather})


def test_a_classifier_whose_holdout_lacks_a_rare_class_trains_gates_and_promotes(
        make_project: Callable[..., Path]) -> None:
    frame = _weather()
    holdout = frame.iloc[int(len(frame) * 0.75):]
    assert "snow" in set(frame["weather"]) and "snow" not in set(holdout["weather"])
    root = make_project(WEATHER_CONFIG, frame=frame)
    run_cli("run", cwd=root)  # failed before: "Number of classes in y_true not equal ..."
    project = open_project(root)
    record = project.tracking.model_version("weather", 1)
    assert record is not None and "champion" in record.aliases
    assert 0.55 <= float(record.tags["mloop.metric.roc_auc"]) <= 1.0


@pytest.mark.parametrize(("labels", "positive"), [
    (["no", "yes"], "yes"), ([0, 1], 1), ([False, True], True), (["churn", "stay"], "stay")])
def test_binary_f1_scores_the_larger_label_also_for_text_targets(labels: list, positive) -> None:
    """A binary target with text labels failed the train step: f1 asked for pos_label=1."""
    rng = np.random.default_rng(3)
    y = np.array(labels, dtype=object)[rng.integers(0, 2, 300)]
    p = np.where(rng.random(300) < 0.8, y, np.array(labels, dtype=object)[rng.integers(0, 2, 300)])
    if not isinstance(labels[0], str):
        y, p = y.astype(type(labels[0])), p.astype(type(labels[0]))
    expected = skm.f1_score(y, p, pos_label=positive)
    assert compute_metrics("classification", ["f1"], y, p) == {"f1": expected}
    assert compute_metrics("classification", ["f1"], y, p, classes=labels) == {"f1": expected}


def test_f1_beyond_two_classes_is_macro() -> None:
    y, proba = _scores(300)
    p = np.array(CLASSES)[proba.argmax(axis=1)]
    assert compute_metrics("classification", ["f1"], y, p)["f1"] == pytest.approx(
        skm.f1_score(y, p, average="macro"))
