"""Online serving: mloop's HTTP model server vs MLflow's ``mlflow models serve``, same model.

    python benchmarks/serving/bench_serving.py [--project DIR] [--duration 20] [--repeats 1]
                                               [--out benchmarks/serving/results.json]

What is measured: HTTP throughput (req/s) and latency (p50, p99) of one-row prediction
requests, plus errors, for three servers run side by side in this one run, each as its own
process with ONE worker and the same environment (OMP_NUM_THREADS=1):

  * mloop  -- ``mloop -C DIR serve`` answering POST /predict ``{"records": [row]}``
  * mlflow -- ``mlflow models serve -m models:/NAME/V --env-manager local --workers 1``
              answering POST /invocations ``{"dataframe_records": [row]}``
  * bare   -- floor A: a bare Starlette endpoint (``bare_asgi.py``) under uvicorn with its
              default loop/http (uvloop + httptools) returning a constant JSON: no model, no
              parsing, the most any uvicorn-served Python endpoint can do here.

Load comes from ``wrk -t1 -cC -dDs --latency -s post.lua`` (a separate process) at C = 1, 8
and 32 connections, after a 3 s warm-up per server; runs are interleaved (for each C: mloop,
mlflow, bare). Errors are wrk's non-2xx responses and socket errors (connect, read, write,
timeout at wrk's default 2 s), and for mloop also the non-2xx statuses of its own
``mloop_requests_total`` counter (GET /metrics), which also gives its mean micro-batch size.

Floor B (no HTTP, measured in this process after the servers are stopped): the served model
loaded as mloop's server loads it (``load_served``, with ``serving.compile`` when this mloop
has the verified ONNX path), ``predict_columns`` timed for one row and for 64-row batches
under ``threadpool_limits(1)``; 1e6 / (per-row us at 64 rows) is the rows/s the model itself
allows with batching, the ceiling for mloop's micro-batcher. When mloop serves a compiled
model, the original scikit-learn path (what MLflow runs) is timed too.

Per run the CPU used (share of one core) by the server under test, by wrk, and by everything
else on the machine is recorded from /proc: on a shared machine "cpu other" says how much a
run was disturbed.

Data and model: the UCI Bike Sharing example (``examples/bike_sharing``). Without
``--project`` the example is copied to a temp folder and ``mloop run`` trains, registers and
promotes version 1 of ``bike-sharing`` (~20 s; if a gate fails there, typically the latency
gate on a busy machine, the benchmark force-promotes v1 in that throwaway copy and prints a
note); with ``--project DIR`` that trained project is
reused (its champion is served by both servers). The request row is a real row of
``data/bike_hourly.parquet`` (``--row``, default 5000: 2011-08-01 06:00, outside the training
window), typed by the signature mloop's GET /model reports (doubles sent as JSON floats).

Targets (printed as PASS/MISS): at 8 and 32 connections mloop's req/s >= 20x MLflow's and its
p99 <= 1/5 of MLflow's; at 1 connection mloop's p50 <= 1/2 of MLflow's; zero mloop errors.

Caveats: wrk, the server under test and the idle servers share this machine's cores. wrk 4
corrects its latency histogram for coordinated omission (for each response slower than the
mean interval it adds the requests a closed loop held back as synthetic samples), so a server
with rare long stalls shows a p99 far above the share of slow responses it actually sent;
``max ms`` and the notes flag that. MLflow runs as shipped (uvicorn with its access log on,
logged here to a file); mloop runs as configured in the project (its inference log on by
default: with ``--project`` the benchmark's requests are recorded in ``DIR/.mloop/inference``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXAMPLE = REPO / "examples" / "bike_sharing"
LUA = HERE / "post.lua"
CONNECTIONS = (1, 8, 32)
BATCH_ROWS = 64
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
TARGET_RPS_RATIO = 20.0   # at 8 and 32 connections: mloop req/s >= 20x MLflow's
TARGET_P99_RATIO = 0.2    # at 8 and 32 connections: mloop p99 <= 1/5 of MLflow's
TARGET_P50_RATIO = 0.5    # at 1 connection: mloop p50 <= 1/2 of MLflow's
SERVERS = ("mloop", "mlflow", "bare")

_ORIGINAL_ENV = dict(os.environ)
os.environ.update(SERVER_ENV)  # floor B in this process runs under the same setting


class ServerFailed(RuntimeError):
    def __init__(self, name: str, message: str, stderr: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name, self.stderr = name, stderr


# ----------------------------------------------------------------------------- processes

def _venv_bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"'{name}' not found next to {sys.executable} or on PATH")
    return found


def _server_env() -> dict[str, str]:
    env = dict(_ORIGINAL_ENV)
    env.update(SERVER_ENV)
    # `mlflow models serve --env-manager local` execs `uvicorn` from PATH: make it this venv's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(base: int, n: int) -> list[int]:
    ports, p = [], base
    while len(ports) < n:
        if p in range(4990, 5011):  # keep away from MLflow's default 5000
            p += 1
            continue
        if _port_free(p):
            ports.append(p)
        p += 1
        if p > base + 500:
            raise SystemExit(f"no free ports found from {base}")
    return ports


def _http(url: str, body: bytes | None = None, timeout: float = 5.0
          ) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    ready_path: str
    predict_path: str
    env: dict[str, str]
    log_dir: Path
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ready_seconds: float | None = None
    _files: list[Any] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + self.predict_path

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.stderr.log"

    def start(self) -> None:
        out = open(self.log_dir / f"{self.name}.stdout.log", "wb")  # noqa: SIM115
        err = open(self.stderr_path, "wb")  # noqa: SIM115
        self._files = [out, err]
        self.started = time.perf_counter()
        # a session (process group) of its own: stop() reaches the workers it spawns too
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True)

    def stderr_tail(self, chars: int = 4000) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.perf_counter() + timeout
        last = "no answer"
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(self.name, f"exited with code {self.proc.returncode} before "
                                   f"it was ready", self.stderr_tail())
            with contextlib.suppress(OSError):
                status, body = _http(self.base + self.ready_path, timeout=2.0)
                if status == 200:
                    self.ready_seconds = time.perf_counter() - self.started
                    return
                last = f"{status} {body[:300].decode(errors='replace')}"
            time.sleep(0.25)
        raise ServerFailed(self.name, f"not ready after {timeout:.0f} s (GET {self.ready_path}: "
                           f"{last})", self.stderr_tail())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # whatever it spawned may outlive the leader: clear the group either way
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for f in self._files:
            f.close()
        self._files = []


# ----------------------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4, "h": 3.6e6}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    pct = {int(p): _ms(v, u) for p, v, u in
           re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M)}
    thread_lat = re.search(r"^\s+Latency\s+([\d.]+)(us|ms|s|m|h)\s+([\d.]+)(us|ms|s|m|h)\s+"
                           r"([\d.]+)(us|ms|s|m|h)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"),
                             (int(x) for x in sock.groups()), strict=True)) if sock else {}
    return {
        "rps": float(rps.group(1)),
        "p50_ms": pct.get(50), "p75_ms": pct.get(75), "p90_ms": pct.get(90),
        "p99_ms": pct.get(99),
        "avg_ms": _ms(*thread_lat.group(1, 2)) if thread_lat else None,
        "max_ms": _ms(*thread_lat.group(5, 6)) if thread_lat else None,
        "requests": int(total.group(1)) if total else None,
        "seconds": _ms(total.group(2), total.group(3)) / 1000 if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors,
        "errors": (int(non2xx.group(1)) if non2xx else 0) + sum(socket_errors.values()),
    }


def run_wrk(url: str, body_file: Path, connections: int, seconds: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(LUA), url]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    result["raw"] = done.stdout
    return result


# ------------------------------------------------------------------- CPU accounting

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies() -> int:
    """Non-idle CPU time of the whole machine (all cores), from /proc/stat."""
    try:
        vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0
    return sum(vals) - vals[3] - vals[4]  # minus idle and iowait


def _group_jiffies(pgid: int) -> int:
    """CPU time (user + system) of the live processes in process group ``pgid``."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        rest = text[text.rfind(")") + 2:].split()
        if len(rest) > 12 and int(rest[2]) == pgid:
            total += int(rest[11]) + int(rest[12])
    return total


