"""Per-request cost of mloop's /predict beyond the bare ASGI floor, measured in process.

    python benchmarks/serving/bench_overhead.py --project DIR [--concurrency 1 32]
        [--requests 20000] [--repeats 3] [--profile FILE]

wrk through a loopback socket measures the whole machine, and on a shared machine its req/s
moves 2-3x with the neighbours' load. This drives both ASGI apps directly on one uvloop event
loop (no sockets, no HTTP parsing: uvicorn's share is the same for both and is left out) and
reports, per request, the CPU time of this process (every thread: the event loop, the model
thread, the inference-log writer) and the wall time. CPU time is what a neighbour's load
disturbs least; the difference between the two apps is the cost mloop adds to the floor.

* bare  -- ``bare_asgi.py``: reads the body, answers a constant JSON
* mloop -- ``mloop.server.build_app`` on the trained project ``DIR`` (what ``mloop serve``
  runs, auth off, its lifespan started: the model loaded, the inference-log writer running),
  POST /predict with one row of the bike example

``C`` tasks each send requests back to back (C = concurrency); runs are interleaved
(bare, mloop, bare, mloop, ...). ``--profile FILE`` writes a cProfile of one extra mloop run
at the largest concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = Path(__file__).resolve().parent

ROW = {"hr": 6.0, "temp": 0.64, "atemp": 0.5758, "hum": 0.83, "windspeed": 0.1045,
       "season": "fall", "holiday": "No", "weekday": "Mon", "workingday": "Working Day",
       "weathersit": "Clear"}


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name (from /proc: the
    model thread, the inference-log writer and the event loop are told apart)."""
    import threading

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        name = t.name.split("_")[0] if t.name.startswith("mloop-") else t.name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def scope_for(path: str, body: bytes) -> dict[str, Any]:
    """What uvicorn (httptools) hands an app for a POST with a JSON body."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
            "scheme": "http", "method": "POST", "root_path": "", "path": path,
            "raw_path": path.encode(), "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                        (b"accept", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "state": {}}


async def one(app: Any, path: str, body: bytes) -> int:
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope_for(path, body), receive, send)
    return status


async def drive(app: Any, path: str, body: bytes, concurrency: int, requests: int
                ) -> dict[str, float]:
    per_task = requests // concurrency
    bad = 0

    async def worker() -> None:
        nonlocal bad
        for _ in range(per_task):
            if await one(app, path, body) != 200:
                bad += 1

    threads0 = thread_cpu()
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    threads = thread_cpu()
    n = per_task * concurrency
    if bad:
        raise SystemExit(f"{bad} of {n} requests to {path} were not answered 200")
    out = {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6, "req_s": n / wall}
    for name, seconds in threads.items():
        out[f"cpu_us[{name}]"] = (seconds - threads0.get(name, 0.0)) / n * 1e6
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from bare_asgi import app as bare

    from mloop.project import open_project
    from mloop.server import build_app

    project = open_project(args.project)
    app = build_app(project, project.config.serving, auth=False)
    body = json.dumps({"records": [ROW]}).encode()
    out: dict[str, Any] = {"requests": args.requests, "runs": {}}
    async with app.router.lifespan_context(app):
        for _ in range(2000):  # warm both, and fill the log's first commit
            await one(app, "/predict", body)
            await one(bare, "/predict", body)
        for c in args.concurrency:
            runs: dict[str, list[dict[str, float]]] = {"bare": [], "mloop": []}
            for _ in range(args.repeats):
                runs["bare"].append(await drive(bare, "/predict", body, c, args.requests))
                runs["mloop"].append(await drive(app, "/predict", body, c, args.requests))
            med = {k: {m: statistics.median(r.get(m, 0.0) for r in v) for m in v[0]}
                   for k, v in runs.items()}
            out["runs"][c] = med
            b, m = med["bare"], med["mloop"]
            print(f"c={c:<3} bare {b['cpu_us']:6.1f} µs CPU {b['wall_us']:6.1f} µs wall "
                  f"| mloop {m['cpu_us']:6.1f} µs CPU {m['wall_us']:6.1f} µs wall "
                  f"| beyond the floor {m['cpu_us'] - b['cpu_us']:6.1f} µs CPU, "
                  f"{m['wall_us'] - b['wall_us']:6.1f} µs wall", flush=True)
            print("       mloop CPU by thread: " + ", ".join(
                f"{k[7:-1]} {v:.1f} µs" for k, v in m.items() if k.startswith("cpu_us[")),
                flush=True)
        if args.profile:
            import cProfile

            # the event loop's own CPU time: wall time would charge GIL waits to whatever ran
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            await drive(app, "/predict", body, max(args.concurrency), args.requests)
            prof.disable()
            prof.dump_stats(args.profile)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", required=True, help="a trained project (its champion is served)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", help="write a cProfile of one mloop run here")
    p.add_argument("--out", help="write the medians here (JSON)")
    args = p.parse_args()
    import uvloop

    result = uvloop.run(main_async(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
