"""What each model costs (mloop.loop.cost, `mloop cost`): on a project that ran its pipeline,
a two-trial tuning study, served traffic and one retrain, the command's CPU-seconds and money
are those the runs recorded in MLflow (read back here independently, step by step), priced
with the config's rates; serving is priced per 1,000 predictions from the inference log's
segments, also after a real `mloop serve` has stopped; `costs.budget_per_day` holds a retrain
(recorded as held) and is a Prometheus rule promtool accepts and fires."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mloop.cli.app import main
from mloop.config import parse_config
from mloop.errors import ConfigError
from mloop.project import open_project

from .helpers import (
    SMALL_CONFIG,
    copy_project,
    heat_wave,
    label_rows,
    log_traffic,
    rentals_frame,
    require,
)
from .serving_util import ServeProcess, request_rows

pytestmark = pytest.mark.slow

RATES = {"cpu_hour": 3.6, "gb_hour": 0.5}  # 0.001 per CPU-second: easy numbers to read
CONFIG = SMALL_CONFIG + f"""\
costs: {{cpu_hour: {RATES['cpu_hour']}, gb_hour: {RATES['gb_hour']}, currency: EUR}}
loop:
  triggers: {{drift: {{consecutive: 1}}}}
  retrain: {{window: 3d, min_labelled_rows: 300}}
  guards: {{cooldown: 3d, max_per_day: 2}}
  canary: null
tune:
  trials: 2
  seed: 0
  search_space:
    learning_rate: {{type: float, low: 0.05, high: 0.3, log: true}}
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pipeline run (v1, champion), a two-trial study (its best trial: v2), then a normal
    and a hot day of labelled traffic answered by v1: a drift trigger is due."""
    from mloop.pipeline.runner import run_pipeline
    from mloop.registry.promotion import change_alias

    require("optuna", install="pip install 'mloop[tune]'")
    from mloop.tuning.study import run_study

    root = tmp_path_factory.mktemp("cost") / "proj"
    (root / "data").mkdir(parents=True)
    (root / "mloop.yaml").write_text(CONFIG)
    rentals_frame(600).to_parquet(root / "data" / "rentals.parquet", index=False)
    assert run_pipeline(open_project(root)).status == "succeeded"
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    run_study(open_project(root))
    project = open_project(root)
    normal, hot = rentals_frame(600, seed=50), heat_wave(600, seed=51)
    label_rows(project, log_traffic(project, normal, "2024-07-01"), normal)
    label_rows(project, log_traffic(project, hot, "2024-07-02"), hot)
    log_traffic(project, rentals_frame(5, seed=52), "2024-07-03")
    return root


@pytest.fixture(scope="module")
def retrained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base`` after one controller pass that retrained (v3)."""
    from mloop.loop.controller import run_once

    root = copy_project(base, tmp_path_factory.mktemp("retrained"))
    out = run_once(open_project(root))
    assert [a["action"] for a in out["actions"]] == ["promoted"], out
    return root