class CpuProbe:
    """CPU used during a wrk run by the server under test, by wrk, and by everything else
    (other servers of this benchmark included), each as a share of ONE core."""

    def __init__(self, pgid: int | None) -> None:
        self.pgid = pgid

    def __enter__(self) -> CpuProbe:
        self.t0 = time.perf_counter()
        self.busy0 = _busy_jiffies()
        self.srv0 = _group_jiffies(self.pgid) if self.pgid else 0
        t = os.times()
        self.kids0 = t.children_user + t.children_system
        self.self0 = t.user + t.system
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        busy = (_busy_jiffies() - self.busy0) / _CLK
        srv = ((_group_jiffies(self.pgid) if self.pgid else 0) - self.srv0) / _CLK
        t = os.times()
        wrk = t.children_user + t.children_system - self.kids0
        me = t.user + t.system - self.self0
        self.result = {"server_cpu": srv / wall, "wrk_cpu": wrk / wall,
                       "other_cpu": max(0.0, busy - srv - wrk - me) / wall}


# ------------------------------------------------------------------------- mloop metrics

_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")


def mloop_counters(server: Server) -> dict[str, float]:
    """Requests by status on /predict and the micro-batch histogram's sum and count."""
    out: dict[str, float] = {}
    try:
        status, raw = _http(server.base + "/metrics")
    except OSError:
        return out
    if status != 200:
        return out
    for line in raw.decode().splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels or ""))
        if name == "mloop_requests_total" and lab.get("endpoint") == "predict":
            key = f"status_{lab.get('status')}"
            out[key] = out.get(key, 0.0) + float(value)
        elif name in ("mloop_batch_rows_sum", "mloop_batch_rows_count"):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


