"""LightGBM on the verified fast path: a tabular pipeline ending in ``lightgbm.LGBMRegressor``
or ``LGBMClassifier`` is compiled to one ONNX graph (onnxmltools' converter in skl2onnx),
verified on the holdout exactly as a scikit-learn model is, and served from that graph; one
that does not verify is served by the original, its verdict saying why.

Two small projects trained with real LightGBM: rentals (regression; v1 with the default
tolerances, v2 with a zero tolerance that float32 trees cannot meet) and busy hours
(three classes named by strings, with probabilities)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from mloop.project import open_project
from mloop.serving.model import load_served

from . import tree_engines as te
from .helpers import copy_project, require
from .serving_util import check_verdict_redone_at_load
from .tree_engines import DEFAULT, STRICT, Engine

pytestmark = pytest.mark.slow

PARAMS = "{{n_estimators: {n}, num_leaves: 15, min_child_samples: 5, random_state: 0, " \
    "n_jobs: 1, verbose: -1}}"
ENGINE = Engine("lightgbm", "LGBMRegressor", "LGBMClassifier", PARAMS,
                ("quiet", "busy", "peak"))
CLASSES = ["busy", "peak", "quiet"]


@pytest.fixture(scope="module", autouse=True)
def _lightgbm() -> None:
    """Real LightGBM and onnxmltools, or the tests skip (fail under CI=true)."""
    require("lightgbm", install="pip install 'mloop[lightgbm]'")
    require("onnxmltools", install="pip install 'mloop[fast]'")


@pytest.fixture(scope="module")
def rentals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ENGINE.project(tmp_path_factory.mktemp("lgbm") / "rentals", "rentals", "regression",
                          [(30, DEFAULT), (20, STRICT)])


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ENGINE.project(tmp_path_factory.mktemp("lgbm") / "busy", "busy", "classification",
                          [(30, DEFAULT)])


def test_a_lightgbm_regressor_registers_verified_with_the_libraries_it_depends_on(
        rentals: Path) -> None:
    verdict = te.verdict_tag(rentals, "rentals", 1)
    assert verdict["status"] == "verified", verdict
    assert verdict["rows"] == 150 and verdict["mismatches"] == 0  # the holdout: 25% of 600
    against = verdict["against"]
    # onnxmltools made the graph and LightGBM runs the original it was verified against
    for library in ("lightgbm", "onnxmltools", "skl2onnx", "onnxruntime", "scikit-learn"):
        assert against[library] == metadata.version(library)
    assert verdict["artifact"]["path"].endswith(".onnx")


def test_the_server_answers_a_lightgbm_regressor_from_its_graph_as_the_original_does(
        rentals: Path) -> None:
    frame = ENGINE.frame(60, seed=7)
    with te.server(rentals) as srv:
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": te.records(frame)})
    assert champion["engine"] == "onnx" and champion["compiled"]["status"] == "verified"
    assert champion["original_loaded"] is False  # the stored graph alone serves
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["predictions"], dtype=np.float64)
    model, prepare = te.original(rentals, 1)
    expected = np.asarray(model.predict(prepare(frame)), dtype=np.float64)
    assert np.all(np.abs(got - expected) <= 1e-3 + 1e-4 * np.abs(expected)), \
        np.abs(got - expected).max()
    assert np.ptp(expected) > 50  # a model that learned the hours, not a constant


def test_a_lightgbm_model_that_does_not_verify_is_served_by_the_original_saying_why(
        rentals: Path) -> None:
    verdict = te.verdict_tag(rentals, "rentals", 2)
    assert verdict["status"] == "mismatch" and verdict["mismatches"] > 0
    assert "outside" in verdict["detail"] and "allowed 0 + 0·|prediction|" in verdict["detail"]
    frame = ENGINE.frame(30, seed=9)
    project = open_project(rentals)
    served = load_served(project, 2, compile=project.config.serving.compile.model_copy(
        update={"atol": 0.0, "rtol": 0.0}))
    assert served.compiled is None and served.describe()["engine"] == "original"
    assert served.compile_verdict is not None
    assert served.compile_verdict["status"] == "mismatch"
    model, prepare = te.original(rentals, 2)
    records = te.records(frame)
    cols = {c: [r[c] for r in records] for c in ("hour", "weather", "temp")}
    assert served.predict_columns(cols) == model.predict(prepare(frame)).tolist()  # exact


@pytest.mark.parametrize(("library", "redone", "compiled_at"), [
    ("lightgbm", "verified again at load", "registration"),
    ("onnxmltools", "compiled at load", "load"),
])
def test_a_lightgbm_verdict_made_with_another_lightgbm_or_onnxmltools_is_redone_at_load(
        rentals: Path, tmp_path: Path, library: str, redone: str, compiled_at: str) -> None:
    """LightGBM runs the original the graph is compared with: checked again. Another
    onnxmltools would make another graph: compiled again."""
    check_verdict_redone_at_load(open_project(copy_project(rentals, tmp_path)), library,
                                 redone, compiled_at)


# ------------------------------------------------------------------------ classification

def test_a_lightgbm_classifier_serves_labels_and_probabilities_from_its_verified_graph(
        busy: Path) -> None:
    verdict = te.verdict_tag(busy, "busy", 1)
    assert verdict["status"] == "verified", verdict
    assert "0 labels differ" in verdict["detail"]
    assert verdict["against"]["lightgbm"] == metadata.version("lightgbm")
    frame = ENGINE.frame(60, seed=11)
    with te.server(busy) as srv:
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": te.records(frame)})
    assert champion["engine"] == "onnx" and champion["classes"] == CLASSES
    assert r.status_code == 200, r.text
    body = r.json()
    model, prepare = te.original(busy, 1)
    x = prepare(frame)
    assert body["classes"] == CLASSES
    assert body["predictions"] == model.predict(x).tolist()
    proba = np.asarray(body["probabilities"])
    expected = np.asarray(model.predict_proba(x))
    assert proba.shape == (60, 3)
    assert np.all(np.abs(proba - expected) <= 1e-3 + 1e-4 * expected)
    assert set(body["predictions"]) == set(CLASSES)  # every class, not a constant
