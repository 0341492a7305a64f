"""Which engine serves an XGBoost pipeline: its ONNX graph, or XGBoost's own inplace_predict.

    python benchmarks/serving/bench_xgboost_engines.py [--seconds 2] [--out FILE]

Why: a pipeline ending in ``xgboost.XGBRegressor`` could be served two fast ways. mloop's
verified fast path compiles the whole pipeline (preprocessing included) into one ONNX graph
through onnxmltools' converter and runs it in onnxruntime; or the preprocessing runs in
scikit-learn and XGBoost's own ``Booster.inplace_predict`` (its fastest call: no DMatrix)
scores the trees. This script times both, and the original pipeline, on the same model.

Model and data: the bike-sharing example (``examples/bike_sharing``) with its model block
swapped for bench_serving's ``--estimator xgboost`` one (``count:poisson``, 300 trees of
depth 6, learning rate 0.08), trained in this process with mloop's own tabular pipeline
(``resolve_spec``, ``build_model``) on the example's rows (``since``/``until``) in time
order, the last 20% held out as ``mloop run`` splits them. The graph is checked on that
holdout with mloop's ``verify`` at the default tolerances, as registration does.

Timed, one OpenMP/BLAS thread (``OMP_NUM_THREADS=1`` and ``threadpool_limits(1)``), median
of as many calls as fit ``--seconds`` (at least 200), for 1 row and for 64 rows of the
holdout:

  * pipeline      -- ``Pipeline.predict(DataFrame)``: what serves when nothing is compiled
  * onnx          -- ``CompiledModel.predict_columns``: request columns to predictions
  * inplace       -- ``Booster.inplace_predict`` on rows already preprocessed (float32):
                     XGBoost's engine alone, a floor no server reaches
  * pre+inplace   -- the ColumnTransformer's ``transform`` then ``inplace_predict``: what a
                     server using XGBoost's engine would pay per call

Absolute figures on these shared 2-core machines drift ~3x between runs; compare within one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import git_state

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bike_sharing"

ROWS = (1, 64)


def _median_us(call: Callable[[], Any], seconds: float) -> float:
    for _ in range(20):
        call()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 200 or time.perf_counter() < end:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _model_config() -> dict[str, Any]:
    """The example's mloop.yaml with bench_serving's XGBoost model block."""
    import yaml
    from bench_serving import with_estimator

    return yaml.safe_load(with_estimator((EXAMPLE / "mloop.yaml").read_text(), "xgboost"))


def train(config: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """The fitted pipeline, the holdout features and target, and the resolved spec."""
    import pandas as pd
    import pyarrow as pa

    from mloop.config import ModelConfig
    from mloop.tabular.model import build_model, features_frame, resolve_spec

    frame = pd.read_parquet(EXAMPLE / config["data"]["path"])
    time_col = config["features"]["time_column"]
    frame = frame[(frame[time_col] >= config["data"]["since"])
                  & (frame[time_col] < config["data"]["until"])].sort_values(time_col)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    spec = resolve_spec(table.schema, table[config["target"]], target=config["target"],
                        task=config["task"], features=config["features"])
    n_hold = round(len(frame) * config["split"]["holdout"])
    train_rows, hold_rows = frame.iloc[:-n_hold], frame.iloc[-n_hold:]
    model = build_model(spec, ModelConfig(**config["model"]))
    model.fit(features_frame(train_rows, spec), train_rows[config["target"]].to_numpy())
    return model, features_frame(hold_rows, spec), hold_rows, spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per cell")
    ap.add_argument("--out", type=Path,
                    default=REPO / "benchmarks" / "serving" / "xgboost_engines_results.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy, xgboost, onnxruntime load
    git = git_state(REPO, ignore=args.out)

    import numpy as np
    from threadpoolctl import threadpool_limits

    from mloop.config import CompileConfig
    from mloop.serving.compiled import compile_sklearn, verify
    from mloop.serving.schema import Column, InputSchema

    config = _model_config()
    print("training the bike example with xgboost.XGBRegressor ...", flush=True)
    t0 = time.perf_counter()
    model, x_hold, hold_rows, spec = train(config)
    train_s = time.perf_counter() - t0
    kinds = {c: "double" for c in spec["numeric"]} | {c: "string" for c in spec["categorical"]}
    schema = InputSchema([Column(c, kinds[c], True) for c in x_hold.columns])
    compiled = compile_sklearn(model, schema)
    cfg = CompileConfig()
    verdict = verify(compiled, model, hold_rows, schema, "regression", atol=cfg.atol,
                     rtol=cfg.rtol, max_label_mismatch=cfg.max_label_mismatch)
    print(f"verify on the holdout: {verdict.status}: {verdict.detail}", flush=True)

    pre, booster = model.steps[0][1], model.steps[-1][1].get_booster()
    cells: dict[str, dict[str, float]] = {}
    with threadpool_limits(1):
        for n in ROWS:
            x = x_hold.iloc[:n]
            cols = {c: x[c].tolist() for c in x.columns}
            ready = np.asarray(pre.transform(x), dtype=np.float32)
            cells[str(n)] = {
                "pipeline": _median_us(lambda x=x: model.predict(x), args.seconds),
                "onnx": _median_us(lambda c=cols: compiled.predict_columns(c), args.seconds),
                "inplace": _median_us(lambda r=ready: booster.inplace_predict(r),
                                      args.seconds),
                "pre+inplace": _median_us(
                    lambda x=x: booster.inplace_predict(pre.transform(x)), args.seconds),
            }
    for n, row in cells.items():
        print(f"{n:>3} rows: " + ", ".join(f"{k} {v:,.0f} us" for k, v in row.items())
              + f"  (onnx is {row['inplace'] / row['onnx']:.1f}x faster than inplace alone, "
              f"{row['pipeline'] / row['onnx']:.0f}x than the pipeline)")

    versions = {d: _version(d) for d in ("xgboost-cpu", "xgboost", "onnxmltools", "skl2onnx",
                                         "onnxruntime", "scikit-learn", "numpy")}
    results = {"git": git, "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(),
                                       "python": platform.python_version()},
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "versions": versions,
               "model": config["model"], "train_seconds": round(train_s, 1),
               "verdict": {"status": verdict.status, "detail": verdict.detail},
               "median_us": {n: {k: round(v, 1) for k, v in row.items()}
                             for n, row in cells.items()},
               "command": " ".join([Path(sys.executable).name, *sys.argv])}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
