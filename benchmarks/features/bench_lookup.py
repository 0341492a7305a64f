"""Online lookup + predict, one row per request: mloop against the stack a user would assemble.

    python benchmarks/features/bench_lookup.py [--duration 10] [--concurrency 1 8 32]
        [--redis 127.0.0.1:6379] [--out benchmarks/features/results.json]

Both sides serve the SAME registered model version (the flights_feast example trained on a few
days of January 2013) from the SAME Redis online store (one Feast project, materialized once):

  * mloop -- ``mloop -C DIR serve`` (one worker): POST /predict with the entity keys and the
             request-time features; the server reads Redis through the Feast SDK once per
             micro-batch, predicts and logs the full feature vector (the inference log on).
  * stack -- Feast's feature server (``feast serve``, one worker) in front of
             ``mlflow models serve --env-manager local --workers 1``: per request the client
             asks Feast for the row's features (POST /get-online-features), completes the row
             and POSTs it to MLflow's /invocations. Two hops, as a user glues them.

Every server runs with OMP_NUM_THREADS=1. The load comes from this process: an aiohttp client
with C concurrent request loops (C = 1, 8, 32) for ``--duration`` seconds each after a warm-up,
mloop and the stack alternating per C; the same client code drives both (one request = one
hop for mloop, two for the stack), so the client's own cost is in both. Errors are non-2xx
answers and exceptions; a request that errs is not counted in req/s.

Targets (issue #17): mloop >= 10x the stack's req/s at c=8 and c=32, and p99 <= 1/5 of its.
The machine has 2 cores shared by the client and every server: absolute figures move ~3x
between days here; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flights_feast"
FLIGHTS = REPO / "examples" / "flights" / "data" / "flights.parquet"
BIN = Path(sys.executable).parent
UNTIL = "2013-01-05"
# request rows: the join keys and request-time features of real flights (Jan 5, 2013)
CARRIERS = ["UA", "AA", "B6", "DL", "EV", "MQ", "US", "WN"]
ORIGINS = ["EWR", "JFK", "LGA"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("MLOOP_")}
    out["OMP_NUM_THREADS"] = "1"
    out.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return out


def run(args: list[str], cwd: Path | None = None, extra: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env={**env(), **(extra or {})}, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                 f"{proc.stderr[-3000:]}")
    return proc.stdout


def prepare(work: Path, redis: str) -> tuple[Path, str]:
    """The example copied, pointed at the bundled flights and a Redis online store under a
    Feast project of its own, trained (v1 champion by its auto_promote) and materialized."""
    root = work / "flights_feast"
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".mloop", "__pycache__"))
    cfg = (root / "mloop.yaml").read_text()
    cfg = cfg.replace("../flights/data/flights.parquet", str(FLIGHTS)).replace(
        'until: "2013-01-16"', f'until: "{UNTIL}"')
    (root / "mloop.yaml").write_text(cfg)
    project = f"bench_{uuid.uuid4().hex[:10]}"
    fs = root / "feature_repo" / "feature_store.yaml"
    lines, skip = [], False
    for line in fs.read_text().splitlines():
        if line.startswith("online_store:"):
            lines.append(f'online_store: {{type: redis, connection_string: "{redis}"}}')
            skip = True
            continue
        if skip and line.startswith("  "):
            continue
        skip = False
        lines.append(f"project: {project}" if line.startswith("project:") else line)
    fs.write_text("\n".join(lines) + "\n")
    print("training flights_feast (Jan 2-4) ...", file=sys.stderr)
    run([str(BIN / "mloop"), "-C", str(root), "run"])
    run([str(BIN / "mloop"), "-C", str(root), "features", "materialize", "--until", UNTIL])
    return root, project


class Server:
    def __init__(self, name: str, args: list[str], url: str, log: Path, *,
                 cwd: Path | None = None, extra: dict[str, str] | None = None) -> None:
        self.name, self.url, self.log, self.args = name, url, log, args
        with log.open("w") as out:
            self.proc = subprocess.Popen(args, cwd=cwd, env={**env(), **(extra or {})},
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, probe: str, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited at start:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + probe, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.3)
        sys.exit(f"{self.name} not up in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def rows(n: int) -> list[dict[str, Any]]:
    """Real flights of Jan 5 (after the materialized day) whose carrier and origin the store
    knows: the request rows, cycled."""
    import pandas as pd

    frame = pd.read_parquet(FLIGHTS)
    day = frame[(frame["datetime"] >= "2013-01-05") & (frame["datetime"] < "2013-01-06")
                & frame["carrier"].isin(CARRIERS) & frame["origin"].isin(ORIGINS)]
    cols = ["weekday", "hour", "sched_dep_time", "sched_arr_time", "distance", "carrier",
            "origin", "dest"]
    out = []
    for rec in day[cols].head(n).to_dict("records"):
        out.append({k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()})
    return out


async def mloop_call(session: Any, url: str, row: dict[str, Any]) -> Any:
    async with session.post(url + "/predict", json={"records": [row]}) as r:
        if r.status != 200:
            raise RuntimeError(f"mloop {r.status}: {await r.text()}")
        return (await r.json())["predictions"][0]


async def stack_call(session: Any, urls: tuple[str, str], row: dict[str, Any],
                     refs: list[str]) -> Any:
    feast_url, mlflow_url = urls
    body = {"features": refs, "entities": {"carrier": [row["carrier"]],
                                           "origin": [row["origin"]]}}
    async with session.post(feast_url + "/get-online-features", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"feast {r.status}: {await r.text()}")
        got = await r.json()
    names = got["metadata"]["feature_names"]
    full = dict(row)
    for name, result in zip(names, got["results"], strict=True):
        full[name] = result["values"][0]
    async with session.post(mlflow_url + "/invocations",
                            json={"dataframe_records": [full]}) as r:
        if r.status != 200:
            raise RuntimeError(f"mlflow {r.status}: {await r.text()}")
        return (await r.json())["predictions"][0]


async def load(call: Any, requests: list[dict[str, Any]], c: int, seconds: float
               ) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    conn = aiohttp.TCPConnector(limit=c * 2)
    async with aiohttp.ClientSession(connector=conn) as session:
        stop = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    await call(session, requests[i % len(requests)])
                    latencies.append(time.perf_counter() - t0)
                except Exception as exc:  # counted, not fatal: the report shows them
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                i += c

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(c)))
        elapsed = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else None

    return {"requests": len(lat), "rps": len(lat) / elapsed, "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "mean_ms": statistics.fmean(lat) * 1000 if lat else None,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--redis", default="127.0.0.1:6379")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "features" /
                    "results.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))  # for _common
    from _common import git_state

    state = git_state(REPO, ignore=args.out)  # before the run (and the results) change it
    work = Path(tempfile.mkdtemp(prefix="bench_lookup_"))
    servers: list[Server] = []
    try:
        root, feast_project = prepare(work, args.redis)
        sys.path.insert(0, str(REPO / "src"))
        from mloop.project import open_project

        project = open_project(root)
        uris = project.uris
        refs = list(project.config.features.feature_refs or [])
        p_mloop, p_feast, p_mlflow = free_port(), free_port(), free_port()
        mloop = Server("mloop", [str(BIN / "mloop"), "-C", str(root), "serve", "--port",
                                 str(p_mloop)], f"http://127.0.0.1:{p_mloop}",
                       work / "mloop.log")
        feast = Server("feast", [str(BIN / "feast"), "-c", str(root / "feature_repo"), "serve",
                                 "-h", "127.0.0.1", "-p", str(p_feast), "-w", "1",
                                 "--no-access-log"], f"http://127.0.0.1:{p_feast}",
                       work / "feast.log")
        mlflow = Server("mlflow", [str(BIN / "mlflow"), "models", "serve", "-m",
                                   "models:/flights-feast/1", "--env-manager", "local",
                                   "--workers", "1", "-h", "127.0.0.1", "-p", str(p_mlflow)],
                        f"http://127.0.0.1:{p_mlflow}", work / "mlflow.log",
                        extra={"MLFLOW_TRACKING_URI": uris["tracking_uri"],
                               "MLFLOW_REGISTRY_URI": uris.get("registry_uri",
                                                               uris["tracking_uri"])})
        servers = [mloop, feast, mlflow]
        mloop.wait("/ready")
        feast.wait("/health")
        mlflow.wait("/ping")
        reqs = rows(200)

        def call_mloop(s: Any, row: dict[str, Any]) -> Any:
            return mloop_call(s, mloop.url, row)

        def call_stack(s: Any, row: dict[str, Any]) -> Any:
            return stack_call(s, (feast.url, mlflow.url), row, refs)

        # both answer the same rows the same way before anything is timed
        async def agree() -> list[tuple[Any, Any]]:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                return [(await call_mloop(s, r), await call_stack(s, r)) for r in reqs[:20]]

        pairs = asyncio.run(agree())
        same = sum(a == b for a, b in pairs)
        print(f"agreement on 20 rows: {same}/20 identical predictions", file=sys.stderr)
        results: dict[str, Any] = {
            "git": state, "duration_s": args.duration, "agreement_20": same,
            "redis": args.redis, "feast_project": feast_project,
            "omp_num_threads": 1, "cpus": os.cpu_count(), "load_before": os.getloadavg(),
            "commands": {s.name: s.args for s in servers}, "cells": {}}
        for c in args.concurrency:
            cell = {}
            order = [("mloop", call_mloop), ("stack", call_stack)]
            if c in args.concurrency[1::2]:
                order.reverse()
            for name, call in order:
                asyncio.run(load(call, reqs, c, args.warmup))
                cell[name] = asyncio.run(load(call, reqs, c, args.duration))
                print(f"c={c:<3} {name:<6} {cell[name]['rps']:8.1f} req/s  "
                      f"p50 {cell[name]['p50_ms'] or 0:7.2f} ms  "
                      f"p99 {cell[name]['p99_ms'] or 0:7.2f} ms  errors {cell[name]['errors']}",
                      file=sys.stderr)
            results["cells"][str(c)] = cell
        report(results)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {args.out}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
        try:  # drop the benchmark's keys from Redis (its own Feast project)
            run([str(BIN / "python"), "-c", "from mloop.project import open_project\n"
                 "from mloop.features.service import project_repo\n"
                 f"r, _ = project_repo(open_project({str(work / 'flights_feast')!r}))\n"
                 "r.store.teardown()"], extra={"PYTHONPATH": str(REPO / "src")})
        except SystemExit:
            print("could not tear down the benchmark's Redis keys", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, Any]) -> None:
    print(f"{'c':>3}  {'mloop req/s':>11}  {'stack req/s':>11}  {'ratio':>6}  "
          f"{'mloop p99':>9}  {'stack p99':>9}  {'p99 ratio':>9}  targets (c>=8: >=10x, <=1/5)")
    for c, cell in results["cells"].items():
        m, s = cell["mloop"], cell["stack"]
        ratio = m["rps"] / s["rps"] if s["rps"] else float("inf")
        p99 = (m["p99_ms"] / s["p99_ms"]) if m["p99_ms"] and s["p99_ms"] else None
        cell["ratio_rps"], cell["ratio_p99"] = ratio, p99
        target = ""
        if int(c) >= 8:
            ok = ratio >= 10 and p99 is not None and p99 <= 0.2
            target = "met" if ok else "NOT met"
        print(f"{c:>3}  {m['rps']:>11.1f}  {s['rps']:>11.1f}  {ratio:>5.1f}x  "
              f"{m['p99_ms'] or 0:>7.1f}ms  {s['p99_ms'] or 0:>7.1f}ms  "
              f"{p99 if p99 is not None else float('nan'):>9.3f}  {target}")


if __name__ == "__main__":
    main()
