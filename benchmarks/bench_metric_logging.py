"""Metric logging: mloop's BatchLogger vs MLflow's own log_batch and per-call log_metric.

    python benchmarks/bench_metric_logging.py [--points 10000] [--per-call-points 2000]
        [--repeats 5] [--out benchmarks/metric_logging_results.json] [--json]

Four ways to put N points (one metric key, steps 0..N-1) into a fresh run of one experiment,
all in one SQLite-backed MLflow store in a temp folder, in this process:

  * ``mloop``            -- mloop's ``BatchLogger`` as steps use it on a SQL store: points
                            buffered, one bulk insert of MLflow's own rows per flush (opening
                            the SQL writer and checking MLflow's schema are inside the timing);
  * ``mloop_log_batch``  -- the same logger's fallback (what it does against an HTTP tracking
                            server): ``MlflowClient.log_batch``, 1,000 points a call;
  * ``mlflow_log_batch`` -- MLflow's own batched API, written by hand the way its docs suggest:
                            ``Metric`` objects, ``MlflowClient.log_batch`` 1,000 a call (MLflow's
                            limit per call). The strongest MLflow anchor: faster than its
                            async fluent logging here (FACTS: ~1 s vs ~5 s for 10,000 points);
  * ``mlflow_log_metric``-- ``mlflow.log_metric`` per point inside ``mlflow.start_run``, the way
                            most training loops log.

The per-call side logs ``--per-call-points`` points (default 2,000), the others ``--points``
(default 10,000): at 40-190 points/s here, 10,000 per-call points take 1-4 minutes a run, 5-20
minutes over the repeats. Its cost is one SQLite transaction per point, so its ratio is taken per
point; logging fewer points favours it, if anything (the metric tables it writes into stay
smaller). ``--per-call-points 10000`` measures it on the same N.

A side's time runs from its first call until every point is committed. The sides are
interleaved: each of ``--repeats`` rounds runs every side once, the order rotated by one each
round (so each side runs first, and after each neighbour, equally often as the store grows).
Every run's point count is read back with ``MlflowClient.get_metric_history`` and must equal N,
and its latest value must be the last point, or the benchmark fails.

Reported per side: median, minimum and maximum seconds and points per second at the median.
Ratios are of medians of seconds per point, with the least favourable pairing (the anchor's
fastest run over mloop's slowest) beside them. Targets (PASS/MISS): mloop >= 50x faster than
per-call ``log_metric`` (issue #2), and mloop faster than MLflow's own ``log_batch`` (>= 2x: a
bulk insert of MLflow's rows against MLflow's batch path over the same store). Results go to
``--out`` with the git commit, whether the work tree was clean, the MLflow and SQLAlchemy
versions and the load on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import git_state

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET_PER_CALL_X = 50.0
TARGET_LOG_BATCH_X = 2.0
KEY = "loss"
MLFLOW_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH

SIDES = ("mloop", "mloop_log_batch", "mlflow_log_batch", "mlflow_log_metric")
WHAT = {
    "mloop": "mloop BatchLogger, direct SQL bulk insert (SQL stores)",
    "mloop_log_batch": "mloop BatchLogger, log_batch fallback (HTTP tracking servers)",
    "mlflow_log_batch": "MlflowClient.log_batch by hand, 1,000 Metric objects a call",
    "mlflow_log_metric": "mlflow.log_metric per call",
}


def _value(i: int) -> float:
    return 1.0 / (i + 1)


def make_sides(client: Any, uri: str, points: dict[str, int]
               ) -> dict[str, Callable[[str], None]]:
    """Each side: a function that logs its points into the given (fresh) run."""
    import mlflow
    from mlflow.entities import Metric

    from mloop.tracking import BatchLogger

    def mloop_logger(direct_sql: bool, n: int) -> Callable[[str], None]:
        def run(run_id: str) -> None:
            logger = BatchLogger(client, run_id, tracking_uri=uri, direct_sql=direct_sql)
            for i in range(n):
                logger.log_metric(KEY, _value(i), step=i)
            logger.close()
        return run

    def mlflow_log_batch(run_id: str) -> None:
        batch: list[Metric] = []
        for i in range(points["mlflow_log_batch"]):
            batch.append(Metric(KEY, _value(i), int(time.time() * 1000), i))
            if len(batch) == MLFLOW_BATCH:
                client.log_batch(run_id, metrics=batch)
                batch = []
        if batch:
            client.log_batch(run_id, metrics=batch)

    def mlflow_log_metric(run_id: str) -> None:
        with mlflow.start_run(run_id=run_id):
            for i in range(points["mlflow_log_metric"]):
                mlflow.log_metric(KEY, _value(i), step=i)

    return {"mloop": mloop_logger(True, points["mloop"]),
            "mloop_log_batch": mloop_logger(False, points["mloop_log_batch"]),
            "mlflow_log_batch": mlflow_log_batch, "mlflow_log_metric": mlflow_log_metric}


def measure(points: dict[str, int], repeats: int, progress: Callable[[str], None]
            ) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    orders: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="mloop-bench-metrics-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        exp = client.create_experiment("bench", artifact_location=Path(tmp, "a").as_uri())
        sides = make_sides(client, uri, points)
        for rep in range(repeats):
            order = list(SIDES[rep % len(SIDES):] + SIDES[:rep % len(SIDES)])
            orders.append(order)
            for side in order:
                n = points[side]
                run_id = client.create_run(exp).info.run_id
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                sides[side](run_id)
                seconds = time.perf_counter() - t0
                stored = len(client.get_metric_history(run_id, KEY))
                latest = client.get_run(run_id).data.metrics.get(KEY)
                if stored != n or latest != _value(n - 1):
                    raise SystemExit(f"{side} (round {rep + 1}) lost points: stored {stored} of "
                                     f"{n}, latest {KEY} {latest} (expected {_value(n - 1)})")
                runs[side].append({"seconds": round(seconds, 4), "loadavg_1m_before": load})
                progress(f"round {rep + 1}/{repeats}: {side:<18} {seconds:8.3f} s "
                         f"(load {load:.1f})")
    return {"runs": runs, "orders": orders}


def summarise(points: dict[str, int], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med, n = statistics.median(secs), points[side]
        out[side] = {"what": WHAT[side], "points": n, "seconds_median": round(med, 4),
                     "seconds_min": min(secs), "seconds_max": max(secs),
                     "points_per_s_median": round(n / med, 1),
                     "us_per_point_median": round(med / n * 1e6, 2), "runs": rs}
    return out


def ratios(sides: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Anchor over mloop, in seconds per point (the sides may log different counts)."""
    def per_point(side: dict[str, Any], key: str) -> float:
        return float(side[key]) / side["points"]

    m = sides["mloop"]
    out = {}
    for anchor in ("mlflow_log_metric", "mlflow_log_batch", "mloop_log_batch"):
        a = sides[anchor]
        out[f"{anchor}_over_mloop"] = {
            "median": round(per_point(a, "seconds_median") / per_point(m, "seconds_median"), 1),
            "least_favourable": round(per_point(a, "seconds_min")
                                      / per_point(m, "seconds_max"), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=10_000, help="points per run, batched sides")
    ap.add_argument("--per-call-points", type=int, default=2_000,
                    help="points per run of per-call mlflow.log_metric (compared per point)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; every side runs once a round")
    ap.add_argument("--out", type=Path, default=HERE / "metric_logging_results.json",
                    help="results file ('-' for none)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args()
    if min(args.points, args.per_call_points, args.repeats) < 1:
        raise SystemExit(f"--points, --per-call-points and --repeats must be at least 1 (got "
                         f"{args.points}, {args.per_call_points}, {args.repeats})")
    n = args.points
    points = {side: args.per_call_points if side == "mlflow_log_metric" else n for side in SIDES}
    git = git_state(REPO)  # before the results file is written: it is in the tree
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    t_start = time.perf_counter()
    measured = measure(points, args.repeats,
                       (lambda _m: None) if args.json else
                       (lambda m: print(m, file=sys.stderr, flush=True)))
    sides = summarise(points, measured["runs"])
    rat = ratios(sides)
    targets = {
        f"mloop >= {TARGET_PER_CALL_X:g}x faster than per-call mlflow.log_metric":
            rat["mlflow_log_metric_over_mloop"]["median"] >= TARGET_PER_CALL_X,
        f"mloop >= {TARGET_LOG_BATCH_X:g}x faster than MLflow's own log_batch":
            rat["mlflow_log_batch_over_mloop"]["median"] >= TARGET_LOG_BATCH_X,
    }
    import mlflow
    import sqlalchemy

    result = {
        "benchmark": "metric_logging", "git": git, "points": points, "key": KEY,
        "repeats": args.repeats, "orders": measured["orders"], "store": "sqlite",
        "versions": {"mlflow": mlflow.__version__, "sqlalchemy": sqlalchemy.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": loadavg},
        "sides": sides, "ratios": rat, "targets": targets,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    if str(args.out) != "-":
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"points of one key into one run, MLflow {mlflow.__version__} on SQLite; "
              f"{args.repeats} interleaved rounds, order rotated")
        print(f"  {'side':<62} {'points':>7} {'median s':>9} {'min':>8} {'max':>8} "
              f"{'points/s':>10}")
        for side in SIDES:
            s = sides[side]
            print(f"  {s['what']:<62} {s['points']:>7,} {s['seconds_median']:9.3f} "
                  f"{s['seconds_min']:8.3f} {s['seconds_max']:8.3f} "
                  f"{s['points_per_s_median']:10,.0f}")
        for key, r in rat.items():
            print(f"  {key.replace('_over_mloop', '')} / mloop, per point: {r['median']:.1f}x "
                  f"(median), "
                  f"{r['least_favourable']:.1f}x least favourable (its fastest / mloop's "
                  f"slowest)")
        for name, ok in targets.items():
            print(f"  {'PASS' if ok else 'MISS'}  {name}")
        print(f"  git {git['commit']} ({'clean' if git['clean'] else 'NOT clean'}); load before "
              f"{' '.join(loadavg)}" + ("" if str(args.out) == "-" else f"; wrote {args.out}"))
    if not all(targets.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
