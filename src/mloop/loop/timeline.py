"""What served when, why it was put there, how it drifted and performed, and what the loop
did: one record on one clock, read from what the store already holds.

Monitoring windows and the controller's retrains are stamped in *event time* (the inference
log's clock: a replay of 2011 traffic has 2011 windows). Deployment rows and audit events are
stamped in *wall time* (when the alias moved). To lay both on one axis, wall time is mapped to
event time through the windows themselves: each window records when it was evaluated (wall)
and where it ends (event), so a change made at wall time ``w`` happened just after the newest
window evaluated before ``w`` (:class:`EventClock`). Live, the two clocks differ by the
window's lateness; in a replay they differ by years, and the mapping is what keeps the story
readable. Nothing here rescans the inference log: windows, deployments, events and the loop
state are precomputed rows.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mloop.loop.state import Retrain, load_state
from mloop.monitoring.windows_store import (
    count_windows,
    list_windows,
    window_signals,
    window_spec,
)
from mloop.project import Project
from mloop.security.audit import list_events
from mloop.store.db import as_utc
from mloop.store.models import DeploymentRow, EventRow, MonitorWindowRow

# alias changes (change_alias writes the action as the event kind) and the loop's verdicts
ALIAS_ACTIONS = ("promote", "rollback", "override", "canary", "shadow", "stop")
LOOP_VERDICTS = ("loop.candidate_rejected", "loop.probation_rollback", "loop.retrain_failed",
                 "loop.promotion_refused")


# a deployment row and its event are written in one transaction, milliseconds apart; a
# replay makes decisions a second or less apart, so the nearest anchor within this wins
ANCHOR_SLACK = timedelta(milliseconds=250)


class EventClock:
    """Wall time -> event time, from (evaluated_at, end) of the stored windows.

    After the newest evaluation at or before ``w`` the clock runs at wall speed, but never
    past the next evaluation's window end, so order is kept both live (where the two clocks
    run together) and in a replay (where hours of event time pass in a wall second). Before
    the first evaluation, the first window's start.
    """

    def __init__(self, points: list[tuple[datetime, datetime]], origin: datetime | None,
                 anchors: Sequence[tuple[datetime, datetime]] = ()) -> None:
        points = sorted(points)
        # exact event times known for some wall instants (the loop's decisions): a wall
        # time within ANCHOR_SLACK of one is that event time
        self._anchors = sorted(anchors)
        self._walls = [w for w, _ in points]
        self._ends = [e for _, e in points]
        # the event clock never runs backwards: a window evaluated later may end earlier
        for i in range(1, len(self._ends)):
            self._ends[i] = max(self._ends[i], self._ends[i - 1])
        self.origin = origin

    def __call__(self, wall: datetime) -> datetime:
        wall = as_utc(wall)
        j = bisect.bisect_left(self._anchors, (wall,))
        near = min(self._anchors[max(j - 1, 0):j + 1], default=None,
                   key=lambda a: abs(a[0] - wall))
        if near is not None and abs(near[0] - wall) <= ANCHOR_SLACK:
            return near[1]
        i = bisect.bisect_right(self._walls, wall) - 1
        if i < 0:
            return self.origin if self.origin is not None else wall
        at = self._ends[i] + (wall - self._walls[i])
        if i + 1 < len(self._ends):
            at = min(at, self._ends[i + 1])
        return at


@dataclass(frozen=True)
class Stint:
    """One deployment row on the event clock: ``version`` held ``alias`` with ``traffic``
    share (a champion's 1.0 is shared with a canary while one runs)."""

    version: int
    alias: str  # champion | challenger
    action: str  # promote | rollback | override | canary | shadow
    traffic: float
    start: datetime
    end: datetime | None  # None: still serving
    started_wall: datetime
    ended_wall: datetime | None
    actor: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """A change of what serves, or the loop's refusal to make one, with its reason."""

    at: datetime  # event clock
    wall: datetime
    kind: str  # an ALIAS_ACTIONS kind, or rejected | rolled_back | retrain_failed | refused
    version: int | None
    replaced: int | None
    alias: str | None
    actor: str
    reason: str
    event_id: int


@dataclass
class Timeline:
    model: str
    window: str  # the window spec of ``windows``
    start: datetime | None
    end: datetime | None
    stints: list[Stint] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)  # oldest first
    windows: list[dict[str, Any]] = field(default_factory=list)  # window_summary rows
    retrains: list[dict[str, Any]] = field(default_factory=list)  # Retrain, as JSON
    window_count: int = 0  # stored windows in the span; more than len(windows) when bucketed
    bucketed: bool = False  # ``windows`` are buckets of windows (see bucket_windows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_VERDICT_KIND = {"loop.candidate_rejected": "rejected", "loop.probation_rollback":
                 "rolled_back", "loop.retrain_failed": "retrain_failed",
                 "loop.promotion_refused": "refused"}


