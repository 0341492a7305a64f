"""Pipelines end to end on a small real project: cache, selective re-run, failures, retries,
and the per-step entry point in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mloop.errors import ConfigError, PipelineDefinitionError, StepFailedError
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project

from .helpers import FLAKY_TRAIN, SMALL_CONFIG, rentals_frame, run_cli

pytestmark = pytest.mark.slow


def _statuses(result) -> dict[str, str]:
    return {s.step: ("hit" if s.cache_hit else "miss") for s in result.steps}


def _versions(project) -> list:
    return project.mlflow.search_model_versions(f"name='{project.config.model_name}'")


def test_second_run_hits_the_cache_for_every_step_but_ingest(make_project) -> None:
    root = make_project()
    first = run_pipeline(open_project(root))
    second = run_pipeline(open_project(root))
    assert set(_statuses(first).values()) == {"miss"}
    assert _statuses(second) == {"ingest": "miss", "validate": "hit", "snapshot": "hit",
                                 "split": "hit", "train": "hit", "evaluate": "hit",
                                 "register": "hit"}
    assert [s.outputs for s in first.steps] == [s.outputs for s in second.steps]
    project = open_project(root)
    assert len(_versions(project)) == 1  # identical model: no duplicate version
    # the cached run's MLflow parent still shows its holdout metrics and its data, and what
    # it used (only ingest ran: mloop cost prices that)
    parent = project.mlflow.get_run(second.mlflow_run_id)
    assert set(parent.data.metrics) == {"holdout_mae", "holdout_rmse", "mloop.cpu_seconds",
                                        "mloop.peak_memory_mb", "mloop.memory_gb_hours",
                                        "mloop.seconds"}
    ingest = project.mlflow.get_run(second.steps[0].mlflow_run_id).data.metrics
    assert parent.data.metrics["mloop.cpu_seconds"] == pytest.approx(
        ingest["cpu_seconds"], abs=1e-4)
    contexts = sorted({t.value for d in parent.inputs.dataset_inputs for t in d.tags})
    assert contexts == ["holdout", "source", "training"]


def test_a_cached_registration_is_redone_when_its_version_was_deleted(make_project) -> None:
    root = make_project()
    run_pipeline(open_project(root))
    project = open_project(root)
    project.mlflow.delete_model_version("rentals", "1")
    again = run_pipeline(project)
    register = next(s for s in again.steps if s.step == "register")
    assert register.cache_hit is False
    assert [int(v.version) for v in _versions(project)] == [2]


def test_odd_column_names_become_legal_mlflow_param_keys(make_project) -> None:
    frame = rentals_frame().rename(columns={"temp": "temp (°C)"})
    config = SMALL_CONFIG.replace("    temp: {type: numeric", "    'temp (°C)': {type: numeric")
    root = make_project(config, frame=frame)
    result = run_pipeline(open_project(root))
    assert result.status == "succeeded"
    validate = next(s for s in result.steps if s.step == "validate")
    params = open_project(root).mlflow.get_run(validate.mlflow_run_id).data.params
    assert params["rules.columns.temp __C_.max"] == "60.0"


def test_changing_a_model_param_reruns_only_the_steps_downstream(make_project) -> None:
    root = make_project()
    first = run_pipeline(open_project(root))
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace("max_iter: 30", "max_iter: 40"))
    second = run_pipeline(open_project(root))
    assert _statuses(second) == {"ingest": "miss", "validate": "hit", "snapshot": "hit",
                                 "split": "hit", "train": "miss", "evaluate": "miss",
                                 "register": "miss"}
    assert first.steps[3].outputs == second.steps[3].outputs  # same train/holdout snapshots
    assert sorted(int(v.version) for v in _versions(open_project(root))) == [1, 2]


def test_new_data_reruns_everything_after_ingest(make_project) -> None:
    root = make_project()
    run_pipeline(open_project(root))
    rentals_frame(seed=1).to_parquet(root / "data" / "rentals.parquet", index=False)
    second = run_pipeline(open_project(root))
    assert set(_statuses(second).values()) == {"miss"}


FAILING_STEP = """\
def train(data, target, task, features, model):
    raise RuntimeError("the GPU caught fire")
