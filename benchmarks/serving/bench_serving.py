"""Online serving: the server's effect and the compiler's, separated, against MLServer and MLflow.

    python benchmarks/serving/bench_serving.py [--project DIR | --estimators sklearn lightgbm ...]
        [--duration 20] [--repeats 1]
        [--mlserver-venv .venv-mlserver] [--skip-mlserver] [--out benchmarks/serving/results.json]

What is measured: HTTP throughput (req/s) and latency (p50, p99) of one-row prediction
requests, plus errors, for six servers run side by side, each as its own process (tree) with
ONE worker (but ``mloop_w2``) and the same environment (OMP_NUM_THREADS=1), all serving the
SAME registered model version; one run covers both models of the bike example (below), one
after the other, each with its own servers:

  * mloop          -- ``mloop -C DIR serve`` (the product): POST /predict ``{"records": [row]}``,
                      on the verified ONNX fast path when the version compiled and verified
                      (``serving.compile``, the default)
  * mloop_w2       -- ``mloop -C DIR serve --workers 2``: the same server, two processes on
                      one port (a listening socket each), run at 8 and 32 connections only
                      (one connection keeps at most one worker busy); measured once both
                      workers answer (``x-mloop-worker``)
  * mloop_nocompile -- the same server and version with ``serving.compile.enabled: false``: the
                      original scikit-learn pipeline, the engine MLServer and MLflow run. A
                      second project folder holding only the changed mloop.yaml reads the
                      trained project's registry, artifacts and store (``MLOOP_*_URI``); nothing
                      is retrained. Its inference log is its own.
  * mlserver       -- MLServer 1.7.1 with mlserver-mlflow 1.7.1 (``MLflowRuntime``, which loads
                      the version's MLflow model folder with ``mlflow.pyfunc.load_model``) and
                      adaptive batching (max_batch_size 64, max_batch_time 0.002 s), debug (and
                      so its access log) off, one inference worker process behind its HTTP
                      process (``parallel_workers: 1``, its default), in a venv of its own
                      (``--mlserver-venv``, created on demand by ``setup_mlserver.sh``: MLServer
                      1.7.1 needs Python < 3.13 and FastAPI < 0.116; the model-loading libraries
                      are pinned to requirements.lock). POST /v2/models/NAME/infer with a
                      one-row V2 request (one ``[1, 1]`` tensor per signature column: FP64,
                      INT64, BYTES for strings).
  * mlflow         -- ``mlflow models serve -m models:/NAME/V --env-manager local --workers 1``
                      answering POST /invocations ``{"dataframe_records": [row]}``
  * bare           -- a floor: a bare Starlette endpoint (``bare_asgi.py``) under uvicorn with
                      its default loop/http (uvloop + httptools) returning a constant JSON: no
                      model, no parsing, the most any uvicorn-served Python endpoint can do here.
  * bare_w2        -- the same floor with ``--workers 2`` (at 8 and 32 connections, as
                      mloop_w2): how far two uvicorn processes can scale on this machine at
                      all, with wrk on the same cores; printed beside the workers target.

Ratios printed per concurrency C (req/s unless named p99):

  * server effect  = mloop_nocompile / mlserver -- two servers, one scikit-learn engine
  * compile effect = mloop / mloop_nocompile    -- one server, with and without the fast path
  * mloop / mlflow, mloop / mlserver, and mloop as a share of the bare floor
  * workers scaling = mloop_w2 / mloop                 -- two workers against one
  * floor scaling   = bare_w2 / bare                   -- the same for the bare floor

Load comes from ``wrk -t1 -cC -dDs --latency -s post.lua`` (a separate process) at C = 1, 8
and 32 connections, after a warm-up per server (``--warmup`` s at c=8); runs are interleaved:
for each repeat and each C every server runs once, in an order rotated by one place per
(repeat, C) so no server always follows the same neighbour. Errors are wrk's non-2xx
responses and socket errors (connect, read, write, timeout at wrk's default 2 s), and for both
mloop servers also the non-2xx statuses of their own ``mloop_requests_total`` counter
(GET /metrics), which also gives their mean micro-batch size. Before the runs every server
must answer the benchmark row with 200; a peer that cannot be set up, does not start or does
not answer is reported as failed (with why) and the others are still measured.

Floor B (no HTTP, measured in this process after the servers are stopped): the served model
loaded as mloop's server loads it (``load_served`` with ``serving.compile``),
``predict_columns`` timed for one row and for 64-row batches under ``threadpool_limits(1)``;
1e6 / (per-row us at 64 rows) is the rows/s the engine itself allows with batching, the
ceiling for a micro-batching server. When mloop serves a compiled model, the original
scikit-learn path (what mloop_nocompile, MLServer and MLflow run) is timed too.

Per run the CPU used (share of one core) by the server under test, by wrk, and by everything
else on the machine ("cpu other") is recorded from /proc: on a shared machine "cpu other" says
how much a run was disturbed; the results file also keeps the machine's load before the run.

Provenance in the results file: the git commit and whether the tree was clean
(``git status --porcelain``, taken before the run), the data version (sha256 of the data
file(s) the project trains on and the snapshot digests mloop recorded on the version:
``mloop.snapshot.source/train/holdout``), library versions of both environments, the exact
commands and MLServer's settings.

Data and model: the UCI Bike Sharing example (``examples/bike_sharing``). Without ``--project``
the example is copied to a temp folder per model and ``mloop run`` trains, registers and
promotes version 1 of ``bike-sharing`` (~20 s; if a gate fails there the benchmark stops unless
run with ``--allow-override``, which force-promotes v1 in that throwaway copy, prints an
OVERRIDE line and records it under ``overrides`` in the results); with ``--project DIR`` that
trained project is reused (its champion is served by every server). ``--estimators`` (default
both): ``sklearn`` is the example as it is (scikit-learn's gradient boosting), ``lightgbm``
trains it with ``lightgbm.LGBMRegressor`` (Poisson objective, 300 trees, the same
preprocessing); mloop compiles it through onnxmltools. The results file holds one entry per
model under ``models`` and every target, labelled by model, under ``targets``. The request row
is a real row of ``data/bike_hourly.parquet`` (``--row``, default 5000: 2011-08-01 06:00,
outside the training window), typed by the signature mloop's GET /model reports (doubles sent
as JSON floats).

Targets (printed as PASS/MISS). Issue 19's, mloop compiled against MLflow: at 8 and 32
connections req/s >= 20x and p99 <= 1/5; at 1 connection p50 <= 1/2; zero errors on both
mloop servers. Issue 20's, against MLServer: the same engine (compile off) >= 2x MLServer's
req/s and <= 1/2 of its p99 at 8 and 32 connections; the fast path >= 10x MLServer's req/s at
every C; mloop compiled >= 35% of the bare floor at 32 connections; mloop compiled with
``--workers 2`` >= 1.7x one worker's req/s at 32 connections. With both models, --duration 10
--repeats 2 takes ~15 min on 2 cores.

Caveats: wrk, the server under test and the four idle servers share this machine's cores (the
idle ones poll or tick: "cpu other"). MLServer is two processes (HTTP + one inference worker)
where mloop and MLflow are one. wrk 4 corrects its latency histogram for coordinated omission
(for each response slower than the mean interval it adds the requests a closed loop held back
as synthetic samples), so a server with rare long stalls shows a p99 far above the share of
slow responses it actually sent; ``max ms`` and the notes flag that. MLflow runs as shipped
(uvicorn with its access log on, logged here to a file); mloop runs as configured in the
project (its inference log on by default: with ``--project`` the compiled server's requests
are recorded in ``DIR/.mloop/inference``). Absolute figures drift between days on shared
machines: compare within one run.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
from _common import git_state
from peers import (
    MLSERVER_MAX_BATCH_SIZE,
    MLSERVER_MAX_BATCH_TIME_S,
    MLSERVER_PARALLEL_WORKERS,
    PeerSetupError,
    ensure_mlserver_venv,
    file_digests,
    mlflow_model_dir,
    model_version_row,
    nocompile_project,
    separated_ratios,
    v2_first_prediction,
    v2_infer_request,
    venv_versions,
    write_mlserver_repo,
)

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
# issue 20, against MLServer
TARGET_SERVER_RPS = 2.0   # at 8 and 32: mloop compile off req/s >= 2x MLServer's
TARGET_SERVER_P99 = 0.5   # at 8 and 32: mloop compile off p99 <= 1/2 of MLServer's
TARGET_FAST_RPS = 10.0    # at every C: mloop compiled req/s >= 10x MLServer's
TARGET_BARE_SHARE = 0.35  # at 32: mloop compiled >= 35% of the bare floor's req/s
TARGET_WORKERS = 1.7      # at 32: mloop compiled --workers 2 >= 1.7x one worker's req/s
WORKERS = 2
WORKERS_MIN_CONNECTIONS = 8  # one connection keeps one worker busy at most: not run at c=1
SERVERS = ("mloop", "mloop_w2", "mloop_nocompile", "mlserver", "mlflow", "bare", "bare_w2")
TWO_WORKERS = ("mloop_w2", "bare_w2")  # run from WORKERS_MIN_CONNECTIONS on
MLOOP_SERVERS = ("mloop", "mloop_w2", "mloop_nocompile")
LABELS = {"mloop": "mloop compiled", "mloop_w2": f"mloop compiled, {WORKERS} workers",
          "mloop_nocompile": "mloop compile off",
          "mlserver": "MLServer 1.7.1", "mlflow": "mlflow serve", "bare": "bare ASGI",
          "bare_w2": f"bare ASGI, {WORKERS} workers"}

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

# ``--estimator lightgbm``: the example's model block with LightGBM in the place of
# scikit-learn's gradient boosting (the same preprocessing, loss and size)
LIGHTGBM_MODEL = """\
model:
  name: bike-sharing
  estimator: lightgbm.LGBMRegressor
  params:
    objective: poisson
    n_estimators: 300
    learning_rate: 0.08
    random_state: 0
    n_jobs: 1
    verbose: -1
  threads: 1