def _anchors(retrains: list[Retrain], events: list[EventRow],
             deployments: Sequence[DeploymentRow] = ()) -> list[tuple[datetime, datetime]]:
    """(wall, event time) of the decisions the controller took: it records the event time of
    each retrain (its canary starts then) and of its verdict (promoted or rolled back). A
    deployment row is written with its decision's event, so its start is anchored too (the
    Overview reads open deployments without the events that made them)."""
    exact: dict[tuple[str, int], datetime] = {}
    for r in retrains:
        if r.version is None:
            continue
        exact[("canary", r.version)] = r.triggered_at
        exact[("rejected", r.version)] = r.triggered_at
        if r.decided_at is not None:
            exact[("promote", r.version)] = exact[("stop", r.version)] = r.decided_at
            exact[("rolled_back", r.version)] = r.decided_at
    out = []
    for e in events:
        p = e.payload or {}
        kind = _VERDICT_KIND.get(e.kind, e.kind)
        version = p.get("version") if kind != "stop" else p.get("replaced")
        if isinstance(version, int) and (kind, version) in exact:
            out.append((as_utc(e.at), exact[(kind, version)]))
    out += [(as_utc(d.started_at), exact[(d.action, d.version)]) for d in deployments
            if (d.action, d.version) in exact]
    return out


def event_clock(project: Project, spec: str,
                anchors: Sequence[tuple[datetime, datetime]] = (),
                walls: Sequence[datetime] | None = None) -> EventClock:
    """The wall -> event mapping of the project's model, from its ``spec`` windows (and
    ``anchors``, instants whose event time is known).

    With ``walls`` (the only instants the caller will place) the clock holds just the points
    those need, each read through an index: the newest evaluation at or before the instant
    with the running maximum of window ends, and the next evaluation after it. It maps those
    instants exactly as the clock over every window does, at a cost that does not grow with
    the windows (the Overview places a handful of instants on a store of 10,000 windows)."""
    name = project.config.model_name
    where = (MonitorWindowRow.model == name, MonitorWindowRow.spec == spec)
    points: set[tuple[datetime, datetime]] = set()
    with project.store.session() as s:
        origin = s.scalar(sa.select(MonitorWindowRow.start).where(*where)
                          .order_by(MonitorWindowRow.start).limit(1))
        if walls is None:
            rows = s.execute(sa.select(MonitorWindowRow.evaluated_at, MonitorWindowRow.end)
                             .where(*where)).all()
            points = {(as_utc(r.evaluated_at), as_utc(r.end)) for r in rows}
        for wall in sorted({as_utc(w) for w in walls or ()}):
            last, reach = s.execute(sa.select(
                sa.func.max(MonitorWindowRow.evaluated_at), sa.func.max(MonitorWindowRow.end))
                .where(*where, MonitorWindowRow.evaluated_at <= wall)).one()
            if last is not None:
                points.add((as_utc(last), as_utc(reach)))
            after = s.execute(sa.select(MonitorWindowRow.evaluated_at, MonitorWindowRow.end)
                              .where(*where, MonitorWindowRow.evaluated_at > wall)
                              .order_by(MonitorWindowRow.evaluated_at, MonitorWindowRow.end)
                              .limit(1)).first()
            if after is not None:
                points.add((as_utc(after.evaluated_at), as_utc(after.end)))
    return EventClock(sorted(points), as_utc(origin) if origin is not None else None,
                      list(anchors))


def _reason(payload: dict[str, Any]) -> str:
    if payload.get("reason"):
        return str(payload["reason"])
    if payload.get("failed_gates"):
        return f"failed gates {payload['failed_gates']}"
    return str(payload.get("error") or "")


