"""Hot swap: from the alias change the server sees to the first answer of the new version.

    python benchmarks/serving/bench_swap.py [--repeats 3] [--burners 2]
                                            [--out benchmarks/serving/swap_results.json]

What is measured: a running ``mloop serve`` (one worker, OMP_NUM_THREADS=1, the compiled fast
path on) serves v1 of the UCI Bike Sharing example; v2 is promoted (``promote(...)``, the
service ``mloop models promote`` calls), then ``POST /reload`` makes the server read the
aliases (its poll) at t0, while a client sends one-row ``POST /predict`` requests every 5 ms.
The figure is t0 to the first answer whose ``version`` is 2: the poll, the load, the warm-up,
the swap and one request. Also recorded: the server's own ``load_seconds`` for v2 and the
seconds its compile/verify took (GET /model), and the CPU the whole machine used meanwhile.

Two ways of loading, side by side in this run (``serving.compile.stored`` in the copied
project's mloop.yaml, alternated per repetition):

  * before -- ``stored: false``: compile (skl2onnx) and verify on the holdout at every load,
              the original scikit-learn model loaded first (mloop before graphs were stored);
  * after  -- ``stored: true`` (the default): the ONNX graph and verdict stored when v2 was
              registered are loaded directly (onnxruntime session from the stored bytes; no
              skl2onnx, no original model).

each under three loads, started by the benchmark after the alias change, 2 s before t0 and
stopped after the measurement:

  * quiet        -- nothing added (on a shared machine other processes may still run: the
                    CPU the whole machine used during each swap is recorded, in cores);
  * busy         -- ``--burners`` processes spinning (two load both cores of this machine);
  * busy+traffic -- the burners plus a client process sending the same one-row request back
                    to back on 8 keep-alive connections:
                    the server answers v1 while it loads v2, as during a replay (where
                    canaries used to start answering 17-30 s after the alias changed).

Every measurement uses a freshly started server (no process caches of v2), and the alias is
put back to v1 between them.

Target (PASS/MISS): every "after" measurement <= 1 s, under every load (the slowest
repetition counts). "before" is printed against the same line for comparison.

Data and model: examples/bike_sharing copied to a temp folder; ``mloop run`` trains v1 (promoted
by its gates); then ``max_iter: 250`` and ``auto_promote: false`` make v2 (registered, not
promoted); v2's gates are evaluated once against v1. The server's poll interval is set to an hour
so that only /reload makes it read the aliases.

Overrides: if v1 fails a gate, or v2 does (then every measured promotion would override it), the
benchmark promotes it anyway only with ``--allow-override`` or a yes at the terminal; run without
a terminal (CI, a pipe) it stops instead. Each override is printed, kept in ``notes`` and listed
in the results under ``overrides`` (version, failed gates, reason, who allowed it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
from _common import git_state
from bench_serving import (
    _CLK,
    EXAMPLE,
    REPO,
    SERVER_ENV,
    Server,
    ServerFailed,
    _busy_jiffies,
    _cpu_model,
    _http,
    _pick_ports,
    _server_env,
    _venv_bin,
    _versions,
    champion_version,
    failed_gates,
    latest_version,
    real_rows,
    train_example,
)

TARGET_SECONDS = 1.0
MODES = ("before", "after")  # serving.compile.stored: false / true
LOADS = ("quiet", "busy", "busy+traffic")
TRAFFIC_CONNECTIONS = 8
STORED_LINE = re.compile(r"^  compile: \{stored: (true|false)\}$", re.M)


# ------------------------------------------------------------------------------ project

def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"{path}: expected the line {old!r} (the example changed?)")
    path.write_text(text.replace(old, new, 1))


def _run(project: Path) -> str:
    env = _server_env()
    done = subprocess.run([_venv_bin("mloop"), "-C", str(project), "run"], capture_output=True,
                          text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"`mloop run` failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    return done.stdout


def allow_override(version: int, failed: list[str], why: str, *, allowed: bool,
                   overrides: list[dict[str, Any]], notes: list[str]) -> None:
    """Let a promotion of ``version`` despite failed gates go ahead only with
    ``--allow-override`` or a yes at the terminal (stops otherwise), and record it."""
    from mloop.cli._common import confirm_override

    what = f"v{version} failed gate(s) {'; '.join(failed)}"
    allowed_by = confirm_override(f"bench_swap: {what}. Promote it anyway ({why})?",
                                  allowed=allowed)
    if allowed_by is None:
        raise SystemExit(f"bench_swap: {what}; the benchmark would have to promote it despite "
                         f"them ({why}). Rerun with --allow-override to do so (recorded in the "
                         f"results as an override), or on a machine where the gates pass.")
    reason = f"bench_swap: {why}, despite failed gate(s) ({allowed_by})"
    overrides.append({"version": version, "failed_gates": failed, "reason": reason,
                      "allowed_by": allowed_by})
    notes.append(f"OVERRIDE: {what}; force-promoted ({why}; {allowed_by})")
    print(f"OVERRIDE: {what}; promoting it anyway ({allowed_by})", flush=True)


def prepare(workdir: Path, notes: list[str], *, allowed: bool,
            overrides: list[dict[str, Any]]) -> tuple[Path, int, int]:
    """The trained example with v1 champion and v2 registered, not promoted."""
    project, out = train_example(workdir)
    yaml = project / "mloop.yaml"
    from mloop.project import open_project

    p = open_project(project)
    model = p.config.model_name
    registry = p.uris.get("registry_uri") or p.uris["tracking_uri"]
    v1 = champion_version(registry, model)
    if v1 is None:
        latest = latest_version(registry, model)
        if latest is None:
            raise SystemExit(f"`mloop run` registered no version:\n{out[-3000:]}")
        from mloop.registry.promotion import promote

        gates = failed_gates(out) or ["(see `mloop run` output)"]
        allow_override(latest, gates, "v1 must serve before the swap", allowed=allowed,
                       overrides=overrides, notes=notes)
        promote(p, latest, reason=overrides[-1]["reason"], force=True)
        v1 = latest
    _edit(yaml, "max_iter: 300", "max_iter: 250")
    _edit(yaml, "auto_promote: true", "auto_promote: false")
    print("training v2 (mloop run) ...", flush=True)
    t0 = time.perf_counter()
    _run(project)
    print(f"  trained in {time.perf_counter() - t0:.1f} s", flush=True)
    v2 = latest_version(registry, model)
    if v2 is None or v2 == v1:
        raise SystemExit("the second `mloop run` registered no new version")
    _edit(yaml, "  poll_seconds: 1 ", "  poll_seconds: 3600\n  compile: {stored: true}\n ")
    return project, v1, v2


def set_stored(project: Path, stored: bool) -> None:
    yaml = project / "mloop.yaml"
    text, n = STORED_LINE.subn(f"  compile: {{stored: {'true' if stored else 'false'}}}",
                               yaml.read_text())
    if n != 1:
        raise SystemExit(f"{yaml}: the serving.compile line is missing")
    yaml.write_text(text)


# ------------------------------------------------------------------------------ burners

class Burners:
    """``n`` processes spinning on the CPU, stopped by their process ids."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       start_new_session=True) for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.procs = []


