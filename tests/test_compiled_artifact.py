"""The compiled fast path is compiled and verified once per version: at registration the ONNX
graph goes into the version's run artifacts and its verdict (with what it was verified against)
on the version; a load builds the session from those bytes without skl2onnx or the original
model, re-verifies when tolerances or libraries changed, and compiles again (recording why) when
the graph is missing or altered.

One small project (Poisson gradient boosting on rentals with missing weather values, like the
bike example): v1 registered with the default tolerances (verifies), v2 with a zero tolerance
(float32 trees cannot meet it: "mismatch")."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest

import mloop
from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.promotion import change_alias
from mloop.serving.app import create_app
from mloop.serving.compiled import TAG
from mloop.serving.model import load_served

from .helpers import copy_project
from .serving_util import ServerThread, check_verdict_redone_at_load

pytestmark = pytest.mark.slow

CONFIG = """\
project: rentals
data: {{path: data/rentals.parquet}}
target: cnt
task: regression
features:
  time_column: ts
split: {{method: time, holdout: 0.25}}
model:
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
  params: {{loss: poisson, max_iter: {max_iter}, random_state: 0}}
  threads: 1
validation: {{max_missing_rate: 0.2}}
metrics: [mae]
serving:
  poll_seconds: 3600
  compile: {compile}
"""
DEFAULT = "{}"
STRICT = "{atol: 0.0, rtol: 0.0}"
FEATURES = ("hour", "weather", "temp")
SRC = str(Path(mloop.__file__).resolve().parents[1])

# Loads a version in a fresh interpreter and says what it imported: argv root, version,
# CompileConfig overrides (JSON).
LOAD = """\
import json, sys
from mloop.project import open_project
from mloop.serving.model import load_served
project = open_project(sys.argv[1])
cfg = project.config.serving.compile.model_copy(update=json.loads(sys.argv[3]))
model = load_served(project, int(sys.argv[2]), compile=cfg)
info = model.describe()
print(json.dumps({"engine": info["engine"], "verdict": info["compiled"],
                  "original_loaded": info["original_loaded"],
                  "skl2onnx_imported": "skl2onnx" in sys.modules}))
"""


def _rentals(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hours = np.arange(n) % 24
    weather = rng.choice(["Clear", "Mist", "Rain"], size=n, p=[0.6, 0.3, 0.1]).astype(object)
    weather[rng.random(n) < 0.05] = None  # the string imputer's fill is in the graph's metadata
    temp = rng.normal(15, 8, size=n).round(2)
    base = 20 + 150 * np.sin((hours - 6) / 24 * 2 * np.pi).clip(0)
    effect = np.where(weather == "Rain", -30, np.where(weather == "Mist", -10, 0))
    cnt = np.maximum(0, base + 2.5 * temp + effect + rng.normal(0, 8, size=n)).round()
    return pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=n, freq="h"),
                         "hour": hours.astype(int), "weather": weather, "temp": temp,
                         "cnt": cnt.astype(int)})


def _write(root: Path, *, max_iter: int, compile_: str) -> None:
    (root / "mloop.yaml").write_text(CONFIG.format(max_iter=max_iter, compile=compile_))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compiled") / "rentals"
    (root / "data").mkdir(parents=True)
    _rentals(600).to_parquet(root / "data" / "rentals.parquet", index=False)
    for max_iter, compile_ in ((40, DEFAULT), (30, STRICT)):
        _write(root, max_iter=max_iter, compile_=compile_)
        assert run_pipeline(open_project(root)).status == "succeeded"
    _write(root, max_iter=40, compile_=DEFAULT)
    return root


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    """A copy with its own registry (tags); the artifact store is still the trained one's."""
    return copy_project(trained, tmp_path)


def _tag(project: Any, version: int) -> dict[str, Any]:
    return json.loads(project.mlflow.get_model_version("rentals", str(version)).tags[TAG])