"""


def test_failing_step_fails_the_run_and_registers_nothing(make_project) -> None:
    root = make_project(SMALL_CONFIG + "pipeline:\n  steps:\n    train: my_steps:train\n",
                        files={"my_steps.py": FAILING_STEP})
    project = open_project(root)
    with pytest.raises(StepFailedError, match=r"Step 'train' failed .*the GPU caught fire"):
        run_pipeline(project)
    run = project.store.list_pipeline_runs()[0]
    assert run.status == "failed"
    steps = {s.step: s for s in project.store.step_runs(run.id)}
    assert list(steps) == ["ingest", "validate", "snapshot", "split", "train"]
    assert steps["train"].status == "failed"
    assert "RuntimeError: the GPU caught fire" in steps["train"].traceback
    assert _versions(project) == []
    client = MlflowClient(project.uris["tracking_uri"])
    assert client.get_run(run.mlflow_run_id).info.status == "FAILED"
    train_run = client.get_run(steps["train"].mlflow_run_id)
    assert train_run.info.status == "FAILED"
    assert "the GPU caught fire" in train_run.data.tags["mloop.error"]


def test_retries_recover_a_flaky_step(make_project) -> None:
    config = SMALL_CONFIG + ("pipeline:\n  steps:\n    train: flaky:train\n  retries: 2\n"
                             "  retry_backoff_seconds: 0.05\n")
    root = make_project(config, files={"flaky.py": FLAKY_TRAIN})
    result = run_pipeline(open_project(root))
    train = next(s for s in result.steps if s.step == "train")
    assert (result.status, train.status, train.attempts) == ("succeeded", "succeeded", 2)
    assert (root / "attempts.txt").read_text() == "2"


def test_validation_failure_reports_every_violation_and_registers_nothing(make_project) -> None:
    frame = rentals_frame()
    frame.loc[3, "temp"] = 99.0
    frame.loc[7, "weather"] = "Snow"
    root = make_project(frame=frame)
    project = open_project(root)
    with pytest.raises(StepFailedError) as info:
        run_pipeline(project)
    msg = str(info.value)
    assert "Step 'validate' failed" in msg
    assert "column 'temp': max: expected 60.0; 1 row(s), e.g. [99.0]" in msg
    assert "column 'weather': allowed" in msg and "'Snow'" in msg
    assert _versions(project) == []


def test_step_run_in_a_fresh_process_reproduces_the_outputs(make_project) -> None:
    root = make_project()
    local = run_pipeline(open_project(root))
    by_step = {s.step: s.outputs for s in local.steps}
    for step_name in ("split", "evaluate"):
        proc = run_cli("step", "run", "tabular", step_name, "--run-id", local.run_id,
                       "--no-cache", "--json", cwd=root)
        got = json.loads(proc.stdout)
        assert got["cache_hit"] is False
        assert got["outputs"] == by_step[step_name]


def test_an_orchestrator_can_run_every_step_in_its_own_process(make_project) -> None:
    root = make_project()
    created = json.loads(run_cli("runs", "create", "tabular", "--json", cwd=root).stdout)
    run_id = created["run_id"]
    for step_name in ("ingest", "validate", "snapshot", "split", "train", "evaluate",
                      "register"):
        run_cli("step", "run", "tabular", step_name, "--run-id", run_id, "--json", cwd=root)
    shown = json.loads(run_cli("runs", "show", run_id, "--json", cwd=root).stdout)
    assert shown["status"] == "succeeded"
    # the --json shape scripts rely on
    assert set(shown) == {"run_id", "pipeline", "status", "started_at", "ended_at", "duration_s",
                          "mlflow_run_id", "config_hash", "steps_total", "cache_hits", "error",
                          "steps", "traceback", "experiment_id"}
    # the experiment the run is in, so a link into MLflow's UI can be made from it
    assert shown["experiment_id"] == open_project(root).mlflow.get_run(
        shown["mlflow_run_id"]).info.experiment_id
    assert set(shown["steps"][0]) == {"step", "status", "cache_hit", "duration_s",
                                      "peak_memory_mb", "attempts", "mlflow_run_id",
                                      "cache_key", "outputs", "error"}
    assert [s["step"] for s in shown["steps"]] == ["ingest", "validate", "snapshot", "split",
                                                   "train", "evaluate", "register"]
    project = open_project(root)
    versions = _versions(project)
    assert len(versions) == 1
    assert versions[0].tags["mloop.pipeline_run_id"] == run_id


def test_step_run_refuses_missing_inputs_and_unknown_steps(make_project) -> None:
    root = make_project()
    run_id = json.loads(run_cli("runs", "create", "--json", cwd=root).stdout)["run_id"]
    proc = run_cli("step", "run", "tabular", "train", "--run-id", run_id, cwd=root, check=False)
    assert proc.returncode == 1
    assert "step 'train' needs the output of 'split', which has not succeeded" in proc.stderr
    proc = run_cli("step", "run", "tabular", "trian", "--run-id", run_id, cwd=root,
                   check=False)
    assert proc.returncode == 1
    assert "has no step 'trian'; steps: ingest, validate, snapshot, split, train" in proc.stderr


def test_unknown_metric_for_the_task_is_a_config_error(make_project) -> None:
    root = make_project(SMALL_CONFIG.replace("metrics: [mae, rmse]", "metrics: [mae, acuracy]"))
    with pytest.raises(ConfigError, match=r"mloop.yaml:12: 'metrics': unknown metric 'acuracy'"):
        run_pipeline(open_project(root))


def test_metric_of_the_wrong_task_is_a_config_error(make_project) -> None:
    root = make_project(SMALL_CONFIG.replace("metrics: [mae, rmse]", "metrics: [accuracy]"))
    with pytest.raises(StepFailedError, match=r"'metrics': 'accuracy' is not a regression "
                                              r"metric"):
        run_pipeline(open_project(root))


def test_unimportable_step_override_names_the_key(make_project) -> None:
    root = make_project(SMALL_CONFIG + "pipeline:\n  steps:\n    train: nowhere:train\n")
    with pytest.raises(ConfigError, match=r"mloop.yaml:20: 'pipeline.steps.train': cannot "
                                          r"import module 'nowhere'"):
        run_pipeline(open_project(root))


def test_override_of_a_step_the_pipeline_lacks_lists_the_steps(make_project) -> None:
    root = make_project(SMALL_CONFIG + "pipeline:\n  steps:\n    tune: my_steps:train\n",
                        files={"my_steps.py": FAILING_STEP})
    with pytest.raises(PipelineDefinitionError, match=r"has no step 'tune'; steps: ingest"):
        run_pipeline(open_project(root))


def test_missing_target_column_is_named(make_project) -> None:
    root = make_project(SMALL_CONFIG.replace("target: cnt", "target: count"))
    proc = run_cli("run", cwd=root, check=False)
    assert proc.returncode == 1
    assert "column 'count': required" in proc.stderr
    assert Path(root / ".mloop").exists()


CLASSIFY = """\
project: weather
data: {path: data/rentals.parquet}
target: weather
features:
  time_column: ts
  categorical: [hour]
