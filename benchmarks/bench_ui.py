"""Page times of the dashboard (`mloop ui`): p95 per page over real HTTP, on the demo's
project and on a synthetic store ten to a hundred times larger.

Targets (issue 15): p95 <= 300 ms on the demo's project (28 versions, 87 windows, ~14,600
requests), <= 1 s with 100 versions, 10,000 monitoring windows and 10 million inference-log
rows. The large store is the demo's project scaled up where the pages read: MLflow model
versions (through MlflowClient, tags copied from real ones), deployments and their audit
events, pipeline runs with their steps, monitoring windows (rows of mloop's store with the
demo's real reports), a long audit chain, and 10M log rows as Parquet segments in the
inference log's layout, so a page that scanned the log would show it.

    python benchmarks/bench_ui.py                      # runs a full `mloop demo` first (~5 min)
    python benchmarks/bench_ui.py --project mloop-demo/project --synthetic
    python benchmarks/bench_ui.py --project DIR --synthetic --out benchmarks/ui_results.json
    python benchmarks/bench_ui.py --project DIR --synthetic --synthetic-dir /tmp/ui-synth
        # keeps the large store and reuses it on the next run

Pages are served by uvicorn on 127.0.0.1 in this process and fetched with one keep-alive
client: each page once to warm up, then ``--repeat`` times. Prints PASS/MISS per store and
writes the results with the git commit and whether the tree was clean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from _common import git_state

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"demo": 0.300, "synthetic": 1.000}
SYNTH = {"versions": 100, "windows": 10_000, "log_rows": 10_000_000, "events": 20_000,
         "pipeline_runs": 2_000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """The dashboard of a project on a real uvicorn in a thread."""

    def __init__(self, project_dir: Path) -> None:
        import uvicorn

        from mloop.project import open_project
        from mloop.ui import create_ui_app

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_ui_app(open_project(project_dir))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def pages(project_dir: Path) -> list[str]:
    """Every page, with the parameters a user would give: a date inside the replay, the
    champion's version page and an older one, their diff, the newest window's page, the
    audit filtered by kind, the newest pipeline run."""
    from mloop.loop.timeline import timeline
    from mloop.monitoring.windows_store import list_windows
    from mloop.project import open_project

    project = open_project(project_dir)
    tl = timeline(project)
    newest_window = list_windows(project, limit=1)
    versions = sorted({s.version for s in tl.stints}) or [1]
    champion = next((s.version for s in reversed(tl.stints) if s.alias == "champion"), 1)
    mid = (tl.start + (tl.end - tl.start) / 2).date().isoformat() if tl.start and tl.end \
        else "2012-03-20"
    from mloop.status import list_runs

    newest_run = [f"/runs/{r['run_id']}" for r in list_runs(project, limit=1)]
    return ["/", "/timeline", f"/timeline?at={mid}", "/versions", f"/versions/{champion}",
            f"/versions/{versions[0]}", f"/versions/diff?a={versions[0]}&b={champion}",
            "/monitoring", *[f"/monitoring/windows/{w['id']}" for w in newest_window], "/loop",
            "/audit", "/audit?kind=promote", "/runs", *newest_run, "/snapshots", "/login"]


def measure(project_dir: Path, repeat: int) -> dict[str, Any]:
    import requests

    paths = pages(project_dir)
    out: dict[str, Any] = {}
    with Served(project_dir) as srv, requests.Session() as http:
        for path in paths:
            r = http.get(srv.url + path, timeout=120)  # warm: templates, imports, caches
            if r.status_code != 200:
                raise SystemExit(f"{path}: HTTP {r.status_code}: {r.text[-500:]}")
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                r = http.get(srv.url + path, timeout=120)
                times.append(time.perf_counter() - t0)
                r.raise_for_status()
            out[path] = {"p50_ms": round(float(np.percentile(times, 50)) * 1000, 1),
                         "p95_ms": round(float(np.percentile(times, 95)) * 1000, 1),
                         "max_ms": round(max(times) * 1000, 1), "bytes": len(r.content)}
            print(f"  {path:32s} p50 {out[path]['p50_ms']:7.1f} ms  p95 "
                  f"{out[path]['p95_ms']:7.1f} ms  {len(r.content) / 1024:7.0f} KB",
                  flush=True)
    return out


# ----------------------------------------------------------------- the synthetic store

def _scale_versions(project: Any, n: int) -> list[int]:
    """Register versions until the model has ``n``, each a copy of a real one's record
    (source, run, tags): what the registry pages read."""
    client = project.mlflow
    name = project.config.model_name
    real = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    made = []
    for i in range(len(real), n):
        src = real[i % len(real)]
        mv = client.create_model_version(name, src.source, run_id=src.run_id,
                                         tags=dict(src.tags))
        made.append(int(mv.version))
    return made


def _scale_windows(project: Any, n: int, spec: str) -> datetime:
    """``n`` hourly windows of ``spec``, their verdicts and reports copied from the demo's
    real windows (so the heatmap and the timeline draw real shapes). Returns the last end."""
    import sqlalchemy as sa

    from mloop.store.models import MonitorWindowRow

    name = project.config.model_name
    with project.store.session() as s:
        real = list(s.scalars(sa.select(MonitorWindowRow).where(
            MonitorWindowRow.model == name)))
    if not real:
        raise SystemExit("the project has no monitoring windows to copy: run the demo first")
    start = datetime(2011, 1, 1, tzinfo=UTC)
    wall = datetime.now(UTC) - timedelta(days=1)
    rows = []
    for i in range(n):
        w = real[i % len(real)]
        t0 = start + timedelta(hours=i)
        rows.append({"model": name, "spec": spec, "seq": i + 1, "start": t0,
                     "end": t0 + timedelta(hours=1), "rows": w.rows,
                     "reference_version": w.reference_version, "drifted": w.drifted,
                     "drift_share": w.drift_share, "prediction_drifted": w.prediction_drifted,
                     "quality_findings": w.quality_findings, "metric": w.metric,
                     "metric_value": w.metric_value, "reference_metric": w.reference_metric,
                     "labelled_rows": w.labelled_rows, "label_coverage": w.label_coverage,
                     "report": w.report, "evaluated_at": wall + timedelta(seconds=i),
                     "performance_at": None})
    with project.store.session() as s:
        for k in range(0, len(rows), 1000):
            s.execute(sa.insert(MonitorWindowRow), rows[k:k + 1000])
        s.commit()
    return start + timedelta(hours=n)


def _scale_events_and_deployments(project: Any, versions: list[int], events: int) -> None:
    """A canary then its stop for each new version (challenger deployment rows and their
    audit events; the champion stays, so MLflow's alias and mloop's agree), and the chain
    filled up to ``events`` with the loop's routine events, hashed in order so it verifies."""
    import sqlalchemy as sa

    from mloop.loop.timeline import LOOP_VERDICTS
    from mloop.security.audit import GENESIS, event_hash
    from mloop.store.models import AuditHeadRow, DeploymentRow, EventRow

    name = project.config.model_name
    rng = random.Random(7)
    with project.store.session() as s:
        last = s.scalars(sa.select(EventRow).order_by(EventRow.id.desc()).limit(1)).first()
        count = s.scalar(sa.select(sa.func.count()).select_from(EventRow)) or 0
        routine = [(e.kind, e.actor, e.payload) for e in s.scalars(
            sa.select(EventRow).where(EventRow.kind.startswith("loop."),
                                      EventRow.kind.notin_(LOOP_VERDICTS))).all()] or [
            ("loop.held", "mloop-loop", {"model": name, "reason": "cooldown"})]
        prev = last.hash if last is not None else GENESIS
        at = datetime.now(UTC) - timedelta(hours=12)
        todo = events - count
        decisions = {rng.randrange(todo): v for v in versions}
        ev: list[dict[str, Any]] = []
        deps: list[dict[str, Any]] = []

        def add(kind: str, actor: str, payload: dict[str, Any]) -> None:
            nonlocal prev
            h = event_hash(prev, at, kind, actor, payload)
            ev.append({"at": at, "kind": kind, "actor": actor, "payload": payload,
                       "prev_hash": prev, "hash": h})
            prev = h

        for i in range(todo):
            at += timedelta(milliseconds=900)
            v = decisions.get(i)
            if v is None:
                add(*routine[i % len(routine)])
                continue
            add("canary", "mloop-loop", {"model": name, "alias": "challenger", "version": v,
                                         "replaced": None, "weight": 0.1,
                                         "reason": "synthetic canary"})
            deps.append({"model": name, "version": v, "alias": "challenger", "traffic": 0.1,
                         "action": "canary", "started_at": at,
                         "ended_at": at + timedelta(milliseconds=500), "actor": "mloop-loop",
                         "reason": "synthetic canary"})
            at += timedelta(milliseconds=500)
            add("stop", "mloop-loop", {"model": name, "alias": "challenger", "version": None,
                                       "replaced": v, "reason": "synthetic: worse on live rows"})
        for k in range(0, len(ev), 2000):
            s.execute(sa.insert(EventRow), ev[k:k + 2000])
        s.execute(sa.insert(DeploymentRow), deps)
        head = s.get(AuditHeadRow, 1)
        if head is None:
            s.add(AuditHeadRow(id=1, events=count + len(ev), head_hash=prev))
        else:
            head.events, head.head_hash = count + len(ev), prev
        s.commit()