# --------------------------------------------------------------------------- the model

def train_example(workdir: Path) -> tuple[Path, str]:
    project = workdir / "bike_sharing"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".mloop"))
    print(f"training the example in {project} (mloop run) ...", flush=True)
    t0 = time.perf_counter()
    env = dict(_ORIGINAL_ENV)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run([_venv_bin("mloop"), "-C", str(project), "run"], capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"`mloop run` failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    print(f"  trained in {time.perf_counter() - t0:.1f} s", flush=True)
    return project, done.stdout


def failed_gates(run_stdout: str) -> list[str]:
    """Best effort: the 'fail' rows of the gate table `mloop run` prints."""
    rows = re.findall(r"^│\s*([\w.]+)\s*│\s*fail\s*│\s*([^│]*?)\s*│\s*([^│]*?)\s*│",
                      run_stdout, re.M)
    return [f"{name} {value} (limit {limit})" for name, value, limit in rows]


def latest_version(registry_uri: str, model: str) -> int | None:
    if not registry_uri.startswith("sqlite:///"):
        return None
    path = registry_uri[len("sqlite:///"):]
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT MAX(version) FROM model_versions WHERE name = ?",
                         (model,)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def champion_version(registry_uri: str, model: str) -> int | None:
    """The champion alias straight from MLflow's SQLite registry (no mlflow import)."""
    if not registry_uri.startswith("sqlite:///"):
        return None
    path = registry_uri[len("sqlite:///"):]
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT version FROM registered_model_aliases "
                             "WHERE name = ? AND alias = 'champion'", (model,)).fetchone()
    except sqlite3.Error:
        return None
    return int(row[0]) if row else None


def _typed(value: Any, kind: str) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if kind in ("double", "float"):
        return float(value)
    if kind in ("long", "integer"):
        return int(value)
    if kind == "boolean":
        return bool(value)
    if kind == "string":
        return str(value)
    if kind == "datetime":
        return value.isoformat() if hasattr(value, "isoformat") else str(value)
    return value.item() if hasattr(value, "item") else value


def real_rows(data_path: Path, signature: list[dict[str, Any]], start: int, n: int
              ) -> tuple[list[int], list[dict[str, Any]]]:
    """``n`` complete rows of the data from index ``start`` on, typed by the signature."""
    import pandas as pd

    names = [c["name"] for c in signature]
    frame = pd.read_parquet(data_path)
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise SystemExit(f"signature columns {missing} not in {data_path}")
    complete = frame[names].notna().all(axis=1)
    idx = [i for i in range(start, len(frame)) if complete.iloc[i]][:n]
    if len(idx) < n:
        raise SystemExit(f"fewer than {n} complete rows from row {start} of {data_path}")
    rows = [{c["name"]: _typed(frame[c["name"]].iloc[i], c["type"]) for c in signature}
            for i in idx]
    return idx, rows