# ------------------------------------------------------------------------------ measure

def measure_swap(server: Server, body: bytes, to_version: int, timeout: float = 120.0
                 ) -> dict[str, Any]:
    """POST /reload at t0 while a client sends a request every 5 ms; t0 to the first answer
    from ``to_version``."""
    first: dict[str, Any] = {}
    done = threading.Event()
    answered = {"old": 0, "errors": 0}

    def client() -> None:
        while not done.is_set():
            try:
                status, raw = _http(server.url, body, timeout=30)
                version = json.loads(raw).get("version") if status == 200 else None
            except (OSError, ValueError):
                version, status = None, 0
            if version == to_version:
                first["t"] = time.perf_counter()
                return
            answered["old" if status == 200 else "errors"] += 1
            time.sleep(0.005)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    time.sleep(0.3)  # the client is answered by the old version
    busy0 = _busy_jiffies()
    t0 = time.perf_counter()
    status, raw = _http(server.base + "/reload", b"", timeout=timeout)
    t_reload = time.perf_counter()
    thread.join(timeout=timeout)
    done.set()
    wall = time.perf_counter() - t0
    machine = (_busy_jiffies() - busy0) / _CLK / wall if wall > 0 else None
    if status != 200:
        raise RuntimeError(f"/reload answered {status}: {raw[:500]!r}")
    if "t" not in first:
        raise RuntimeError(f"no answer from v{to_version} within {timeout:.0f} s")
    _, info_raw = _http(server.base + "/model")
    champion = json.loads(info_raw).get("champion") or {}
    verdict = champion.get("compiled") or {}
    return {"first_answer_s": round(first["t"] - t0, 4),
            "reload_s": round(t_reload - t0, 4),
            "server_load_s": champion.get("load_seconds"),
            "compile_verify_s": round(verdict.get("seconds") or 0.0, 4),
            "engine": champion.get("engine"), "verdict": verdict.get("status"),
            "compiled_at": verdict.get("compiled_at"),
            "original_loaded": champion.get("original_loaded"),
            "machine_busy_cores": round(machine, 2) if machine is not None else None,
            "answers_from_old": answered["old"], "errors": answered["errors"]}


