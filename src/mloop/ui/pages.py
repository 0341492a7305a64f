"""The read pages: each a plain endpoint that calls the services the CLI calls and renders
one template. Endpoints are sync: Starlette runs them in its thread pool, so a slow store
read never blocks the event loop."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mloop.errors import MloopError
from mloop.timeparse import parse_iso_time
from mloop.ui.auth import require_reader
from mloop.ui.params import int_param
from mloop.ui.render import render


def _parse_day(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parse_iso_time(text)
    except ValueError:
        raise MloopError(f"'{text}' is not a date or ISO time (e.g. 2012-03-20 or "
                         f"2012-03-20T12:00)") from None


def overview(request: Request) -> Response:
    """Who serves (champion, challenger, mode, weight, since), the loop's state, the newest
    window's signals and the last decisions."""
    from mloop.loop.state import load_state
    from mloop.loop.timeline import timeline_head
    from mloop.registry.promotion import history
    from mloop.serving.deploy import desired_state
    from mloop.ui.monitoring_pages import overview_signals

    require_reader(request)
    project = request.app.state.project
    state = desired_state(project)
    hist = history(project)
    open_rows = {d["alias"]: d for d in hist["deployments"] if d["ended_at"] is None}
    tl = timeline_head(project)  # not the whole timeline: its clock spans every window
    since = {s.alias: s for s in tl.stints if s.end is None}
    loop = load_state(project)
    cfg = project.config.loop
    cooldown_until = (loop.last_retrain_at + cfg.guards.cooldown
                      if loop.last_retrain_at is not None else None)
    latest = tl.windows[-1] if tl.windows else None
    return render(request, "overview.html", page="overview", state=state,
                  open_rows=open_rows, since=since, loop=loop, cooldown_until=cooldown_until,
                  latest=latest, decisions=list(reversed(tl.decisions))[:8],
                  alias_drift=hist["drift"], margin=project.config.monitoring.performance_margin,
                  **overview_signals(request, latest))


def timeline_page(request: Request) -> Response:
    """The centrepiece: what served when, why, how it drifted and performed. ``from``/``to``
    narrow it to a span of event time; with more windows than the chart has pixel columns
    they are drawn in buckets (the answer to "what served on" still reads its own window)."""
    from dataclasses import replace

    from mloop.loop.timeline import served_at, timeline
    from mloop.monitoring.windows_store import list_windows
    from mloop.ui.charts import DECISION_STYLE, colour, timeline_svg

    require_reader(request)
    project = request.app.state.project
    t0 = time.perf_counter()
    since = _parse_day(request.query_params.get("from"))
    to = request.query_params.get("to")
    until = _parse_day(to)
    if until is not None and to is not None and len(to) == 10:
        until += timedelta(days=1)  # a day given as "to" is included
    if since is not None and until is not None and until <= since:
        raise MloopError(f"from {since:%Y-%m-%d %H:%M} is not before to "
                         f"{until:%Y-%m-%d %H:%M}")
    tl = timeline(project, since=since, until=until)
    at = _parse_day(request.query_params.get("at"))
    answer = served_at(tl, at) if at is not None else None
    if answer is not None and at is not None and tl.bucketed:
        # the chart's buckets summarise many windows: the answer names the window itself
        answer = replace(answer, windows=list_windows(
            project, window=tl.window, limit=10, since=at, until=at + timedelta(microseconds=1)))
    recent = []
    if answer is not None:
        recent = [d for d in tl.decisions if d.at <= at][-4:] if at else []
    return render(request, "timeline.html", page="timeline", tl=tl,
                  chart=timeline_svg(tl), at=at, answer=answer, recent=recent,
                  styles=DECISION_STYLE, colour=colour, since=since, until=until,
                  decisions=list(reversed(tl.decisions)),
                  seconds=time.perf_counter() - t0)


def versions_page(request: Request) -> Response:
    from mloop.serving.deploy import desired_state
    from mloop.status import model_versions

    require_reader(request)
    project = request.app.state.project
    rows = model_versions(project, limit=500)
    state = desired_state(project)
    newest = rows[0]["version"] if rows else None
    # the form's defaults: the newest version against the champion (or the one before it)
    base = state.champion if state.champion not in (None, newest) else (
        rows[1]["version"] if len(rows) > 1 else None)
    return render(request, "versions.html", page="versions", versions=rows, state=state,
                  a=base, b=newest)