split: {method: random, holdout: 0.3, seed: 7}
model:
  estimator: sklearn.linear_model.LogisticRegression
  params: {max_iter: 500}
"""


def test_a_text_target_is_inferred_as_classification_with_overridden_feature_kinds(
        make_project) -> None:
    from mloop.pipeline.artifacts import load_output
    from mloop.serving.model import load_served

    root = make_project(CLASSIFY)
    project = open_project(root)
    result = run_pipeline(project)
    train = next(s for s in result.steps if s.step == "train")
    spec = load_output(train.outputs["spec"], project.outputs, project.snapshots)
    assert spec["task"] == "classification"
    assert (spec["categorical"], spec["numeric"]) == (["hour"], ["temp", "cnt"])
    assert spec["classes"] == ["Clear", "Mist", "Rain"]
    evaluation = next(s for s in result.steps if s.step == "evaluate")
    metrics = load_output(evaluation.outputs["output"], project.outputs, project.snapshots)
    assert set(metrics["metrics"]) == {"accuracy", "f1_macro", "roc_auc", "log_loss"}
    # the accuracy is the registered version's on the holdout rows, recomputed here
    holdout = project.snapshots.read_table(metrics["holdout_digest"]).to_pandas()
    assert len(holdout) == metrics["holdout_rows"] == 180
    predicted = load_served(project, 1).predict_columns(
        {c: holdout[c].tolist() for c in ("hour", "temp", "cnt")})
    assert metrics["metrics"]["accuracy"] == pytest.approx(
        float(np.mean(np.asarray(predicted, dtype=object) == holdout["weather"].to_numpy())))
    (mv,) = _versions(project)
    assert mv.tags["mloop.task"] == "classification"


def test_a_binary_text_target_trains_and_scores_f1_of_the_larger_label(make_project) -> None:
    """Found with LightGBM: a two-class target with text labels failed the train step (its
    f1 asked scikit-learn for pos_label=1, a label the target does not have)."""
    frame = rentals_frame()
    frame["weather"] = np.where(frame["weather"] == "Clear", "dry", "wet")
    root = make_project(CLASSIFY, frame=frame)
    project = open_project(root)
    result = run_pipeline(project)
    (mv,) = _versions(project)
    train = next(s for s in result.steps if s.step == "train")
    assert train.mlflow_run_id is not None
    assert 0.0 <= project.mlflow.get_run(train.mlflow_run_id).data.metrics["train_f1"] <= 1.0
    holdout = project.snapshots.read_table(mv.tags["mloop.snapshot.holdout"]).to_pandas()
    assert set(holdout["weather"]) == {"dry", "wet"}


@pytest.mark.parametrize(("edit", "message"), [
    ("estimator: sklearn.ensemble.HistGradientBoostingRegresor",
     r"mloop.yaml:10: 'model.estimator': module 'sklearn.ensemble' has no attribute "
     r"'HistGradientBoostingRegresor'"),
    ("estimator: sklearn.ensemble.HistGradientBoostingRegressor\n  params: {max_iters: 3}",
     r"mloop.yaml:11: 'model.params': sklearn.ensemble.HistGradientBoostingRegressor does not "
     r"accept these params"),
])
def test_a_bad_estimator_fails_before_any_data_is_read(make_project, edit, message) -> None:
    config = SMALL_CONFIG.replace(
        "estimator: sklearn.ensemble.HistGradientBoostingRegressor\n"
        "  params: {max_iter: 30, random_state: 0}", edit)
    root = make_project(config)
    project = open_project(root)
    with pytest.raises(ConfigError, match=message):
        run_pipeline(project)
    assert project.store.list_pipeline_runs() == []


BROKEN_CACHE_CHECK = """\
import mloop

