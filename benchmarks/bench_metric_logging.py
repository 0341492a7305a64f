"""Metric logging: mloop's BatchLogger vs per-call ``mlflow.log_metric``, same SQLite store.

    python benchmarks/bench_metric_logging.py [--points 10000] [--json]

Both sides log the same N points (one metric key, steps 0..N-1) into fresh runs of one
experiment in one SQLite-backed MLflow store in a temp folder, one after the other in this
process. Each side's time runs from its first call until every point is committed (the batch
logger's flush included), and each side's point count is read back with MlflowClient and must
equal N (and the run's latest value must be the last point). Target (issue #2): mloop >= 50x
faster. mloop's log_batch fallback (used when tracking is an HTTP server) is timed too.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from mloop.tracking import BatchLogger

TARGET_RATIO = 50.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    n = args.points

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = client.create_experiment("bench", artifact_location=Path(tmp, "a").as_uri())

        # anchor: the fluent per-call API, the way most training loops log
        anchor_run = client.create_run(exp).info.run_id
        with mlflow.start_run(run_id=anchor_run):
            t0 = time.perf_counter()
            for i in range(n):
                mlflow.log_metric("loss", 1.0 / (i + 1), step=i)
            anchor_s = time.perf_counter() - t0

        def run_mloop(direct_sql: bool) -> tuple[float, str]:
            run_id = client.create_run(exp).info.run_id
            t0 = time.perf_counter()  # includes opening the SQL writer and checking the schema
            logger = BatchLogger(client, run_id, tracking_uri=uri, direct_sql=direct_sql)
            for i in range(n):
                logger.log_metric("loss", 1.0 / (i + 1), step=i)
            logger.close()
            return time.perf_counter() - t0, run_id

        # mloop as steps use it: buffered, one bulk insert into MLflow's SQL schema per flush
        mloop_s, mloop_run = run_mloop(direct_sql=True)
        # mloop's fallback (what it does against an HTTP tracking server): log_batch, 1000/call
        batch_s, batch_run = run_mloop(direct_sql=False)

        got = {name: len(client.get_metric_history(run_id, "loss"))
               for name, run_id in (("anchor", anchor_run), ("mloop", mloop_run),
                                    ("log_batch", batch_run))}
        latest = client.get_run(mloop_run).data.metrics["loss"]
    if set(got.values()) != {n} or latest != 1.0 / n:
        raise SystemExit(f"lost points: stored {got} of {n} each; latest loss {latest}")

    ratio = anchor_s / mloop_s
    result = {
        "benchmark": "metric_logging", "points": n, "store": "sqlite",
        "mlflow_version": mlflow.__version__, "machine": f"{platform.machine()} "
        f"{platform.python_implementation()} {platform.python_version()}",
        "anchor": {"what": "mlflow.log_metric per call", "seconds": round(anchor_s, 3),
                   "points_per_s": round(n / anchor_s, 1)},
        "mloop": {"what": "mloop BatchLogger, direct SQL bulk insert",
                  "seconds": round(mloop_s, 3), "points_per_s": round(n / mloop_s, 1)},
        "mloop_log_batch_fallback": {"what": "mloop BatchLogger via MlflowClient.log_batch",
                                     "seconds": round(batch_s, 3),
                                     "ratio": round(anchor_s / batch_s, 1)},
        "ratio": round(ratio, 1), "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{n} metric points into MLflow {mlflow.__version__} on SQLite")
        print(f"  mlflow.log_metric per call : {anchor_s:8.2f} s  ({n / anchor_s:9.0f} points/s)")
        print(f"  mloop BatchLogger          : {mloop_s:8.2f} s  ({n / mloop_s:9.0f} points/s)")
        print(f"  (mloop's log_batch fallback: {batch_s:.2f} s, {anchor_s / batch_s:.1f}x; used "
              f"for HTTP tracking servers)")
        print(f"  ratio: mloop is {ratio:.1f}x faster (target >= {TARGET_RATIO:.0f}x: "
              f"{'met' if ratio >= TARGET_RATIO else 'NOT met'})")


if __name__ == "__main__":
    main()
