"""What the tree-engine fast-path tests share (LightGBM's and XGBoost's): a small rentals
table with a three-class target, projects trained with a real engine, and the ways a test
reads a version's verdict, its original pipeline and its server."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.gates import load_version
from mloop.registry.promotion import change_alias
from mloop.serving.app import create_app
from mloop.serving.compiled import TAG
from mloop.serving.model import load_served

from .helpers import rentals_frame
from .serving_util import ServerThread

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
  estimator: {library}.{estimator}
  params: {params}
  threads: 1
metrics: [{metric}]
serving:
  poll_seconds: 3600
  compile: {compile}
"""
DEFAULT = "{}"
STRICT = "{atol: 0.0, rtol: 0.0}"


@dataclass(frozen=True)
class Engine:
    """One tree library as the tests train it: its module, estimator classes, parameters
    (``{n}``: the number of trees) and how the three busy-hour classes are named."""

    library: str
    regressor: str
    classifier: str
    params: str
    classes: tuple[Any, Any, Any]  # quiet, busy, peak

    def config(self, *, name: str, task: str, trees: int, compile_: str) -> str:
        regression = task == "regression"
        return CONFIG.format(
            name=name, task=task, compile=compile_, library=self.library,
            params=self.params.format(n=trees),
            target="cnt" if regression else "busy", exclude="[busy]" if regression else "[cnt]",
            estimator=self.regressor if regression else self.classifier,
            metric="mae" if regression else "accuracy")

    def frame(self, n: int, seed: int) -> pd.DataFrame:
        """Rentals with 5% of the weather missing (imputed in the graph) and a busy class."""
        frame = rentals_frame(n, seed=seed)
        weather = frame["weather"].astype(object)
        weather[np.random.default_rng(seed + 1).random(n) < 0.05] = None
        frame["weather"] = weather
        quiet, busy, peak = self.classes
        frame["busy"] = np.select([frame["cnt"] <= 40, frame["cnt"] <= 110], [quiet, busy],
                                  peak)
        return frame

    def project(self, root: Path, name: str, task: str, runs: list[tuple[int, str]]) -> Path:
        """A project trained once per (trees, compile setting) in ``runs`` (another model
        each: the same one would be the cached version), v1 champion, configured with the
        default tolerances."""
        (root / "data").mkdir(parents=True)
        self.frame(600, seed=0).to_parquet(root / "data" / "rentals.parquet", index=False)
        for trees, compile_ in runs:
            (root / "mloop.yaml").write_text(
                self.config(name=name, task=task, trees=trees, compile_=compile_))
            assert run_pipeline(open_project(root)).status == "succeeded"
        # what the servers and loads of the tests are configured with
        (root / "mloop.yaml").write_text(
            self.config(name=name, task=task, trees=runs[0][0], compile_=DEFAULT))
        change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                     reason="test setup")
        return root


def project_fixtures(engine: Engine) -> tuple[Any, Any]:
    """The module-scoped fixtures ``rentals`` (regression; v1 with the default tolerances, v2
    with a zero tolerance that float32 trees cannot meet) and ``busy`` (three classes, v1),
    trained with ``engine``. A test module binds them by those names:
    ``rentals, busy = te.project_fixtures(ENGINE)``."""

    @pytest.fixture(scope="module")
    def rentals(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return engine.project(tmp_path_factory.mktemp(engine.library) / "rentals", "rentals",
                              "regression", [(30, DEFAULT), (20, STRICT)])

    @pytest.fixture(scope="module")
    def busy(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return engine.project(tmp_path_factory.mktemp(engine.library) / "busy", "busy",
                              "classification", [(30, DEFAULT)])

    return rentals, busy


def verdict_tag(root: Path, name: str, version: int) -> dict[str, Any]:
    mv = open_project(root).mlflow.get_model_version(name, str(version))
    return json.loads(mv.tags[TAG])  # type: ignore[no-any-return]


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"hour": int(h), "weather": None if w is None else str(w), "temp": float(t)}
            for h, w, t in zip(frame["hour"], frame["weather"], frame["temp"], strict=True)]


def original(root: Path, version: int) -> tuple[Any, Any]:
    """The registered pipeline itself (not mloop's serving path) and its input."""
    loaded = load_version(open_project(root), version)
    return loaded.sklearn_model, loaded.prepare


def server(root: Path, **compile_: Any) -> ServerThread:
    project = open_project(root)
    cfg = project.config.serving.model_copy(deep=True)
    cfg.compile = cfg.compile.model_copy(update=compile_)
    return ServerThread(create_app(project, cfg))


def check_served_from_its_graph(engine: Engine, rentals: Path) -> None:
    """v1 of the rentals project (default tolerances) is served from its stored, verified
    graph alone, answering as the original pipeline does within the tolerances."""
    frame = engine.frame(60, seed=7)
    with server(rentals) as srv:
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": records(frame)})
    assert champion["engine"] == "onnx" and champion["compiled"]["status"] == "verified"
    assert champion["original_loaded"] is False  # the stored graph alone serves
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["predictions"], dtype=np.float64)
    model, prepare = original(rentals, 1)
    expected = np.asarray(model.predict(prepare(frame)), dtype=np.float64)
    assert np.all(np.abs(got - expected) <= 1e-3 + 1e-4 * np.abs(expected)), \
        np.abs(got - expected).max()
    assert np.ptp(expected) > 50  # a model that learned the hours, not a constant


def check_a_mismatch_served_by_the_original(engine: Engine, rentals: Path) -> None:
    """v2 (a zero tolerance float32 trees cannot meet) is a mismatch, says why, and is
    served exactly by the original."""
    verdict = verdict_tag(rentals, "rentals", 2)
    assert verdict["status"] == "mismatch" and verdict["mismatches"] > 0
    assert "outside" in verdict["detail"] and "allowed 0 + 0·|prediction|" in verdict["detail"]
    frame = engine.frame(30, seed=9)
    project = open_project(rentals)
    served = load_served(project, 2, compile=project.config.serving.compile.model_copy(
        update={"atol": 0.0, "rtol": 0.0}))
    assert served.compiled is None and served.describe()["engine"] == "original"
    assert served.compile_verdict is not None
    assert served.compile_verdict["status"] == "mismatch"
    model, prepare = original(rentals, 2)
    rows = records(frame)
    cols = {c: [r[c] for r in rows] for c in ("hour", "weather", "temp")}
    assert served.predict_columns(cols) == model.predict(prepare(frame)).tolist()  # exact


def check_classifier_served_from_its_graph(engine: Engine, busy: Path, classes: list[Any]) -> None:
    """v1 of the busy project answers labels and probabilities from its graph as the original
    pipeline does (``classes``: the classes as the server names them, sorted)."""
    frame = engine.frame(60, seed=11)
    with server(busy) as srv:
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": records(frame)})
    assert champion["engine"] == "onnx" and champion["classes"] == classes
    assert r.status_code == 200, r.text
    body = r.json()
    model, prepare = original(busy, 1)
    x = prepare(frame)
    assert body["classes"] == classes
    assert body["predictions"] == model.predict(x).tolist()
    proba = np.asarray(body["probabilities"])
    expected = np.asarray(model.predict_proba(x))
    assert proba.shape == (60, 3)
    assert np.all(np.abs(proba - expected) <= 1e-3 + 1e-4 * expected)
    assert set(body["predictions"]) == set(classes)  # every class, not a constant