def _scale_runs(project: Any, n: int) -> None:
    """Pipeline runs until the project has ``n``, each a copy of a real one with its steps
    (rows of mloop's store, started a minute apart): what the Runs page reads."""
    import uuid

    import sqlalchemy as sa

    from mloop.store.models import PipelineRunRow, StepRunRow

    with project.store.session() as s:
        real = list(s.scalars(sa.select(PipelineRunRow)).all())
        if not real:
            return
        steps = {r.id: list(s.scalars(sa.select(StepRunRow).where(
            StepRunRow.pipeline_run_id == r.id)).all()) for r in real}
        run_cols = [c.key for c in PipelineRunRow.__table__.columns]
        step_cols = [c.key for c in StepRunRow.__table__.columns if c.key != "id"]
        t0 = datetime.now(UTC) - timedelta(minutes=n)
        runs: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        for i in range(len(real), n):
            src = real[i % len(real)]
            rid = uuid.uuid4().hex
            runs.append({**{k: getattr(src, k) for k in run_cols}, "id": rid,
                         "started_at": t0 + timedelta(minutes=i)})
            rows.extend({**{k: getattr(st, k) for k in step_cols}, "pipeline_run_id": rid}
                        for st in steps[src.id])
        s.execute(sa.insert(PipelineRunRow), runs)
        for k in range(0, len(rows), 2000):
            s.execute(sa.insert(StepRunRow), rows[k:k + 2000])
        s.commit()


