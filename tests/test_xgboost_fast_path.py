"""XGBoost on the verified fast path: a tabular pipeline ending in ``xgboost.XGBRegressor`` or
``XGBClassifier`` is compiled to one ONNX graph (onnxmltools' converter in skl2onnx), verified
on the holdout exactly as a scikit-learn model is, and served from that graph; one that does
not verify is served by the original, its verdict saying why.

Two small projects trained with real XGBoost (the ``xgboost`` extra: xgboost-cpu): rentals
(regression; v1 with the default tolerances, v2 with a zero tolerance that float32 trees
cannot meet) and busy hours (three classes, with probabilities; coded 0, 1, 2, as
XGBClassifier requires)."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mloop.errors import MloopError
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.candidates import version_files
from mloop.registry.gates import load_version
from mloop.registry.promotion import change_alias
from mloop.serving.app import create_app
from mloop.serving.compiled import TAG
from mloop.serving.model import load_served

from .helpers import copy_project, rentals_frame, require
from .serving_util import ServerThread, check_verdict_redone_at_load

pytestmark = pytest.mark.slow

PARAMS = "{{n_estimators: {n}, max_depth: 4, learning_rate: 0.3, random_state: 0, n_jobs: 1}}"
CONFIG = """\
project: {name}
data: {{path: data/rentals.parquet}}
target: {target}
task: {task}
features:
  time_column: ts
  exclude: {exclude}
split: {{method: time, holdout: 0.25}}
model:
  estimator: xgboost.{estimator}
  params: {params}
  threads: 1
metrics: [{metric}]
serving:
  poll_seconds: 3600
  compile: {compile}
"""
DEFAULT = "{}"
STRICT = "{atol: 0.0, rtol: 0.0}"
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


def _frame(n: int, seed: int) -> pd.DataFrame:
    frame = rentals_frame(n, seed=seed)
    weather = frame["weather"].astype(object)
    weather[np.random.default_rng(seed + 1).random(n) < 0.05] = None  # imputed in the graph
    frame["weather"] = weather
    frame["busy"] = np.select([frame["cnt"] <= 40, frame["cnt"] <= 110], [0, 1], 2)
    return frame


def _project(root: Path, name: str, task: str, runs: list[tuple[int, str]]) -> Path:
    """A project trained once per (n_estimators, compile setting) in ``runs`` (another
    model each: the same one would be the cached version), v1 champion, configured with
    the default tolerances."""
    (root / "data").mkdir(parents=True)
    _frame(600, seed=0).to_parquet(root / "data" / "rentals.parquet", index=False)
    regression = task == "regression"

    def write(n: int, compile_: str) -> None:
        (root / "mloop.yaml").write_text(CONFIG.format(
            name=name, task=task, compile=compile_, params=PARAMS.format(n=n),
            target="cnt" if regression else "busy", exclude="[busy]" if regression else "[cnt]",
            estimator="XGBRegressor" if regression else "XGBClassifier",
            metric="mae" if regression else "accuracy"))

    for n, compile_ in runs:
        write(n, compile_)
        assert run_pipeline(open_project(root)).status == "succeeded"
    write(runs[0][0], DEFAULT)  # what the servers and loads below are configured with
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


@pytest.fixture(scope="module")
def rentals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _project(tmp_path_factory.mktemp("xgb") / "rentals", "rentals", "regression",
                    [(30, DEFAULT), (20, STRICT)])


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _project(tmp_path_factory.mktemp("xgb") / "busy", "busy", "classification",
                    [(30, DEFAULT)])


def _tag(root: Path, name: str, version: int) -> dict[str, Any]:
    mv = open_project(root).mlflow.get_model_version(name, str(version))
    return json.loads(mv.tags[TAG])  # type: ignore[no-any-return]


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"hour": int(h), "weather": None if w is None else str(w), "temp": float(t)}
            for h, w, t in zip(frame["hour"], frame["weather"], frame["temp"], strict=True)]


def _original(root: Path, version: int) -> tuple[Any, Any]:
    """The registered XGBoost pipeline itself (not mloop's serving path) and its input."""
    loaded = load_version(open_project(root), version)
    return loaded.sklearn_model, loaded.prepare


def _server(root: Path) -> ServerThread:
    project = open_project(root)
    return ServerThread(create_app(project, project.config.serving.model_copy(deep=True)))


# ---------------------------------------------------------------------------- regression

def test_an_xgboost_regressor_registers_verified_with_the_libraries_it_depends_on(
        rentals: Path) -> None:
    verdict = _tag(rentals, "rentals", 1)
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
    frame = _frame(60, seed=7)
    with _server(rentals) as srv:
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": _records(frame)})
    assert champion["engine"] == "onnx" and champion["compiled"]["status"] == "verified"
    assert champion["original_loaded"] is False  # the stored graph alone serves
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["predictions"], dtype=np.float64)
    model, prepare = _original(rentals, 1)
    expected = np.asarray(model.predict(prepare(frame)), dtype=np.float64)
    assert np.all(np.abs(got - expected) <= 1e-3 + 1e-4 * np.abs(expected)), \
        np.abs(got - expected).max()
    assert np.ptp(expected) > 50  # a model that learned the hours, not a constant


