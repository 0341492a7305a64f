"""What encryption at rest costs: serving req/s and a monitoring window, encryption off vs on.

    python benchmarks/security/bench_encryption.py --project DIR [--requests 3000]
        [--concurrency 1 32] [--repeats 3] [--rows 20000] [--rows-per-segment 100]
        [--out FILE]

``DIR`` is a trained bike-sharing project (``mloop run`` in examples/bike_sharing; its
champion is served). The script copies it twice into a temporary folder, ``off`` as it is and
``on`` with ``security.encryption.key_file`` (a fresh key), and measures, interleaved
(off, on, off, on, ...), medians of ``--repeats``:

* serving -- ``mloop.server.build_app`` driven in process as benchmarks/serving/
  bench_overhead.py does (no sockets; one row of the bike example per POST /predict, the
  inference-log writer committing, and so sealing, a segment every second in the
  background): req/s and CPU µs per request (this process, every thread: the sealing
  writer included). Target: on within 10% of off. On a shared machine req/s moves with the
  neighbours' load; CPU per request is the figure they disturb least.
* a monitoring window -- ``--rows`` rows of the bike data's inputs written to each log as
  segments of ``--rows-per-segment`` rows (one commit interval's worth), then one day's
  window read cold (segment cache emptied) and judged against the champion's profile
  (``read_rows`` + ``evaluate_window``, what ``mloop monitor`` does per window). Target: on
  within 1.5x of off.

Prints the ratios (on / off) and, with ``--out``, writes them as JSON with the git state.
Runs in about a minute here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "serving"))

from _common import git_state  # noqa: E402
from bench_overhead import ROW, drive, one  # noqa: E402

DAY = datetime(2011, 8, 1, tzinfo=UTC)
INPUTS = ("hr", "temp", "atemp", "hum", "windspeed", "season", "holiday", "weekday",
          "workingday", "weathersit")


def make_copies(project: Path, work: Path) -> dict[str, Path]:
    """``off`` and ``on`` copies of the trained project (their own stores)."""
    from mloop.security.keys import create_key_file

    out = {}
    for side in ("off", "on"):
        root = work / side
        shutil.copytree(project, root, ignore=shutil.ignore_patterns("inference"))
        if side == "on":
            create_key_file(root / "bench.key")
            cfg = root / "mloop.yaml"
            cfg.write_text(cfg.read_text() + "\nsecurity:\n  encryption:\n"
                                             "    key_file: bench.key\n")
        out[side] = root
    return out


async def serve_side(root: Path, concurrency: list[int], requests: int
                     ) -> dict[int, dict[str, float]]:
    from mloop.project import open_project
    from mloop.server import build_app

    project = open_project(root)
    app = build_app(project, project.config.serving, auth=False)
    body = json.dumps({"records": [ROW]}).encode()
    out = {}
    async with app.router.lifespan_context(app):
        for _ in range(500):
            await one(app, "/predict", body)
        for c in concurrency:
            out[c] = await drive(app, "/predict", body, c, requests)
    return out


def write_traffic(root: Path, rows: int, per_segment: int) -> None:
    """``rows`` rows of the bike data's inputs over one day, committed ``per_segment`` at a
    time (each commit one segment, as the server's writer makes them)."""
    import pyarrow.parquet as pq

    from mloop.project import open_project
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    project = open_project(root)
    data = pq.read_table(root / "data" / "bike_hourly.parquet").slice(5000).to_pylist()
    log = InferenceLog(project.log_store, commit_interval=3600)
    start = DAY.timestamp()
    for i in range(rows):
        ts = start + i * 86_000 / rows
        row = data[i % len(data)]
        log.append(LogEntry([new_request_id(ts)], ts, 1, "champion", 1.0,
                            [float(row["cnt"])], {k: [row[k]] for k in INPUTS}))
        if (i + 1) % per_segment == 0:
            log.commit()
    log.close()
    # a row the next day closes the window
    log = InferenceLog(project.log_store, commit_interval=3600)
    ts = (DAY + timedelta(days=1, hours=1)).timestamp()
    log.append(LogEntry([new_request_id(ts)], ts, 1, "champion", 1.0, [1.0],
                        {k: [data[0][k]] for k in INPUTS}))
    log.close()


def window_side(root: Path) -> dict[str, float]:
    """One day's window read cold and judged: seconds for each part."""
    from mloop.monitoring.evaluate import evaluate_window
    from mloop.monitoring.service import reference_for
    from mloop.monitoring.windows import read_rows
    from mloop.project import open_project
    from mloop.traffic import inference_log

    project = open_project(root)
    ref = reference_for(project, 1)
    inference_log._SEGMENTS.__init__()  # type: ignore[misc]  # cold: as a new process reads
    t0 = time.perf_counter()
    window = read_rows(project.log_store, since=DAY - timedelta(microseconds=1),
                       until=DAY + timedelta(days=1))
    t1 = time.perf_counter()
    evaluate_window(ref.profile, window, project.config.monitoring, columns=ref.features,
                    size="1d")
    t2 = time.perf_counter()
    return {"rows": window.num_rows, "read_s": t1 - t0, "evaluate_s": t2 - t1,
            "window_s": t2 - t0}


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", required=True, type=Path, help="a trained bike project")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--rows-per-segment", type=int, default=100)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="mloop-bench-crypt-") as tmp:
        roots = make_copies(args.project.resolve(), Path(tmp))
        serving: dict[str, dict[int, list[dict[str, float]]]] = {
            s: {c: [] for c in args.concurrency} for s in roots}
        for _ in range(args.repeats):
            for side, root in roots.items():
                for c, r in uvloop.run(serve_side(root, args.concurrency,
                                                  args.requests)).items():
                    serving[side][c].append(r)
        for root in roots.values():
            write_traffic(root, args.rows, args.rows_per_segment)
        windows: dict[str, list[dict[str, float]]] = {s: [] for s in roots}
        for _ in range(args.repeats):
            for side, root in roots.items():
                windows[side].append(window_side(root))
        sealed = sum(1 for f in (roots["on"] / ".mloop" / "inference").rglob("*.parquet")
                     if f.read_bytes()[:8] == b"MLOOPENC")

    result: dict[str, Any] = {"requests": args.requests, "repeats": args.repeats,
                              "rows": args.rows, "rows_per_segment": args.rows_per_segment,
                              "sealed_segments": sealed, "serving": {}, "window": {}}
    for c in args.concurrency:
        off, on = median(serving["off"][c]), median(serving["on"][c])
        ratio = on["req_s"] / off["req_s"]
        result["serving"][c] = {"off": off, "on": on, "req_s_ratio": ratio,
                                "cpu_ratio": on["cpu_us"] / off["cpu_us"]}
        print(f"serving c={c:<3} off {off['req_s']:7.0f} req/s {off['cpu_us']:6.0f} µs CPU | "
              f"on {on['req_s']:7.0f} req/s {on['cpu_us']:6.0f} µs CPU | on/off: req/s "
              f"{ratio:.3f} (target >= 0.90), CPU per request "
              f"{on['cpu_us'] / off['cpu_us']:.3f}", flush=True)
    off, on = median(windows["off"]), median(windows["on"])
    ratio = on["window_s"] / off["window_s"]
    result["window"] = {"off": off, "on": on, "ratio": ratio}
    print(f"window of {int(off['rows'])} rows in {args.rows // args.rows_per_segment} "
          f"segments ({sealed} sealed): off {off['window_s'] * 1000:.0f} ms (read "
          f"{off['read_s'] * 1000:.0f}) | on {on['window_s'] * 1000:.0f} ms (read "
          f"{on['read_s'] * 1000:.0f}) | on/off {ratio:.2f}x (target <= 1.5x)", flush=True)
    if args.out:
        result["git"] = git_state(Path(__file__).resolve().parents[2], ignore=args.out)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