def version_page(request: Request) -> Response:
    from mloop.registry.gate_report import latest_gate_report
    from mloop.registry.lineage import lineage
    from mloop.registry.promotion import history
    from mloop.serving.deploy import desired_state
    from mloop.ui.links import project_mlflow_ui

    require_reader(request)
    project = request.app.state.project
    version = int(request.path_params["version"])
    lin = lineage(project, version)
    report = latest_gate_report(project, version)
    deployments = [d for d in history(project)["deployments"] if d["version"] == version]
    served_before = any(d["alias"] == "champion" for d in deployments)
    return render(request, "version.html", page="versions", lin=lin, version=version,
                  report=report, deployments=deployments, state=desired_state(project),
                  served_before=served_before, mlflow=project_mlflow_ui(project))


def audit_page(request: Request) -> Response:
    """Events with a kind filter, and the chain's status: checked incrementally on each visit
    (only the events appended since the last check are rehashed), fully on first visit and
    when asked (``?verify=all``, the page's button)."""
    from mloop.security.audit import event_kinds, list_events

    require_reader(request)
    project = request.app.state.project
    kind = request.query_params.get("kind") or None
    limit = int_param(request, "limit", default=200, high=5000)
    events = list_events(project.store, limit=limit, kind=kind)
    chain, full_at = check_chain(request.app.state,
                                 full=request.query_params.get("verify") == "all")
    return render(request, "audit.html", page="audit", events=events, chain=chain,
                  full_at=full_at, kind=kind or "", kinds=event_kinds(project.store),
                  limit=limit)


def check_chain(state: Any, *, full: bool = False) -> tuple[Any, datetime]:
    """The audit chain's status for the dashboard, and when the last full check ran. The
    last intact report is kept on the app (one per process): a visit rehashes only what was
    appended since, a broken chain or ``full`` rechecks everything."""
    from mloop.security.audit import verify_chain

    with state.chain_lock:
        last, full_at = getattr(state, "chain", None), getattr(state, "chain_full_at", None)
        if full or last is None or not last.ok or full_at is None:
            last, full_at = verify_chain(state.project.store), datetime.now(UTC)
        else:
            last = verify_chain(state.project.store, since=last)
        state.chain, state.chain_full_at = last, full_at
    return last, full_at


def monitoring_page(request: Request) -> Response:
    from mloop.monitoring.windows_store import count_windows, list_windows, window_spec
    from mloop.ui.charts import heatmap_svg
    from mloop.ui.monitoring_pages import window_href

    require_reader(request)
    project = request.app.state.project
    spec = window_spec(project, request.query_params.get("window"))
    limit = int_param(request, "limit", default=120, high=2000)
    windows = list_windows(project, window=spec, limit=limit, with_reports=True)
    scores: dict[tuple[int, str], tuple[float, float, bool]] = {}
    features: list[str] = []
    for w in windows:
        for c in ((w.get("report") or {}).get("drift") or {}).get("columns", []):
            if c["column"] not in features:
                features.append(c["column"])
            # a test decided by its p-value (chi-square) has no score threshold: its score is
            # the effect size, shaded against the smallest effect that counts as drift
            threshold = c.get("threshold")
            if threshold is None:
                threshold = c.get("min_effect") or 0.0
            # temporally calibrated: the score must clear the larger of the two thresholds
            threshold = max(threshold, c.get("temporal_threshold") or 0.0)
            scores[(w["id"], c["column"])] = (float(c.get("score") or 0.0), float(threshold),
                                              bool(c["drifted"]))
        w.pop("report", None)
    href = window_href(request.scope.get("root_path", ""))
    return render(request, "monitoring.html", page="monitoring", spec=spec,
                  windows=windows, total=count_windows(project, spec),
                  heatmap=heatmap_svg(windows, features, scores, href=href), features=features)


def loop_page(request: Request) -> Response:
    from mloop.loop.controller import loop_metrics
    from mloop.loop.state import load_state

    require_reader(request)
    project = request.app.state.project
    state = load_state(project)
    return render(request, "loop.html", page="loop", state=state,
                  metrics=loop_metrics(project, state), cfg=project.config.loop)
