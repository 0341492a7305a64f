"""Batch formation, before and after: the same mloop server (compile off, the scikit-learn
pipeline) from two source trees, side by side in one run.

    python benchmarks/serving/bench_batching.py [--before REF] [--project DIR]
        [--duration 8] [--repeats 3] [--connections 1 8 32] [--out FILE]

``--before`` (default ``HEAD~1``) is exported with ``git archive`` into a temp folder and
served with ``PYTHONPATH`` pointing at it; "after" is this checkout's ``src``. Both serve the
same registered version of the bike example (trained in a temp copy unless ``--project``
names a trained one) with ``serving.compile.enabled: false``, one worker each,
``OMP_NUM_THREADS=1``, each with its own inference log. Load: ``wrk -t1 -cC`` one-row
``/predict`` requests, interleaved (for each repeat and C both servers run once, the order
alternating), medians reported with the after/before ratio of req/s and p99 and each
server's mean micro-batch size (from its ``mloop_batch_rows`` histogram). On a shared
machine the figures move with other load: compare within one run, and read the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import git_state  # noqa: E402
from bench_serving import (  # noqa: E402
    REPO,
    Server,
    _pick_ports,
    _server_env,
    _venv_bin,
    champion_version,
    run_wrk,
    train_example,
)
from peers import nocompile_project  # noqa: E402


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def batch_rows(server: Server) -> tuple[float, float]:
    """(rows, batches) the server's model calls scored so far."""
    text = _get(server.base + "/metrics")
    total = sum(float(x) for x in re.findall(r"^mloop_batch_rows_sum\{[^}]*\} (\S+)", text,
                                             re.M))
    count = sum(float(x) for x in re.findall(r"^mloop_batch_rows_count\{[^}]*\} (\S+)", text,
                                             re.M))
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="HEAD~1", help="git ref served as 'before'")
    ap.add_argument("--project", type=Path, help="an already trained mloop project")
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--base-port", type=int, default=18950)
    ap.add_argument("--out", type=Path, help="write the results (JSON) here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mloop-bench-batching-"))
    before_src = work / "before"
    before_src.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "src"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
    project = args.project or train_example(work)[0]

    from mloop.project import open_project
    from mloop.serving.model import load_served

    opened = open_project(project)
    nc_root, nc_env = nocompile_project(project.resolve(), opened.uris, work / "nocompile")
    version = champion_version(opened.uris["registry_uri"], opened.config.model_name)
    if version is None:
        raise SystemExit(f"{project} has no champion to serve")
    example = load_served(opened, version, compile=None, warm=False).example
    if example is None:
        raise SystemExit("the served version has no input example to send")
    body = work / "body.json"
    body.write_text(json.dumps({"records": [{k: v[0] for k, v in example.items()}]}))

    servers = {}
    for (name, src), port in zip({"before": before_src / "src", "after": REPO / "src"}.items(),
                                 _pick_ports(args.base_port, 2), strict=True):
        own = work / f"serve-{name}"  # its inference log, outputs and server logs
        own.mkdir()
        env = {**_server_env(), **nc_env, "PYTHONPATH": str(src),
               "MLOOP_INFERENCE_LOG_URI": str(own / "inference"),
               "MLOOP_OUTPUTS_URI": str(own / "outputs")}
        servers[name] = Server(name, [_venv_bin("mloop"), "-C", str(nc_root), "serve", "--port",
                                      str(port)], port, "/ready", "/predict", env, own)
    results: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in servers}
    try:
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready(240)
            run_wrk(s.url, body, 8, 3)  # warm-up
        for rep in range(args.repeats):
            for i, c in enumerate(args.connections):
                order = list(servers.values())
                if (rep + i) % 2:
                    order.reverse()
                for s in order:
                    rows0, calls0 = batch_rows(s)
                    w = run_wrk(s.url, body, c, args.duration)
                    rows1, calls1 = batch_rows(s)
                    w.pop("raw", None)
                    w["mean_batch"] = (rows1 - rows0) / max(1.0, calls1 - calls0)
                    w["load"] = os.getloadavg()[0]
                    results[s.name].setdefault(c, []).append(w)
                    print(f"rep {rep} c={c:<3d} {s.name:6s} {w['rps']:8.1f} req/s  p50 "
                          f"{w['p50_ms']:6.1f}  p99 {w['p99_ms']:6.1f} ms  batch "
                          f"{w['mean_batch']:5.2f}  errors {w['errors']}  load {w['load']:.1f}",
                          flush=True)
    finally:
        for s in servers.values():
            s.stop()

    summary = {}
    for c in args.connections:
        med = {n: {k: statistics.median(w[k] for w in results[n][c])
                   for k in ("rps", "p99_ms", "mean_batch")} for n in servers}
        ratio = {"rps": med["after"]["rps"] / med["before"]["rps"],
                 "p99": med["after"]["p99_ms"] / med["before"]["p99_ms"]}
        summary[c] = {**med, "ratio": ratio}
        print(f"c={c:<3d} before {med['before']['rps']:7.1f} req/s p99 "
              f"{med['before']['p99_ms']:6.1f} ms batch {med['before']['mean_batch']:4.1f} | "
              f"after {med['after']['rps']:7.1f} req/s p99 {med['after']['p99_ms']:6.1f} ms "
              f"batch {med['after']['mean_batch']:4.1f} | after/before {ratio['rps']:.2f}x "
              f"req/s, {ratio['p99']:.2f}x p99")
    if args.out:
        args.out.write_text(json.dumps({"before": args.before, "git": git_state(REPO),
                                        "summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