def test_an_xgboost_model_that_does_not_verify_is_served_by_the_original_saying_why(
        rentals: Path) -> None:
    verdict = _tag(rentals, "rentals", 2)
    assert verdict["status"] == "mismatch" and verdict["mismatches"] > 0
    assert "outside" in verdict["detail"] and "allowed 0 + 0·|prediction|" in verdict["detail"]
    frame = _frame(30, seed=9)
    project = open_project(rentals)
    served = load_served(project, 2, compile=project.config.serving.compile.model_copy(
        update={"atol": 0.0, "rtol": 0.0}))
    assert served.compiled is None and served.describe()["engine"] == "original"
    assert served.compile_verdict is not None
    assert served.compile_verdict["status"] == "mismatch"
    model, prepare = _original(rentals, 2)
    records = _records(frame)
    cols = {c: [r[c] for r in records] for c in ("hour", "weather", "temp")}
    assert served.predict_columns(cols) == model.predict(prepare(frame)).tolist()  # exact


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
    verdict = _tag(busy, "busy", 1)
    assert verdict["status"] == "verified", verdict
    assert "0 labels differ" in verdict["detail"]
    assert verdict["against"]["xgboost"] == _xgboost_version()
    frame = _frame(60, seed=11)
    with _server(busy) as srv:
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": _records(frame)})
    assert champion["engine"] == "onnx" and champion["classes"] == CLASSES
    assert r.status_code == 200, r.text
    body = r.json()
    model, prepare = _original(busy, 1)
    x = prepare(frame)
    assert body["classes"] == CLASSES
    assert body["predictions"] == model.predict(x).tolist()
    proba = np.asarray(body["probabilities"])
    expected = np.asarray(model.predict_proba(x))
    assert proba.shape == (60, 3)
    assert np.all(np.abs(proba - expected) <= 1e-3 + 1e-4 * expected)
    assert set(body["predictions"]) == set(CLASSES)  # every class, not a constant


def test_an_xgboost_classifier_refuses_text_classes_before_training_saying_how_to_fix(
        tmp_path: Path) -> None:
    """XGBClassifier learns only classes coded 0 to n-1: mloop says so, naming the key and
    the way out, instead of XGBoost's own error from inside the train step."""
    root = tmp_path / "busy"
    (root / "data").mkdir(parents=True)
    frame = _frame(200, seed=0)
    frame["busy"] = np.array(["quiet", "busy", "peak"])[frame["busy"]]
    frame.to_parquet(root / "data" / "rentals.parquet", index=False)
    (root / "mloop.yaml").write_text(CONFIG.format(
        name="busy", task="classification", compile=DEFAULT, params=PARAMS.format(n=5),
        target="busy", exclude="[cnt]", estimator="XGBClassifier", metric="accuracy"))
    project = open_project(root)
    with pytest.raises(MloopError, match=(
            r"'model.estimator': xgboost.XGBClassifier learns only classes coded 0 to 2; "
            r"target 'busy' has 'busy', 'peak', 'quiet'. Code the classes as integers")):
        run_pipeline(project)
    assert project.mlflow.search_model_versions("name='busy'") == []