def floor_b(project_dir: Path, version: int, row: dict[str, Any], batch: list[dict[str, Any]],
            seconds: float) -> dict[str, Any]:
    """In-process predict cost, the model loaded as mloop's server loads it (with
    ``serving.compile`` when this mloop has it), one BLAS/OpenMP thread. When the server's
    engine is not the original scikit-learn pipeline, the original is timed too."""
    import dataclasses
    import inspect

    from threadpoolctl import threadpool_limits

    from mloop.project import open_project
    from mloop.serving.model import load_served

    project = open_project(project_dir)
    kwargs: dict[str, Any] = {}
    compile_cfg = getattr(project.config.serving, "compile", None)
    if compile_cfg is not None and "compile" in inspect.signature(load_served).parameters:
        kwargs["compile"] = compile_cfg  # what the server passes
    t0 = time.perf_counter()
    served = load_served(project, version, **kwargs)
    load_s = time.perf_counter() - t0
    compiled = getattr(served, "compiled", None) is not None
    one = {k: [v] for k, v in row.items()}
    many = {k: [r[k] for r in batch] for k in row}

    def timed(model: Any, cols: dict[str, list], n: int) -> list[float]:
        for _ in range(20):
            if len(model.predict_columns(cols)) != n:
                raise RuntimeError("predict_columns returned the wrong number of rows")
        times: list[float] = []
        end = time.perf_counter() + seconds
        while len(times) < 200 or time.perf_counter() < end:
            t = time.perf_counter()
            model.predict_columns(cols)
            times.append(time.perf_counter() - t)
        return times

    def measure(model: Any, engine: str) -> dict[str, Any]:
        with threadpool_limits(1):
            t1 = timed(model, one, 1)
            tb = timed(model, many, len(batch))
        one_ms = statistics.median(t1) * 1e3
        per_row_us = statistics.median(tb) / len(batch) * 1e6
        return {
            "engine": engine,
            "one_row_ms_median": round(one_ms, 4),
            "one_row_ms_mean": round(statistics.fmean(t1) * 1e3, 4),
            "one_row_calls": len(t1),
            "one_row_calls_per_s": round(1e3 / one_ms, 1),
            "batch_rows": len(batch),
            "batch_ms_median": round(statistics.median(tb) * 1e3, 4),
            "batch_calls": len(tb),
            "per_row_us_in_batch": round(per_row_us, 3),
            "batched_rows_per_s": round(1e6 / per_row_us, 1),
            "prediction_one_row": model.predict_columns(one)[0],
        }

    out = {"what": "ServedModel.predict_columns in process (load_served"
                   f"{', compile=serving.compile' if kwargs else ''}; threadpool_limits(1))",
           "load_seconds": round(load_s, 2),
           "compile_verdict": getattr(served, "compile_verdict", None),
           "served": measure(served, "onnx" if compiled else "original"), "original": None}
    if compiled:
        out["original"] = measure(dataclasses.replace(served, compiled=None), "original")
    return out


# ------------------------------------------------------------------------------ output