"""
# ``--estimator xgboost``: the same with XGBoost (its trees grow to its default depth 6)
XGBOOST_MODEL = """\
model:
  name: bike-sharing
  estimator: xgboost.XGBRegressor
  params:
    objective: count:poisson
    n_estimators: 300
    learning_rate: 0.08
    random_state: 0
    n_jobs: 1
  threads: 1
"""
MODELS = {"lightgbm": LIGHTGBM_MODEL, "xgboost": XGBOOST_MODEL}
ESTIMATORS = ("sklearn", *MODELS)
DEFAULT_ESTIMATORS = ("sklearn", "lightgbm")  # the two models; xgboost on request


def with_estimator(config: str, estimator: str) -> str:
    """The example's mloop.yaml text with ``estimator``'s model block (``sklearn``: as is).
    Its tune search space names scikit-learn's parameters, so it goes with the swap."""
    if estimator == "sklearn":
        return config
    model = re.search(r"^model:\n(?:[ #].*\n)+", config, flags=re.M)
    tune = re.search(r"^tune:.*\n(?:[ #].*\n)+\n?", config, flags=re.M)
    if model is None or tune is None:
        raise SystemExit("the bike example's mloop.yaml has no model: or tune: block to swap")
    out = config[:model.start()] + MODELS[estimator] + config[model.end():]
    return out.replace(tune.group(0), "")