def _scale_log(project: Any, rows: int) -> int:
    """``rows`` inference-log rows as day/version Parquet segments, tiled from the demo's own
    segments (its schema, its values) over 2011-2012."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mloop.storage import ObjectStore
    from mloop.traffic.inference_log import segment_files

    store = ObjectStore(project.uris["inference_log_uri"])
    files = segment_files(store)
    if not files:
        raise SystemExit("the project's inference log is empty: run the demo first")
    base = pa.concat_tables([pq.read_table(f) for f in files[:50]], promote_options="default")
    root = Path(project.uris["inference_log_uri"].removeprefix("file://"))
    days = 730
    per_day = rows // days
    written = 0
    start = datetime(2011, 1, 1, tzinfo=UTC)
    for d in range(days):
        n = per_day if d < days - 1 else rows - written
        idx = np.arange(written, written + n) % base.num_rows
        t = base.take(pa.array(idx))
        day = start + timedelta(days=d)
        ts = (np.int64(day.timestamp() * 1e6) + np.linspace(0, 86_399e6, n).astype(np.int64))
        t = t.set_column(t.schema.get_field_index("_ts"), "_ts",
                         pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")))
        t = t.set_column(t.schema.get_field_index("_request_id"), "_request_id",
                         pa.array([f"s{d:04d}{i:08d}" for i in range(n)], pa.string()))
        folder = root / f"day={day.date().isoformat()}" / "version=1"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, folder / f"part-{int(day.timestamp())}-0-0.parquet")
        written += n
    return written


def build_synthetic(demo_project: Path, out: Path) -> dict[str, Any]:
    """The demo's project copied to ``out`` and scaled to SYNTH."""
    from mloop.project import open_project

    t0 = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(demo_project, out)
    cfg = out / "mloop.yaml"
    text = cfg.read_text()
    spec = "1h"
    new = re.sub(r"(?m)^(monitoring:\n(?:  .*\n)*?  window: )\S+", rf"\g<1>{spec}", text)
    if new == text:
        raise SystemExit(f"{cfg}: no monitoring.window to set to {spec}")
    cfg.write_text(new)
    project = open_project(out)
    made = _scale_versions(project, SYNTH["versions"])
    print(f"  registered {len(made)} more versions", flush=True)
    _scale_windows(project, SYNTH["windows"], spec)
    print(f"  stored {SYNTH['windows']:,} windows", flush=True)
    _scale_events_and_deployments(project, made, SYNTH["events"])
    print(f"  audit chain at {SYNTH['events']:,} events", flush=True)
    _scale_runs(project, SYNTH["pipeline_runs"])
    print(f"  {SYNTH['pipeline_runs']:,} pipeline runs", flush=True)
    logged = _scale_log(project, SYNTH["log_rows"])
    print(f"  wrote {logged:,} inference-log rows", flush=True)
    return {**SYNTH, "build_seconds": round(time.perf_counter() - t0, 1)}


