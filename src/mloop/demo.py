"""``mloop demo``: the whole loop on real data, end to end, with nothing started by hand.

On the bundled UCI Bike Sharing project: train on January-April 2011; start the real server
(``mloop serve``, a separate process); replay the rest of 2011-2012 in time order over HTTP,
one request per hour with its event time; send each hour's true count as a label after a
delay; run the controller (``mloop loop``'s pass) every few simulated days. It retrains,
gates, canaries and promotes or rolls back by the policy in ``mloop.yaml``. At the end it
compares, month by month, the MAE of what the loop served with the MAE the frozen initial
model would have had on the same hours, and writes ``summary.json`` and ``loop.html``.

The demo needs a champion to serve. If the initial model fails a gate it is promoted only when
the caller allows it (``DemoOptions.allow_override``, ``mloop demo --allow-override``) or a
person confirms it (``confirm_override``, asked by the CLI only at a terminal); otherwise the
demo stops with ``GateFailedError`` before starting anything, so a run in CI never overrides a
gate silently. An override is recorded in the model's history (action ``override``) and in
``summary.json`` under ``overrides``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from mloop.errors import GateFailedError, MloopError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bike_sharing"


@dataclass
class DemoOptions:
    out: Path
    example: Path = EXAMPLE
    start: str = "2011-05-01"
    end: str = "2013-01-01"
    label_delay_days: float = 2.0
    check_every_days: int = 7
    port: int = 0
    allow_override: bool = False  # promote the initial model even if it fails a gate
    schedules: bool = True  # fixed-schedule baselines beside the loop (loop/schedules.py)
    inject_shift: str | None = None  # "temp+0.5sd": moved in the served traffic (loop/shift.py)
    shift_at: str | None = None  # its onset (ISO date); None: halfway through the replay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(project_dir: Path, port: int) -> subprocess.Popen:
    import requests

    exe = Path(sys.executable).parent / "mloop"
    cmd = [str(exe), "-C", str(project_dir), "serve", "--port", str(port)]
    log = open(project_dir / "serve.log", "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    deadline = time.time() + 180
    why = "no answer"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise MloopError(f"the server exited at start (see {project_dir / 'serve.log'})")
        try:
            r = requests.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            if r.ok:
                return proc
            why = r.text
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise MloopError(f"the server did not become ready in 180 s ({why}; see "
                     f"{project_dir / 'serve.log'})")


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_demo(opts: DemoOptions, *, progress: Callable[[str, dict[str, Any]], None] | None = None,
             confirm_override: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``opts.out/summary.json``).

    ``confirm_override`` is asked (with the question to show) when the initial model failed a
    gate and ``opts.allow_override`` is off; without it, or when it answers no, the demo
    raises ``GateFailedError`` and the champion stays unset."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import requests

    from mloop.loop.controller import load_state, loop_metrics, run_once
    from mloop.project import open_project
    from mloop.registry.training import gate_candidate, train_candidate

    say = progress or (lambda _kind, _info: None)
    t_start = time.perf_counter()
    shift = _shift_of(opts)  # a malformed --inject-shift fails here, before anything is made
    out = opts.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    project_dir = out / "project"
    shutil.copytree(opts.example, project_dir, ignore=shutil.ignore_patterns(".mloop"))
    project = open_project(project_dir)
    cfg = project.config

    # 1. the initial model, exactly as `mloop run` makes it
    say("phase", {"text": "training the initial model on Jan-Apr 2011"})
    first = train_candidate(project, gate=False).version
    gating = gate_candidate(project, first)
    override = None if gating.promoted else _promote_initial(project, first, gating.gates,
                                                              opts, say, confirm_override)
    overrides = [override] if override else []
    project = open_project(project_dir)

    # 2. the real server, in its own process
    port = opts.port or _free_port()
    say("phase", {"text": f"starting mloop serve on 127.0.0.1:{port}"})
    server = _start_server(project_dir, port)
    url = f"http://127.0.0.1:{port}"
    baselines = None
    try:
        table = pq.read_table(project_dir / cfg.data.path)  # type: ignore[operator]
        tcol = cfg.features.time_column or "datetime"
        start = datetime.fromisoformat(opts.start).replace(tzinfo=UTC)
        end = datetime.fromisoformat(opts.end).replace(tzinfo=UTC)
        ts = table.column(tcol)
        table = table.filter(pc.and_(
            pc.greater_equal(ts, start.replace(tzinfo=None)),
            pc.less(ts, end.replace(tzinfo=None)))).sort_by([(tcol, "ascending")])
        inputs = [c["name"] for c in requests.get(f"{url}/model", timeout=30).json()
                  ["champion"]["signature"]]
        if shift is not None:
            say("phase", {"text": f"injecting {shift.column} {shift.sd:+g} sd "
                                  f"({shift.delta:+.4g}) from {shift.onset.isoformat()}"})
        rows = table.to_pylist()
        baselines = _start_schedules(project_dir, cfg, start, end, opts) \
            if opts.schedules else None
        say("replay", {"total": len(rows)})

        def tell(kind: str, info: dict[str, Any]) -> None:
            if kind == "progress" and baselines is not None:
                baselines.poll()
                info = {**info, "baselines": (baselines.done, baselines.total)}
            say(kind, info)

        replay = _replay(project_dir, url, rows, inputs, tcol, cfg.target, opts, tell,
                         run_once, shift)
        serving_cpu = _scraped(requests.get(f"{url}/metrics", timeout=30).text,
                               "mloop_serving_cpu_seconds_per_1k_predictions")
    except BaseException:
        if baselines is not None:
            baselines.stop()
        raise
    finally:
        _stop_server(server)
    project = open_project(project_dir)
    run_once(project)  # the last windows, with every label in

    # 3. the story in numbers
    summary = _summarise(project, replay, first, tcol, cfg.target)
    answered, frozen_pred = summary.pop("_answered"), summary.pop("_frozen_pred")
    summary["overrides"] = overrides
    summary["loop"] = loop_metrics(project)
    if baselines is not None:
        say("phase", {"text": "fixed-schedule baselines: waiting for the last fits"})
        run = baselines.result(lambda d, n: say("phase", {
            "text": f"fixed-schedule baselines: {d}/{n} fits"}))
        summary.update(_compare_schedules(summary, run, answered, frozen_pred, end))
    if shift is not None:
        from mloop.loop.shift import measure_detection

        summary["injected_shift"] = measure_detection(project, shift).to_dict()
    rates = project.config.cost_rates
    summary["serving"] = {
        "cpu_seconds_per_1k_predictions": serving_cpu,
        "cost_per_1k_predictions": None if serving_cpu is None else
        round(serving_cpu / 3600 * rates.cpu_hour, 8), "currency": rates.currency}
    summary["history"] = [h.model_dump(mode="json") for h in load_state(project).history]
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    # the path as the user gave it (relative to where they ran the demo), quoted for a shell
    summary["ui_command"] = f"mloop -C {shlex.quote(str(opts.out / 'project'))} ui"
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from mloop.loop.report import loop_html

    (out / "loop.html").write_text(loop_html(project, summary), encoding="utf-8")
    return summary


def _shift_of(opts: DemoOptions) -> Any:
    """The requested shift (unscaled), its onset defaulting to halfway through the replay
    (midnight UTC); None when none is asked for."""
    if opts.inject_shift is None:
        return None
    from mloop.loop.shift import InjectedShift

    start = datetime.fromisoformat(opts.start).replace(tzinfo=UTC)
    end = datetime.fromisoformat(opts.end).replace(tzinfo=UTC)
    if opts.shift_at is not None:
        try:
            onset = datetime.fromisoformat(opts.shift_at)
        except ValueError:
            raise MloopError(f"--shift-at: '{opts.shift_at}' is not an ISO date or time "
                             f"(e.g. 2012-06-01)") from None
        onset = onset.replace(tzinfo=UTC) if onset.tzinfo is None else onset
        if not start < onset < end:
            raise MloopError(f"--shift-at: {opts.shift_at} is outside the replay "
                             f"({opts.start} to {opts.end})")
    else:
        onset = (start + (end - start) / 2).replace(hour=0, minute=0, second=0,
                                                    microsecond=0)
    shift = InjectedShift.parse(opts.inject_shift, onset)
    # in the column's units, from the rows before the replay (the initial model's training
    # period); checked against the example's inputs before anything is made
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mloop.config import load_config

    cfg = load_config(opts.example / "mloop.yaml")
    data = pq.read_table(opts.example / cfg.data.path)  # type: ignore[operator]
    tcol = cfg.features.time_column or "datetime"
    inputs = [c for c in data.column_names
              if c not in (cfg.target, tcol, *cfg.features.exclude)]
    before = data.filter(pc.less(data.column(tcol), start.replace(tzinfo=None)))
    return shift.with_scale(before.to_pandas(), inputs)


def _start_schedules(project_dir: Path, cfg: Any, start: datetime, end: datetime,
                     opts: DemoOptions) -> Any:
    """The fixed-schedule baselines, fitting in their own process while the replay runs:
    the loop's retrain window, the demo's label delay and the loop's recipe: the whole window
    when it refits once the gates pass (``loop.retrain.refit``), else the project's time
    split; scored on 2012 when the replay reaches it (else on the whole replay)."""
    from mloop.loop.schedules import BackgroundSchedules

    return BackgroundSchedules(
        project_dir / cfg.data.path, cfg, workdir=project_dir.parent / "schedules",
        start=start, end=end,
        window=cfg.loop.retrain.window, label_delay=timedelta(days=opts.label_delay_days),
        holdout=0.0 if cfg.loop.retrain.refit else cfg.split.holdout,
        score_from=_scored_from(end))


def _scored_from(end: datetime) -> datetime | None:
    """2012 is the year the summary scores; a replay that stops before it: the whole."""
    year = datetime(2012, 1, 1, tzinfo=UTC)
    return year if end > year else None


def _compare_schedules(summary: dict[str, Any], run: Any, answered: list[Any],
                       frozen_pred: np.ndarray, end: datetime) -> dict[str, Any]:
    """The schedules' MAE over the scored period beside the loop's, and where the loop
    sits against the schedules' MAE-vs-retrains curve (the frozen model is its 0-retrain
    point; between points, linear; past the weekly point, flat)."""
    from mloop.loop.schedules import score_schedules

    score_from = _scored_from(end)
    results = score_schedules(run, when=[a[1] for a in answered],
                              truth=np.array([a[2] for a in answered]),
                              initial=frozen_pred, score_from=score_from)
    key = "2012" if score_from is not None else "all"
    loop_mae, frozen_mae = summary[f"mae_{key}_loop"], summary[f"mae_{key}_frozen"]
    retrains = summary["loop"]["retrains"]
    points = sorted([(0, frozen_mae), *((r.retrains, r.mae) for r in results)])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    curve = float(np.interp(retrains, xs, ys)) if loop_mae is not None else None
    return {"schedules": [r.to_dict() for r in results],
            "schedule_setup": {
                "scored": key, "window_days": run.window.total_seconds() / 86400,
                "label_delay_days": run.label_delay.total_seconds() / 86400,
                "holdout": run.holdout,
                "distinct_fits": run.fitted, "seconds": run.seconds,
                "cpu_seconds": run.cpu_seconds},
            "loop_vs_schedules": {
                "retrains": retrains, "mae": loop_mae, "curve_mae": curve,
                "on_or_below_curve": None if curve is None else loop_mae <= curve + 1e-9}}


def _promote_initial(project: Any, version: int, gates: dict[str, Any], opts: DemoOptions,
                     say: Callable[[str, dict[str, Any]], None],
                     confirm: Callable[[str], bool] | None) -> dict[str, Any] | None:
    """Make the initial model champion though ``gate_candidate`` did not: its gates failed
    (an override, only when allowed or confirmed), or they passed with auto-promotion off
    (a plain promotion). Returns the override record for ``summary.json`` (None: none)."""
    from mloop.registry.promotion import promote

    failed = [{k: r.get(k) for k in ("gate", "value", "threshold", "message")}
              for r in gates["results"] if r["status"] == "fail"]
    if not failed:
        promote(project, version, reason="demo: the initial model (gates passed)")
        return None
    names = ", ".join(f["gate"] for f in failed)
    why = "; ".join(f"{f['gate']} ({f['message']})" for f in failed)
    model = project.config.model_name
    question = (f"The initial model v{version} of '{model}' failed gate(s) {why}. Promote it "
                f"anyway so the demo has a champion to serve (recorded as an override)?")
    if opts.allow_override:
        allowed_by = "--allow-override"
    elif confirm is not None and confirm(question):
        allowed_by = "confirmed at the prompt"
    else:
        raise GateFailedError(
            f"The initial model v{version} of '{model}' failed gate(s) {why}; the demo needs a "
            f"champion to serve and does not override a gate unless told to: rerun with "
            f"`mloop demo --allow-override` (recorded as an override in the model's history and "
            f"in summary.json), or change the gates in {project.root / 'mloop.yaml'}. Nothing "
            f"was started; champion unchanged (none).")
    reason = f"demo: initial model promoted despite failed gate(s) {names} ({allowed_by})"
    say("phase", {"text": f"OVERRIDE: initial model v{version} failed gate(s) {names}; "
                          f"promoting it anyway ({allowed_by}; recorded as an override)"})
    change = promote(project, version, reason=reason, force=True)
    return {"version": version, "failed_gates": failed, "reason": reason,
            "allowed_by": allowed_by, "action": change.action, "at": change.at}


def _replay(project_dir: Path, url: str, rows: list[dict[str, Any]], inputs: list[str],
            tcol: str, target: str, opts: DemoOptions, say: Callable, run_once: Callable,
            shift: Any = None) -> dict[str, Any]:
    """Send every hour in time order; labels follow after the delay; the controller runs
    every ``check_every_days`` of event time."""
    import orjson
    import urllib3

    from mloop.project import open_project

    # urllib3 straight: requests costs ~1 ms of client CPU per call, which over 14,593 hours
    # is more than the server spends answering them
    pool = urllib3.HTTPConnectionPool("127.0.0.1", int(url.rsplit(":", 1)[1]), maxsize=1,
                                      retries=False, timeout=60.0)

    def post(path: str, body: Any) -> tuple[int, Any]:
        r = pool.request("POST", path, body=orjson.dumps(body),
                         headers={"Content-Type": "application/json"})
        try:
            return r.status, orjson.loads(r.data) if r.data else None
        except orjson.JSONDecodeError:
            return r.status, r.data.decode(errors="replace")

    answered: list[tuple[str, datetime, float, int, str]] = []  # id, time, truth, version, role
    pending: list[tuple[datetime, str, float]] = []
    delay = timedelta(days=opts.label_delay_days)
    next_check: datetime | None = None
    passes = 0
    actions: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        when = row[tcol].replace(tzinfo=UTC)
        record = {k: (float(row[k]) if isinstance(row[k], int) and not isinstance(row[k], bool)
                      else row[k]) for k in inputs}
        if shift is not None:
            shift.apply(record, when)
        # the hour is the routing key: the canary split is the same on every run
        status, body = post("/predict", {"records": [record], "key": when.isoformat(),
                                         "timestamp": when.isoformat()})
        if status != 200:
            raise MloopError(f"the server answered {status} for the hour "
                             f"{when.isoformat()}: {str(body)[:300]}")
        rid = body["request_ids"][0]
        answered.append((rid, when, float(row[target]), body["version"], body["role"]))
        pending.append((when + delay, rid, float(row[target])))
        due = [p for p in pending if p[0] <= when]
        if due and (len(due) >= 24 or i == len(rows) - 1):
            pending = [p for p in pending if p[0] > when]
            status, fb = post("/feedback", {"labels": [
                {"request_id": rid_, "label": y} for _, rid_, y in due]})
            if status not in (200, 404):
                raise MloopError(f"feedback refused ({status}): {str(fb)[:300]}")
        if next_check is None:
            next_check = when + timedelta(days=opts.check_every_days)
        if when >= next_check:
            next_check = when + timedelta(days=opts.check_every_days)
            post("/flush", {})  # the log on disk holds every hour sent so far
            result = run_once(open_project(project_dir))
            passes += 1
            if result.get("next_due"):  # a verdict or a held retrain waits on the clock:
                wake = datetime.fromisoformat(result["next_due"])  # pass then, not a week on
                if when < wake < next_check:
                    next_check = wake
            for a in result["actions"]:
                actions.append({"at": result["now"], **{k: v for k, v in a.items()
                                                         if k != "triggers"}})
            if result["actions"]:
                post("/reload", {})
            say("progress", {"done": i + 1, "now": when.isoformat(), "actions":
                             result["actions"]})
    if pending:
        post("/feedback", {"labels": [{"request_id": rid_, "label": y}
                                      for _, rid_, y in pending]})
    post("/flush", {})
    return {"answered": answered, "passes": passes, "actions": actions}


def _summarise(project: Any, replay: dict[str, Any], frozen_version: int, tcol: str,
               target: str) -> dict[str, Any]:
    """MAE per month: what the loop served vs what the frozen first model would have."""
    import pyarrow.parquet as pq

    from mloop.serving.model import load_served

    answered = replay["answered"]
    log_preds = _served_predictions(project)
    table = pq.read_table(project.root / project.config.data.path)
    frame = table.to_pandas()
    frame["when"] = frame[tcol].dt.tz_localize("UTC")
    by_time = frame.set_index("when")
    frozen = load_served(project, frozen_version)
    rows = by_time.loc[[a[1] for a in answered]]
    cols = {c: [None if (isinstance(v, float) and v != v) else v for v in rows[c].tolist()]
            for c in frozen.schema.names}
    frozen_pred = np.asarray(frozen.predict_frame(frozen.schema.frame(cols)), dtype=float)
    months: dict[str, dict[str, list[float]]] = {}
    for (rid, when, truth, version, _role), fp in zip(answered, frozen_pred, strict=True):
        served = log_preds.get(rid)
        if served is None:
            continue
        m = months.setdefault(when.strftime("%Y-%m"), {"loop": [], "frozen": [],
                                                        "versions": []})
        m["loop"].append(abs(served - truth))
        m["frozen"].append(abs(fp - truth))
        m["versions"].append(version)
    monthly = [{"month": k, "hours": len(v["loop"]), "mae_loop": float(np.mean(v["loop"])),
                "mae_frozen": float(np.mean(v["frozen"])),
                "versions": sorted(set(v["versions"]))} for k, v in sorted(months.items())]

    def overall(year: str, key: str) -> float | None:
        vals = [x for k, v in months.items() if k.startswith(year) for x in v[key]]
        return float(np.mean(vals)) if vals else None

    return {"months": monthly,
            "mae_2012_loop": overall("2012", "loop"), "mae_2012_frozen": overall("2012",
                                                                                 "frozen"),
            "mae_all_loop": overall("20", "loop"), "mae_all_frozen": overall("20", "frozen"),
            "requests": len(answered), "controller_passes": replay["passes"],
            "actions": replay["actions"], "frozen_version": frozen_version,
            "_answered": answered, "_frozen_pred": frozen_pred}


def _served_predictions(project: Any) -> dict[str, float]:
    from mloop.monitoring.windows import read_rows

    table = read_rows(project.log_store)
    return dict(zip(table.column("_request_id").to_pylist(),
                    table.column("_prediction").to_pylist(), strict=True))


def _scraped(text: str, name: str) -> float | None:
    """One sample's value from a Prometheus exposition (the server's /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return round(float(sample.value), 4)
    return None