_TRAFFIC = """\
import http.client, sys, threading
host, port, path, body, n = sys.argv[1:6]
port, n = int(port), int(n)
def loop():
    conn = http.client.HTTPConnection(host, port, timeout=30)
    while True:
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            conn.getresponse().read()
        except OSError:
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
for _ in range(n):
    threading.Thread(target=loop, daemon=True).start()
threading.Event().wait()
"""


class Traffic:
    """A client process sending the one-row request back to back on ``connections`` keep-alive
    connections until stopped: the server is busy answering the old version while it loads
    the new one (as during a replay, where canaries used to start answering 17-30 s late)."""

    def __init__(self, server: Server, body: bytes, connections: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TRAFFIC, "127.0.0.1", str(server.port),
             server.predict_path, body.decode(), str(connections)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def one(project_dir: Path, project: Any, *, mode: str, load: str, rep: int, v1: int, v2: int,
        report: Any, burners: int, port: int, logs: Path, body: bytes) -> dict[str, Any]:
    from mloop.registry.promotion import promote, rollback

    set_stored(project_dir, mode == "after")
    if champion_version(project.uris.get("registry_uri") or project.uris["tracking_uri"],
                        project.config.model_name) != v1:
        rollback(project, to=v1, reason="bench_swap: back to the start")
    server = Server(f"mloop-{mode}-{load}-{rep}",
                    [_venv_bin("mloop"), "-C", str(project_dir), "serve", "--host", "127.0.0.1",
                     "--port", str(port), "--workers", "1"],
                    port, "/ready", "/predict", _server_env(), logs)
    burn: Burners | None = None
    traffic: Traffic | None = None
    try:
        server.start()
        server.wait_ready(180)
        # force only when v2 failed a gate and the override was allowed (see main)
        promote(project, v2, reason="bench_swap: the measured swap", force=not report.passed,
                gate_report=report)
        if load.startswith("busy"):
            burn = Burners(burners)
        if load.endswith("traffic"):
            traffic = Traffic(server, body, TRAFFIC_CONNECTIONS)
        if burn is not None or traffic is not None:
            time.sleep(2.0)
        return measure_swap(server, body, v2)
    except ServerFailed as exc:
        raise SystemExit(f"{exc}\n--- stderr (tail) ---\n{exc.stderr}") from None
    finally:
        if traffic is not None:
            traffic.stop()
        if burn is not None:
            burn.stop()
        server.stop()


# ------------------------------------------------------------------------- where it goes

def phases(project: Any, version: int, repeats: int) -> dict[str, float]:
    """Each piece of a load, timed in this process (median of ``repeats``, the process's
    caches of the version emptied each time): what the stored path does, then what it no
    longer does (the original model, the compile and the verification)."""
    from mloop.registry import candidates

    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        candidates._PYFUNCS.clear()  # what a fresh server has: nothing of this version
        candidates._COPIES.clear()
        for name, seconds in _phases_once(project, version).items():
            times.setdefault(name, []).append(seconds)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def _phases_once(project: Any, version: int) -> dict[str, float]:
    from mloop.registry.candidates import get_version, load_metadata, load_pyfunc
    from mloop.serving import compiled as c
    from mloop.serving.schema import InputSchema

    out: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    mv = get_version(project, version)
    lap("registry: get version and tags")
    path, meta = load_metadata(project, version)
    lap("model folder: download and read MLmodel")
    schema = InputSchema.from_mlflow(meta.get_input_schema())
    example = meta.load_input_example(str(path))
    lap("signature and input example")
    verdict = c.Verdict.from_tag(mv.tags.get(c.TAG))
    if verdict is None or verdict.artifact is None:
        raise SystemExit(f"v{version} has no stored graph")
    data = c._fetch(project, verdict.artifact)
    lap("stored graph: download and sha256")
    model = c.session_from_bytes(data, schema)
    lap("onnxruntime session from the bytes")
    model.score_columns({k: [None if v != v else v for v in example[k].tolist()]
                         for k in schema.names})
    lap("warm-up (the input example)")
    # no longer on the path
    raw = load_pyfunc(project, version)[1].get_raw_model()
    lap("[not loaded] original: MLflow pyfunc + skops")
    c.convert_sklearn(raw, schema)
    lap("[not done] compile (skl2onnx)")
    c._check(project, model, raw, schema, mv.tags.get("mloop.task"),
             mv.tags.get(c.HOLDOUT_TAG), project.config.serving.compile)
    lap("[not done] verify on the holdout")
    return out


# ------------------------------------------------------------------------------- output

def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cells = {}
    for key, reps in runs.items():
        firsts = [r["first_answer_s"] for r in reps]
        worst = max(firsts) if firsts else None
        cells[key] = {"first_answer_s_max": worst,
                      "first_answer_s_median": statistics.median(firsts) if firsts else None,
                      "server_load_s_median": statistics.median(
                          r["server_load_s"] for r in reps) if reps else None,
                      "compile_verify_s_median": statistics.median(
                          r["compile_verify_s"] for r in reps) if reps else None,
                      "result": "PASS" if worst is not None and worst <= TARGET_SECONDS
                      else "MISS"}
    return cells


def print_report(results: dict[str, Any]) -> None:
    print(f"\nHot swap, {results['model']} v{results['from']} -> v{results['to']}: seconds from "
          f"the server's poll (POST /reload) to the first answer of v{results['to']}; "
          f"{results['config']['repeats']} fresh server(s) per cell, busy = "
          f"{results['config']['burners']} CPU burners on {results['machine']['cpus']} CPUs")
    print(f"{'cell':<20} {'first answer (each)':<24} {'max':>7} {'load':>7} {'compile+verify':>15}"
          f"  target <= {TARGET_SECONDS:g} s")
    for mode in MODES:
        for load in LOADS:
            key = f"{mode}/{load}"
            reps = results["runs"].get(key, [])
            cell = results["cells"].get(key)
            if not reps or cell is None:
                continue
            each = " ".join(f"{r['first_answer_s']:.3f}" for r in reps)
            print(f"{key:<20} {each:<24} {cell['first_answer_s_max']:>7.3f} "
                  f"{cell['server_load_s_median']:>7.3f} {cell['compile_verify_s_median']:>15.3f}"
                  f"  {cell['result']}")
    print("\nwhere a load's time goes (in process, median of 3, seconds):")
    phases_ = results["phases_s"]
    print(f"{'':<45} {'quiet':>8} {'busy':>8}")
    for name in phases_["quiet"]:
        print(f"{name:<45} {phases_['quiet'][name]:>8.4f} {phases_['busy'][name]:>8.4f}")
    for note in results["notes"]:
        print(f"note: {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--row", type=int, default=5000)
    ap.add_argument("--base-port", type=int, default=8700)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "swap_results.json")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (server logs)")
    ap.add_argument("--allow-override", action="store_true",
                    help="if v1 or v2 fails a gate, promote it anyway (recorded as an override); "
                         "without it the benchmark asks at a terminal and stops otherwise")
    args = ap.parse_args()
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="mloop-bench-swap-"))
    notes: list[str] = []
    overrides: list[dict[str, Any]] = []
    try:
        project_dir, v1, v2 = prepare(workdir, notes, allowed=args.allow_override,
                                      overrides=overrides)
        from mloop.project import open_project
        from mloop.registry.gates import evaluate_gates

        project = open_project(project_dir)
        report = evaluate_gates(project, v2)  # once: every promotion below replaces v1
        if not report.passed:
            allow_override(v2, [f"{r.gate} ({r.message})" for r in report.results
                                if r.status == "fail"],
                           f"every measured swap promotes it over v1 "
                           f"({args.repeats * len(MODES) * len(LOADS)} times)",
                           allowed=args.allow_override, overrides=overrides, notes=notes)
        logs = workdir / "logs"
        logs.mkdir()
        (port,) = _pick_ports(args.base_port, 1)
        data = project_dir / project.config.data.path
        signature = _signature(project, v2)
        _, rows = real_rows(data, signature, args.row, 1)
        body = json.dumps({"records": rows}).encode()
        runs: dict[str, list[dict[str, Any]]] = {f"{m}/{ld}": [] for m in MODES for ld in LOADS}
        for rep in range(args.repeats):
            for load in LOADS:
                for mode in MODES:
                    r = one(project_dir, project, mode=mode, load=load, rep=rep, v1=v1, v2=v2,
                            report=report, burners=args.burners, port=port, logs=logs,
                            body=body)
                    runs[f"{mode}/{load}"].append(r)
                    print(f"  [{rep + 1}/{args.repeats}] {mode:<6} {load:<5} first answer "
                          f"{r['first_answer_s']:.3f} s (reload {r['reload_s']:.3f}, load "
                          f"{r['server_load_s']}, compile+verify {r['compile_verify_s']:.3f}, "
                          f"engine {r['engine']}, {r['compiled_at']}, machine "
                          f"{r['machine_busy_cores']} cores busy)", flush=True)
        print("timing the pieces of a load in this process ...", flush=True)
        breakdown = {"quiet": phases(project, v2, 3)}
        burn = Burners(args.burners)
        try:
            time.sleep(2.0)
            breakdown["busy"] = phases(project, v2, 3)
        finally:
            burn.stop()
        results: dict[str, Any] = {
            "benchmark": "serving/swap",
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "git": git_state(REPO, ignore=args.out), "model": project.config.model_name,
            "from": v1, "to": v2,
            "config": {"repeats": args.repeats, "burners": args.burners, "row": args.row,
                       "env": SERVER_ENV, "workers": 1, "target_s": TARGET_SECONDS,
                       "example": str(EXAMPLE)},
            "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "loadavg": Path("/proc/loadavg").read_text().split()[:3]},
            "versions": {**_versions(), **_more_versions()},
            "runs": runs, "cells": summarize(runs), "phases_s": breakdown, "notes": notes,
            "overrides": overrides,
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print_report(results)
        print(f"results: {args.out}; total {results['total_seconds']:.0f} s")
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)


def _signature(project: Any, version: int) -> list[dict[str, Any]]:
    """The input signature as the server reports it (GET /model), from the MLmodel file."""
    from mloop.registry.candidates import load_metadata
    from mloop.serving.schema import InputSchema

    _, meta = load_metadata(project, version)
    return InputSchema.from_mlflow(meta.get_input_schema()).describe()


def _more_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("onnxruntime", "skl2onnx", "skops"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


if __name__ == "__main__":
    main()
