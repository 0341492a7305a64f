"""Performance before labels for regression: direct loss estimation (DLE) on the bike data.

A model of hourly rentals trained on the first half of 2011 (a random holdout), with every
fourth week of that half kept out of training: those weeks, served shuffled, are traffic like
the holdout ("unchanged"), and their labels say how close the estimate is. Daytime hours of
July-September are a later, busier season where the model errs more. The loss model is
trained once per version and kept in the outputs store; the estimated-performance trigger fires
on calibrated estimates only, with no label at all; its config refuses bad values by key.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mloop.cli.app import main
from mloop.config import parse_config
from mloop.errors import ConfigError
from mloop.project import open_project

from .helpers import BIKE, append_config, copy_project, train_champion

# xdist_group: with --dist loadgroup (pyproject's addopts) every test here runs on one worker,
# so each module-scoped bike project is trained once (~45 s each), not once per worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dle")]

ROWS_PER_DAY = 200
TOLERANCE = 0.15  # |estimated - realized| MAE on a labelled 200-row window, relative

# the bike example's model and validation, on 2011-01..06 with a random holdout
CONFIG = """\
project: bike-dle
data: {path: data/rentals.parquet, since: "2011-01-01", until: "UNTIL"}
target: cnt
task: regression
features: {time_column: datetime, exclude: [casual, registered]}
split: {method: SPLIT, holdout: HOLDOUT}
model:
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
  params: {loss: poisson, max_iter: 150, learning_rate: 0.08, random_state: 0}
  threads: 1
metrics: [mae, rmse]
monitoring: {window: 1d}
"""


def _bike() -> pd.DataFrame:
    frame = pd.read_parquet(BIKE / "data" / "bike_hourly.parquet")
    frame["datetime"] = pd.to_datetime(frame["datetime"])
    return frame


def _aside(frame: pd.DataFrame) -> pd.Series:
    """Every fourth ISO week of 2011-01..06: never trained on, never in the holdout."""
    dt = frame["datetime"]
    return (dt.dt.isocalendar().week % 4 == 2) & (dt < "2011-07-01")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = _bike()
    config = CONFIG.replace("UNTIL", "2011-07-01").replace("SPLIT", "random") \
        .replace("HOLDOUT", "0.25")
    return train_champion(tmp_path_factory.mktemp("dle") / "bike", config,
                          frame[~_aside(frame)])


@pytest.fixture(scope="module")
def time_split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bike example's own setup: Jan-Apr 2011, the holdout its last 20% by time. Its
    errors double from the holdout's first half to its second (riders multiply in April for
    the same weather), which no input explains: the loss model's check fails."""
    config = CONFIG.replace("UNTIL", "2011-05-01").replace("SPLIT", "time") \
        .replace("HOLDOUT", "0.2")
    return train_champion(tmp_path_factory.mktemp("dle") / "bike", config, _bike())


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    return copy_project(trained, tmp_path)


def unchanged(n_days: int) -> pd.DataFrame:
    frame = _bike()
    return frame[_aside(frame)].sample(n=n_days * ROWS_PER_DAY, random_state=0)


def later_season(n_days: int) -> pd.DataFrame:
    frame = _bike()
    summer = frame[(frame["datetime"] >= "2011-07-01") & (frame["datetime"] < "2011-10-01")
                   & frame["hr"].between(8, 20)]
    return summer.sample(n=n_days * ROWS_PER_DAY, random_state=0)


