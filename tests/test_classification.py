"""Classification with probabilities, end to end: /predict and /invocations answer them, the
inference log keeps them, `mloop predict` writes them, the ONNX fast path is verified on
them, monitoring computes ROC AUC from them, and the canary verdict is judged by the paired
bootstrap bound of the non-inferiority gate (not a point comparison).

One small project: is an hour "busy" (rentals above 74), with a fifth of the labels flipped
so the models are good but not perfect (holdout ROC AUC ~0.8). v1 gradient boosting (the
champion), v2 a much smaller boosted model (as good overall, ranking rows differently), v3 a
one-split stump (clearly worse)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mloop.cli.app import main
from mloop.config import CompileConfig
from mloop.project import open_project
from mloop.registry.aliases import stored_alias
from mloop.registry.gates import load_version
from mloop.registry.promotion import change_alias
from mloop.security.audit import list_events
from mloop.serving.app import create_app
from mloop.serving.deploy import deploy_challenger, desired_state
from mloop.serving.model import load_served
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id, read_log
from mloop.traffic.labels import store_labels

from .helpers import copy_project, rentals_frame
from .serving_util import ServerThread

pytestmark = pytest.mark.slow

FEATURES = ("hour", "weather", "temp")
CONFIG = """\
project: busy
data: {{path: data/rentals.parquet}}
target: busy
task: classification
features:
  time_column: ts
  exclude: [cnt]
split: {{method: time, holdout: 0.25}}
model:
  estimator: {estimator}
  params: {params}
metrics: [roc_auc, accuracy, log_loss]
monitoring: {{window: 1d}}
loop:
  canary: {{weight: 0.5, probation: 1d, min_labelled: 20, margin: 0.02}}
