"""XGBoost on the verified fast path: a tabular pipeline ending in ``xgboost.XGBRegressor`` or
``XGBClassifier`` is compiled to one ONNX graph (onnxmltools' converter in skl2onnx), verified
on the holdout exactly as a scikit-learn model is, and served from that graph; one that does
not verify is served by the original, its verdict saying why.

Two small projects trained with real XGBoost (the ``xgboost`` extra: xgboost-cpu): rentals
(regression; v1 with the default tolerances, v2 with a zero tolerance that float32 trees
cannot meet) and busy hours (three classes, with probabilities; coded 0, 1, 2, as
XGBClassifier requires)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from mloop.errors import MloopError
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.candidates import version_files

from . import tree_engines as te
from .helpers import copy_project, require
from .serving_util import check_verdict_redone_at_load
from .tree_engines import DEFAULT, Engine

pytestmark = pytest.mark.slow

PARAMS = "{{n_estimators: {n}, max_depth: 4, learning_rate: 0.3, random_state: 0, n_jobs: 1}}"
ENGINE = Engine("xgboost", "XGBRegressor", "XGBClassifier", PARAMS, (0, 1, 2))
CLASSES = [0, 1, 2]  # quiet, busy, peak


@pytest.fixture(scope="module", autouse=True)
def _xgboost() -> None:
    """Real XGBoost and onnxmltools, or the tests skip (fail under CI=true)."""
    require("xgboost", install="pip install 'mloop[xgboost]'")
    require("onnxmltools", install="pip install 'mloop[fast]'")


def _xgboost_version() -> str:
    """The installed XGBoost, whichever distribution brought it (the extra's xgboost-cpu)."""
    for dist in ("xgboost-cpu", "xgboost"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    raise AssertionError("xgboost is importable but no distribution provides it")


rentals, busy = te.project_fixtures(ENGINE)


def test_an_xgboost_regressor_registers_verified_with_the_libraries_it_depends_on(
        rentals: Path) -> None:
    verdict = te.verdict_tag(rentals, "rentals", 1)
    assert verdict["status"] == "verified", verdict
    assert verdict["rows"] == 150 and verdict["mismatches"] == 0  # the holdout: 25% of 600
    against = verdict["against"]
    # onnxmltools made the graph and XGBoost runs the original it was verified against
    assert against["xgboost"] == _xgboost_version()
    for library in ("onnxmltools", "skl2onnx", "onnxruntime", "scikit-learn"):
        assert against[library] == metadata.version(library)
    assert "lightgbm" not in against
    assert verdict["artifact"]["path"].endswith(".onnx")


def test_an_xgboost_version_pins_the_distribution_that_installed_xgboost(
        rentals: Path) -> None:
    """xgboost-cpu provides the module ``xgboost``: the logged model's requirements name the
    distribution, so `mlflow models serve` can install what the model was trained with."""
    files = version_files(open_project(rentals), 1)
    pins = (files.path / "requirements.txt").read_text().split()
    version = _xgboost_version()
    assert f"xgboost-cpu=={version}" in pins or f"xgboost=={version}" in pins, pins


def test_the_server_answers_an_xgboost_regressor_from_its_graph_as_the_original_does(
        rentals: Path) -> None:
    te.check_served_from_its_graph(ENGINE, rentals)


def test_an_xgboost_model_that_does_not_verify_is_served_by_the_original_saying_why(
        rentals: Path) -> None:
    te.check_a_mismatch_served_by_the_original(ENGINE, rentals)


@pytest.mark.parametrize(("library", "redone", "compiled_at"), [
    ("xgboost", "verified again at load", "registration"),
    ("onnxmltools", "compiled at load", "load"),
])
def test_an_xgboost_verdict_made_with_another_xgboost_or_onnxmltools_is_redone_at_load(
        rentals: Path, tmp_path: Path, library: str, redone: str, compiled_at: str) -> None:
    """XGBoost runs the original the graph is compared with: checked again. Another
    onnxmltools would make another graph: compiled again."""
    installed = _xgboost_version() if library == "xgboost" else None
    check_verdict_redone_at_load(open_project(copy_project(rentals, tmp_path)), library,
                                 redone, compiled_at, installed=installed)


# ------------------------------------------------------------------------ classification

def test_an_xgboost_classifier_serves_labels_and_probabilities_from_its_verified_graph(
        busy: Path) -> None:
    verdict = te.verdict_tag(busy, "busy", 1)
    assert verdict["status"] == "verified", verdict
    assert "0 labels differ" in verdict["detail"]
    assert verdict["against"]["xgboost"] == _xgboost_version()
    te.check_classifier_served_from_its_graph(ENGINE, busy, CLASSES)


def test_an_xgboost_classifier_refuses_text_classes_before_training_saying_how_to_fix(
        tmp_path: Path) -> None:
    """XGBClassifier learns only classes coded 0 to n-1: mloop says so, naming the key and
    the way out, instead of XGBoost's own error from inside the train step."""
    root = tmp_path / "busy"
    (root / "data").mkdir(parents=True)
    frame = ENGINE.frame(200, seed=0)
    frame["busy"] = np.array(["quiet", "busy", "peak"])[frame["busy"]]
    frame.to_parquet(root / "data" / "rentals.parquet", index=False)
    (root / "mloop.yaml").write_text(
        ENGINE.config(name="busy", task="classification", trees=5, compile_=DEFAULT))
    project = open_project(root)
    with pytest.raises(MloopError, match=(
            r"'model.estimator': xgboost.XGBClassifier learns only classes coded 0 to 2; "
            r"target 'busy' has 'busy', 'peak', 'quiet'. Code the classes as integers")):
        run_pipeline(project)
    assert project.mlflow.search_model_versions("name='busy'") == []