def serve(project: object, frame: pd.DataFrame, first_day: str, *,
          labelled: bool = False) -> list[pd.Timestamp]:
    """``frame``'s rows answered by v1, ROWS_PER_DAY a day from ``first_day``, through the
    server's log writer (and their true ``cnt`` as labels); then a few rows on the next day,
    so the last day's window closes. Returns the days served."""
    from mloop.serving.model import load_served
    from mloop.storage import ObjectStore
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id
    from mloop.traffic.labels import store_labels

    model = load_served(project, 1)  # type: ignore[arg-type]
    names = model.schema.names
    start = pd.Timestamp(first_day, tz="UTC")
    days = -(-len(frame) // ROWS_PER_DAY)
    tail = frame.head(5)
    rows = pd.concat([frame, tail])
    cols = {c: [None if pd.isna(v) else v for v in rows[c].tolist()] for c in names}
    cols["hr"] = [float(v) for v in cols["hr"]]
    preds = model.predict_columns(cols)
    uri = project.uris["inference_log_uri"]  # type: ignore[attr-defined]
    log = InferenceLog(uri, commit_interval=3600)
    labels = {}
    for i in range(len(rows)):
        day, k = divmod(i, ROWS_PER_DAY) if i < len(frame) else (days, i - len(frame))
        ts = (start + pd.Timedelta(days=day)).timestamp() + k * 86_000 / ROWS_PER_DAY
        rid = new_request_id(ts)
        log.append(LogEntry([rid], ts, 1, "champion", 1.0, [preds[i]],
                            {c: [v[i]] for c, v in cols.items()}, None))
        if i < len(frame):
            labels[rid] = float(rows["cnt"].iloc[i])
    log.close()
    if labelled:
        store_labels(ObjectStore(uri), labels, task="regression", source="test")
    return [start + pd.Timedelta(days=d) for d in range(days)]


def monitor(project: object) -> list[dict]:
    from mloop.monitoring.service import run_monitor

    return run_monitor(project, window="1d")["evaluated"]  # type: ignore[arg-type]


def test_the_estimated_mae_of_unchanged_traffic_is_within_15_percent_of_the_realized(
        proj: Path) -> None:
    project = open_project(proj)
    serve(project, unchanged(4), "2024-03-01", labelled=True)
    windows = monitor(project)
    assert len(windows) == 4
    for w in windows:
        est = w["estimated"]
        assert est["method"] == "dle" and est["metric"] == "mae"
        assert est["status"] == "calibrated", est["calibration"]
        assert w["label_coverage"] == 1.0 and w["metric"] == "mae"
        assert abs(est["value"] - w["metric_value"]) <= TOLERANCE * w["metric_value"], w
        assert w["estimate_error"] == pytest.approx(est["value"] - w["metric_value"])
    # the holdout check: each half estimated by a loss model fitted on the other
    check = windows[0]["estimated"]["calibration"]
    assert check["halves"] == "random" and len(check["folds"]) == 2
    for fold in check["folds"]:
        assert abs(fold["expected"] - fold["realized"]) <= fold["tolerance"]
    # the reference is the version's holdout MAE, the value its gates saw
    from mloop.registry.candidates import get_version

    tag = float(get_version(project, 1).tags["mloop.metric.mae"])
    assert windows[0]["estimated"]["reference"] == pytest.approx(tag, rel=1e-4)


def test_a_later_season_raises_the_estimate_with_the_realized_error(proj: Path) -> None:
    project = open_project(proj)
    serve(project, unchanged(2), "2024-03-01", labelled=True)
    serve(project, later_season(2), "2024-03-03", labelled=True)
    windows = monitor(project)
    assert len(windows) == 4
    before, after = windows[:2], windows[2:]
    for w in after:  # the realized error rose by half at least, and so did the estimate
        assert w["metric_value"] > 1.5 * max(b["metric_value"] for b in before)
        assert w["estimated"]["value"] > 1.4 * max(b["estimated"]["value"] for b in before)


def test_the_loss_model_is_trained_once_per_version_and_read_back(proj: Path) -> None:
    project = open_project(proj)
    serve(project, unchanged(1), "2024-03-01")
    [first] = monitor(project)
    store = project.outputs
    model_key, record_key = "monitoring/loss-model-v1.skops", "monitoring/loss-estimate-v1.json"
    assert store.exists(model_key) and store.exists(record_key)
    stamp = {k: Path(store.path(k)).stat().st_mtime_ns for k in (model_key, record_key)}
    serve(project, unchanged(2).tail(ROWS_PER_DAY), "2024-03-05")
    later = monitor(open_project(proj))  # a fresh process's view: read, not refitted
    assert len(later) >= 1 and later[-1]["estimated"]["status"] == "calibrated"
    assert {k: Path(store.path(k)).stat().st_mtime_ns for k in stamp} == stamp
    assert first["estimated"]["reference"] == later[-1]["estimated"]["reference"]


def test_a_loss_model_file_with_foreign_types_is_refused_by_name(proj: Path) -> None:
    import skops.io

    from mloop.errors import MloopError
    from mloop.monitoring.loss_estimate import load_loss_model

    project = open_project(proj)
    assert load_loss_model(project, 1, "mae") is not None
    project.outputs.write_bytes("monitoring/loss-model-v1.skops",
                                skops.io.dumps({"x": pd.Timestamp("2024-01-01")}))
    with pytest.raises(MloopError, match=r"monitoring/loss-model-v1.skops in the outputs store "
                                         r"holds types a loss model never has \(pandas"):
        load_loss_model(open_project(proj), 1, "mae")
    # the monitor goes on without the estimate, and each window's report says why
    serve(project, unchanged(1), "2024-03-01")
    [window] = monitor(open_project(proj))
    assert window["drift_share"] is not None
    assert window["estimated"]["status"] == "unavailable"
    assert "holds types a loss model never has" in window["estimated"]["error"]


def test_the_windows_listing_and_gauges_carry_the_dle_estimate(
        proj: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.monitoring.alerts import MonitorCollector

    project = open_project(proj)
    serve(project, unchanged(1), "2024-03-01")
    [window] = monitor(project)
    est = window["estimated"]
    capsys.readouterr()
    assert main(["-C", str(proj), "monitor", "windows"]) == 0
    assert f"mae {est['value']:.4g}" in capsys.readouterr().out
    gauges = {f.name: f.samples[0].value for f in MonitorCollector(project).collect()
              if f.samples}
    assert gauges["mloop_monitor_estimated_metric_value"] == pytest.approx(est["value"])
    assert gauges["mloop_monitor_estimate_reference_metric"] == pytest.approx(est["reference"])
    assert gauges["mloop_monitor_estimate_calibrated"] == 1.0


def test_an_rmse_primary_metric_gets_an_rmse_estimate(tmp_path: Path) -> None:
    """Squared errors learned, the root of their predicted mean: on fresh rows of the same
    rentals generator the estimate is within 15% of the realized RMSE."""
    from .helpers import SMALL_CONFIG, label_rows, log_traffic, rentals_frame

    root = train_champion(tmp_path / "rentals", SMALL_CONFIG.replace(
        "metrics: [mae, rmse]", "metrics: [rmse, mae]"), rentals_frame(1200, seed=3))
    project = open_project(root)
    fresh = rentals_frame(600, seed=71)
    label_rows(project, log_traffic(project, fresh, "2024-03-01"), fresh)
    log_traffic(project, rentals_frame(5, seed=72), "2024-03-02")
    [window] = monitor(project)
    est = window["estimated"]
    assert est["metric"] == window["metric"] == "rmse" and est["method"] == "dle"
    assert est["status"] == "calibrated", est["calibration"]
    assert abs(est["value"] - window["metric_value"]) <= TOLERANCE * window["metric_value"]


# ------------------------------------------------------------------------------ the trigger

TRIGGER = """
loop:
  triggers: {estimated_performance: {margin: 0.15, consecutive: 2}}
  retrain: {window: 30d, min_labelled_rows: 100}
"""


def test_the_trigger_fires_on_estimated_degradation_with_no_labels(proj: Path) -> None:
    from mloop.loop.controller import run_once
    from mloop.security.audit import list_events

    append_config(proj, TRIGGER)
    project = open_project(proj)
    serve(project, unchanged(2), "2024-03-01")
    out = run_once(project)
    assert out["triggers"] == [] and out["actions"] == []  # unchanged traffic: nothing
    serve(project, later_season(2), "2024-03-03")  # from the first batch's tail day on
    out = run_once(project)
    [fired] = out["triggers"]
    assert fired["trigger"] == "estimated_performance" and fired["method"] == "dle"
    assert fired["metric"] == "mae" and fired["streak"] == 2 and len(fired["windows"]) == 2
    assert min(fired["values"]) > fired["reference"] * 1.15
    # no label at all: the retrain is held for labelled rows, and the event says why
    [action] = out["actions"]
    assert action["action"] == "held" and "min_labelled_rows" in action["guard"]
    [event] = list_events(project.store, kind="loop.trigger_held", limit=5)
    assert event.payload["triggers"][0]["trigger"] == "estimated_performance"


def test_unchanged_traffic_does_not_fire_the_trigger(proj: Path) -> None:
    from mloop.loop.controller import run_once

    append_config(proj, TRIGGER)
    project = open_project(proj)
    serve(project, unchanged(5), "2024-03-01")
    out = run_once(project)
    assert len(out["monitor"]["evaluated"]) == 5
    assert all(w["estimated"]["status"] == "calibrated" for w in out["monitor"]["evaluated"])
    assert out["triggers"] == [] and out["actions"] == []


def test_an_uncalibrated_estimate_is_shown_as_such_and_never_fires_the_trigger(
        time_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.loop.controller import run_once

    root = append_config(copy_project(time_split, tmp_path), TRIGGER)
    project = open_project(root)
    serve(project, later_season(2), "2024-03-01")
    out = run_once(project)
    windows = out["monitor"]["evaluated"]
    assert len(windows) == 2
    for w in windows:  # worse than the holdout by far more than the margin, but not trusted
        est = w["estimated"]
        assert est["value"] > 1.15 * est["reference"]
        assert est["status"] == "uncalibrated"
    check = windows[0]["estimated"]["calibration"]
    assert check["halves"] == "time" and not check["calibrated"]
    assert abs(check["expected"] - check["realized"]) > check["tolerance"]
    assert out["triggers"] == []
    capsys.readouterr()
    assert main(["-C", str(root), "monitor", "windows"]) == 0
    assert "uncalibrated" in capsys.readouterr().out


# ------------------------------------------------------------------------------- config

BASE = "project: demo\ndata:\n  path: data/x.csv\ntarget: y\nloop:\n  triggers:\n"


@pytest.mark.parametrize(("body", "message"), [
    ("    estimated_performance: {margin: -0.1}\n",
     r"mloop.yaml:7: 'loop.triggers.estimated_performance.margin': Input should be greater "
     r"than or equal to 0 \(got -0.1\)"),
    ("    estimated_performance: {consecutive: 0}\n",
     r"'loop.triggers.estimated_performance.consecutive': Input should be greater than or "
     r"equal to 1 \(got 0\)"),
    ("    estimated_performance: {margn: 0.1}\n",
     r"mloop.yaml:7: unknown key 'margn' under 'loop.triggers.estimated_performance' \(did "
     r"you mean 'margin'\?\)"),
    ("    estimated_perf: {margin: 0.1}\n",
     r"mloop.yaml:7: unknown key 'estimated_perf' under 'loop.triggers' \(did you mean "
     r"'estimated_performance'\?\)"),
])
def test_bad_estimated_performance_config_names_the_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE + body)


def test_the_estimated_performance_config_reads_its_defaults() -> None:
    cfg = parse_config(BASE + "    estimated_performance: {}\n")
    trigger = cfg.loop.triggers.estimated_performance
    assert trigger is not None and (trigger.margin, trigger.consecutive) == (0.15, 2)