def train_example(workdir: Path, estimator: str = "sklearn") -> tuple[Path, str]:
    project = workdir / "bike_sharing"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".mloop"))
    config = project / "mloop.yaml"
    config.write_text(with_estimator(config.read_text(), estimator))
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
                           "rps_per_server_cpu": med("rps_per_server_cpu"),
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


def _f(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    cfg = results["config"]
    git = results.get("git") or {}
    con.print(f"\n[bold]Serving benchmark[/]: {results['model']} v{results['version']} "
              f"(one row per request), wrk -t1 -d{cfg['duration_s']}s x{cfg['repeats']} per "
              f"cell after a {cfg['warmup_s']} s warm-up; commit {str(git.get('commit'))[:12]}"
              f" ({'clean' if git.get('clean') else 'DIRTY tree' if git else 'unknown'})")
    con.print(f"mloop compiled engine: {results.get('mloop_engine')}; mloop compile off, "
              f"MLServer and MLflow: the original pipeline (pyfunc); row "
              f"{results['row_index']} of {Path(results['data']).name}")
    con.print(f"each server: 1 worker (mloop_w2: {WORKERS}, run from c="
              f"{WORKERS_MIN_CONNECTIONS}), env "
              f"{' '.join(f'{k}={v}' for k, v in SERVER_ENV.items())}"
              f"; machine: {results['machine']['cpus']} CPUs ({results['machine']['cpu']}), "
              f"{results['machine']['cpu_busy_before']:.0%} of a core busy before start")
    for c in cfg["connections"]:
        cell = results["runs"][str(c)]
        t = Table(title=f"{c} connection{'s' if c > 1 else ''}", title_justify="left")
        for col in ("server", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors wrk",
                    "errors server", "mean batch", "cpu server", "req per\ncpu-s",
                    "cpu wrk", "cpu other"):
            t.add_column(col, justify="left" if col == "server" else "right",
                         no_wrap=col == "server")
        for name in SERVERS:
            r = cell.get(name)
            if r is None:
                t.add_row(LABELS[name], "failed" if name in results["failures"] else "not run",
                          *[""] * 11)
                continue
            t.add_row(LABELS[name], _f(r["rps"]), _f(r["p50_ms"], "{:.2f}"),
                      _f(r["p90_ms"], "{:.2f}"), _f(r["p99_ms"], "{:.2f}"),
                      _f(r["max_ms"], "{:.1f}"), str(r["errors"]),
                      str(r.get("server_non_2xx", "")),
                      _f(r.get("mean_batch_rows"), "{:.2f}") if name in MLOOP_SERVERS else "",
                      _f(r["server_cpu"], "{:.0%}"), _f(r.get("rps_per_server_cpu"), "{:,.0f}"),
                      _f(r["wrk_cpu"], "{:.0%}"),
                      _f(r["other_cpu"], "{:.0%}"))
        con.print(t)

    t = Table(title="separated effects (req/s ratios unless p99; p99 ratios: below 1 is better)",
              title_justify="left")
    for col in ("connections", "server effect\ncompile off / MLServer",
                "server effect p99", "compile effect\ncompiled / compile off",
                "compile effect p99", "mloop / MLServer", "mloop / MLflow",
                "mloop p99 / MLflow", "mloop / bare", f"{WORKERS} workers / 1",
                f"bare {WORKERS} workers / 1"):
        t.add_column(col, justify="right")
    for c in cfg["connections"]:
        r = results["ratios"][str(c)]
        t.add_row(str(c), _f(r["server_effect_rps"], "{:.2f}x"),
                  _f(r["server_effect_p99"], "{:.3f}"), _f(r["compile_effect_rps"], "{:.2f}x"),
                  _f(r["compile_effect_p99"], "{:.3f}"), _f(r["mloop_vs_mlserver_rps"],
                                                            "{:.1f}x"),
                  _f(r["mloop_vs_mlflow_rps"], "{:.1f}x"), _f(r["mloop_vs_mlflow_p99"], "{:.3f}"),
                  _f(r["mloop_vs_bare"], "{:.1%}"), _f(r["workers_scaling_rps"], "{:.2f}x"),
                  _f(r.get("bare_workers_scaling_rps"), "{:.2f}x"))
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
    con.print("[bold]floors[/]")
    if fb:
        for key, label in (("served", "as served"), ("original", "original pipeline")):
            f = fb.get(key)
            if f:
                con.print(f"  in-process predict, {label} ({f['engine']}), no HTTP: one row "
                          f"{f['one_row_ms_median']:.3f} ms median (= "
                          f"{f['one_row_calls_per_s']:,.0f} calls/s); {f['batch_rows']}-row "
                          f"batches {f['per_row_us_in_batch']:.2f} us/row (= "
                          f"{f['batched_rows_per_s']:,.0f} rows/s)")
        con.print("  share of that batched limit reached over HTTP: " + ", ".join(
            f"c={c}: compiled {_f(results['ratios'][str(c)]['mloop_vs_batched_floor'], '{:.1%}')}"
            f", compile off "
            f"{_f(results['ratios'][str(c)]['nocompile_vs_batched_floor'], '{:.1%}')}"
            for c in cfg["connections"]))
    else:
        con.print(f"  in-process predict: failed ({results['floors'].get('in_process_error')})")
    con.print("  bare ASGI (uvicorn + Starlette, constant JSON): " + ", ".join(
        f"c={c}: {_f(v)} req/s" for c, v in bare.items()))
    for name, why in results["failures"].items():
        con.print(f"[red]FAILED: {LABELS.get(name, name)}[/]: {why.splitlines()[0]}"
                  + (" (details in the results file)" if "\n" in why else ""))
    for note in results["notes"]:
        con.print(f"[yellow]note:[/] {note}")
    con.print(f"\nJSON: {results['out']}")


def evaluate(results: dict[str, Any]) -> None:
    runs, conns = results["runs"], results["config"]["connections"]
    fb = results["floors"].get("in_process") or {}
    served = fb.get("served") or {}
    # the scikit-learn pipeline's own batched limit: timed beside the compiled one, or as served
    original = fb.get("original") or (served if served.get("engine") == "original" else {})
    served_floor, original_floor = (served.get("batched_rows_per_s"),
                                    original.get("batched_rows_per_s"))
    results["ratios"] = {str(c): separated_ratios(runs[str(c)],
                                                  batched_floor_served=served_floor,
                                                  batched_floor_original=original_floor)
                         for c in conns}
    ratios = results["ratios"]
    targets = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    def add(target: str, value: float | None, fmt: str, ok: bool | None) -> None:
        targets.append({"target": target, "measured": _f(value, fmt), "value": value,
                        "result": verdict(None if value is None else ok)})

    for c in (8, 32):
        if str(c) not in ratios:
            continue
        r = ratios[str(c)]
        rr, pr = r["mloop_vs_mlflow_rps"], r["mloop_vs_mlflow_p99"]
        add(f"c={c}: mloop req/s >= {TARGET_RPS_RATIO:g}x MLflow's", rr, "{:.1f}x",
            rr is not None and rr >= TARGET_RPS_RATIO)
        add(f"c={c}: mloop p99 <= 1/{1 / TARGET_P99_RATIO:g} of MLflow's", pr, "{:.3f} of it",
            pr is not None and pr <= TARGET_P99_RATIO)
    if "1" in ratios:
        r50 = ratios["1"]["mloop_vs_mlflow_p50"]
        add(f"c=1: mloop p50 <= 1/{1 / TARGET_P50_RATIO:g} of MLflow's", r50, "{:.3f} of it",
            r50 is not None and r50 <= TARGET_P50_RATIO)
    for name in MLOOP_SERVERS:
        cells = [runs[str(c)].get(name) for c in conns
                 if name not in TWO_WORKERS or c >= WORKERS_MIN_CONNECTIONS]
        if cells and all(cells):
            wrk_err = sum(m["errors"] for m in cells)  # type: ignore[index]
            srv_err = sum(m.get("server_non_2xx", 0) for m in cells)  # type: ignore[union-attr]
            targets.append({"target": f"zero {LABELS[name]} errors (wrk non-2xx + socket, "
                                      f"server non-2xx)",
                            "measured": f"{wrk_err} wrk, {srv_err} server",
                            "value": wrk_err + srv_err, "result": verdict(wrk_err + srv_err == 0)})
        else:
            targets.append({"target": f"zero {LABELS[name]} errors", "measured": "did not run",
                            "value": None, "result": "n/a"})
    for c in (8, 32):
        if str(c) not in ratios:
            continue
        r = ratios[str(c)]
        se, sp = r["server_effect_rps"], r["server_effect_p99"]
        add(f"c={c}: mloop compile off req/s >= {TARGET_SERVER_RPS:g}x MLServer's (same engine)",
            se, "{:.2f}x", se is not None and se >= TARGET_SERVER_RPS)
        add(f"c={c}: mloop compile off p99 <= 1/{1 / TARGET_SERVER_P99:g} of MLServer's", sp,
            "{:.3f} of it", sp is not None and sp <= TARGET_SERVER_P99)
    for c in conns:
        fr = ratios[str(c)]["mloop_vs_mlserver_rps"]
        add(f"c={c}: mloop compiled req/s >= {TARGET_FAST_RPS:g}x MLServer's", fr, "{:.1f}x",
            fr is not None and fr >= TARGET_FAST_RPS)
    if "32" in ratios:
        w = ratios["32"]["workers_scaling_rps"]
        add(f"c=32: mloop compiled --workers {WORKERS} req/s >= {TARGET_WORKERS:g}x one "
            f"worker's", w, "{:.2f}x", w is not None and w >= TARGET_WORKERS)
        one, two = runs["32"].get("mloop") or {}, runs["32"].get("mloop_w2") or {}
        if one.get("rps_per_server_cpu") and two.get("rps_per_server_cpu"):
            # not a target: on a machine other processes keep busy, how much of the scaling
            # the workers' own cost per request allows (1.0: two workers as lean as one)
            targets[-1]["measured"] += (
                f" (server CPU {one['server_cpu']:.0%} -> {two['server_cpu']:.0%} of a core; "
                f"req per CPU-s {two['rps_per_server_cpu'] / one['rps_per_server_cpu']:.2f}x)")
        fw = ratios["32"].get("bare_workers_scaling_rps")
        if fw is not None:
            # not a target either: the bare floor under the same two-worker test is the most
            # any uvicorn server gets from a second worker here, wrk sharing the cores
            targets[-1]["measured"] += f"; the bare floor: {fw:.2f}x"
        b = ratios["32"]["mloop_vs_bare"]
        add(f"c=32: mloop compiled >= {TARGET_BARE_SHARE:.0%} of the bare ASGI floor", b,
            "{:.1%}", b is not None and b >= TARGET_BARE_SHARE)
    results["targets"] = targets


# -------------------------------------------------------------------------------- main

def measure_model(args: argparse.Namespace, *, estimator: str | None, workdir: Path,
                  git: dict[str, Any], loadavg: list[str], busy_before: float
                  ) -> dict[str, Any]:
    """One model's whole run: train it (``estimator``; None: serve ``--project``), start
    every server on it, measure them interleaved, stop them, time the in-process floor;
    the results of that model, evaluated against the targets."""
    t_start = time.perf_counter()
    workdir.mkdir(parents=True)
    servers: dict[str, Server] = {}
    notes: list[str] = []
    failures: dict[str, str] = {}
    overrides: list[dict[str, Any]] = []

    def fail(name: str, why: str) -> None:
        """A peer that cannot be measured: said on stderr now, in the report and the JSON."""
        failures[name] = why
        print(f"  {LABELS[name]} FAILED: {why}", file=sys.stderr, flush=True)
        if name in servers:
            servers.pop(name).stop()

    try:
        run_stdout = None
        if args.project:
            project_dir = args.project.resolve()
        else:
            project_dir, run_stdout = train_example(workdir, estimator or "sklearn")
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
            from mloop.cli._common import confirm_override

            allowed_by = confirm_override(
                f"v{latest} failed gate(s) {'; '.join(gates)}: promote it anyway to benchmark "
                f"it?", allowed=args.allow_override)
            if allowed_by is None:
                raise SystemExit(f"v{latest} of {model} failed gate(s) {'; '.join(gates)}; "
                                 f"not promoted. Re-run with --allow-override to benchmark it "
                                 f"anyway (recorded as an override in the results)")
            overrides.append({"version": latest, "failed_gates": gates,
                              "reason": "bench_serving: throwaway project",
                              "allowed_by": allowed_by})
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
            print(f"  OVERRIDE: gates failed ({'; '.join(gates)}): force-promoted v{latest} "
                  f"({allowed_by})", flush=True)
        elif version is None:
            raise SystemExit(f"{project_dir}: model '{model}' has no champion to serve "
                             f"(`mloop models promote VERSION`)")
        else:
            print(f"  champion: {model} v{version}", flush=True)
        data_path = (project_dir / project.config.data.path) \
            if not Path(project.config.data.path).is_absolute() else Path(project.config.data.path)
        if not data_path.exists():
            data_path = EXAMPLE / "data" / "bike_hourly.parquet"
        mv = model_version_row(registry_uri, model, version)
        data_version = {"files_sha256": file_digests(data_path, project_dir),
                        "snapshots": {k[len("mloop.snapshot."):]: v
                                      for k, v in ((mv or {}).get("tags") or {}).items()
                                      if k.startswith("mloop.snapshot.")} or None}

        env = _server_env()
        logs = workdir / "logs"
        logs.mkdir()
        p_mloop, p_nocomp, p_mls, p_mls_grpc, p_mls_metrics, p_mlflow, p_bare, p_w2, \
            p_bare_w2 = _pick_ports(args.base_port, 9)
        servers["mloop"] = Server(
            "mloop", [_venv_bin("mloop"), "-C", str(project_dir), "serve", "--host",
                      "127.0.0.1", "--port", str(p_mloop), "--workers", "1"],
            p_mloop, "/ready", "/predict", env, logs)
        # the same project and version from WORKERS processes on one port
        servers["mloop_w2"] = Server(
            "mloop_w2", [_venv_bin("mloop"), "-C", str(project_dir), "serve", "--host",
                         "127.0.0.1", "--port", str(p_w2), "--workers", str(WORKERS)],
            p_w2, "/ready", "/predict", env, logs)
        try:
            nc_dir, nc_env = nocompile_project(project_dir, project.uris,
                                               workdir / "mloop_nocompile" / project_dir.name)
            servers["mloop_nocompile"] = Server(
                "mloop_nocompile", [_venv_bin("mloop"), "-C", str(nc_dir), "serve", "--host",
                                    "127.0.0.1", "--port", str(p_nocomp), "--workers", "1"],
                p_nocomp, "/ready", "/predict", {**env, **nc_env}, logs)
        except PeerSetupError as exc:
            fail("mloop_nocompile", str(exc))
        mlserver_setup: dict[str, Any] = {}
        if args.skip_mlserver:
            notes.append("MLServer left out (--skip-mlserver)")
        else:
            try:
                venv = args.mlserver_venv.resolve()
                print(f"MLServer venv {venv} (setup_mlserver.sh) ...", flush=True)
                mlserver_bin = ensure_mlserver_venv(venv, logs / "setup_mlserver.log")
                model_dir, found = mlflow_model_dir(
                    mv, model=model, version=version, dest=workdir / "mlflow_model",
                    mlflow_bin=_venv_bin("mlflow"),
                    env={**env, "MLFLOW_TRACKING_URI": tracking_uri,
                         "MLFLOW_REGISTRY_URI": registry_uri})
                repo_dir = workdir / "mlserver"
                mlserver_setup = {
                    "venv": str(venv), "model_dir": str(model_dir), "model_dir_from": found,
                    **write_mlserver_repo(repo_dir, model=model, model_dir=model_dir,
                                          http_port=p_mls, grpc_port=p_mls_grpc,
                                          metrics_port=p_mls_metrics),
                    "versions": venv_versions(mlserver_bin.parent / "python", (
                        "mlserver", "mlserver-mlflow", "mlflow", "mlflow-skinny",
                        "scikit-learn", "skops", "numpy", "pandas", "fastapi", "starlette",
                        "uvicorn", "uvloop"))}
                mls_env = {**env, "PATH": f"{mlserver_bin.parent}{os.pathsep}"
                                          f"{_ORIGINAL_ENV.get('PATH', '')}"}
                servers["mlserver"] = Server(
                    "mlserver", [str(mlserver_bin), "start", str(repo_dir)], p_mls,
                    f"/v2/models/{model}/ready", f"/v2/models/{model}/infer", mls_env, logs)
            except (PeerSetupError, OSError, subprocess.SubprocessError) as exc:
                fail("mlserver", f"{type(exc).__name__}: {exc}")
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
        servers["bare_w2"] = Server(
            "bare_w2", [sys.executable, "-m", "uvicorn", "bare_asgi:app", "--app-dir", str(HERE),
                        "--host", "127.0.0.1", "--port", str(p_bare_w2), "--workers",
                        str(WORKERS), "--no-access-log", "--log-level", "warning"],
            p_bare_w2, "/ping", "/predict", env, logs)
        print(f"starting servers ({', '.join(f'{n} :{s.port}' for n, s in servers.items())}) "
              f"for {model} v{version} ...", flush=True)
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
                fail(name, f"{exc}\n--- stderr (tail) ---\n{exc.stderr}")

        # ---- the row, typed by the signature mloop serves
        champion = model_info(servers["mloop"])
        signature = champion.get("signature")
        if not signature:
            raise SystemExit(f"GET /model of mloop's server has no signature: {champion}")
        results_engine = _engine(champion)
        print(f"mloop engine: {results_engine}", flush=True)
        if champion.get("version") != version:
            notes.append(f"mloop serves v{champion.get('version')} but the others serve "
                         f"v{version}")
        nocompile_info: dict[str, Any] = {}
        if "mloop_nocompile" in servers:
            nocompile_info = model_info(servers["mloop_nocompile"])
            if nocompile_info.get("engine") != "original":
                fail("mloop_nocompile", f"serves engine {_engine(nocompile_info)!r}, not the "
                     f"original pipeline: serving.compile.enabled: false was not applied")
            elif nocompile_info.get("version") != version:
                fail("mloop_nocompile", f"serves v{nocompile_info.get('version')}, not "
                     f"v{version}")
            else:
                print(f"mloop compile off engine: {_engine(nocompile_info)}", flush=True)
        idx, rows = real_rows(data_path, signature, args.row, BATCH_ROWS)
        row = rows[0]
        bodies = {"mloop": {"records": [row]}, "mloop_w2": {"records": [row]},
                  "mloop_nocompile": {"records": [row]},
                  "mlserver": v2_infer_request(row, signature),
                  "mlflow": {"dataframe_records": [row]}, "bare": {"records": [row]},
                  "bare_w2": {"records": [row]}}
        body_files = {}
        for name, body in bodies.items():
            body_files[name] = workdir / f"body_{name}.json"
            body_files[name].write_text(json.dumps(body, separators=(",", ":")))
        print(f"row {idx[0]} of {data_path.name}: {json.dumps(row)}", flush=True)
        if "mloop_w2" in servers:
            try:
                pids = wait_workers(servers["mloop_w2"], body_files["mloop_w2"], WORKERS,
                                    args.startup_timeout)
                print(f"  mloop_w2: {WORKERS} workers answer (pids {', '.join(pids)})",
                      flush=True)
            except ServerFailed as exc:
                fail("mloop_w2", f"{exc}\n--- stderr (tail) ---\n{exc.stderr}")

        # ---- one request each: every server must answer 200 (mloop's own, or no run)
        check: dict[str, Any] = {}
        for name, s in list(servers.items()):
            try:
                st, out = _http(s.url, body_files[name].read_bytes(), timeout=30)
                pred = v2_first_prediction(json.loads(out)) if name == "mlserver" and st == 200 \
                    else (json.loads(out).get("predictions", [None])[0] if st == 200 else None)
            except (OSError, ValueError) as exc:
                st, out, pred = 0, str(exc).encode(), None
            if st != 200:
                if name == "mloop":
                    raise SystemExit(f"mloop answered {st} to the benchmark row: {out[:500]!r}")
                fail(name, f"answered {st} to the benchmark row: {out[:500]!r}")
                continue
            check[name] = pred
        print(f"predictions for that row: {check}", flush=True)
        # the scikit-learn pipeline's answer, as mloop (compile off) or else a peer gives it
        ref_name = next((n for n in ("mloop_nocompile", "mlflow", "mlserver")
                         if isinstance(check.get(n), int | float)), None)
        for name, v in check.items():
            if ref_name and name not in (ref_name, "bare", "bare_w2") \
                    and isinstance(v, int | float) and v != check[ref_name]:
                notes.append(f"{LABELS[name]} answers the row {v!r}, {LABELS[ref_name]} "
                             f"{check[ref_name]!r} (|difference| "
                             f"{abs(v - check[ref_name]):.2g})")

        # ---- warm-up, then interleaved runs
        for name, s in servers.items():
            run_wrk(s.url, body_files[name], 8, args.warmup)
        print(f"warmed up ({args.warmup} s each at c=8)", flush=True)
        names = list(servers)
        raw_runs: dict[int, dict[str, list[dict[str, Any]]]] = {
            c: {n: [] for n in names} for c in args.connections}
        for rep in range(args.repeats):
            for ci, c in enumerate(args.connections):
                shift = (rep * len(args.connections) + ci) % len(names)
                order = names[shift:] + names[:shift]
                for pos, name in enumerate(order):
                    if name in TWO_WORKERS and c < WORKERS_MIN_CONNECTIONS:
                        continue
                    s = servers[name]
                    time.sleep(0.5)  # let the previous server's background work settle
                    before = mloop_counters(s) if name in MLOOP_SERVERS else {}
                    with CpuProbe(s.proc.pid if s.proc else None) as probe:
                        r = run_wrk(s.url, body_files[name], c, args.duration)
                    r.update({k: round(v, 3) for k, v in probe.result.items()})
                    r["implied_mean_ms"] = c / r["rps"] * 1e3 if r["rps"] else None
                    # requests per CPU-second of the server: what a busy machine disturbs least
                    r["rps_per_server_cpu"] = r["rps"] / r["server_cpu"] \
                        if r.get("server_cpu") else None
                    r["position"] = pos
                    if name in MLOOP_SERVERS:
                        d = _diff(mloop_counters(s), before)
                        r["server_by_status"] = {k[7:]: int(v) for k, v in d.items()
                                                 if k.startswith("status_") and v}
                        r["server_non_2xx"] = sum(v for k, v in r["server_by_status"].items()
                                                  if not k.startswith("2"))
                        r["batch_rows_sum"] = d.get("mloop_batch_rows_sum", 0.0)
                        r["batch_calls"] = d.get("mloop_batch_rows_count", 0.0)
                    raw_runs[c][name].append(r)
                    print(f"  [{rep + 1}/{args.repeats}] c={c:<3} {name:<15} "
                          f"{r['rps']:>9,.1f} req/s  p50 {r['p50_ms']:.2f} ms  "
                          f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}  "
                          f"cpu: server {r['server_cpu']:.0%} wrk {r['wrk_cpu']:.0%} "
                          f"other {r['other_cpu']:.0%}", flush=True)
        commands = {n: s.cmd for n, s in servers.items()}
        for s in servers.values():
            s.stop()
        print("servers stopped; timing the in-process floor ...", flush=True)

        floors: dict[str, Any] = {}
        try:
            floors["in_process"] = floor_b(project_dir, version, row, rows,
                                           args.floor_seconds)
        except Exception as exc:  # report the rest even if the floor cannot be timed
            floors["in_process_error"] = f"{type(exc).__name__}: {exc}"
        runs = {str(c): {n: _aggregate(v) for n, v in per.items() if v}
                for c, per in raw_runs.items()}
        floors["bare_asgi_rps"] = {str(c): runs[str(c)]["bare"]["rps"]
                                   for c in args.connections if "bare" in runs[str(c)]}
        for c in args.connections:
            for n in ("mlserver", "mlflow"):
                peer = runs[str(c)].get(n)
                if peer and peer["errors"]:
                    notes.append(f"{LABELS[n]} had {peer['errors']} errors at c={c} (its "
                                 f"numbers count only the answered requests)")
        other = [r["other_cpu"] for per in runs.values() for r in per.values()
                 if r.get("other_cpu") is not None]
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
        if not git.get("clean"):
            notes.append(f"measured on a work tree that was not clean (commit "
                         f"{git.get('commit')}): {', '.join(git.get('dirty') or [])[:300]}")

        results: dict[str, Any] = {
            "benchmark": "serving", "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": git, "model": model, "version": version, "project": str(project_dir),
            "data_version": data_version,
            "mloop_engine": results_engine, "mloop_model_info": champion,
            "mloop_nocompile_model_info": nocompile_info,
            "row_index": idx[0], "row": row, "data": str(data_path),
            "check_predictions": check,
            "config": {"estimator": estimator,
                       "duration_s": args.duration, "repeats": args.repeats,
                       "warmup_s": args.warmup, "connections": args.connections,
                       "order": "servers interleaved per (repeat, C), rotated one place each",
                       "wrk": "wrk -t1 -cC -dDs --latency -s post.lua", "env": SERVER_ENV,
                       "workers": {n: WORKERS if n in TWO_WORKERS else 1 for n in servers},
                       "workers_min_connections": WORKERS_MIN_CONNECTIONS,
                       "batch_rows_floor": BATCH_ROWS,
                       "mlserver": {"max_batch_size": MLSERVER_MAX_BATCH_SIZE,
                                    "max_batch_time_s": MLSERVER_MAX_BATCH_TIME_S,
                                    "parallel_workers": MLSERVER_PARALLEL_WORKERS,
                                    **mlserver_setup},
                       "bodies": bodies, "commands": commands},
            "startup_s": {n: s.ready_seconds and round(s.ready_seconds, 1)
                          for n, s in servers.items()},
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg_before": loadavg,
                        "cpu_busy_before": round(busy_before, 3),
                        "cpu_other_during_runs": {
                            "median": round(statistics.median(other), 3) if other else None,
                            "max": round(max(other), 3) if other else None,
                            "unit": "share of one core used by processes other than the "
                                    "server under test, wrk and this script"}},
            "versions": _versions(),
            "runs": runs, "floors": floors, "notes": notes,
            "failures": failures, "overrides": overrides, "out": str(args.out),
            "total_seconds": None,
        }
        evaluate(results)
        results["total_seconds"] = round(time.perf_counter() - t_start, 1)
        return results
    finally:
        for s in servers.values():
            s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="an already trained mloop project (skips "
                    "training the bike-sharing example)")
    ap.add_argument("--estimator", "--estimators", dest="estimators", nargs="+",
                    choices=ESTIMATORS, default=None,
                    help="the models the example trains without --project, measured one "
                    "after the other in this run: its scikit-learn gradient boosting and "
                    "LightGBM's (the lightgbm extra), or XGBoost's (the xgboost extra); default "
                    "sklearn and lightgbm")
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
    ap.add_argument("--mlserver-venv", type=Path, default=REPO / ".venv-mlserver",
                    help="MLServer's own virtualenv, created or checked by setup_mlserver.sh "
                    "(default: .venv-mlserver in the repo root)")
    ap.add_argument("--skip-mlserver", action="store_true", help="leave MLServer out")
    ap.add_argument("--allow-override", action="store_true", help="if the throwaway "
                    "project's first model fails a gate, promote it anyway (recorded in the "
                    "results as an override); without it the benchmark stops, unless a person "
                    "at the terminal says yes")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (trained "
                    "project and server logs)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()
    if args.project and args.estimators:
        ap.error("--estimator chooses the models of the example the benchmark trains; with "
                 "--project the project's own champion is served")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")

    # SIGTERM/SIGHUP -> SystemExit, so the finally below stops the servers
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))

    t_start = time.perf_counter()
    git = git_state(REPO)  # before anything is written (the results file is tracked)
    loadavg = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() \
        else []
    b0, w0 = _busy_jiffies(), time.perf_counter()
    time.sleep(2.0)  # how busy is the machine before we start? (share of one core)
    busy_before = (_busy_jiffies() - b0) / _CLK / (time.perf_counter() - w0)
    workdir = Path(tempfile.mkdtemp(prefix="mloop-bench-serving-"))
    estimators: list[str | None] = [None] if args.project else \
        list(dict.fromkeys(args.estimators or DEFAULT_ESTIMATORS))
    models: dict[str, Any] = {}
    try:
        for estimator in estimators:
            key = estimator or "project"
            print(f"\n=== model: {key} ===", flush=True)
            models[key] = measure_model(args, estimator=estimator, workdir=workdir / key,
                                        git=git, loadavg=loadavg, busy_before=busy_before)
            report(models[key])
        combined = {"benchmark": "serving",
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "git": git, "models": models,
                    "targets": [{**t, "model": k} for k, m in models.items()
                                for t in m["targets"]],
                    "total_seconds": round(time.perf_counter() - t_start, 1)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(combined, indent=2, default=str) + "\n")
        summary(combined, args.out)
    finally:
        if args.keep:
            print(f"kept {workdir} (server logs in logs/)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def wait_workers(server: Server, body_file: Path, n: int, timeout: float) -> list[str]:
    """Requests on new connections until ``n`` different workers answered (``x-mloop-worker``):
    /ready answers as soon as ONE worker listens, and a worker not yet listening gets no
    connections, so a run started then would measure fewer workers."""
    pids: set[str] = set()
    body = body_file.read_bytes()
    deadline = time.perf_counter() + timeout
    while len(pids) < n:
        if server.proc is not None and server.proc.poll() is not None:
            raise ServerFailed(server.name, f"exited with code {server.proc.returncode}",
                               server.stderr_tail())
        if time.perf_counter() > deadline:
            raise ServerFailed(server.name, f"only {len(pids)} of {n} workers answered in "
                               f"{timeout:.0f} s", server.stderr_tail())
        req = urllib.request.Request(server.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Connection": "close"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                pid = r.headers.get("x-mloop-worker")
        except OSError:
            pid = None
        if pid:
            pids.add(pid)
        else:
            time.sleep(0.2)
    return sorted(pids)


def summary(combined: dict[str, Any], out: Path) -> None:
    """Every model's targets in one table, and where the results are."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=140)
    git = combined.get("git") or {}
    t = Table(title=f"targets, all models (commit {str(git.get('commit'))[:12]}, "
                    f"{'clean' if git.get('clean') else 'DIRTY tree'})", title_justify="left")
    for col in ("model", "target", "measured", "result"):
        t.add_column(col)
    for tg in combined["targets"]:
        mark = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]"}.get(tg["result"], tg["result"])
        t.add_row(tg["model"], tg["target"], tg["measured"], mark)
    con.print(t)
    con.print(f"JSON: {out}; total {combined['total_seconds']:.0f} s")


def model_info(server: Server) -> dict[str, Any]:
    """The champion entry of an mloop server's GET /model (version, signature, engine)."""
    status, raw = _http(server.base + "/model")
    if status != 200:
        raise SystemExit(f"GET /model of {server.name} gave {status}: {raw[:500]!r}")
    return dict(json.loads(raw).get("champion") or {})


def _engine(info: dict[str, Any]) -> str:
    engine = str(info.get("engine", "original (no compile support)"))
    if info.get("compiled"):
        engine += f" (compile: {info['compiled'].get('status')})"
    return engine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("mloop", "mlflow", "mlflow-skinny", "scikit-learn", "skops", "onnxruntime",
                 "skl2onnx", "uvicorn", "starlette", "fastapi", "uvloop", "httptools", "orjson",
                 "pandas", "numpy", "threadpoolctl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
        out["wrk"] = (done.stdout or done.stderr).splitlines()[0].strip()
    return out


if __name__ == "__main__":
    main()