def explode(project, outputs):
    raise RuntimeError("cache check exploded")

@mloop.step(cache_valid=explode)
def make(n: int):
    return {"n": n}

@mloop.pipeline(name="tiny")
def pipe(cfg):
    make(n=3)
"""


def test_an_error_outside_the_step_body_still_ends_the_run_as_failed(make_project) -> None:
    config = "project: tiny\ndata: {path: data/rentals.parquet}\ntarget: cnt\n" \
             "pipeline: {entry: 'tiny_steps:pipe'}\n"
    root = make_project(config, files={"tiny_steps.py": BROKEN_CACHE_CHECK})
    run_pipeline(open_project(root))  # first run: nothing cached, the check is not consulted
    project = open_project(root)
    with pytest.raises(StepFailedError, match="RuntimeError: cache check exploded"):
        run_pipeline(project)
    latest = project.store.list_pipeline_runs()[0]
    assert latest.status == "failed"
    (step_run,) = project.store.step_runs(latest.id)
    assert step_run.status == "failed"
    assert "cache check exploded" in step_run.traceback
    assert project.mlflow.get_run(step_run.mlflow_run_id).info.status == "FAILED"
    assert project.mlflow.get_run(latest.mlflow_run_id).info.status == "FAILED"


def test_step_run_refuses_a_run_whose_config_has_changed(make_project) -> None:
    from mloop.pipeline.runner import create_run, run_single_step

    root = make_project()
    run = create_run(open_project(root))
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace("holdout: 0.25", "holdout: 0.3"))
    with pytest.raises(PipelineDefinitionError, match=r"mloop.yaml changed since pipeline run "
                                                      r".* start a new run"):
        run_single_step(open_project(root), "tabular", "ingest", run.id)
