"""The controller: one pass = monitor new windows, judge a canary on probation, check the
triggers, act (retrain → gate → canary, or alert), record.

It uses the same services as the CLI (``run_monitor``, ``evaluate_gates``,
``deploy_challenger``, ``promote``, ``stop_challenger``). Its clock is the inference log's
event time (the watermark), so cooldowns and probations mean the same thing for live traffic
and for a replay. Its progress (last window seen, drift streak, retrain in flight, probation,
history: :class:`mloop.loop.state.LoopState`) is one row in mloop's store, saved after every
step with a revision check: a ``kill -9`` followed by a restart resumes from the last saved
step and never repeats an action that completed; a retrain interrupted mid-way is recorded as
such (its pipeline run marked failed) and not silently redone. A pass acts only while it holds
the model's lease (:mod:`mloop.loop.lease`), so two controllers never act at once, whatever
runs them. Every decision is an event in the audit chain with what it was based on.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from mloop.errors import MloopError, StaleStateError
from mloop.loop.cost import budget_guard
from mloop.loop.lease import LoopLease
from mloop.loop.retrain import (
    build_training_data,
    count_labelled_since,
    event_time_now,
    retrain,
)
from mloop.loop.state import (
    DriftTrigger,
    EstimatedPerformanceTrigger,
    FeatureTrigger,
    InFlight,
    LoopState,
    NewLabelsTrigger,
    PerformanceTrigger,
    Probation,
    Retrain,
    ScheduleTrigger,
    Trigger,
    load_state,
    save_state,
)
from mloop.project import Project
from mloop.registry.gate_report import gates_config_hash
from mloop.security.audit import append_event
from mloop.store.models import MonitorWindowRow

# the state is read and written through these; importable from here as before
__all__ = ["LoopState", "check_guards", "check_triggers", "judge_probation", "load_state",
           "loop_metrics", "next_due", "run_once", "save_state"]


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _dumped(triggers: list[Trigger]) -> list[dict[str, Any]]:
    """Triggers as events and ``run_once`` report them: plain JSON."""
    return [t.model_dump(mode="json") for t in triggers]


def _event(project: Project, kind: str, payload: dict[str, Any]) -> None:
    append_event(project.store, f"loop.{kind}",
                 {"model": project.config.model_name, **payload})


# ------------------------------------------------------------------------------ triggers

def _new_windows(project: Project, after_id: int) -> list[MonitorWindowRow]:
    spec = project.config.monitoring.window
    with project.store.session() as s:
        return list(s.scalars(sa.select(MonitorWindowRow).where(
            MonitorWindowRow.model == project.config.model_name,
            MonitorWindowRow.spec == spec, MonitorWindowRow.id > after_id)
            .order_by(MonitorWindowRow.seq)))


def _recent_windows(project: Project, n: int) -> list[MonitorWindowRow]:
    spec = project.config.monitoring.window
    with project.store.session() as s:
        rows = list(s.scalars(sa.select(MonitorWindowRow).where(
            MonitorWindowRow.model == project.config.model_name,
            MonitorWindowRow.spec == spec).order_by(MonitorWindowRow.seq.desc()).limit(n)))
    return list(reversed(rows))


def check_triggers(project: Project, state: LoopState, new: list[MonitorWindowRow],
                   now: datetime, champion: int | None = None) -> list[Trigger]:
    """Which triggers fire, each with what it saw. Updates the drift and estimate streaks in
    ``state``.
    Only windows judged against the current champion count: drift from an older model's
    reference says nothing about the model serving now."""
    from mloop.metrics import HIGHER_IS_BETTER

    t = project.config.loop.triggers
    if champion is not None:
        new = [w for w in new if w.reference_version in (None, champion)]
    fired: list[Trigger] = []
    streak, onset = state.drift_streak, state.drift_onset
    for w in new:
        if w.drifted:
            streak += 1
            onset = onset or w.start
        else:
            streak, onset = 0, None
    state.drift_streak, state.drift_onset = streak, onset
    if t.drift is not None and streak >= t.drift.consecutive:
        fired.append(DriftTrigger(
            streak=streak, onset=state.drift_onset,
            windows=[w.id for w in new if w.drifted][-t.drift.consecutive:],
            drift_share=[w.drift_share for w in new][-t.drift.consecutive:]))
    for name in t.features:
        for w in new:
            cols = ((w.report or {}).get("drift") or {}).get("columns", [])
            hit = next((c for c in cols if c["column"] == name and c["drifted"]), None)
            if hit is not None:
                fired.append(FeatureTrigger(feature=name, window=w.id, score=hit["score"],
                                            threshold=hit["threshold"],
                                            min_effect=hit["min_effect"], onset=w.start))
                break
    if t.performance is not None:
        for w in reversed(_recent_windows(project, 30)):
            if champion is not None and w.reference_version not in (None, champion):
                continue
            if w.id <= state.performance_seen_window \
                    or w.labelled_rows < t.performance.min_labelled \
                    or w.metric_value is None or w.reference_metric is None:
                continue
            higher = HIGHER_IS_BETTER.get(w.metric or "", False)
            ref = w.reference_metric
            worse = (w.metric_value < ref * (1 - t.performance.margin)) if higher else \
                (w.metric_value > ref * (1 + t.performance.margin))
            if worse:
                state.performance_seen_window = w.id
                fired.append(PerformanceTrigger(
                    window=w.id, metric=w.metric, value=w.metric_value, reference=ref,
                    margin=t.performance.margin, label_coverage=w.label_coverage,
                    onset=w.start))
            break  # only the newest window with enough labels counts
    if t.estimated_performance is not None:
        fired.extend(_estimated_performance(state, new, t.estimated_performance.margin,
                                            t.estimated_performance.consecutive))
    last = state.last_retrain_at or state.started_at
    if t.schedule is not None and last is not None and now - last >= t.schedule:
        fired.append(ScheduleTrigger(every=str(t.schedule), since=last))
    if t.new_labels is not None:
        n = count_labelled_since(project, state.last_retrain_at)
        if n >= t.new_labels:
            fired.append(NewLabelsTrigger(labelled_rows=n, threshold=t.new_labels))
    return fired


def _estimated_performance(state: LoopState, new: list[MonitorWindowRow], margin: float,
                           consecutive: int) -> list[Trigger]:
    """The estimated-performance trigger over the new windows (judged against the champion):
    extends or breaks the streak of windows whose calibrated label-free estimate is worse than
    the version's holdout value by ``margin``; fires while the streak is ``consecutive``
    long, as the drift trigger does. A window without an estimate, or with one its holdout
    check did not trust, breaks the streak: an uncalibrated estimate never fires it."""
    streak, onset = state.estimate_streak, state.estimate_onset
    worse: list[tuple[MonitorWindowRow, dict[str, Any]]] = []
    for w in new:
        est = estimate_worse(w.report or {}, margin)
        if est is not None:
            streak += 1
            onset = onset or w.start
            worse.append((w, est))
        else:
            streak, onset, worse = 0, None, []
    state.estimate_streak, state.estimate_onset = streak, onset
    if streak < consecutive:
        return []
    last = worse[-consecutive:]
    est = last[-1][1] if last else {}
    return [EstimatedPerformanceTrigger(
        streak=streak, windows=[w.id for w, _ in last], metric=est.get("metric"),
        method=est.get("method"), values=[float(e["value"]) for _, e in last],
        reference=est.get("reference"), margin=margin, onset=onset)]


def estimate_worse(report: dict[str, Any], margin: float) -> dict[str, Any] | None:
    """The window's label-free estimate if it is calibrated and worse than its version's
    holdout value by ``margin`` (relative, in the metric's direction); else None."""
    from mloop.metrics import HIGHER_IS_BETTER

    est = report.get("estimated") or {}
    value, ref = est.get("value"), est.get("reference")
    if est.get("status") != "calibrated" or value is None or ref is None:
        return None
    higher = HIGHER_IS_BETTER.get(est.get("metric") or "", False)
    bad = value < ref * (1 - margin) if higher else value > ref * (1 + margin)
    return est if bad else None


def check_guards(project: Project, state: LoopState, now: datetime) -> str | None:
    """Why a retrain may not start now (None: it may)."""
    g = project.config.loop.guards
    if state.in_flight is not None:
        return "a retrain is already in flight"
    if state.probation is not None:
        return "a challenger is on probation"
    last = state.last_retrain_at
    if last is not None and now - last < g.cooldown:
        return f"cooldown: last retrain at {last.isoformat()} (cooldown {g.cooldown})"
    day_ago = now - timedelta(days=1)
    recent = [t for t in state.retrain_times if t > day_ago]
    if len(recent) >= g.max_per_day:
        return f"{len(recent)} retrains in the last day (max_per_day {g.max_per_day})"
    return budget_guard(project)  # wall clock: money is spent in real time


# ----------------------------------------------------------------------------- probation

def _live_stats(rows: pa.Table, labelled: pa.Table, version: int, role: str
                ) -> dict[str, Any]:
    """What ``version`` did live as ``role``: rows answered, labelled, latency p95."""
    def mine(t: pa.Table) -> pa.Table:
        if not t.num_rows:
            return t
        return t.filter(pc.and_(pc.equal(t.column("_version"), version),
                                pc.equal(t.column("_role"), role)))

    served = mine(rows)
    return {"version": version, "role": role, "rows": served.num_rows,
            "labelled": mine(labelled).num_rows,
            "latency_p95_ms": float(pc.quantile(served.column("_latency_ms"), 0.95)[0].as_py())
            if served.num_rows else None}


def paired_scores(project: Project, labelled: pa.Table, versions: list[int]
                  ) -> dict[str, Any]:
    """Each version's metric on the same labelled rows (their logged inputs re-scored by
    every version): a paired comparison, so the verdict is not swayed by which hours each
    side happened to answer. See ``mloop.loop.verdict``."""
    from mloop.loop.verdict import score_paired

    return score_paired(project, labelled, versions).summary()


def challenger_errors(project: Project, version: int, since: datetime | None
                      ) -> dict[str, Any] | None:
    """The newest ``serve.challenger_error`` event for ``version`` since its canary began
    (``since``, wall clock)."""
    from mloop.security.audit import list_events

    for e in list_events(project.store, limit=200, kind="serve.challenger_error",
                         since=since):
        p = e.payload or {}
        if p.get("model") == project.config.model_name and p.get("version") == version:
            return {"event": e.id, "failed_rows": p.get("failed_rows"), "error": p.get("error")}
    return None


def judge_probation(project: Project, state: LoopState, now: datetime) -> dict[str, Any] | None:
    """Promote or roll back a challenger whose probation is over, or at once if it failed to
    predict or breached its latency budget; None while it is still on probation.

    The verdict compares challenger and champion on the same labelled rows of the probation
    (every row answered in it, by either side, re-scored by both versions), by the paired
    bootstrap bound of the non-inferiority gate (``mloop.loop.verdict``); the live canary
    rows give the error and latency checks."""
    prob = state.probation
    policy = project.config.loop.canary
    if prob is None or policy is None:
        return None
    from mloop.monitoring.windows import read_rows
    from mloop.traffic.labels import read_labels

    errors = challenger_errors(project, prob.version, prob.started_wall)
    if errors is not None:
        return _end_probation(project, state, prob, "rollback",
                              f"the canary failed to predict {errors['failed_rows']} row(s): "
                              f"{errors['error']}", {"errors": errors}, now)
    uri = project.log_store
    rows = read_rows(uri, since=prob.started_at)
    labels = read_labels(uri)
    labelled = rows.join(labels, keys="_request_id", join_type="inner") \
        if rows.num_rows and labels.num_rows else rows.slice(0, 0)
    challenger = _live_stats(rows, labelled, prob.version, "canary")
    champion = _live_stats(rows, labelled, prob.champion, "champion")
    inputs: dict[str, Any] = {"challenger": challenger, "champion": champion,
                              "probation": str(policy.probation), "margin": policy.margin}
    if policy.latency_p95_ms is not None and challenger["latency_p95_ms"] is not None \
            and challenger["latency_p95_ms"] > policy.latency_p95_ms:
        return _end_probation(project, state, prob, "rollback",
                              f"latency p95 {challenger['latency_p95_ms']:.1f} ms over the "
                              f"budget of {policy.latency_p95_ms:g} ms", inputs, now)
    elapsed = (now - prob.started_at).total_seconds()
    if elapsed < policy.probation.total_seconds():
        return None
    if labelled.num_rows < policy.min_labelled or challenger["rows"] == 0:
        if elapsed < 3 * policy.probation.total_seconds():
            return None  # wait for labels (and traffic), up to three probation lengths
        why = ("the canary answered no traffic" if challenger["rows"] == 0 else
               f"only {labelled.num_rows} labelled rows")
        return _end_probation(project, state, prob, "rollback",
                              f"{why} after {elapsed / 86400:.1f} days (need "
                              f"{policy.min_labelled} labelled rows)", inputs, now)
    from mloop.loop.verdict import canary_bound, score_paired

    paired = score_paired(project, labelled, [prob.version, prob.champion])
    bound = canary_bound(project, paired, prob.version, prob.champion)
    inputs["paired"], inputs["bound"] = paired.summary(), bound
    c, b = paired.values[prob.version], paired.values[prob.champion]
    verdict = (f"{paired.metric} challenger v{prob.version} {c:.4g} vs champion "
               f"v{prob.champion} {b:.4g} on the same {bound['rows']} labelled rows: worse "
               f"by {bound['difference']:+.4g} observed, {bound['upper']:+.4g} at the "
               f"{bound['confidence']:.0%} upper bound (margin {bound['margin']:.4g}, "
               f"{bound['margin_from']}; the canary answered {challenger['rows']} rows live)")
    return _end_probation(project, state, prob, "promote" if bound["passed"] else "rollback",
                          verdict, inputs, now)


def _end_probation(project: Project, state: LoopState, prob: Probation, outcome: str,
                   why: str, inputs: dict[str, Any], now: datetime) -> dict[str, Any]:
    from mloop.registry.promotion import promote
    from mloop.serving.deploy import stop_challenger

    if outcome == "promote":
        try:
            promote(project, prob.version, reason=f"loop: probation passed: {why}",
                    expected_champion=prob.champion, actor="mloop-loop",
                    gate_report=_stored_gates(project, prob))
        except MloopError as exc:
            outcome, why = "rollback", f"promotion refused: {exc}"
    if outcome == "rollback":
        with contextlib.suppress(MloopError):  # already gone
            stop_challenger(project, reason=f"loop: rolled back: {why}", actor="mloop-loop")
    record = state.retrain_of(prob.version)
    if record is not None:
        record.outcome = "promoted" if outcome == "promote" else "rolled_back"
        record.decided_at, record.reason = now, why
    state.probation = None
    _event(project, f"probation_{outcome}", {"version": prob.version, "reason": why, **inputs})
    return {"action": outcome, "version": prob.version, "reason": why}


def _stored_gates(project: Project, prob: Probation) -> Any:
    """The gate report the candidate passed before its canary, if the gate config is still
    the one it passed (promote then need not run every gate again); else None: promote runs
    them under today's config."""
    from mloop.registry.gate_report import GateReport, GateResult

    body = prob.gates
    if not body or prob.gates_config != gates_config_hash(project):
        return None
    return GateReport(**{**body, "results": [GateResult(**r) for r in body["results"]]})


# ----------------------------------------------------------------------------- one pass

def run_once(project: Project, *, on_event: Any = None,
             lease: LoopLease | None = None) -> dict[str, Any]:
    """One controller pass; returns what it saw and did (plain JSON: the CLI prints it).

    The pass acts under the model's loop lease (``mloop.loop.lease``): taken here and
    released when the pass ends, LeaseHeldError (naming the holder and its expiry) when
    another controller holds it; or ``lease``, one the caller holds already (``mloop loop``
    keeps its lease across passes)."""
    if lease is None:
        with LoopLease.of(project) as held:
            return _with_next_due(project, _with_lease(_pass(project, held, on_event), held))
    lease.ensure()
    return _with_next_due(project, _with_lease(_pass(project, lease, on_event), lease))


def _pass(project: Project, lease: LoopLease, on_event: Any) -> dict[str, Any]:
    """The pass, after ``security.retention`` has deleted what aged out: first, so that
    monitoring, triggers and retraining never see rows the project promised not to keep;
    then, with a feature store, its online store brought up to the pass's clock."""
    from mloop.traffic.retention import apply_retention

    kept = apply_retention(project)
    materialized = _materialize(project)
    result = _run_pass(project, lease, on_event)
    if materialized is not None:
        result = {**result, "materialized": materialized}
    return result if kept is None else {**result, "retention": kept.to_dict()}


def next_due(project: Project, state: LoopState, actions: list[dict[str, Any]]
             ) -> datetime | None:
    """The earliest event time at which a pass has something to do that it could not do
    now: a probation's end (its verdict), or the end of the cooldown that held a trigger
    (the retrain it held). None: nothing is waiting on the clock.

    A scheduler that passes only every N days adds up to N days to each of these (a 5-day
    probation judged by a weekly pass lasts 7), and that delay is time a better model
    waits to serve all traffic; passing again at ``next_due`` removes it."""
    due: list[datetime] = []
    canary = project.config.loop.canary
    if state.probation is not None and canary is not None:
        due.append(state.probation.started_at + canary.probation)
    if state.last_retrain_at is not None and any(
            a.get("action") == "held" and str(a.get("guard", "")).startswith("cooldown")
            for a in actions):
        due.append(state.last_retrain_at + project.config.loop.guards.cooldown)
    return min(due, default=None)


def _with_next_due(project: Project, result: dict[str, Any]) -> dict[str, Any]:
    when = next_due(project, load_state(project), result.get("actions", []))
    return {**result, "next_due": _iso(when)}


def _with_lease(result: dict[str, Any], lease: LoopLease) -> dict[str, Any]:
    """Which controller made the pass (the holder and generation of its lease)."""
    return {**result, "lease": {"holder": lease.holder, "generation": lease.generation}}


def _materialize(project: Project) -> dict[str, Any] | None:
    """With a feature store (and ``loop.materialize``), bring its online store up to the
    pass's clock (the inference log's event time) before monitoring and retraining, so the
    server looks up features as fresh as the traffic the pass judges: a
    ``features.materialize`` event. None when nothing was new, or there is no traffic yet."""
    if project.config.features.store != "feast" or not project.config.loop.materialize:
        return None
    now = event_time_now(project)
    if now is None:
        return None
    from mloop.features.service import materialize_due

    return materialize_due(project, until=now, actor="mloop-loop")


def _run_pass(project: Project, lease: LoopLease, on_event: Any) -> dict[str, Any]:
    from mloop.monitoring.service import run_monitor
    from mloop.serving.deploy import desired_state

    loop_cfg = project.config.loop
    state = load_state(project)
    actions: list[dict[str, Any]] = []
    if state.in_flight is not None:
        actions.append(_record_interrupted(project, state, state.in_flight, lease))
    monitor = run_monitor(project)
    now = event_time_now(project)
    if now is None:
        return {"now": None, "actions": actions, "monitor": monitor,
                "message": "no traffic in the inference log yet"}
    if state.started_at is None:
        state.started_at = now
    new = _new_windows(project, state.last_window_id)
    if new:
        state.last_window_id = new[-1].id
    lease.ensure()  # the verdict may promote or roll back: only while the lease is ours
    verdict = judge_probation(project, state, now)
    if verdict is not None:
        actions.append(verdict)
        if verdict["action"] == "promote":
            state.last_promotion_at = now
            state.drift_streak, state.drift_onset = 0, None
            state.estimate_streak, state.estimate_onset = 0, None
    fired = check_triggers(project, state, new, now, desired_state(project).champion)
    save_state(project, state, lease=lease)
    seen = _dumped(fired)
    if not fired or not loop_cfg.enabled:
        return {"now": _iso(now), "actions": actions, "triggers": seen, "monitor": monitor}
    blocked = check_guards(project, state, now)
    if blocked is not None:
        _event(project, "trigger_held", {"triggers": seen, "guard": blocked})
        actions.append({"action": "held", "guard": blocked, "triggers": seen})
        return {"now": _iso(now), "actions": actions, "triggers": seen, "monitor": monitor}
    if loop_cfg.action == "alert":
        _event(project, "alert", {"triggers": seen})
        actions.append({"action": "alert", "triggers": seen})
        return {"now": _iso(now), "actions": actions, "triggers": seen, "monitor": monitor}
    champion = desired_state(project).champion
    need = loop_cfg.retrain.min_labelled_rows
    have = count_labelled_since(project, now - loop_cfg.retrain.window)
    if have < need:
        guard = (f"{have} labelled rows in the last {loop_cfg.retrain.window} "
                 f"(loop.retrain.min_labelled_rows {need})")
        _event(project, "trigger_held", {"triggers": seen, "guard": guard})
        actions.append({"action": "held", "guard": guard, "triggers": seen})
        return {"now": _iso(now), "actions": actions, "triggers": seen, "monitor": monitor}
    actions.append(_retrain_and_roll_out(project, state, fired, now, champion, lease=lease,
                                         on_event=on_event))
    return {"now": _iso(now), "actions": actions, "triggers": seen, "monitor": monitor}


def _record_interrupted(project: Project, state: LoopState, flight: InFlight,
                        lease: LoopLease) -> dict[str, Any]:
    """A retrain the last controller started and never finished (killed, or it lost its
    lease): recorded (event, history entry, its pipeline run marked failed), not redone.
    Its trigger still stands; the cooldown, counted from when it started, decides when the
    loop may retrain again."""
    previous = lease.taken_over
    died = previous is not None and previous.holder == flight.holder
    who = flight.holder or "the previous controller"
    reason = (f"interrupted: {who} stopped mid-retrain"
              + (f" without releasing its lease (last renewed "
                 f"{previous.renewed_at.isoformat(timespec='seconds')}: killed?)"
                 if died and previous is not None else ""))
    payload: dict[str, Any] = {"in_flight": flight.model_dump(mode="json"), "reason": reason,
                               "holder": lease.holder}
    if flight.pipeline_run_id is not None:
        payload["pipeline_run"] = _fail_pipeline_run(project, flight.pipeline_run_id, reason)
    state.history.append(Retrain(triggered_at=flight.triggered_at, champion=flight.champion,
                                 started_wall=flight.started_wall,
                                 pipeline_run_id=flight.pipeline_run_id, outcome="failed",
                                 reason=reason))
    state.in_flight = None
    save_state(project, state, lease=lease)
    _event(project, "retrain_interrupted", payload)
    return {"action": "retrain_interrupted", **payload}


def _fail_pipeline_run(project: Project, run_id: str, reason: str) -> dict[str, Any]:
    """Mark an interrupted retrain's pipeline run (and its unfinished steps) failed, unless
    it got to an end; what was found and done, for the event."""
    from mloop.pipeline.runner import finish_pipeline_run

    try:
        run = project.store.get_pipeline_run(run_id)
    except MloopError as exc:
        return {"id": run_id, "found": False, "error": str(exc)}
    if run.status not in ("created", "running"):
        return {"id": run_id, "status": run.status}
    for step in project.store.step_runs(run_id):
        if step.status == "running":
            project.store.finish_step(step.id, status="failed", error=reason)
    try:
        finish_pipeline_run(project, run, status="failed", error=reason)
    except Exception as exc:  # MLflow unreachable, or its run deleted: the store says it
        project.store.update_pipeline_run(run_id, status="failed", error=reason)
        return {"id": run_id, "was": run.status, "status": "failed",
                "mlflow_error": f"{type(exc).__name__}: {exc}"}
    return {"id": run_id, "was": run.status, "status": "failed"}


def _retrain_and_roll_out(project: Project, state: LoopState, fired: list[Trigger],
                          now: datetime, champion: int | None, *, lease: LoopLease,
                          on_event: Any = None) -> dict[str, Any]:
    from mloop.registry.gates import evaluate_gates
    from mloop.registry.promotion import promote
    from mloop.serving.deploy import deploy_challenger

    policy = project.config.loop
    record = Retrain(triggered_at=now, triggers=fired,
                     onset=min((f.onset for f in fired if f.onset is not None), default=None),
                     champion=champion, started_wall=datetime.now(UTC))
    flight = state.in_flight = InFlight(
        triggered_at=now, triggers=[f.trigger for f in fired], holder=lease.holder,
        started_wall=record.started_wall, champion=champion)
    state.last_retrain_at = now
    state.retrain_times = [*state.retrain_times, now][-50:]
    # from here a crash is "interrupted", never a silent redo
    save_state(project, state, lease=lease)
    _event(project, "retrain_started", {"triggers": _dumped(fired), "champion": champion,
                                        "holder": lease.holder})

    def heard(kind: str, name: str, info: dict[str, Any]) -> None:
        if kind == "pipeline":  # the retrain's run: a restart marks it failed if it dies
            flight.pipeline_run_id = info["run_id"]
            save_state(project, state, lease=lease)
        if on_event is not None:
            on_event(kind, name, info)

    try:
        data = build_training_data(project, until=now, champion=champion)
        result = retrain(project, data, on_event=heard)
    except StaleStateError:
        raise  # the lease or the state is another controller's now: stop, record nothing
    except Exception as exc:
        record.outcome, record.reason = "failed", f"{type(exc).__name__}: {exc}"
        return _finish(project, state, record, "retrain_failed",
                       {"error": record.reason, "triggers": _dumped(fired)}, lease)
    lease.ensure()  # a long retrain: still ours before gating and rolling out
    version = record.version = int(result["version"])
    record.seconds = result["seconds"]
    record.cpu_seconds = result["cpu_seconds"]
    record.peak_memory_mb = result["peak_memory_mb"]
    record.training_rows = result["training_rows"]
    record.labelled_rows = result["labelled_rows"]
    record.features = result.get("features")
    record.pipeline_run_id = result["pipeline_run_id"]
    report = evaluate_gates(project, version)
    record.gates_passed = report.passed
    if not report.passed:
        failed = [r.gate for r in report.results if r.status == "fail"]
        record.outcome, record.reason = "rejected", f"failed gates {failed}"
        return _finish(project, state, record, "candidate_rejected",
                       {"version": version, "failed_gates": failed}, lease)
    if policy.retrain.refit:
        try:
            version, report = _refit(project, record, data, report, on_event=heard)
        except StaleStateError:
            raise
        except Exception as exc:  # the held-out fit passed: roll it out, say why not the refit
            _event(project, "refit_failed", {"version": version,
                                             "error": f"{type(exc).__name__}: {exc}"})
        lease.ensure()
    if policy.canary is None or champion is None:
        try:
            promote(project, version, reason="loop: retrained, every gate passed",
                    expected_champion=champion, gate_report=report, actor="mloop-loop")
        except MloopError as exc:
            record.outcome, record.reason = "rejected", str(exc)
            return _finish(project, state, record, "promotion_refused",
                           {"version": version, "error": str(exc)}, lease)
        record.outcome, record.decided_at = "promoted", now
        state.last_promotion_at = now
        return _finish(project, state, record, "promoted", {"version": version}, lease)
    wall = datetime.now(UTC)  # challenger errors are counted from here
    deploy_challenger(project, version, mode="canary", weight=policy.canary.weight,
                      reason=f"loop: retrained on {data.labelled_rows} labelled rows; "
                             f"probation {policy.canary.probation}", actor="mloop-loop")
    state.probation = Probation(version=version, champion=champion, started_at=now,
                                started_wall=wall, gates=report.to_dict(),
                                gates_config=gates_config_hash(project))
    record.outcome = "canary"
    return _finish(project, state, record, "canary_started",
                   {"version": version, "weight": policy.canary.weight}, lease)


def _refit(project: Project, record: Retrain, data: Any, report: Any, *, on_event: Any
           ) -> tuple[int, Any]:
    """Fit the gated recipe again on the whole window (``loop.retrain.refit``); the refit
    carries the held-out fit's gates and metrics (``mloop.registry.refit``)."""
    from mloop.registry.refit import adopt_held_out_evidence

    held_out = int(record.version or 0)
    result = retrain(project, data, on_event=on_event, refit=True)
    refit = int(result["version"])
    if refit == held_out:  # every step cached: the project's pipeline ignores split.refit
        _event(project, "refit_skipped", {
            "version": held_out, "reason": "the project's pipeline does not pass "
            "split.refit to its split step (mloop.tabular.pipeline.split_options)"})
        return held_out, report
    carried = adopt_held_out_evidence(project, refit, held_out, report)
    record.held_out_version, record.version = held_out, refit
    record.refit_run_id = result["pipeline_run_id"]
    record.seconds = round((record.seconds or 0.0) + result["seconds"], 2)
    record.cpu_seconds = round((record.cpu_seconds or 0.0) + result["cpu_seconds"], 2)
    record.peak_memory_mb = max(record.peak_memory_mb or 0.0, result["peak_memory_mb"])
    _event(project, "refit", {"version": refit, "held_out_version": held_out,
                              "training_rows": result["training_rows"],
                              "pipeline_run_id": result["pipeline_run_id"]})
    return refit, carried


def _finish(project: Project, state: LoopState, record: Retrain, kind: str,
            payload: dict[str, Any], lease: LoopLease) -> dict[str, Any]:
    state.in_flight = None
    state.history.append(record)
    save_state(project, state, lease=lease)
    _event(project, kind, payload)
    return {"action": kind, **payload}


def loop_metrics(project: Project, state: LoopState | None = None) -> dict[str, Any]:
    """Time to detect, time to deploy, retrain cost and outcomes, from the saved history."""
    state = state or load_state(project)
    rates = project.config.cost_rates
    retrains = [h for h in state.history if h.version is not None or h.outcome]
    done = [h for h in retrains if h.outcome in ("promoted", "rolled_back", "canary",
                                                 "rejected", "failed")]
    promoted = [h for h in retrains if h.outcome == "promoted"]
    rolled = [h for h in retrains if h.outcome == "rolled_back"]
    detect = [_gap(h.onset, h.triggered_at) for h in retrains]
    deploy = [_gap(h.triggered_at, h.decided_at) for h in promoted]
    cpu = sum(h.cpu_seconds or 0 for h in retrains)
    gb_hours = sum((h.peak_memory_mb or 0) / 1024 * (h.seconds or 0) / 3600 for h in retrains)
    return {
        "retrains": len(retrains), "promoted": len(promoted), "rolled_back": len(rolled),
        "rejected": sum(1 for h in retrains if h.outcome == "rejected"),
        "failed": sum(1 for h in retrains if h.outcome == "failed"),
        "deployment_success_rate": (len(promoted) / len(done)) if done else None,
        "rollback_frequency": (len(rolled) / len(done)) if done else None,
        "time_to_detect_hours": _mean(detect, 3600),
        "time_to_deploy_hours": _mean(deploy, 3600),
        "retrain_seconds": _mean([h.seconds for h in retrains if h.seconds], 1),
        "retrain_cpu_seconds_total": round(cpu, 2),
        "retrain_peak_memory_mb_max": max((h.peak_memory_mb or 0 for h in retrains),
                                          default=None),
        "retrain_cost": round(cpu / 3600 * rates.cpu_hour + gb_hours * rates.gb_hour, 6),
        "currency": rates.currency,
    }


def _gap(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def _mean(values: list[Any], unit: float) -> float | None:
    vals = [v for v in values if v is not None]
    return round(sum(vals) / len(vals) / unit, 3) if vals else None
