"""The serving benchmark's peer plumbing (benchmarks/serving/peers.py): what the V2 request
sends, which servers each published ratio divides, and that the compile-off project serves the
trained project's registry with the fast path off. The servers themselves run in the benchmark."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from mloop.project import open_project

REPO = Path(__file__).resolve().parents[1]


def _load_peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_serving_peers", REPO / "benchmarks" / "serving" / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _load_peers()

SIGNATURE = [{"name": "temp", "type": "double"}, {"name": "hr", "type": "long"},
             {"name": "season", "type": "string"}, {"name": "holiday", "type": "boolean"}]
ROW = {"season": "fall", "temp": 23.02, "holiday": False, "hr": 6}


def test_v2_request_sends_one_typed_tensor_per_signature_column_in_order() -> None:
    body = peers.v2_infer_request(ROW, SIGNATURE)
    assert [(t["name"], t["datatype"], t["shape"], t["data"]) for t in body["inputs"]] == [
        ("temp", "FP64", [1, 1], [23.02]), ("hr", "INT64", [1, 1], [6]),
        ("season", "BYTES", [1, 1], ["fall"]), ("holiday", "BOOL", [1, 1], [False])]
    assert body["inputs"][2]["parameters"] == {"content_type": "str"}
    assert all("parameters" not in t for i, t in enumerate(body["inputs"]) if i != 2)


def test_v2_request_names_a_column_type_it_cannot_send() -> None:
    with pytest.raises(ValueError, match="column 'when' has type 'datetime'"):
        peers.v2_infer_request({"when": "2011-08-01"}, [{"name": "when", "type": "datetime"}])


def test_v2_request_names_a_signature_column_missing_from_the_row() -> None:
    with pytest.raises(ValueError, match="no value for signature column 'hr'"):
        peers.v2_infer_request({"temp": 1.0}, SIGNATURE[:2])


def test_v2_first_prediction_reads_the_first_output_tensor() -> None:
    assert peers.v2_first_prediction(
        {"outputs": [{"name": "output-1", "data": [45.6]}, {"name": "x", "data": [0]}]}) == 45.6
    with pytest.raises(ValueError, match="without output data"):
        peers.v2_first_prediction({"outputs": []})


def test_separated_ratios_divide_compile_off_by_mlserver_and_compiled_by_compile_off() -> None:
    cell = {"mloop": {"rps": 1200.0, "p50_ms": 4.0, "p99_ms": 20.0},
            "mloop_w2": {"rps": 2100.0, "p50_ms": 3.0, "p99_ms": 12.0},
            "mloop_nocompile": {"rps": 300.0, "p50_ms": 25.0, "p99_ms": 80.0},
            "mlserver": {"rps": 150.0, "p50_ms": 50.0, "p99_ms": 400.0},
            "mlflow": {"rps": 24.0, "p50_ms": 300.0, "p99_ms": 1600.0},
            "bare": {"rps": 6000.0, "p50_ms": 1.0, "p99_ms": 5.0},
            "bare_w2": {"rps": 7800.0, "p50_ms": 1.0, "p99_ms": 4.0}}
    r = peers.separated_ratios(cell, batched_floor_served=60_000.0,
                               batched_floor_original=3_000.0)
    assert r["server_effect_rps"] == pytest.approx(2.0)
    assert r["server_effect_p99"] == pytest.approx(0.2)
    assert r["compile_effect_rps"] == pytest.approx(4.0)
    assert r["compile_effect_p99"] == pytest.approx(0.25)
    assert r["mloop_vs_mlserver_rps"] == pytest.approx(8.0)
    assert r["mloop_vs_mlflow_rps"] == pytest.approx(50.0)
    assert r["mloop_vs_mlflow_p50"] == pytest.approx(4.0 / 300.0)
    assert r["mloop_vs_bare"] == pytest.approx(0.2)
    assert r["mloop_vs_batched_floor"] == pytest.approx(0.02)
    assert r["nocompile_vs_batched_floor"] == pytest.approx(0.1)
    assert r["workers_scaling_rps"] == pytest.approx(1.75)  # --workers 2 / one worker
    assert r["bare_workers_scaling_rps"] == pytest.approx(1.3)  # the floor's, the same way


def test_separated_ratios_leave_out_a_peer_that_did_not_run() -> None:
    cell = {"mloop": {"rps": 1200.0, "p99_ms": 20.0},
            "mloop_nocompile": {"rps": 300.0, "p99_ms": 80.0}, "mlserver": None}
    r = peers.separated_ratios(cell)
    assert r["server_effect_rps"] is None and r["mloop_vs_mlserver_rps"] is None
    assert r["mloop_vs_bare"] is None and r["mloop_vs_batched_floor"] is None
    assert r["workers_scaling_rps"] is None and r["bare_workers_scaling_rps"] is None
    assert r["compile_effect_rps"] == pytest.approx(4.0)


def test_nocompile_project_reads_the_trained_stores_with_compile_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained = tmp_path / "bike_sharing"
    trained.mkdir()
    shutil.copy(REPO / "examples" / "bike_sharing" / "mloop.yaml", trained / "mloop.yaml")
    (trained / "data").mkdir()
    original = open_project(trained)
    assert original.config.serving.compile.enabled is True

    dest, env = peers.nocompile_project(trained, original.uris, tmp_path / "nc" / "bike")
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    copy = open_project(dest)

    assert copy.config.serving.compile.enabled is False
    assert copy.config.model_dump(exclude={"serving"}) == \
        original.config.model_dump(exclude={"serving"})
    for key in ("tracking_uri", "registry_uri", "artifact_root", "store_uri", "data_uri"):
        assert copy.uris[key] == original.uris[key], key
    assert copy.uris["inference_log_uri"] != original.uris["inference_log_uri"]
    assert (dest / "data").resolve() == (trained / "data").resolve()


def test_file_digests_key_the_data_files_by_their_path_in_the_project(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.parquet").write_bytes(b"abc")
    (data / "notes.txt").write_bytes(b"ignored")
    digests = peers.file_digests(data, tmp_path)
    assert digests == {
        "data/a.parquet": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert peers.file_digests(data / "a.parquet", tmp_path / "elsewhere") == {
        str(data / "a.parquet"): digests["data/a.parquet"]}


@pytest.mark.parametrize(("option", "estimator", "objective"), [
    ("lightgbm", "lightgbm.LGBMRegressor", "poisson"),
    ("xgboost", "xgboost.XGBRegressor", "count:poisson"),
])
def test_the_estimator_option_swaps_only_the_examples_model_and_its_search_space(
        option: str, estimator: str, objective: str) -> None:
    """``bench_serving.py --estimator lightgbm`` (or ``xgboost``): the same data, features,
    gates and serving as the bike example, LightGBM (XGBoost) as its estimator (its tune
    space names scikit-learn's)."""
    import sys

    import yaml

    from mloop.config import ProjectConfig

    sys.path[:0] = [str(REPO / "benchmarks" / "serving"), str(REPO / "benchmarks")]
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_serving_main", REPO / "benchmarks" / "serving" / "bench_serving.py")
        assert spec is not None and spec.loader is not None
        bench = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = bench  # its dataclasses look their module up there
        spec.loader.exec_module(bench)
    finally:
        del sys.path[:2]
        sys.modules.pop("bench_serving_main", None)
    text = (REPO / "examples" / "bike_sharing" / "mloop.yaml").read_text()
    assert bench.with_estimator(text, "sklearn") == text
    original = ProjectConfig(**yaml.safe_load(text))
    swapped = ProjectConfig(**yaml.safe_load(bench.with_estimator(text, option)))
    assert swapped.model.estimator == estimator
    assert swapped.model.params["objective"] == objective
    assert swapped.model.name == original.model.name and swapped.model.threads == 1
    assert swapped.tune is None and original.tune is not None
    for key in ("data", "target", "task", "features", "split", "metrics", "gates", "serving"):
        assert getattr(swapped, key) == getattr(original, key), key