def _aggregate(reps: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        vals = [r[key] for r in reps if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    agg: dict[str, Any] = {"rps": med("rps"), "p50_ms": med("p50_ms"), "p90_ms": med("p90_ms"),
                           "p99_ms": med("p99_ms"), "avg_ms": med("avg_ms"),
                           "max_ms": max((r["max_ms"] for r in reps if r.get("max_ms")),
                                         default=None),
                           "implied_mean_ms": med("implied_mean_ms"),
                           "server_cpu": med("server_cpu"),
                           "wrk_cpu": med("wrk_cpu"), "other_cpu": med("other_cpu"),
                           "requests": sum(r.get("requests") or 0 for r in reps),
                           "errors": sum(r["errors"] for r in reps),
                           "non_2xx": sum(r["non_2xx"] for r in reps),
                           "socket_errors": sum(sum(r["socket_errors"].values()) for r in reps)}
    if any("server_non_2xx" in r for r in reps):
        agg["server_non_2xx"] = sum(r.get("server_non_2xx", 0) for r in reps)
        rows = sum(r.get("batch_rows_sum", 0) for r in reps)
        calls = sum(r.get("batch_calls", 0) for r in reps)
        agg["mean_batch_rows"] = rows / calls if calls else None
    agg["repeats"] = reps  # wrk's raw output included
    return agg


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _f(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=132)
    cfg = results["config"]
    con.print(f"\n[bold]Serving benchmark[/]: {results['model']} v{results['version']} "
              f"(one row per request), wrk -t1 -d{cfg['duration_s']}s x{cfg['repeats']} per "
              f"cell after a {cfg['warmup_s']} s warm-up")
    con.print(f"mloop engine: {results.get('mloop_engine')}; MLflow: pyfunc (scikit-learn "
              f"pipeline); row {results['row_index']} of {Path(results['data']).name}")
    con.print(f"each server: 1 worker, env {' '.join(f'{k}={v}' for k, v in SERVER_ENV.items())}"
              f"; machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu']}), "
              f"{results['machine']['cpu_busy_before']:.0%} of a core busy before start")
    for c in cfg["connections"]:
        cell = results["runs"][str(c)]
        t = Table(title=f"{c} connection{'s' if c > 1 else ''}", title_justify="left")
        for col in ("server", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors wrk",
                    "errors server", "mean batch", "cpu server", "cpu wrk", "cpu other"):
            t.add_column(col, justify="left" if col == "server" else "right")
        for name in SERVERS:
            r = cell.get(name)
            if r is None:
                t.add_row(name, "failed", *[""] * 10)
                continue
            t.add_row(name, _f(r["rps"]), _f(r["p50_ms"], "{:.2f}"), _f(r["p90_ms"], "{:.2f}"),
                      _f(r["p99_ms"], "{:.2f}"), _f(r["max_ms"], "{:.1f}"), str(r["errors"]),
                      str(r.get("server_non_2xx", "")),
                      _f(r.get("mean_batch_rows"), "{:.2f}") if name == "mloop" else "",
                      _f(r["server_cpu"], "{:.0%}"), _f(r["wrk_cpu"], "{:.0%}"),
                      _f(r["other_cpu"], "{:.0%}"))
        con.print(t)

    t = Table(title="mloop vs MLflow", title_justify="left")
    for col in ("connections", "req/s ratio", "p99 ratio", "p50 ratio",
                "mloop / bare req/s", "mloop / batched-predict floor"):
        t.add_column(col, justify="right")
    for c in cfg["connections"]:
        r = results["ratios"][str(c)]
        t.add_row(str(c), _f(r["rps_ratio"], "{:.1f}x"), _f(r["p99_ratio"], "{:.3f}"),
                  _f(r["p50_ratio"], "{:.3f}"), _f(r["mloop_vs_bare"], "{:.1%}"),
                  _f(r["mloop_vs_batched_floor"], "{:.1%}"))
    con.print(t)

    t = Table(title="targets", title_justify="left")
    for col in ("target", "measured", "result"):
        t.add_column(col)
    for tg in results["targets"]:
        mark = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]"}.get(tg["result"], tg["result"])
        t.add_row(tg["target"], tg["measured"], mark)
    con.print(t)

    fb = results["floors"].get("in_process")
    bare = results["floors"].get("bare_asgi_rps", {})
    con.print("[bold]floors[/] (req/s of mloop vs these: see the ratio table)")
    if fb:
        for key, label in (("served", "as served"), ("original", "original pipeline")):
            f = fb.get(key)
            if f:
                con.print(f"  in-process predict, {label} ({f['engine']}), no HTTP: one row "
                          f"{f['one_row_ms_median']:.3f} ms median (= "
                          f"{f['one_row_calls_per_s']:,.0f} calls/s); {f['batch_rows']}-row "
                          f"batches {f['per_row_us_in_batch']:.2f} us/row (= "
                          f"{f['batched_rows_per_s']:,.0f} rows/s)")
    else:
        con.print(f"  in-process predict: failed ({results['floors'].get('in_process_error')})")
    con.print("  bare ASGI (uvicorn + Starlette, constant JSON): " + ", ".join(
        f"c={c}: {_f(v)} req/s" for c, v in bare.items()))
    for note in results["notes"]:
        con.print(f"[yellow]note:[/] {note}")
    con.print(f"\nJSON: {results['out']}")


def evaluate(results: dict[str, Any]) -> None:
    runs, conns = results["runs"], results["config"]["connections"]
    fb = results["floors"].get("in_process")
    floor_rows = fb["served"]["batched_rows_per_s"] if fb else None
    ratios: dict[str, Any] = {}
    for c in conns:
        ml, mf, bare = (runs[str(c)].get(s) for s in SERVERS)
        g = (lambda r, k: r[k] if r else None)  # noqa: E731
        ratios[str(c)] = {
            "rps_ratio": _ratio(g(ml, "rps"), g(mf, "rps")),
            "p99_ratio": _ratio(g(ml, "p99_ms"), g(mf, "p99_ms")),
            "p50_ratio": _ratio(g(ml, "p50_ms"), g(mf, "p50_ms")),
            "mloop_vs_bare": _ratio(g(ml, "rps"), g(bare, "rps")),
            "mloop_vs_batched_floor": _ratio(g(ml, "rps"), floor_rows),
        }
    results["ratios"] = ratios

    targets = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    for c in (8, 32):
        if str(c) not in ratios:
            continue
        r = ratios[str(c)]
        rr, pr = r["rps_ratio"], r["p99_ratio"]
        targets.append({"target": f"c={c}: mloop req/s >= {TARGET_RPS_RATIO:g}x MLflow's",
                        "measured": _f(rr, "{:.1f}x"), "value": rr,
                        "result": verdict(None if rr is None else rr >= TARGET_RPS_RATIO)})
        targets.append({"target": f"c={c}: mloop p99 <= 1/{1 / TARGET_P99_RATIO:g} of MLflow's",
                        "measured": _f(pr, "{:.3f} of it"), "value": pr,
                        "result": verdict(None if pr is None else pr <= TARGET_P99_RATIO)})
    if "1" in ratios:
        r50 = ratios["1"]["p50_ratio"]
        targets.append({"target": f"c=1: mloop p50 <= 1/{1 / TARGET_P50_RATIO:g} of MLflow's",
                        "measured": _f(r50, "{:.3f} of it"), "value": r50,
                        "result": verdict(None if r50 is None else r50 <= TARGET_P50_RATIO)})
    ml_cells = [runs[str(c)].get("mloop") for c in conns]
    if all(ml_cells):
        wrk_err = sum(m["errors"] for m in ml_cells)  # type: ignore[index]
        srv_err = sum(m.get("server_non_2xx", 0) for m in ml_cells)  # type: ignore[union-attr]
        targets.append({"target": "zero mloop errors (wrk non-2xx + socket, server non-2xx)",
                        "measured": f"{wrk_err} wrk, {srv_err} server", "value": wrk_err + srv_err,
                        "result": verdict(wrk_err + srv_err == 0)})
    else:
        targets.append({"target": "zero mloop errors", "measured": "mloop did not run",
                        "value": None, "result": "n/a"})
    results["targets"] = targets


# -------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="an already trained mloop project (skips "
                    "training the bike-sharing example)")
    ap.add_argument("--duration", type=int, default=20, help="seconds per wrk run (default 20)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; medians reported")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up seconds per server")
    ap.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS))
    ap.add_argument("--row", type=int, default=5000, help="index of the data row sent "
                    "(the first complete row from there on)")
    ap.add_argument("--base-port", type=int, default=18700)
    ap.add_argument("--floor-seconds", type=float, default=3.0,
                    help="timing budget per in-process floor measurement")
    ap.add_argument("--startup-timeout", type=float, default=180.0)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (trained "
                    "project and server logs)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    # SIGTERM/SIGHUP -> SystemExit, so the finally below stops the servers
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))

    t_start = time.perf_counter()
    loadavg = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() \
        else []
    b0, w0 = _busy_jiffies(), time.perf_counter()
    time.sleep(2.0)  # how busy is the machine before we start? (share of one core)
    busy_before = (_busy_jiffies() - b0) / _CLK / (time.perf_counter() - w0)
    workdir = Path(tempfile.mkdtemp(prefix="mloop-bench-serving-"))
    servers: dict[str, Server] = {}
    notes: list[str] = []
    failures: dict[str, str] = {}
    try:
        run_stdout = None
        if args.project:
            project_dir = args.project.resolve()
        else:
            project_dir, run_stdout = train_example(workdir)
        from mloop.project import open_project  # light import: no mlflow

        project = open_project(project_dir)
        model = project.config.model_name
        registry_uri = project.uris.get("registry_uri") or project.uris["tracking_uri"]
        tracking_uri = project.uris["tracking_uri"]
        version = champion_version(registry_uri, model)
        if version is None and run_stdout is not None:
            # the throwaway project's gates failed (on a busy machine, typically the latency
            # gate): the benchmark needs a champion to serve, so it overrides them, and says so
            latest = latest_version(registry_uri, model)
            if latest is None:
                raise SystemExit(f"`mloop run` registered no version of {model}:\n"
                                 f"{run_stdout[-3000:]}")
            gates = failed_gates(run_stdout) or ["(see `mloop run` output)"]
            done = subprocess.run(
                [_venv_bin("mloop"), "-C", str(project_dir), "models", "promote", str(latest),
                 "--force", "--reason", "bench_serving: gates failed in the benchmark's "
                 "throwaway project: " + "; ".join(gates)],
                capture_output=True, text=True, env=_server_env(), timeout=300)
            version = champion_version(registry_uri, model)
            if done.returncode != 0 or version is None:
                raise SystemExit(f"`mloop run` promoted nothing (failed gates: {gates}) and "
                                 f"`mloop models promote --force` failed:\n{done.stdout}\n"
                                 f"{done.stderr}")
            notes.append(f"`mloop run` did not promote v{latest}: gates failed "
                         f"({'; '.join(gates)}); the benchmark force-promoted it to serve it")
            print(f"  gates failed ({'; '.join(gates)}): force-promoted v{latest}", flush=True)
        elif version is None:
            raise SystemExit(f"{project_dir}: model '{model}' has no champion to serve "
                             f"(`mloop models promote VERSION`)")
        else:
            print(f"  champion: {model} v{version}", flush=True)
        data_path = (project_dir / project.config.data.path) \
            if not Path(project.config.data.path).is_absolute() else Path(project.config.data.path)
        if not data_path.exists():
            data_path = EXAMPLE / "data" / "bike_hourly.parquet"

        env = _server_env()
        logs = workdir / "logs"
        logs.mkdir()
        p_mloop, p_mlflow, p_bare = _pick_ports(args.base_port, 3)
        servers["mloop"] = Server(
            "mloop", [_venv_bin("mloop"), "-C", str(project_dir), "serve", "--host",
                      "127.0.0.1", "--port", str(p_mloop), "--workers", "1"],
            p_mloop, "/ready", "/predict", env, logs)
        servers["mlflow"] = Server(
            "mlflow", [_venv_bin("mlflow"), "models", "serve", "-m", f"models:/{model}/{version}",
                       "--env-manager", "local", "--port", str(p_mlflow), "--host", "127.0.0.1",
                       "--workers", "1"],
            p_mlflow, "/ping", "/invocations",
            {**env, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": registry_uri},
            logs)
        servers["bare"] = Server(
            "bare", [sys.executable, "-m", "uvicorn", "bare_asgi:app", "--app-dir", str(HERE),
                     "--host", "127.0.0.1", "--port", str(p_bare), "--workers", "1",
                     "--no-access-log", "--log-level", "warning"],
            p_bare, "/ping", "/predict", env, logs)
        print(f"starting servers (mloop :{p_mloop}, mlflow :{p_mlflow}, bare :{p_bare}) for "
              f"{model} v{version} ...", flush=True)
        for s in servers.values():
            s.start()
        for name in list(servers):
            try:
                servers[name].wait_ready(args.startup_timeout)
                print(f"  {name} ready after {servers[name].ready_seconds:.1f} s", flush=True)
            except ServerFailed as exc:
                if name == "mloop":
                    raise SystemExit(f"mloop's server did not start: {exc}\n--- stderr (tail)"
                                     f" ---\n{exc.stderr}") from None
                failures[name] = f"{exc}\n--- stderr (tail) ---\n{exc.stderr}"
                print(f"  {name} FAILED: {exc}\n--- stderr (tail) ---\n{exc.stderr}",
                      file=sys.stderr, flush=True)
                servers[name].stop()
                del servers[name]
        if "mloop" not in servers:
            raise SystemExit("mloop's server did not start: nothing to compare")

        # ---- the row, typed by the signature mloop serves
        status, raw = _http(servers["mloop"].base + "/model")
        info = json.loads(raw)
        champion = info.get("champion") or {}
        signature = champion.get("signature")
        if status != 200 or not signature:
            raise SystemExit(f"GET /model gave {status}: {raw[:500]!r}")
        results_engine = champion.get("engine", "original (no compile support)")
        if champion.get("compiled"):
            results_engine += f" (compile: {champion['compiled'].get('status')})"
        print(f"mloop engine: {results_engine}", flush=True)
        if champion.get("version") != version:
            notes.append(f"mloop serves v{champion.get('version')} but MLflow serves v{version}")
        idx, rows = real_rows(data_path, signature, args.row, BATCH_ROWS)
        row = rows[0]
        bodies = {"mloop": {"records": [row]}, "mlflow": {"dataframe_records": [row]},
                  "bare": {"records": [row]}}
        body_files = {}
        for name, body in bodies.items():
            body_files[name] = workdir / f"body_{name}.json"
            body_files[name].write_text(json.dumps(body, separators=(",", ":")))
        print(f"row {idx[0]} of {data_path.name}: {json.dumps(row)}", flush=True)

        # ---- one request each: both must answer 200 with the same prediction
        check: dict[str, Any] = {}
        for name, s in servers.items():
            st, out = _http(s.url, body_files[name].read_bytes(), timeout=30)
            if st != 200:
                raise SystemExit(f"{name} answered {st} to the benchmark row: {out[:500]!r}")
            check[name] = json.loads(out).get("predictions", [None])[0]
        print(f"predictions for that row: {check}", flush=True)
        if check.get("mlflow") is not None and check.get("mloop") is not None \
                and check["mlflow"] != check["mloop"]:
            notes.append(f"mloop and MLflow answer the row differently: {check['mloop']!r} vs "
                         f"{check['mlflow']!r} (|difference| "
                         f"{abs(check['mloop'] - check['mlflow']):.2g})")

        # ---- warm-up, then interleaved runs
        for name, s in servers.items():
            run_wrk(s.url, body_files[name], 8, args.warmup)
        print(f"warmed up ({args.warmup} s each at c=8)", flush=True)
        raw_runs: dict[int, dict[str, list[dict[str, Any]]]] = {
            c: {n: [] for n in servers} for c in args.connections}
        for rep in range(args.repeats):
            for c in args.connections:
                for name, s in servers.items():
                    time.sleep(1.0)  # let the previous server's background work settle
                    before = mloop_counters(s) if name == "mloop" else {}
                    with CpuProbe(s.proc.pid if s.proc else None) as probe:
                        r = run_wrk(s.url, body_files[name], c, args.duration)
                    r.update({k: round(v, 3) for k, v in probe.result.items()})
                    r["implied_mean_ms"] = c / r["rps"] * 1e3 if r["rps"] else None
                    if name == "mloop":
                        d = _diff(mloop_counters(s), before)
                        r["server_by_status"] = {k[7:]: int(v) for k, v in d.items()
                                                 if k.startswith("status_") and v}
                        r["server_non_2xx"] = sum(v for k, v in r["server_by_status"].items()
                                                  if not k.startswith("2"))
                        r["batch_rows_sum"] = d.get("mloop_batch_rows_sum", 0.0)
                        r["batch_calls"] = d.get("mloop_batch_rows_count", 0.0)
                    raw_runs[c][name].append(r)
                    print(f"  [{rep + 1}/{args.repeats}] c={c:<3} {name:<6} "
                          f"{r['rps']:>9,.1f} req/s  p50 {r['p50_ms']:.2f} ms  "
                          f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}  "
                          f"cpu: server {r['server_cpu']:.0%} wrk {r['wrk_cpu']:.0%} "
                          f"other {r['other_cpu']:.0%}", flush=True)
        for s in servers.values():
            s.stop()
        print("servers stopped; timing the in-process floor ...", flush=True)

        floors: dict[str, Any] = {}
        try:
            floors["in_process"] = floor_b(project_dir, version, row, rows,
                                           args.floor_seconds)
        except Exception as exc:  # report the rest even if the floor cannot be timed
            floors["in_process_error"] = f"{type(exc).__name__}: {exc}"
        runs = {str(c): {n: _aggregate(v) for n, v in per.items()}
                for c, per in raw_runs.items()}
        floors["bare_asgi_rps"] = {str(c): runs[str(c)]["bare"]["rps"]
                                   for c in args.connections if "bare" in runs[str(c)]}
        for name, msg in failures.items():
            notes.append(f"{name} failed to start: {msg}")
        for c in args.connections:
            mf = runs[str(c)].get("mlflow")
            if mf and mf["errors"]:
                notes.append(f"MLflow had {mf['errors']} errors at c={c} (its numbers count "
                             f"only the answered requests)")
        busy = [(c, n, r["other_cpu"]) for c in args.connections
                for n, r in runs[str(c)].items() if (r.get("other_cpu") or 0) > 0.15]
        if busy:
            notes.append("other processes used CPU during some runs (share of one core; the "
                         "machine has " + str(os.cpu_count()) + "): " + ", ".join(
                             f"c={c} {n} {o:.0%}" for c, n, o in busy) + " -- those numbers "
                         "are pessimistic")
        for c in args.connections:
            for n, r in runs[str(c)].items():
                if r.get("avg_ms") and r.get("implied_mean_ms") and r.get("max_ms") and \
                        r["avg_ms"] > 1.5 * r["implied_mean_ms"] and \
                        r["max_ms"] > 10 * (r["p50_ms"] or 0):
                    notes.append(
                        f"{n} at c={c}: rare long stalls (max {r['max_ms']:.0f} ms) dominate "
                        f"wrk's tail. wrk 4 corrects for coordinated omission, adding the "
                        f"requests a stall held back at the measured rate as synthetic samples, "
                        f"so its avg ({r['avg_ms']:.2f} ms) exceeds connections/req/s "
                        f"({r['implied_mean_ms']:.2f} ms) and p90/p99 weigh stall length x "
                        f"rate, not the share of slow responses")
        if busy_before > 0.15:
            notes.append(f"the machine was not idle before the run: {busy_before:.0%} of a core "
                         f"busy over 2 s (load avg {loadavg})")

        results: dict[str, Any] = {
            "benchmark": "serving", "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model, "version": version, "project": str(project_dir),
            "mloop_engine": results_engine, "mloop_model_info": champion,
            "row_index": idx[0], "row": row, "data": str(data_path),
            "check_predictions": check,
            "config": {"duration_s": args.duration, "repeats": args.repeats,
                       "warmup_s": args.warmup, "connections": args.connections,
                       "wrk": "wrk -t1 -cC -dDs --latency -s post.lua", "env": SERVER_ENV,
                       "workers": 1, "batch_rows_floor": BATCH_ROWS,
                       "commands": {n: s.cmd for n, s in servers.items()}},
            "startup_s": {n: s.ready_seconds and round(s.ready_seconds, 1)
                          for n, s in servers.items()},
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg_before": loadavg,
                        "cpu_busy_before": round(busy_before, 3)},
            "versions": _versions(),
            "runs": runs, "floors": floors, "notes": notes,
            "failures": failures, "out": str(args.out),
            "total_seconds": None,
        }
        evaluate(results)
        results["total_seconds"] = round(time.perf_counter() - t_start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        report(results)
        print(f"total {results['total_seconds']:.0f} s")
    finally:
        for s in servers.values():
            s.stop()
        if args.keep:
            print(f"kept {workdir} (server logs in logs/)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("mloop", "mlflow", "mlflow-skinny", "scikit-learn", "uvicorn", "starlette",
                 "fastapi", "uvloop", "httptools", "orjson", "pandas", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
        out["wrk"] = (done.stdout or done.stderr).splitlines()[0].strip()
    return out


if __name__ == "__main__":
    main()