def cost_json(root: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["-C", str(root), "cost", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _recorded(root: Path) -> dict[str, dict[str, float]]:
    """Each pipeline run's parent-run metrics and the sum of its steps' CPU-seconds, read
    through MlflowClient and mloop's store (not through mloop.loop.cost)."""
    from mlflow.tracking import MlflowClient

    project = open_project(root)
    client = MlflowClient(project.uris["tracking_uri"])
    out = {}
    for run in project.store.list_pipeline_runs(limit=100):
        metrics = client.get_run(run.mlflow_run_id).data.metrics
        steps = [client.get_run(s.mlflow_run_id).data.metrics.get("cpu_seconds", 0.0)
                 for s in project.store.step_runs(run.id) if not s.cache_hit]
        out[run.id] = {**metrics, "steps_cpu": sum(steps)}
    return out


def _price(cpu: float, gb_hours: float) -> float:
    return cpu / 3600 * RATES["cpu_hour"] + gb_hours * RATES["gb_hour"]


def test_cost_sums_the_cpu_seconds_each_run_and_trial_recorded(
        retrained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    from mloop.loop.controller import load_state

    doc = cost_json(retrained, capsys)
    assert doc["currency"] == "EUR" and doc["by"] == "run"
    rows = {r["key"]: r for r in doc["rows"]}
    recorded = _recorded(retrained)
    # every pipeline run is there once: the first run, the study's data steps, the best
    # trial's training run and the retrain's two (its held-out fit, then the refit)
    kinds = sorted(rows[k]["kind"] for k in recorded)
    assert kinds == ["pipeline", "pipeline", "retrain", "retrain", "tune"]
    for run_id, metrics in recorded.items():
        row = rows[run_id]
        assert metrics["mloop.cpu_seconds"] > 0
        # the parent run's figure is its steps' sum; cost shows it, priced
        assert metrics["mloop.cpu_seconds"] == pytest.approx(metrics["steps_cpu"], abs=1e-3)
        assert row["cpu_seconds"] == pytest.approx(metrics["mloop.cpu_seconds"], abs=1e-3)
        assert row["peak_memory_mb"] == pytest.approx(metrics["mloop.peak_memory_mb"])
        assert row["cost"] == pytest.approx(
            _price(metrics["mloop.cpu_seconds"], metrics["mloop.memory_gb_hours"]), rel=1e-4)
    # the retrain: the controller's own measure (the whole retrain, in its process) is at
    # least what its steps used
    history = load_state(open_project(retrained)).history
    retrain = rows[history[-1].pipeline_run_id]
    assert retrain["kind"] == "retrain" and retrain["version"] == 3
    assert retrain["cpu_seconds"] <= (history[-1].cpu_seconds or 0) + 0.01
    # trials: their own runs' metrics
    project = open_project(retrained)
    client = MlflowClient(project.uris["tracking_uri"])
    trials = [r for r in doc["rows"] if r["kind"] == "trial"]
    assert len(trials) == 2 and {t["version"] for t in trials} == {2}
    for t in trials:
        metrics = client.get_run(t["key"]).data.metrics
        assert metrics["mloop.cpu_seconds"] > 0
        assert t["cpu_seconds"] == pytest.approx(metrics["mloop.cpu_seconds"], abs=1e-3)
        assert t["cost"] == pytest.approx(
            _price(metrics["mloop.cpu_seconds"], metrics["mloop.memory_gb_hours"]), rel=1e-4)
    total = sum(r["cpu_seconds"] for r in doc["rows"])
    assert doc["totals"]["cpu_seconds"] == pytest.approx(total, abs=1e-3)
    assert doc["totals"]["training_cost"] == pytest.approx(
        sum(r["training_cost"] for r in doc["rows"]), rel=1e-6)


def test_serving_cost_per_1k_predictions_comes_from_the_logs_segments(
        retrained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    doc = cost_json(retrained, capsys, "--by", "version")
    cpu = rows = 0.0
    for path in (retrained / ".mloop" / "inference").glob("day=*/version=1/*.parquet"):
        meta = pq.read_metadata(path).metadata
        cpu += float(meta[b"mloop.cpu_seconds"])
        rows += int(meta[b"mloop.rows"])
    (served,) = doc["serving"]
    assert served["version"] == 1 and served["predictions"] == rows == 1205
    assert served["cpu_seconds"] == pytest.approx(cpu, abs=1e-3) and cpu > 0
    assert served["cost_per_1k_predictions"] == pytest.approx(
        cpu / 3600 * RATES["cpu_hour"] / rows * 1000, rel=1e-4)
    by_version = {r["key"]: r for r in doc["rows"]}
    assert by_version[1]["predictions"] == 1205
    assert by_version[1]["cost"] == pytest.approx(
        by_version[1]["training_cost"] + served["cost"], rel=1e-6)
    assert by_version[2]["runs"] == 3  # the best trial's training run and both trials
    assert by_version[3]["runs"] == 1


def test_by_day_and_the_json_keys_are_stable(retrained: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    docs = {by: cost_json(retrained, capsys, "--by", by) for by in ("run", "version", "day")}
    keys = {by: set(d) for by, d in docs.items()}
    assert keys["run"] == keys["version"] == keys["day"] == {
        "by", "since", "until", "currency", "rates", "rows", "serving", "totals", "budget"}
    row_keys = {frozenset(r) for d in docs.values() for r in d["rows"]}
    assert len(row_keys) == 1
    assert docs["run"]["totals"] == docs["version"]["totals"] == docs["day"]["totals"]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    (day,) = docs["day"]["rows"]
    assert day["key"] == today and day["cost"] == pytest.approx(docs["day"]["totals"]["cost"])
    # a range that ends before anything ran holds nothing
    empty = cost_json(retrained, capsys, "--until", "2020-01-01")
    assert empty["rows"] == [] and empty["serving"] == [] and empty["totals"]["cost"] == 0
    capsys.readouterr()
    assert main(["-C", str(retrained), "cost", "--by", "version"]) == 0
    human = capsys.readouterr().out
    assert "Serving per version (EUR)" in human and "total " in human


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "yesterday"], "--since 'yesterday': not an ISO 8601 time"),
    (["--until", "2024-13-01"], "--until '2024-13-01': not an ISO 8601 time"),
    (["--by", "week"], "--by 'week': choose one of run, version, day"),
    (["--since", "2024-02-01", "--until", "2024-01-01"], "is not before --until"),
])
def test_bad_arguments_exit_1_naming_the_value(base: Path, capsys: pytest.CaptureFixture[str],
                                               args: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(["-C", str(base), "cost", "--json", *args]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_a_real_server_records_what_its_predictions_cost(base: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    root = copy_project(base, tmp_path)
    # from now, not a second before: the base fixture's own traffic may have been committed
    # within the last second (it ends with it), and is not this server's
    since = datetime.now(UTC).isoformat()
    with ServeProcess(root, tmp_path / "serve.log") as server:
        for i in range(40):
            r = requests.post(server.url + "/predict", json={"records": request_rows(5, i)},
                              timeout=30)
            assert r.status_code == 200, r.text
    # the server has stopped: the cost of its 200 rows is in the log's segments
    doc = cost_json(root, capsys, "--since", since)
    (served,) = doc["serving"]
    assert served["version"] == 1 and served["predictions"] == 200
    assert 0 < served["cpu_seconds_per_1k_predictions"] < 1000
    assert served["cost_per_1k_predictions"] == pytest.approx(
        served["cpu_seconds_per_1k_predictions"] / 3600 * RATES["cpu_hour"], rel=1e-3)


def test_the_budget_holds_a_retrain_and_says_why(base: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.loop.controller import run_once
    from mloop.loop.cost import CostCollector, spent_last_day
    from mloop.security.audit import list_events

    root = copy_project(base, tmp_path)
    text = (root / "mloop.yaml").read_text().replace("currency: EUR}",
                                                     "currency: EUR, budget_per_day: 0.0001}")
    (root / "mloop.yaml").write_text(text)
    project = open_project(root)
    spent = spent_last_day(project)
    assert spent > 0.0001  # the pipeline run and the study ran just now
    out = run_once(project)
    (held,) = out["actions"]
    assert held["action"] == "held"
    assert held["guard"].startswith("budget: ") and "over costs.budget_per_day 0.0001 EUR" \
        in held["guard"]
    (event,) = list_events(project.store, kind="loop.trigger_held")
    assert event.payload["guard"] == held["guard"]
    assert [v.version for v in project.tracking.model_versions("rentals")] == [2, 1]
    gauges = {f.name: f.samples[0] for f in CostCollector(project).collect()}
    assert gauges["mloop_cost_last_day"].value == pytest.approx(spent, rel=0.01)
    assert gauges["mloop_cost_last_day"].labels == {"model": "rentals", "currency": "EUR"}
    assert gauges["mloop_cost_budget_per_day"].value == 0.0001
    doc = cost_json(root, capsys)
    assert doc["budget"]["per_day"] == 0.0001 and doc["budget"]["over"] is True


def test_promtool_accepts_the_budget_rule_and_it_fires(make_project, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install -y prometheus (.ci/run does this)"
    root = make_project(SMALL_CONFIG + "costs: {budget_per_day: 5, currency: EUR}\n")
    assert main(["-C", str(root), "monitor", "rules", "--out",
                 str(tmp_path / "alerts.yml")]) == 0
    rules = yaml.safe_load((tmp_path / "alerts.yml").read_text())
    (group,) = [g for g in rules["groups"] if g["name"] == "mloop-cost-rentals"]
    assert group["rules"][0]["expr"] == 'mloop_cost_last_day{model="rentals"} > 5'
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "alerts.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    series = 'mloop_cost_last_day{model="rentals",currency="EUR"}'
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["alerts.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": series, "values": "1 4 6 6"}],
                   "alert_rule_test": [
                       {"eval_time": "1m", "alertname": "MloopCostOverBudget",
                        "exp_alerts": []},
                       {"eval_time": "2m", "alertname": "MloopCostOverBudget",
                        "exp_alerts": [{"exp_labels": {
                            "severity": "warning", "model": "rentals", "currency": "EUR"},
                            "exp_annotations": group["rules"][0]["annotations"] | {
                                "summary": "6 EUR spent on rentals in the last 24 h, over "
                                           "costs.budget_per_day (5 EUR); the loop holds "
                                           "retrains"}}]}]}]}))
    run = subprocess.run([promtool, "test", "rules", "test.yml"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    # without a budget, no cost rule
    plain = make_project(name="plain")
    assert main(["-C", str(plain), "monitor", "rules", "--out", str(tmp_path / "p.yml")]) == 0
    assert "MloopCostOverBudget" not in (tmp_path / "p.yml").read_text()


# ---------------------------------------------------------------------------- config

def test_prices_may_sit_under_costs_or_loop_costs_but_not_both() -> None:
    new = parse_config(SMALL_CONFIG + "costs: {cpu_hour: 1.5, budget_per_day: 2}\n")
    assert new.cost_rates.cpu_hour == new.loop.costs.cpu_hour == 1.5
    assert new.cost_rates.budget_per_day == 2
    old = parse_config(SMALL_CONFIG + "loop: {costs: {cpu_hour: 0.7}}\n")
    assert old.cost_rates.cpu_hour == 0.7 and old.costs == old.loop.costs
    assert new.config_hash() == old.config_hash() == parse_config(SMALL_CONFIG).config_hash()
    with pytest.raises(ConfigError, match=r"'costs' and 'loop.costs' both set prices"):
        parse_config(SMALL_CONFIG + "costs: {cpu_hour: 1}\nloop: {costs: {cpu_hour: 2}}\n")


@pytest.mark.parametrize(("extra", "message"), [
    ("costs: {budget_per_day: 0}", r"mloop.yaml:\d+: 'costs.budget_per_day': Input should be "
                                   r"greater than 0"),
    ("costs: {budget_per_dya: 3}", r"unknown key 'budget_per_dya' under 'costs' \(did you "
                                   r"mean 'budget_per_day'\?\)"),
    ("costs: {cpu_hour: -1}", r"'costs.cpu_hour': Input should be greater than or equal to 0"),
])
def test_a_bad_cost_setting_names_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(SMALL_CONFIG + extra + "\n")


def test_the_dashboard_cost_page_shows_the_report_mloop_cost_prints(
        retrained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """/cost on real HTTP: the totals `mloop cost` prints, one pair of bars (training,
    serving) per day it lists, a row per version; a bad range is a 4xx naming the value."""
    import re

    import requests

    from mloop.ui import create_ui_app

    from .serving_util import ServerThread

    doc = cost_json(retrained, capsys, "--by", "day")
    versions = cost_json(retrained, capsys, "--by", "version")
    with ServerThread(create_ui_app(open_project(retrained))) as srv:
        page = requests.get(srv.url + "/cost?days=0", timeout=60)
        bad = requests.get(srv.url + "/cost?days=-3", timeout=60)
    assert page.status_code == 200, page.text[-2000:]
    html = page.text
    totals = re.search(r"<p id=\"totals\">([^ ]+) EUR in all", html)
    assert totals and float(totals.group(1)) == pytest.approx(doc["totals"]["cost"], rel=1e-3)
    assert html.count("class='mark train") == len(doc["rows"]) == 1
    assert html.count("class='mark serve") == len(doc["rows"])
    table = html[html.index('id="per-version"'):html.index('id="per-run"')]
    assert table.count("<tr><td>") == len(versions["rows"])
    assert bad.status_code == 400 and "days &#39;-3&#39;: a whole number" in bad.text
