"""Gates on purpose-built candidates, against real MLflow (SQLite) and the real store."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.pipeline.runner import run_pipeline
from mloop.project import open_project
from mloop.registry.gates import evaluate_gates
from mloop.security.audit import verify_chain

from .helpers import (
    FOREST_CONFIG,
    GOOD,
    RESEED,
    WORSE,
    rentals_frame,
    run_cli,
    train_forest,
    write_forest_config,
)

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """v1 champion; v2 the same config reseeded; v3 clearly worse; v4 drops the 'temp' input."""
    root = tmp_path_factory.mktemp("gates") / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    versions = {"champion": train_forest(root, GOOD), "reseeded": train_forest(root, RESEED),
                "worse": train_forest(root, WORSE),
                "no_temp": train_forest(root, GOOD, exclude="[temp]")}
    assert sorted(versions.values()) == [1, 2, 3, 4]
    from mloop.registry.promotion import promote

    write_forest_config(root, params=GOOD)
    promote(open_project(root), versions["champion"], reason="first champion")
    return {"root": root, **versions}


def _gate(root: Path, version: int, gates: str, params: str = GOOD, exclude: str = "[]"):
    write_forest_config(root, params=params, gates=gates, exclude=exclude)
    return evaluate_gates(open_project(root), version)


def _by_name(report) -> dict:
    return {r.gate: r for r in report.results}


def test_the_champion_itself_skips_comparisons_and_says_why(registry) -> None:
    report = _gate(registry["root"], 1, "gates:\n  non_inferiority: {margin: 1.0}\n")
    gates = _by_name(report)
    assert report.champion == 1 and report.passed
    assert gates["non_inferiority.mae"].status == "skip"
    assert "this version is the champion" in gates["non_inferiority.mae"].message
    assert gates["signature"].status == "skip"


def test_first_version_skips_comparisons_and_says_why(make_project) -> None:
    root = make_project(FOREST_CONFIG.replace("PARAMS", GOOD).replace("EXCLUDE", "[]")
                        .replace("GATES", "gates:\n  non_inferiority: {margin: 1.0}\n"))
    run_pipeline(open_project(root))
    report = evaluate_gates(open_project(root), 1)
    gates = _by_name(report)
    assert report.champion is None and report.passed
    assert gates["non_inferiority.mae"].status == "skip"
    assert "no champion yet" in gates["non_inferiority.mae"].message
    assert gates["signature"].status == "skip"
    assert gates["sanity"].status == "pass"


@pytest.mark.parametrize(("bound", "status"), [("max: 1000", "pass"), ("max: 0.5", "fail"),
                                               ("min: 0.0", "pass")])
def test_absolute_gate(registry, bound: str, status: str) -> None:
    report = _gate(registry["root"], 2, f"gates:\n  absolute: [{{metric: mae, {bound}}}]\n")
    (result,) = [r for r in report.results if r.gate.startswith("absolute.")]
    assert result.status == status
    # the gate scores the candidate on its holdout: the MAE its evaluation recorded (a tag of
    # six significant digits)
    recorded = open_project(registry["root"]).mlflow.get_model_version("rentals", "2").tags
    assert result.value == pytest.approx(float(recorded["mloop.metric.mae"]), rel=1e-5)
    assert report.passed is (status == "pass")


def test_non_inferiority_is_not_fooled_by_a_reseeded_retrain(registry) -> None:
    report = _gate(registry["root"], registry["reseeded"],
                   "gates:\n  non_inferiority: {margin: 1.0}\n", params=RESEED)
    result = _by_name(report)["non_inferiority.mae"]
    assert result.status == "pass", result.message
    assert abs(result.detail["observed"]) < 1.0
    assert result.detail["lower"] <= result.detail["observed"] <= result.detail["upper"]


def test_non_inferiority_fails_a_clearly_worse_model(registry) -> None:
    report = _gate(registry["root"], registry["worse"],
                   "gates:\n  non_inferiority: {margin: 1.0}\n", params=WORSE)
    result = _by_name(report)["non_inferiority.mae"]
    assert result.status == "fail"
    assert result.detail["lower"] > 1.0  # worse beyond the margin even at the optimistic end
    assert "vs champion v1" in result.message
    assert not report.passed


def test_latency_gate_passes_a_generous_budget_and_fails_an_impossible_one(registry) -> None:
    ok = _by_name(_gate(registry["root"], 2, "gates:\n  latency: {p95_ms: 5000, "
                        "min_rows_per_s: 1, samples: 20, batch_rows: 200}\n", params=RESEED))
    assert ok["latency.p95_ms"].status == "pass" and ok["latency.rows_per_s"].status == "pass"
    assert 0 < ok["latency.p95_ms"].value < 5000
    bad = _by_name(_gate(registry["root"], 2, "gates:\n  latency: {p95_ms: 0.0001, "
                         "min_rows_per_s: 1.0e12, samples: 20, batch_rows: 200}\n",
                         params=RESEED))
    assert bad["latency.p95_ms"].status == "fail" and bad["latency.rows_per_s"].status == "fail"


def test_size_gate(registry) -> None:
    ok = _by_name(_gate(registry["root"], 2, "gates:\n  size: {max_mb: 500}\n"))["size"]
    assert ok.status == "pass" and 0 < ok.value < 500
    bad = _by_name(_gate(registry["root"], 2, "gates:\n  size: {max_mb: 0.001}\n"))["size"]
    assert bad.status == "fail"
    assert "budget 0.001 MB" in bad.message


def test_signature_gate_fails_a_candidate_that_dropped_an_input(registry) -> None:
    report = _gate(registry["root"], registry["no_temp"], "", exclude="[temp]")
    sig = _by_name(report)["signature"]
    assert sig.status == "fail"
    assert "input 'temp' removed" in sig.message
    ok = _by_name(_gate(registry["root"], 2, ""))["signature"]
    assert ok.status == "pass" and "compatible with champion v1" in ok.message


def test_sanity_gate_checks_the_configured_output_range(registry) -> None:
    ok = _by_name(_gate(registry["root"], 2, ""))["sanity"]
    assert ok.status == "pass"
    bad = _by_name(_gate(registry["root"], 2,
                         "gates:\n  sanity: {prediction_max: 10}\n"))["sanity"]
    assert bad.status == "fail" and "above 10" in bad.message


def test_slice_gate(registry) -> None:
    strict = _by_name(_gate(registry["root"], 2, "gates:\n  slices: [{column: weather, "
                            "margin: 0.0, min_size: 10}]\n"))["slice.weather"]
    assert strict.status == "fail"  # some weather is harder than average: margin 0 must fail
    assert {s["slice"] for s in strict.detail["slices"]} == {"Clear", "Mist", "Rain"}
    loose = _by_name(_gate(registry["root"], 2, "gates:\n  slices: [{column: temp, "
                           "margin: 1000, buckets: 3}]\n"))["slice.temp"]
    assert loose.status == "pass" and len(loose.detail["slices"]) == 3
    tiny = _by_name(_gate(registry["root"], 2, "gates:\n  slices: [{column: weather, "
                          "margin: 0, min_size: 100000}]\n"))["slice.weather"]
    assert tiny.status == "skip"


def test_gate_results_are_stored_tagged_and_chained(registry) -> None:
    root = registry["root"]
    report = _gate(root, 3, "gates:\n  non_inferiority: {margin: 1.0}\n", params=WORSE)
    project = open_project(root)
    latest = project.store.latest_gate_runs("rentals")[3]
    assert latest.passed is False and latest.champion_version == 1
    stored = {r.gate: r.status for r in project.store.gate_results(latest.id)}
    assert stored == {r.gate: r.status for r in report.results}
    tags = project.mlflow.get_model_version("rentals", "3").tags
    assert tags["mloop.gates"] == "failed"
    assert tags["mloop.gate.non_inferiority.mae"].startswith("fail value=")
    assert verify_chain(project.store).ok


def test_cli_gate_prints_numbers_and_exits_1_on_failure(registry) -> None:
    root = registry["root"]
    write_forest_config(root, params=WORSE,
                        gates="gates:\n  absolute: [{metric: mae, max: 0.5}]\n")
    proc = run_cli("models", "gate", "3", "--json", cwd=root, check=False)
    assert proc.returncode == 1
    got = json.loads(proc.stdout)
    assert got["passed"] is False and got["version"] == 3
    listed = json.loads(run_cli("models", "list", "--json", cwd=root).stdout)["versions"]
    by_version = {v["version"]: v for v in listed}
    assert by_version[3]["gates"] == "failed"
    assert by_version[1]["aliases"] == ["champion"]


def test_audit_verify_names_the_first_edited_row(registry) -> None:
    root = registry["root"]
    project = open_project(root)
    _gate(root, 2, "")
    report = verify_chain(project.store)
    assert report.ok and report.events >= 2
    with project.store.engine.begin() as conn:
        first = conn.execute(sa.text("select min(id) from events")).scalar()
        conn.execute(sa.text("update events set actor = 'mallory' where id = :i"), {"i": first})
    broken = verify_chain(project.store)
    assert (broken.ok, broken.first_bad_id) == (False, first)
    proc = run_cli("audit", "verify", cwd=root, check=False)
    assert proc.returncode == 1
    assert f"event {first} (gate) was modified after it was written" in proc.stderr


def test_unknown_gate_metric_is_named(registry) -> None:
    from mloop.errors import MloopError

    with pytest.raises(MloopError, match=r"gates name metric\(s\) accuracy that a regression "
                                         r"model does not have"):
        _gate(registry["root"], 2, "gates:\n  absolute: [{metric: accuracy, min: 0.5}]\n")


def test_gating_a_missing_version_is_a_clear_error(registry) -> None:
    from mloop.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="model 'rentals' has no version 99"):
        _gate(registry["root"], 99, "")


def test_sanity_gate_flags_classes_never_seen_in_training() -> None:
    import numpy as np

    from mloop.config import GatesConfig
    from mloop.registry.gates import gate_sanity

    ok = gate_sanity(np.array(["Clear", "Mist"]), "classification", {"Clear", "Mist", "Rain"},
                     GatesConfig())
    assert ok.status == "pass"
    bad = gate_sanity(np.array(["Clear", "Snow"]), "classification", {"Clear", "Mist"},
                      GatesConfig())
    assert bad.status == "fail" and "classes never seen in training: Snow" in bad.message
    nan = gate_sanity(np.array([1.0, float("nan"), float("inf")]), "regression", None,
                      GatesConfig())
    assert nan.status == "fail" and "2 NaN/inf prediction(s)" in nan.message


# ------------------------------------------------- the version's files, read without MLflow

def test_gating_a_local_sklearn_version_does_not_import_mlflow(registry) -> None:
    """A fresh `mloop models gate` paid ~1 s (2-4 s busy) importing MLflow to open a folder
    on this disk; the sklearn flavour is read in place, as mlflow.sklearn reads it."""
    write_forest_config(registry["root"], params=GOOD)  # another test may have left its gates
    code = ("import sys\nfrom mloop.project import open_project\n"
            "from mloop.registry.gates import evaluate_gates\n"
            f"r = evaluate_gates(open_project({str(registry['root'])!r}), 2, record=False)\n"
            "print(r.passed is not None, sorted(m for m in sys.modules "
            "if m == 'mlflow' or m.startswith('mlflow.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "[]"], out.stdout


def test_the_signature_read_in_place_is_the_one_mlflow_reads(registry) -> None:
    from mlflow.models import Model

    from mloop.registry.candidates import load_scorer

    project = open_project(registry["root"])
    for version in (1, registry["no_temp"]):
        files = load_scorer(project, version).files
        meta = Model.load(str(files.path))
        theirs = [(c.name, c.type.name, c.required)
                  for c in meta.get_input_schema().inputs]
        assert [(c.name, c.type, c.required) for c in files.inputs] == theirs
        assert [c.type for c in files.outputs] == [
            c.type.name for c in meta.get_output_schema().inputs]
    assert "temp" not in [c.name for c in load_scorer(project, registry["no_temp"])
                          .files.inputs]


@pytest.mark.parametrize("fmt", ["pickle", "cloudpickle"])
def test_a_pickled_sklearn_model_loads_in_place_like_mlflow_loads_it(
        registry, tmp_path: Path, fmt: str) -> None:
    import cloudpickle
    import mlflow.pyfunc

    from mloop.registry.candidates import load_scorer
    from mloop.registry.model_files import load_sklearn, read_model_files

    source = load_scorer(open_project(registry["root"]), 1)
    folder = tmp_path / "model"
    shutil.copytree(source.files.path, folder)
    mlmodel = (folder / "MLmodel").read_text()
    (folder / "model.pkl").write_bytes(cloudpickle.dumps(source.model))
    (folder / "MLmodel").write_text(
        mlmodel.replace("pickled_model: model.skops", "pickled_model: model.pkl")
        .replace("model_path: model.skops", "model_path: model.pkl")
        .replace("serialization_format: skops", f"serialization_format: {fmt}"))
    ours = load_sklearn(read_model_files(folder))
    X = rentals_frame(50, seed=5)[[c.name for c in source.files.inputs]]
    for col in ("temp", "hour"):
        if col in X:
            X[col] = X[col].astype("float64")
    expected = mlflow.pyfunc.load_model(str(folder)).predict(X)
    assert ours is not None and list(ours.predict(X)) == list(expected)


@pytest.mark.parametrize(("content", "problem"), [
    (None, "cannot read the model's"), ("- a\n- list\n", "is not an MLflow MLmodel file"),
    ("flavors: {sklearn: [unclosed\n", "cannot read the model's"),
])
def test_an_unreadable_mlmodel_is_an_error_naming_the_file(
        tmp_path: Path, content: str | None, problem: str) -> None:
    from mloop.errors import MloopError
    from mloop.registry.model_files import read_model_files

    if content is not None:
        (tmp_path / "MLmodel").write_text(content)
    with pytest.raises(MloopError, match=problem) as info:
        read_model_files(tmp_path)
    assert str(tmp_path / "MLmodel") in str(info.value)


def test_with_pickle_loading_refused_the_model_goes_through_mlflow_and_its_refusal(
        registry, monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.registry.candidates import load_scorer
    from mloop.registry.model_files import load_sklearn

    files = load_scorer(open_project(registry["root"]), 1).files
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    assert load_sklearn(files) is None