def _load_fresh(root: Path, version: int, **overrides: Any) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (SRC, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", LOAD, str(root), str(version),
                           json.dumps(overrides)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _stored_file(project: Any, artifact: dict[str, Any]) -> Path:
    uri = project.mlflow.get_run(artifact["run_id"]).info.artifact_uri
    return Path(urlparse(uri).path) / artifact["path"]


def _cols(frame: pd.DataFrame) -> dict[str, list]:
    return {c: [None if v is None or v != v else v for v in frame[c].tolist()]
            for c in FEATURES}


# ------------------------------------------------------------------------- registration

def test_registration_stores_the_verified_graph_and_what_it_was_verified_against(
        trained: Path) -> None:
    project = open_project(trained)
    mv = project.mlflow.get_model_version("rentals", "1")
    verdict = json.loads(mv.tags[TAG])
    assert verdict["status"] == "verified" and verdict["compiled_at"] == "registration"
    assert verdict["rows"] == 150 and verdict["mismatches"] == 0  # the holdout: 25% of 600
    assert verdict["against"] == {
        "holdout": mv.tags["mloop.snapshot.holdout"], "atol": 1e-3, "rtol": 1e-4,
        "max_label_mismatch": 0.0, "onnxruntime": metadata.version("onnxruntime"),
        "skl2onnx": metadata.version("skl2onnx"),
        "scikit-learn": metadata.version("scikit-learn")}
    artifact = verdict["artifact"]
    assert artifact["run_id"] == mv.run_id
    assert artifact["path"] == f"mloop-compiled/{artifact['sha256']}.onnx"
    data = _stored_file(project, artifact).read_bytes()
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    assert len(data) == artifact["bytes"]


def test_a_model_that_does_not_verify_is_registered_with_the_mismatch_verdict(
        trained: Path) -> None:
    verdict = _tag(open_project(trained), 2)
    assert verdict["status"] == "mismatch" and verdict["mismatches"] > 0
    assert verdict["against"]["atol"] == 0.0 and verdict["against"]["rtol"] == 0.0
    assert "outside" in verdict["detail"]
    assert verdict["artifact"]["path"].endswith(".onnx")  # kept: another tolerance may pass


# --------------------------------------------------------------------------------- loads

def test_a_load_serves_the_stored_graph_without_skl2onnx_or_the_original(
        trained: Path) -> None:
    out = _load_fresh(trained, 1)
    assert out["engine"] == "onnx"
    assert out["skl2onnx_imported"] is False
    assert out["original_loaded"] is False
    assert out["verdict"]["seconds"] == 0 and out["verdict"]["compiled_at"] == "registration"


def test_the_stored_graph_answers_what_the_original_answers_and_the_original_loads_on_use(
        trained: Path) -> None:
    project = open_project(trained)
    model = load_served(project, 1, compile=project.config.serving.compile)
    assert model.compiled is not None and model.original is not None
    assert not model.original.loaded
    frame = _rentals(60, seed=7)
    frame.loc[3, "weather"] = None
    cols = _cols(frame)
    fast = model.predict_columns(cols)
    original, _ = model.score_frame(model.schema.frame(cols))  # the original, loaded now
    assert model.original.loaded
    assert fast == pytest.approx(original.tolist(), abs=1e-3, rel=1e-4)
    assert original.tolist() != pytest.approx(fast, abs=0, rel=0)  # float32 graph vs float64


def test_a_changed_tolerance_verifies_the_stored_graph_again_without_compiling(
        proj: Path) -> None:
    project = open_project(proj)
    stored = _tag(project, 1)
    out = _load_fresh(proj, 1, atol=0.01)
    assert out["skl2onnx_imported"] is False and out["engine"] == "onnx"
    verdict = out["verdict"]
    assert verdict["status"] == "verified" and verdict["seconds"] > 0
    assert verdict["note"] == ("verified again at load (changed since it was verified: "
                               "atol 0.001 -> 0.01)")
    assert verdict["artifact"] == stored["artifact"]
    assert verdict["compiled_at"] == "registration"
    recorded = _tag(project, 1)
    assert recorded["against"]["atol"] == 0.01 and recorded["note"] == verdict["note"]
    # the recorded verdict now holds for that tolerance: the next load trusts it
    again = _load_fresh(proj, 1, atol=0.01)
    assert again["verdict"]["seconds"] == 0 and again["original_loaded"] is False


@pytest.mark.parametrize(("library", "redone", "compiled_at"), [
    ("onnxruntime", "verified again at load", "registration"),
    ("scikit-learn", "verified again at load", "registration"),
    ("skl2onnx", "compiled at load", "load"),
])
def test_a_verdict_made_with_other_library_versions_is_redone_at_load(
        proj: Path, library: str, redone: str, compiled_at: str) -> None:
    """onnxruntime runs the stored graph and scikit-learn the original it is compared with:
    the graph is checked again. Another skl2onnx would make another graph: compiled again."""
    check_verdict_redone_at_load(open_project(proj), library, redone, compiled_at)


@pytest.mark.parametrize(("how", "why"), [
    ("altered", "does not match its recorded sha256 (altered)"),
    ("missing", "cannot be read"),
])
def test_a_tampered_or_missing_graph_is_compiled_again_at_load_and_recorded(
        proj: Path, how: str, why: str) -> None:
    project = open_project(proj)
    stored = _tag(project, 1)
    path = _stored_file(project, stored["artifact"])
    saved = path.read_bytes()
    try:
        if how == "altered":
            path.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        else:
            path.unlink()
        model = load_served(project, 1, compile=project.config.serving.compile)
        verdict = model.compile_verdict
        assert verdict is not None and model.compiled is not None  # compiled, verified
        assert verdict["status"] == "verified" and verdict["compiled_at"] == "load"
        assert verdict["note"].startswith("compiled at load: the stored graph "
                                          f"{stored['artifact']['path']} (run ")
        assert why in verdict["note"]
        recorded = _tag(project, 1)
        assert recorded["compiled_at"] == "load" and recorded["note"] == verdict["note"]
        fresh = _stored_file(project, recorded["artifact"]).read_bytes()
        assert hashlib.sha256(fresh).hexdigest() == recorded["artifact"]["sha256"]
    finally:
        path.write_bytes(saved)  # the artifact store is shared with the other tests' copies


def test_a_version_registered_without_a_stored_graph_is_compiled_at_its_first_load_only(
        proj: Path) -> None:
    project = open_project(proj)
    project.mlflow.delete_model_version_tag("rentals", "1", TAG)
    first = load_served(project, 1, compile=project.config.serving.compile)
    verdict = first.compile_verdict
    assert verdict is not None and first.compiled is not None
    assert verdict["compiled_at"] == "load"
    assert verdict["note"] == "compiled at load: no compiled graph stored with the version"
    assert _tag(project, 1)["artifact"] == verdict["artifact"]
    later = _load_fresh(proj, 1)
    assert later["skl2onnx_imported"] is False and later["engine"] == "onnx"
    assert later["verdict"]["seconds"] == 0 and later["verdict"]["compiled_at"] == "load"


def test_a_mismatch_verdict_serves_the_original_without_compiling_at_each_load(
        proj: Path) -> None:
    out = _load_fresh(proj, 2, atol=0.0, rtol=0.0)
    assert out["engine"] == "original" and out["original_loaded"] is True
    assert out["verdict"]["status"] == "mismatch" and out["verdict"]["seconds"] == 0
    assert out["skl2onnx_imported"] is False


def test_stored_false_compiles_and_verifies_at_every_load_and_records_nothing(
        proj: Path) -> None:
    project = open_project(proj)
    before = project.mlflow.get_model_version("rentals", "1").tags[TAG]
    cfg = project.config.serving.compile.model_copy(update={"stored": False})
    model = load_served(project, 1, compile=cfg)
    verdict = model.compile_verdict
    assert verdict is not None and model.compiled is not None
    assert verdict["compiled_at"] == "load" and verdict["seconds"] > 0
    assert "artifact" not in verdict
    assert project.mlflow.get_model_version("rentals", "1").tags[TAG] == before


# ------------------------------------------------------------------------------ hot swap

def test_a_hot_swap_serves_the_promoted_versions_stored_graph_without_its_original(
        proj: Path) -> None:
    project = open_project(proj)
    change_alias(project, "champion", 2, expected=None, action="promote", reason="test setup")
    frame = _rentals(5, seed=3)
    records = [{"hour": int(h), "weather": w, "temp": float(t)}
               for h, w, t in zip(frame["hour"], frame["weather"], frame["temp"], strict=True)]
    with ServerThread(create_app(project)) as srv:
        assert srv.post("/predict", {"records": records}).json()["version"] == 2
        change_alias(project, "champion", 1, expected=2, action="promote", reason="swap")
        assert srv.post("/reload").status_code == 200
        champion = srv.get("/model").json()["champion"]
        r = srv.post("/predict", {"records": records})
    assert champion["version"] == 1 and champion["engine"] == "onnx"
    assert champion["compiled"]["seconds"] == 0 and champion["original_loaded"] is False
    assert r.status_code == 200 and r.json()["version"] == 1
    expected = load_served(project, 1, compile=project.config.serving.compile
                           ).predict_columns(_cols(frame))
    assert r.json()["predictions"] == pytest.approx(expected)
