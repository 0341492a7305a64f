"""Batch scoring memory: mloop's chunked ``predict`` vs the whole-file pandas way, as files grow.

    python benchmarks/serving/bench_batch_memory.py [--project DIR] [--sizes 100000,400000,1600000]
        [--allow-override]

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

Without ``--project`` the example is trained here (``mloop run``) and its v1 must pass its gates
to become champion. If it fails one, the benchmark promotes it anyway only with
``--allow-override`` or a yes at the terminal (stops otherwise, e.g. in CI), prints the override
and lists it in the results (``overrides``: version, failed gates, reason, who allowed it).
Results: ``batch_memory_results.json`` beside this file, with the git commit and whether the
work tree was clean.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for _common
from _common import git_state

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


def train(project: Path, *, allowed: bool) -> list[dict]:
    """``mloop run`` on the copied example; v1 becomes champion by its gates, or despite them
    only when allowed (returns the override records)."""
    from mloop.cli._common import confirm_override

    mloop = Path(sys.executable).parent / "mloop"
    done = subprocess.run([str(mloop), "-C", str(project), "run", "--json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`mloop run` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    if result.get("promotion") is not None:
        return []
    version = result["registered"]["version"]
    failed = [f"{r['gate']} ({r['message']})" for r in result["gates"]["results"]
              if r["status"] == "fail"]
    if not failed:  # gates passed, auto_promote off: a plain promotion
        subprocess.run([str(mloop), "-C", str(project), "models", "promote", str(version),
                        "--reason", "bench_batch_memory: the model scored"], check=True,
                       capture_output=True)
        return []
    what = f"v{version} failed gate(s) {'; '.join(failed)}"
    allowed_by = confirm_override(f"bench_batch_memory: {what}. Promote it anyway to score "
                                  f"with it?", allowed=allowed)
    if allowed_by is None:
        raise SystemExit(f"bench_batch_memory: {what}; it would have to be champion to be "
                         f"scored. Rerun with --allow-override to promote it anyway (recorded "
                         f"in the results as an override), or pass --project with a champion.")
    reason = f"bench_batch_memory: scored despite failed gate(s) ({allowed_by})"
    promoted = subprocess.run([str(mloop), "-C", str(project), "models", "promote",
                               str(version), "--force", "--reason", reason],
                              capture_output=True, text=True)
    if promoted.returncode != 0:
        raise SystemExit(f"`mloop models promote {version} --force` failed:\n"
                         f"{promoted.stderr[-3000:]}")
    print(f"OVERRIDE: {what}; promoted anyway ({allowed_by})", flush=True)
    return [{"version": version, "failed_gates": failed, "reason": reason,
             "allowed_by": allowed_by}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, help="a trained bike project (default: train one)")
    ap.add_argument("--sizes", default="100000,400000,1600000")
    ap.add_argument("--allow-override", action="store_true",
                    help="if the freshly trained v1 fails a gate, promote it anyway (recorded "
                         "as an override); without it the benchmark asks at a terminal and "
                         "stops otherwise")
    args = ap.parse_args()
    git = git_state(REPO)  # before the results file is written: it is in the tree
    overrides: list[dict] = []
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="mloop-bench-batch-") as tmp:
        work = Path(tmp)
        project = args.project
        if project is None:
            project = work / "bike_sharing"
            shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".mloop"))
            overrides = train(project, allowed=args.allow_override)
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
        for o in overrides:
            print(f"note: v{o['version']} was scored despite failed gate(s) "
                  f"{'; '.join(o['failed_gates'])} ({o['allowed_by']})")
        out = Path(__file__).with_name("batch_memory_results.json")
        out.write_text(json.dumps({"benchmark": "serving/batch_memory", "git": git,
                                   "project": str(args.project) if args.project else
                                   "examples/bike_sharing, trained here",
                                   "overrides": overrides, "sizes": results}, indent=2) + "\n")
        print(f"JSON: {out}")


if __name__ == "__main__":
    main()