def bucket_windows(rows: Sequence[dict[str, Any]], start: datetime, end: datetime,
                   buckets: int) -> list[dict[str, Any]]:
    """``rows`` (window_signals, oldest first) summarised into at most ``buckets`` equal
    spans of event time between ``start`` and ``end``, each shaped like a window summary so
    a chart draws it the same way: the span it covers (first start to last end), the largest
    drift share (a drifting hour stays visible among calm ones), the mean realized metric with
    its min and max, the mean holdout reference and label coverage, the rows summed, and
    ``windows``, how many it holds. A chart has ~1000 pixel columns: 10,000 windows drawn one
    mark each made the timeline a 4 MB page that took seconds to build."""
    span = (end - start).total_seconds() or 1.0
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        mid = r["start"] + (r["end"] - r["start"]) / 2
        k = min(max(int((mid - start).total_seconds() / span * buckets), 0), buckets - 1)
        groups.setdefault(k, []).append(r)
    out = []
    for k in sorted(groups):
        g = groups[k]
        values = [r["metric_value"] for r in g if r["metric_value"] is not None]
        refs = [r["reference_metric"] for r in g if r["reference_metric"] is not None]
        shares = [r["drift_share"] for r in g if r["drift_share"] is not None]
        out.append({
            "id": None, "start": g[0]["start"].isoformat(),
            "end": max(r["end"] for r in g).isoformat(), "windows": len(g),
            "rows": sum(r["rows"] for r in g), "versions": None,
            "drifted": any(r["drifted"] for r in g),
            "drifted_windows": sum(1 for r in g if r["drifted"]),
            "drift_share": max(shares) if shares else None,
            "prediction_drifted": any(r["prediction_drifted"] for r in g),
            "quality_findings": sum(r["quality_findings"] or 0 for r in g),
            "metric": next((r["metric"] for r in g if r["metric"]), None),
            "metric_value": sum(values) / len(values) if values else None,
            "metric_min": min(values, default=None), "metric_max": max(values, default=None),
            "reference_metric": sum(refs) / len(refs) if refs else None,
            "label_coverage": sum(r["label_coverage"] or 0.0 for r in g) / len(g)})
    return out


def timeline(project: Project, *, window: str | None = None, max_windows: int = 20_000,
             max_events: int = 5_000, since: datetime | None = None,
             until: datetime | None = None, max_marks: int = 1_000) -> Timeline:
    """The model's timeline: deployments, decisions, windows and retrains on the event clock.

    ``window`` picks the window size (default ``monitoring.window``); the newest
    ``max_windows`` windows and ``max_events`` decision events are read. ``since``/``until``
    (event time) narrow it to a span. When the span holds more than ``max_marks`` windows
    they are summarised into ``max_marks`` buckets (:func:`bucket_windows`); deployments and
    decisions are always kept one by one (they are few).
    """
    name = project.config.model_name
    spec = window_spec(project, window)
    since, until = as_utc(since), as_utc(until)
    history = load_state(project).history
    events = [e for e in reversed(list_events(project.store, limit=max_events,
                                              kinds=ALIAS_ACTIONS + LOOP_VERDICTS))
              if (e.payload or {}).get("model") in (None, name)]
    clock = event_clock(project, spec, _anchors(history, events))
    count = min(count_windows(project, spec, since=since, until=until), max_windows)
    bucketed = count > max_marks
    if bucketed:
        signals = window_signals(project, spec, since=since, until=until)[-max_windows:]
    else:
        windows = list_windows(project, window=spec, limit=max_windows, since=since,
                               until=until)
    with project.store.session() as s:
        rows = list(s.scalars(sa.select(DeploymentRow).where(DeploymentRow.model == name)
                              .order_by(DeploymentRow.started_at, DeploymentRow.id)))
    stints = [Stint(version=r.version, alias=r.alias, action=r.action, traffic=r.traffic,
                    start=clock(r.started_at),
                    end=clock(r.ended_at) if r.ended_at is not None else None,
                    started_wall=as_utc(r.started_at), ended_wall=as_utc(r.ended_at),
                    actor=r.actor, reason=r.reason) for r in rows]
    decisions = []
    for e in events:
        p = e.payload or {}
        decisions.append(Decision(
            at=clock(e.at), wall=as_utc(e.at), kind=_VERDICT_KIND.get(e.kind, e.kind),
            version=p.get("version"), replaced=p.get("replaced"), alias=p.get("alias"),
            actor=e.actor, reason=_reason(p), event_id=e.id))
    retrains = [h.model_dump(mode="json") for h in history]
    last_end = (signals[-1]["end"] if signals else None) if bucketed else (
        as_utc(datetime.fromisoformat(windows[-1]["end"])) if windows else None)
    times = [t for t in ([clock.origin] if clock.origin else []) + [last_end] +
             [st.start for st in stints] + [d.at for d in decisions] if t is not None]
    start = since or min(times, default=None)
    end = until or max(times, default=None)
    if start is not None and end is not None and end - start < timedelta(hours=1):
        end = start + timedelta(hours=1)
    if since is not None or until is not None:
        # what happened inside the span: stints overlapping it, decisions and retrains in it
        lo = since or datetime.min.replace(tzinfo=UTC)
        hi = until or datetime.max.replace(tzinfo=UTC)
        stints = [st for st in stints if st.start < hi and (st.end is None or st.end > lo)]
        decisions = [d for d in decisions if lo <= d.at <= hi]
        retrains = [r for r in retrains
                    if lo <= as_utc(datetime.fromisoformat(r["triggered_at"])) <= hi]
    if bucketed:
        assert start is not None and end is not None  # there are windows
        windows = bucket_windows(signals, start, end, max_marks)
    return Timeline(model=name, window=spec, start=start, end=end, stints=stints,
                    decisions=decisions, windows=windows, retrains=retrains,
                    window_count=count, bucketed=bucketed)