"""
HGB = "sklearn.ensemble.HistGradientBoostingClassifier"
MODELS = [(HGB, "{max_iter: 30, random_state: 0}"),
          (HGB, "{max_iter: 5, max_depth: 2, random_state: 0}"),
          ("sklearn.tree.DecisionTreeClassifier", "{max_depth: 1, random_state: 0}")]


def busy_frame(n: int, seed: int = 0) -> pd.DataFrame:
    frame = rentals_frame(n, seed=seed)
    flip = np.random.default_rng(seed + 1000).random(n) < 0.2
    frame["busy"] = ((frame["cnt"] > 74) ^ flip).astype(int)
    return frame


def _write(root: Path, estimator: str, params: str) -> None:
    (root / "mloop.yaml").write_text(CONFIG.format(estimator=estimator, params=params))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mloop.pipeline.runner import run_pipeline

    root = tmp_path_factory.mktemp("classification") / "busy"
    (root / "data").mkdir(parents=True)
    busy_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    for estimator, params in MODELS:
        _write(root, estimator, params)
        assert run_pipeline(open_project(root)).status == "succeeded"
    _write(root, *MODELS[0])
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


@pytest.fixture
def proj(trained: Path, tmp_path: Path) -> Path:
    return copy_project(trained, tmp_path)


def _server(root: Path, **compile_: Any) -> ServerThread:
    project = open_project(root)
    cfg = project.config.serving.model_copy(update={"poll_seconds": 0.2}, deep=True)
    cfg.compile = cfg.compile.model_copy(update=compile_)
    cfg.inference_log.commit_interval_seconds = 3600  # committed by /flush
    return ServerThread(create_app(project, cfg))


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"hour": int(h), "weather": w, "temp": float(t)}
            for h, w, t in zip(frame["hour"], frame["weather"], frame["temp"], strict=True)]


def _sklearn_proba(root: Path, version: int, frame: pd.DataFrame) -> np.ndarray:
    """The registered scikit-learn model's own predict_proba (not mloop's serving path)."""
    loaded = load_version(open_project(root), version)
    return np.asarray(loaded.sklearn_model.predict_proba(loaded.prepare(frame)))


# ---------------------------------------------------------------------------------- HTTP

@pytest.mark.parametrize("engine", ["onnx", "original"])
def test_predict_answers_class_probabilities_that_match_the_sklearn_model(
        proj: Path, engine: str) -> None:
    frame = busy_frame(40, seed=5)
    with _server(proj, enabled=engine == "onnx") as srv:
        champion = srv.get("/model").json()["champion"]
        assert (champion["engine"], champion["classes"]) == (engine, [0, 1])
        r = srv.post("/predict", {"records": _records(frame)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == [0, 1]
    proba = np.asarray(body["probabilities"])
    assert proba.shape == (40, 2)
    assert np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    # float32 trees on the compiled path, the very same numbers on the original one
    expected = _sklearn_proba(proj, 1, frame)
    assert np.allclose(proba, expected, atol=1e-5 if engine == "onnx" else 1e-12, rtol=0)
    # the labels are the model's own, and they are the classes the probabilities favour
    assert body["predictions"] == [body["classes"][i] for i in proba.argmax(axis=1)]


def test_invocations_answers_labels_unless_params_ask_for_probabilities(proj: Path) -> None:
    frame = busy_frame(6, seed=6)
    split = {"columns": list(FEATURES), "data": [list(r.values()) for r in _records(frame)]}
    with _server(proj) as srv:
        plain = srv.post("/invocations", {"dataframe_split": split})
        proba = srv.post("/invocations", {"dataframe_split": split,
                                          "params": {"predict_method": "predict_proba"}})
        labels = srv.post("/invocations", {"dataframe_split": split,
                                           "params": {"predict_method": "predict"}})
        predict = srv.post("/predict", {"records": _records(frame)}).json()
    assert plain.status_code == proba.status_code == labels.status_code == 200
    # as MLflow's scoring server answers for a scikit-learn model logged with the default
    # pyfunc_predict_fn: labels only
    assert plain.json() == {"predictions": predict["predictions"]}
    assert labels.json() == plain.json()
    # as it answers for one logged with pyfunc_predict_fn="predict_proba", classes named
    assert np.allclose(proba.json()["predictions"], predict["probabilities"], atol=1e-12)
    assert proba.json()["classes"] == [0, 1]


@pytest.mark.parametrize(("params", "field", "value"), [
    ({"predict_method": "decision_function"}, "params.predict_method", "decision_function"),
    ({"predict_method": "predict_proba", "threshold": 0.3}, "params.threshold", None),
    (["predict_proba"], "params", ["predict_proba"]),
])
def test_invocations_refuses_params_it_does_not_know_naming_them(
        proj: Path, params: Any, field: str, value: Any) -> None:
    split = {"columns": list(FEATURES), "data": [[8, "Clear", 14.5]]}
    with _server(proj) as srv:
        r = srv.post("/invocations", {"dataframe_split": split, "params": params})
        # nothing was scored
        assert srv.post("/flush").json() == {"committed_rows": 0, "quarantined_rows": 0}
    assert r.status_code == 422, r.text
    fields = r.json()["fields"]
    assert [f["field"] for f in fields] == [field]
    assert fields[0].get("value") == value


# ------------------------------------------------------------------ log and batch scoring

def test_the_inference_log_keeps_the_probabilities_each_client_got(proj: Path) -> None:
    frame = busy_frame(10, seed=7)
    with _server(proj) as srv:
        body = srv.post("/predict", {"records": _records(frame)}).json()
        assert srv.post("/flush").json() == {"committed_rows": 10, "quarantined_rows": 0}
    table = read_log(open_project(proj).uris["inference_log_uri"]).to_pandas()
    table = table.set_index("_request_id").loc[body["request_ids"]]
    assert table["_prediction"].tolist() == body["predictions"]
    logged = table[["_proba_0", "_proba_1"]].to_numpy()
    assert np.array_equal(logged, np.asarray(body["probabilities"]))


def test_a_quarantined_request_keeps_its_probabilities(tmp_path: Path) -> None:
    """A request whose inputs the log cannot store is set aside whole: read back, fixed and
    appended again, it is logged with the probabilities its client got."""
    from mloop.traffic.inference_log import read_quarantined_entries

    uri = str(tmp_path / "log")
    log = InferenceLog(uri, commit_interval=3600)
    entry = LogEntry([new_request_id(1_700_000_000.0)], 1_700_000_000.0, 1, "champion", 1.0,
                     [1], {"hour": [8], "weather": ["Clear"], "temp": [2**63 + 5]}, None,
                     [[0.25, 0.75]], [0, 1])
    assert log.append(entry)
    [name] = log.commit_report().quarantine_files
    [back] = read_quarantined_entries(ObjectStore(uri), name)
    assert (back.probabilities, back.classes) == ([[0.25, 0.75]], [0, 1])
    back.cols["temp"] = [21.5]
    assert log.append(back)
    assert log.commit() == 1
    row = read_log(uri).to_pylist()[0]
    assert (row["_prediction"], row["_proba_0"], row["_proba_1"]) == (1, 0.25, 0.75)


def test_mloop_predict_writes_one_probability_column_per_class(
        proj: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    frame = busy_frame(50, seed=8)
    frame[list(FEATURES)].to_parquet(tmp_path / "in.parquet", index=False)
    code = main(["-C", str(proj), "predict", "-i", str(tmp_path / "in.parquet"),
                 "-o", str(tmp_path / "out.parquet"), "--json"])
    assert code == 0, capsys.readouterr()
    out = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert out.columns.tolist() == [*FEATURES, "prediction", "proba_0", "proba_1"]
    expected = _sklearn_proba(proj, 1, frame)
    assert np.allclose(out[["proba_0", "proba_1"]].to_numpy(), expected, atol=1e-12, rtol=0)


# --------------------------------------------------------------------- the compiled path

def test_the_compiled_path_is_verified_on_probabilities(proj: Path) -> None:
    project = open_project(proj)
    model = load_served(project, 1, compile=CompileConfig())
    verdict = model.compile_verdict
    assert verdict is not None and verdict["status"] == "verified", verdict
    assert verdict["rows"] == 200 and verdict["max_abs_diff"] < 1e-5  # float32 probabilities
    assert "0 with a probability off" in verdict["detail"]


def test_a_compiled_model_whose_probabilities_disagree_falls_back_to_the_original(
        proj: Path) -> None:
    """Every label agrees, but float32 probabilities cannot meet a zero tolerance: the
    original serves, and the verdict on the version says why."""
    project = open_project(proj)
    model = load_served(project, 1, compile=CompileConfig(atol=0.0, rtol=0.0))
    assert model.compiled is None and model.describe()["engine"] == "original"
    verdict = model.compile_verdict
    assert verdict is not None and verdict["status"] == "mismatch"
    assert verdict["detail"].startswith("200 holdout rows, 0 labels differ, ")
    assert verdict["mismatches"] > 0
    tag = project.mlflow.get_model_version("busy", "1").tags["mloop.compiled"]
    assert json.loads(tag)["status"] == "mismatch"
    # and it still answers probabilities, from the original model
    frame = busy_frame(5, seed=9)
    _, proba = model.score_arrays({c: frame[c].tolist() for c in FEATURES})
    assert proba is not None
    assert np.allclose(proba, _sklearn_proba(proj, 1, frame), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- monitoring

def _day(day: str, hour: int = 0) -> float:
    return datetime.fromisoformat(f"{day}T{hour:02d}:00:00+00:00").timestamp()


def test_monitoring_computes_roc_auc_from_the_served_probabilities(proj: Path) -> None:
    from mloop.monitoring.service import run_monitor

    day1, day2 = busy_frame(120, seed=11), busy_frame(5, seed=12)
    with _server(proj) as srv:
        first = srv.post("/predict", {"records": _records(day1),
                                      "timestamp": _day("2024-04-01", 10)}).json()
        srv.post("/predict", {"records": _records(day2), "timestamp": _day("2024-04-02", 10)})
        assert srv.post("/flush").json() == {"committed_rows": 125, "quarantined_rows": 0}
        labels = {"labels": [{"request_id": i, "label": int(y)}
                             for i, y in zip(first["request_ids"], day1["busy"], strict=True)]}
        assert srv.post("/feedback", labels).json()["stored"] == 120
    out = run_monitor(open_project(proj), window="1d")
    [window] = out["evaluated"]
    assert window["metric"] == "roc_auc" and window["label_coverage"] == 1.0
    served = np.asarray(first["probabilities"])[:, 1]
    assert window["metric_value"] == pytest.approx(roc_auc_score(day1["busy"], served))
    assert window["reference_metric"] == pytest.approx(float(open_project(proj).mlflow
                                                              .get_model_version("busy", "1")
                                                              .tags["mloop.metric.roc_auc"]))


def test_monitoring_judges_logs_without_probabilities_on_accuracy(proj: Path) -> None:
    """Rows logged before probabilities were kept: accuracy against the holdout's accuracy,
    and the report says why."""
    from mloop.monitoring.service import run_monitor

    project = open_project(proj)
    uri = project.uris["inference_log_uri"]
    frame = busy_frame(60, seed=13)
    preds = load_served(project, 1).predict_columns({c: frame[c].tolist() for c in FEATURES})
    log = InferenceLog(uri, commit_interval=3600)
    ids = [new_request_id(_day("2024-04-01", 10) + i) for i in range(60)]
    for i, rid in enumerate(ids):
        log.append(LogEntry([rid], _day("2024-04-01", 10) + i, 1, "champion", 1.0, [preds[i]],
                            {c: [frame[c].iloc[i]] for c in FEATURES}))
    log.append(LogEntry([new_request_id(_day("2024-04-02", 10))], _day("2024-04-02", 10), 1,
                        "champion", 1.0, [0], {c: [frame[c].iloc[0]] for c in FEATURES}))
    log.close()
    store_labels(ObjectStore(uri), dict(zip(ids, frame["busy"].tolist(), strict=True)),
                 task="classification", source="test")
    [window] = run_monitor(project, window="1d")["evaluated"]
    assert window["metric"] == "accuracy"
    assert window["metric_value"] == pytest.approx(
        float(np.mean(np.asarray(preds) == frame["busy"].to_numpy())))
    tags = project.mlflow.get_model_version("busy", "1").tags
    assert window["reference_metric"] == pytest.approx(float(tags["mloop.metric.accuracy"]))
    from mloop.monitoring.windows_store import get_window

    perf = get_window(project, window["id"])["report"]["performance"]
    assert "roc_auc needs the class probabilities" in perf["fallback"]


# ------------------------------------------------------------------------ canary verdicts

def _probation(root: Path, *, challenger: int, champion: int, frame: pd.DataFrame,
               start: str = "2024-05-01") -> dict[str, Any]:
    """``challenger`` on canary against ``champion``: ``frame`` answered half by each (by
    the version itself, as the server would log it), labelled, then the probation is judged
    a day after it ended."""
    from mloop.loop.controller import judge_probation, load_state, save_state
    from mloop.loop.state import Probation

    project = open_project(root)
    if stored_alias(project) != champion:
        change_alias(project, "champion", champion, expected=stored_alias(project),
                     action="promote", reason="test setup")
    deploy_challenger(project, challenger, mode="canary", weight=0.5, reason="test canary")
    uri = project.uris["inference_log_uri"]
    log = InferenceLog(uri, commit_interval=3600)
    t0 = _day(start, 1)
    ids: list[str] = []
    for n, (version, role) in enumerate(((challenger, "canary"), (champion, "champion"))):
        part = frame.iloc[n::2]
        model = load_served(project, version)
        preds, proba = model.unpack(model.score_columns({c: part[c].tolist()
                                                         for c in FEATURES}))
        for i in range(len(part)):
            ts = t0 + 60 * (2 * i + n)
            ids.append(new_request_id(ts))
            log.append(LogEntry([ids[-1]], ts, version, role, 1.0, [preds[i]],
                                {c: [part[c].iloc[i]] for c in FEATURES}, None,
                                [proba[i]] if proba else None, model.classes))
    log.close()
    labels = [*frame["busy"].iloc[0::2], *frame["busy"].iloc[1::2]]
    store_labels(ObjectStore(uri), dict(zip(ids, labels, strict=True)),
                 task="classification", source="test")
    state = load_state(project)
    state.probation = Probation(version=challenger, champion=champion,
                                started_at=datetime.fromtimestamp(t0 - 60, UTC),
                                started_wall=datetime.now(UTC) - timedelta(seconds=5))
    save_state(project, state)
    now = datetime.fromtimestamp(t0, UTC) + timedelta(days=2)
    verdict = judge_probation(project, state, now)
    assert verdict is not None
    save_state(project, state)
    return verdict


def _verdict_event(root: Path, kind: str) -> dict[str, Any]:
    return list_events(open_project(root).store, kind=f"loop.probation_{kind}")[0].payload


def test_a_canary_better_only_by_noise_on_a_few_labelled_rows_is_rolled_back(
        proj: Path) -> None:
    """The reported case: the canary's ROC AUC is above the champion's on a tiny labelled
    sample, but the paired bootstrap bound of the difference is wide: not promoted."""
    pool = busy_frame(400, seed=21)
    p1, p2 = _sklearn_proba(proj, 1, pool)[:, 1], _sklearn_proba(proj, 2, pool)[:, 1]
    y = pool["busy"].to_numpy()
    start = next(s for s in range(0, 376, 24)  # the first 24 rows where v2 looks better
                 if roc_auc_score(y[s:s + 24], p2[s:s + 24])
                 > roc_auc_score(y[s:s + 24], p1[s:s + 24]))
    verdict = _probation(proj, challenger=2, champion=1, frame=pool.iloc[start:start + 24])
    assert verdict["action"] == "rollback", verdict
    bound = _verdict_event(proj, "rollback")["bound"]
    assert bound["metric"] == "roc_auc" and bound["rows"] == 24
    assert bound["difference"] < 0  # better, observed
    assert bound["upper"] > bound["margin"] > 0  # the bound is wider than the margin
    assert bound["confidence"] == 0.95 and bound["resamples"] > 1000
    assert bound["margin_from"].startswith("loop.canary.margin")
    assert "upper bound" in verdict["reason"]
    assert desired_state(open_project(proj)).challenger is None


def test_a_clearly_better_canary_is_promoted_on_the_bound(proj: Path) -> None:
    verdict = _probation(proj, challenger=1, champion=3, frame=busy_frame(300, seed=22))
    assert verdict["action"] == "promote", verdict
    event = _verdict_event(proj, "promote")
    assert event["paired"]["metric"] == "roc_auc" and event["paired"]["rows"] == 300
    assert event["bound"]["upper"] < 0  # better even at the 95% bound
    assert desired_state(open_project(proj)).champion == 1


def test_a_clearly_worse_canary_is_rolled_back_on_the_bound(proj: Path) -> None:
    verdict = _probation(proj, challenger=3, champion=1, frame=busy_frame(300, seed=23))
    assert verdict["action"] == "rollback", verdict
    bound = _verdict_event(proj, "rollback")["bound"]
    assert bound["difference"] > 0 and bound["upper"] > bound["margin"]
    state = desired_state(open_project(proj))
    assert (state.champion, state.challenger) == (1, None)


def test_the_canary_margin_is_the_gates_when_they_judge_the_same_metric(proj: Path) -> None:
    """With a non-inferiority gate on ROC AUC, the canary is held to the gate's margin and
    confidence: v2, as good as v1 overall, passes on enough rows."""
    text = (proj / "mloop.yaml").read_text()
    (proj / "mloop.yaml").write_text(text + "gates:\n  non_inferiority: {metric: roc_auc, "
                                            "margin: 0.1, confidence: 0.9, resamples: 500}\n")
    verdict = _probation(proj, challenger=2, champion=1, frame=busy_frame(300, seed=24))
    assert verdict["action"] == "promote", verdict
    bound = _verdict_event(proj, "promote")["bound"]
    assert (bound["margin"], bound["margin_from"]) == (0.1, "gates.non_inferiority.margin")
    assert (bound["confidence"], bound["resamples"]) == (0.9, 500)
    assert bound["upper"] <= 0.1
