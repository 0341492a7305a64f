"""Batch scoring memory: mloop's chunked ``predict`` vs the whole-file pandas way, as files grow.

    python benchmarks/serving/bench_batch_memory.py [--project DIR] [--sizes 100000,400000,1600000]

What is measured: peak resident memory (RSS, sampled by the OS: ``ru_maxrss`` of the child) and
wall time to score a Parquet file of N rows with the bike example's champion, each side in a
fresh process so one cannot inherit the other's heap:

  * mloop  -- ``mloop.serving.batch.predict_file`` (50,000-row chunks, Parquet out), what
              ``mloop predict`` runs;
  * anchor -- what a notebook or ``mlflow models predict`` does: ``pd.read_parquet`` the whole
              file, one ``pyfunc.predict`` over it, ``to_parquet`` the result.

Data: the rows of ``examples/bike_sharing/data/bike_hourly.parquet`` (17,379 real hours, UCI
Bike Sharing, CC BY 4.0) repeated to each size. The claim under test is "constant memory":
mloop's peak should stay flat as the file grows while the anchor's grows with it. Prints
one row per size and the growth of each side from the smallest to the largest file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bike_sharing"

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
side, project_dir, src, out = sys.argv[1:5]
t0 = time.perf_counter()
if side == "mloop":
    from mloop.project import open_project
    from mloop.serving.batch import predict_file
    r = predict_file(open_project(project_dir), Path(src), Path(out), progress=False)
    rows = r["rows"]
else:
    import mlflow, mlflow.pyfunc, pandas as pd
    from mloop.project import open_project
    from mloop.serving.deploy import desired_state
    p = open_project(project_dir)
    p.mlflow  # points MLflow at the project's tracking and registry stores
    v = desired_state(p).champion
    model = mlflow.pyfunc.load_model(f"models:/{p.config.model_name}/{v}")
    names = [c.name for c in model.metadata.get_input_schema().inputs]
    frame = pd.read_parquet(src)
    X = frame[names].astype({c.name: "float64" for c in model.metadata.get_input_schema().inputs
                             if getattr(c.type, "name", "") == "double"})
    frame["prediction"] = model.predict(X)
    frame.to_parquet(out, index=False)
    rows = len(frame)
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _make_file(rows: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pq.read_table(EXAMPLE / "data" / "bike_hourly.parquet")
    reps = -(-rows // base.num_rows)
    pq.write_table(pa.concat_tables([base] * reps).slice(0, rows), path, row_group_size=100_000)


def _run(side: str, project: Path, src: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, side, str(project), str(src), str(out)],
                          capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "MLFLOW_LOGGING_LEVEL": "WARNING"})
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="a trained bike project (default: train one)")
    ap.add_argument("--sizes", default="100000,400000,1600000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="mloop-bench-batch-") as tmp:
        work = Path(tmp)
        project = args.project
        if project is None:
            project = work / "bike_sharing"
            shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".mloop"))
            mloop = Path(sys.executable).parent / "mloop"
            subprocess.run([str(mloop), "-C", str(project), "run", "--json"], check=True,
                           capture_output=True)
            subprocess.run([str(mloop), "-C", str(project), "models", "promote", "1", "--force",
                            "--reason", "benchmark"], capture_output=True)  # if a gate failed
        results = []
        for n in sizes:
            src = work / f"in-{n}.parquet"
            _make_file(n, src)
            row = {"rows": n, "file_mb": round(src.stat().st_size / 2**20, 1)}
            for side in ("mloop", "anchor"):
                r = _run(side, project, src, work / f"out-{side}-{n}.parquet")
                assert r["rows"] == n, (side, r)
                row[side] = {"peak_rss_mb": round(r["peak_rss_mb"], 1),
                             "seconds": round(r["seconds"], 2)}
            results.append(row)
            print(f"{n:>10,} rows ({row['file_mb']:>6} MB parquet): "
                  f"mloop peak {row['mloop']['peak_rss_mb']:>7,.1f} MB in "
                  f"{row['mloop']['seconds']:>6.1f} s | anchor (pandas whole file + pyfunc) "
                  f"peak {row['anchor']['peak_rss_mb']:>7,.1f} MB in "
                  f"{row['anchor']['seconds']:>6.1f} s", flush=True)
        first, last = results[0], results[-1]
        for side in ("mloop", "anchor"):
            grow = last[side]["peak_rss_mb"] - first[side]["peak_rss_mb"]
            print(f"{side}: peak RSS grows {grow:+,.1f} MB from {first['rows']:,} to "
                  f"{last['rows']:,} rows ({last['rows'] / first['rows']:.0f}x the data)")
        ratio = last["anchor"]["peak_rss_mb"] / last["mloop"]["peak_rss_mb"]
        print(f"at {last['rows']:,} rows the anchor peaks at {ratio:.1f}x mloop's memory")
        out = Path(__file__).with_name("batch_memory_results.json")
        out.write_text(json.dumps(results, indent=2))
        print(f"JSON: {out}")


if __name__ == "__main__":
    main()