def timeline_head(project: Project, *, window: str | None = None,
                  decisions: int = 8) -> Timeline:
    """The end of the timeline, what the Overview shows: the open deployments (since when, in
    event time), the last ``decisions`` and the newest window. Only the instants those need
    are placed on the event clock (:func:`event_clock` with ``walls``), so its cost does not
    grow with the stored windows, deployments or events."""
    name = project.config.model_name
    spec = window_spec(project, window)
    history = load_state(project).history
    # other models' events share the chain: read a few more than shown, keep this model's
    found = list_events(project.store, limit=decisions * 8, kinds=ALIAS_ACTIONS + LOOP_VERDICTS)
    events = [e for e in reversed(found)
              if (e.payload or {}).get("model") in (None, name)][-decisions:]
    with project.store.session() as s:
        rows = list(s.scalars(sa.select(DeploymentRow).where(
            DeploymentRow.model == name, DeploymentRow.ended_at.is_(None))
            .order_by(DeploymentRow.started_at, DeploymentRow.id)))
    clock = event_clock(project, spec, _anchors(history, events, rows),
                        walls=[r.started_at for r in rows] + [e.at for e in events])
    stints = [Stint(version=r.version, alias=r.alias, action=r.action, traffic=r.traffic,
                    start=clock(r.started_at), end=None, started_wall=as_utc(r.started_at),
                    ended_wall=None, actor=r.actor, reason=r.reason) for r in rows]
    out = [Decision(at=clock(e.at), wall=as_utc(e.at), kind=_VERDICT_KIND.get(e.kind, e.kind),
                    version=(e.payload or {}).get("version"),
                    replaced=(e.payload or {}).get("replaced"),
                    alias=(e.payload or {}).get("alias"), actor=e.actor,
                    reason=_reason(e.payload or {}), event_id=e.id) for e in events]
    windows = list_windows(project, window=spec, limit=1)
    return Timeline(model=name, window=spec, start=None, end=None, stints=stints,
                    decisions=out, windows=windows, window_count=len(windows))


@dataclass(frozen=True)
class ServedAt:
    """What served at one instant, why it was there, and the one it replaced."""

    at: datetime
    champion: Stint | None
    challenger: Stint | None
    previous: Stint | None  # the champion stint before ``champion``
    previous_end: Decision | None  # the decision that ended ``previous``
    windows: list[dict[str, Any]]  # the windows that contain ``at``


def served_at(tl: Timeline, at: datetime) -> ServedAt:
    """Read off a timeline what served at ``at`` (event clock)."""
    at = as_utc(at)

    def holding(alias: str) -> Stint | None:
        found = [s for s in tl.stints if s.alias == alias and s.start <= at
                 and (s.end is None or s.end > at)]
        return found[-1] if found else None

    champion, challenger = holding("champion"), holding("challenger")
    previous = end_of_previous = None
    if champion is not None:
        earlier = [s for s in tl.stints if s.alias == "champion" and s.start < champion.start
                   and s.version != champion.version]
        previous = earlier[-1] if earlier else None
    if previous is not None:
        # why the previous champion left: the decision that replaced it
        ends = [d for d in tl.decisions if d.replaced == previous.version
                and d.alias == "champion" and d.wall >= previous.started_wall]
        end_of_previous = ends[0] if ends else None
    inside = [w for w in tl.windows if datetime.fromisoformat(w["start"]) <= at
              < datetime.fromisoformat(w["end"])]
    return ServedAt(at, champion, challenger, previous, end_of_previous, inside)
