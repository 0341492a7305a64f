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

import pytest

from mloop.project import open_project

from . import tree_engines as te
from .helpers import copy_project, require
from .serving_util import check_verdict_redone_at_load
from .tree_engines import Engine

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


rentals, busy = te.project_fixtures(ENGINE)


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
    te.check_served_from_its_graph(ENGINE, rentals)


def test_a_lightgbm_model_that_does_not_verify_is_served_by_the_original_saying_why(
        rentals: Path) -> None:
    te.check_a_mismatch_served_by_the_original(ENGINE, rentals)


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
    te.check_classifier_served_from_its_graph(ENGINE, busy, CLASSES)