def verdict(label: str, results: dict[str, Any]) -> dict[str, Any]:
    worst = max(results.values(), key=lambda r: r["p95_ms"])
    path = next(p for p, r in results.items() if r is worst)
    ok = worst["p95_ms"] <= TARGETS[label] * 1000
    print(f"{'PASS' if ok else 'MISS'} {label}: slowest p95 {worst['p95_ms']:.0f} ms ({path}); "
          f"target <= {TARGETS[label] * 1000:.0f} ms", flush=True)
    return {"pass": ok, "slowest_p95_ms": worst["p95_ms"], "slowest_page": path,
            "target_ms": TARGETS[label] * 1000, "pages": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, help="a demo's project (default: run the demo)")
    ap.add_argument("--until", default="2013-01-01", help="demo replay end when it runs here")
    ap.add_argument("--synthetic", action="store_true", help="also the 100-version store")
    ap.add_argument("--synthetic-dir", type=Path,
                    help="keep the synthetic store here and reuse it when it is already built "
                         "(its build takes minutes)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", type=Path, help="results JSON")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLOOP_ACTOR", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    try:
        project = args.project
        if project is None:
            from mloop.cli.app import main as mloop

            if mloop(["demo", "--out", str(work / "demo"), "--until", args.until]) != 0:
                return 1
            project = work / "demo" / "project"
        results: dict[str, Any] = {"git": git_state(ROOT), "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version()},
            "repeat": args.repeat, "command": " ".join(sys.argv)}
        print(f"demo project {project}", flush=True)
        results["demo"] = verdict("demo", measure(project, args.repeat))
        if args.synthetic:
            synthetic = args.synthetic_dir or work / "synthetic"
            marker = synthetic / "synthetic.json"
            if marker.exists():
                print(f"reusing the synthetic store {synthetic}", flush=True)
                built = json.loads(marker.read_text())
            else:
                print(f"building the synthetic store in {synthetic}", flush=True)
                built = build_synthetic(project, synthetic)
                # written last: a build that stopped half-way is rebuilt, not reused
                marker.write_text(json.dumps(built, indent=2) + "\n")
            results["synthetic_store"] = built
            results["synthetic"] = verdict("synthetic", measure(synthetic, args.repeat))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"wrote {args.out}")
        return 0 if all(results[k]["pass"] for k in ("demo", "synthetic") if k in results) \
            else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
