"""Everything mloop writes must read back with plain MlflowClient, unchanged."""

from __future__ import annotations

import json

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project

pytestmark = pytest.mark.slow

STEPS = ["ingest", "validate", "snapshot", "split", "train", "evaluate", "register"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
    from .helpers import SMALL_CONFIG, rentals_frame

    root = tmp_path_factory.mktemp("readback")
    (root / "data").mkdir()
    (root / "mloop.yaml").write_text(SMALL_CONFIG)
    rentals_frame().to_parquet(root / "data" / "rentals.parquet", index=False)
    project = open_project(root)
    result = run_pipeline(project)
    return project, result, MlflowClient(project.uris["tracking_uri"],
                                         registry_uri=project.uris["registry_uri"])


def test_pipeline_run_is_a_parent_run_with_one_nested_run_per_step(trained) -> None:
    project, result, client = trained
    exp = client.get_experiment_by_name("rentals")
    assert exp is not None and exp.artifact_location.endswith(".mloop/artifacts")
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mloop.pipeline_run_id"] == result.run_id
    assert parent.data.tags["mloop.config_hash"] == project.config.config_hash()
    # the model's holdout metrics, and what the run used (summed over its steps: `mloop cost`)
    assert set(parent.data.metrics) == {"holdout_mae", "holdout_rmse", "mloop.cpu_seconds",
                                        "mloop.peak_memory_mb", "mloop.memory_gb_hours",
                                        "mloop.seconds"}
    assert parent.data.metrics["mloop.cpu_seconds"] > 0
    assert parent.data.metrics["mloop.peak_memory_mb"] > 10
    children = client.search_runs([exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(STEPS)
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mloop.cache"] == "miss"
        assert {"duration_s", "peak_memory_mb", "cache_hit"} <= set(run.data.metrics)
        assert run.data.metrics["peak_memory_mb"] > 10
    train = next(r for r in children if r.info.run_name == "train")
    assert train.data.params["model.params.max_iter"] == "30"
    assert {"train_mae", "train_rmse", "train_r2"} <= set(train.data.metrics)
    ingest = next(r for r in children if r.info.run_name == "ingest")
    assert ingest.data.metrics["rows"] == 600


def test_snapshots_are_mlflow_dataset_inputs_with_their_digest(trained) -> None:
    project, result, client = trained
    parent = client.get_run(result.mlflow_run_id)
    inputs = {}
    for d in parent.inputs.dataset_inputs:
        ctx = {t.key: t.value for t in d.tags}["mlflow.data.context"]
        inputs[ctx] = d.dataset
    assert set(inputs) == {"source", "training", "holdout"}
    split = next(s for s in result.steps if s.step == "split")
    train_digest = split.outputs["train"]["digest"]
    assert inputs["training"].digest == train_digest[:36]
    assert inputs["training"].source_type == "local"
    assert json.loads(inputs["training"].profile) == {"num_rows": 450,
                                                       "mloop_digest": train_digest}
    schema = json.loads(inputs["training"].schema)["mlflow_colspec"]
    assert {c["name"]: c["type"] for c in schema}["temp"] == "double"
    # mlflow.data resolves the source back to the snapshot's own Parquet file
    path = mlflow.data.get_source(inputs["training"]).load()
    assert pq.read_table(path).num_rows == 450
    assert path == project.snapshots.get(train_digest).uri


def test_registered_version_carries_its_lineage_tags(trained) -> None:
    project, result, client = trained
    (mv,) = client.search_model_versions("name='rentals'")
    tags = mv.tags
    split = next(s for s in result.steps if s.step == "split")
    snap = next(s for s in result.steps if s.step == "snapshot")
    assert tags["mloop.pipeline_run_id"] == result.run_id
    assert tags["mloop.snapshot.train"] == split.outputs["train"]["digest"]
    assert tags["mloop.snapshot.holdout"] == split.outputs["holdout"]["digest"]
    assert tags["mloop.snapshot.source"] == snap.outputs["output"]["digest"]
    assert tags["mloop.config_hash"] == project.config.config_hash()
    assert tags["mloop.version"] == "0.1.0"
    # the evaluate step's holdout metrics (the tags keep six significant digits)
    holdout = client.get_run(result.mlflow_run_id).data.metrics
    assert float(tags["mloop.metric.mae"]) == pytest.approx(holdout["holdout_mae"], rel=1e-5)
    assert float(tags["mloop.metric.rmse"]) == pytest.approx(holdout["holdout_rmse"], rel=1e-5)
    assert "mloop.git_commit" not in tags  # the temp project is not a git work tree


def test_registered_model_loads_with_pyfunc_and_takes_raw_columns(trained) -> None:
    project, _result, _client = trained
    mlflow.set_tracking_uri(project.uris["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/rentals/1")
    inputs = [c.name for c in model.metadata.get_input_schema().inputs]
    assert sorted(inputs) == ["hour", "temp", "weather"]
    pred = model.predict(pd.DataFrame({"hour": [8.0, 17.0], "temp": [20.0, 5.0],
                                       "weather": ["Clear", "Rain"]}))
    assert len(pred) == 2 and pred[0] > pred[1]
