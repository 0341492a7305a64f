"""The audit report: a document an auditor can read for a period.

Every promotion, forced override, rollback, gate failure, alert, retrain and loop decision
between ``since`` and ``until``, each with who acted and why, as the audit chain recorded
them; every version that served in the period with the data snapshots behind it (from its
lineage tags); and the chain's verification result, so the reader knows whether the record
itself can be trusted. Read only: nothing is recomputed, a missing fact says so.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from mloop.errors import MloopError
from mloop.project import Project
from mloop.security.audit import verify_chain
from mloop.store.db import as_utc
from mloop.store.models import DeploymentRow, EventRow

__all__ = ["CATEGORIES", "audit_report", "audit_report_html", "category"]

# in the order the report counts them
CATEGORIES = ("promotion", "forced override", "rollback", "gate failure", "alert", "retrain",
              "loop decision", "deployment", "personal data", "access")
NOT_RECORDED = "not recorded"


def category(kind: str, payload: dict[str, Any]) -> str | None:
    """Which kind of decision an event is, or None for what the report leaves out (passed
    gates, server load errors, inference-log maintenance)."""
    if kind == "promote":
        return "promotion"
    if kind == "override":
        return "forced override"
    if kind in ("rollback", "loop.probation_rollback"):
        return "rollback"
    if kind == "gate":
        return None if payload.get("passed") else "gate failure"
    if kind in ("monitor.alert", "loop.alert"):
        return "alert"
    if kind.startswith("loop.retrain"):
        return "retrain"
    if kind.startswith("loop."):
        return "loop decision"
    if kind in ("canary", "shadow", "stop"):
        return "deployment"
    if kind in ("data.erased", "data.retention"):
        return "personal data"
    if kind.startswith(("token.", "keys.")):
        return "access"
    return None


def _why(kind: str, p: dict[str, Any]) -> str:
    """The recorded cause, in words; never made up."""
    if kind == "gate":
        failed = [f"{g} ({r[1]} vs {r[2]})" for g, r in (p.get("results") or {}).items()
                  if isinstance(r, list) and r and r[0] == "fail"]
        return "failed " + ", ".join(failed) if failed else NOT_RECORDED
    if p.get("reason"):
        return str(p["reason"])
    if p.get("reasons"):
        return "; ".join(map(str, p["reasons"]))
    if p.get("failed_gates"):
        return f"failed gates {p['failed_gates']}"
    parts = []
    if p.get("triggers"):
        names = [t.get("trigger", "?") if isinstance(t, dict) else str(t)
                 for t in p["triggers"]]
        parts.append("triggers: " + ", ".join(names))
    if p.get("guard"):
        parts.append(f"held by guard: {p['guard']}")
    if p.get("error"):
        parts.append(str(p["error"]))
    if kind.startswith("token.") and p.get("role"):
        parts.append(f"{p.get('person') or p.get('name')} as {p['role']}")
    return "; ".join(parts) or NOT_RECORDED


def _decision(e: EventRow) -> dict[str, Any] | None:
    cat = category(e.kind, e.payload or {})
    if cat is None:
        return None
    p = e.payload or {}
    return {"id": e.id, "at": as_utc(e.at).isoformat(), "kind": e.kind,
            "category": cat, "version": p.get("version"), "replaced": p.get("replaced"),
            "who": e.actor, "why": _why(e.kind, p)}


def _served(project: Project, since: datetime | None, until: datetime) -> list[dict[str, Any]]:
    """Every stint of a version under an alias that overlaps the period, with its data."""
    from mloop.registry.lineage import version_snapshots

    q = sa.select(DeploymentRow).where(DeploymentRow.model == project.config.model_name,
                                       DeploymentRow.started_at <= until)
    if since is not None:
        q = q.where(sa.or_(DeploymentRow.ended_at.is_(None), DeploymentRow.ended_at >= since))
    with project.store.session() as s:
        rows = list(s.scalars(q.order_by(DeploymentRow.started_at, DeploymentRow.id)))
    data: dict[int, dict[str, Any]] = {}
    out = []
    for r in rows:
        if r.version not in data:
            try:
                data[r.version] = version_snapshots(project, r.version)
            except MloopError as exc:
                data[r.version] = {"error": str(exc)}
        out.append({"version": r.version, "alias": r.alias, "traffic": r.traffic,
                    "from": as_utc(r.started_at).isoformat(timespec="seconds"),
                    "to": (as_utc(r.ended_at).isoformat(timespec="seconds")
                           if r.ended_at is not None else None),
                    "put_there_by": r.actor, "action": r.action, "why": r.reason,
                    "data": data[r.version]})
    return out


def audit_report(project: Project, *, since: datetime | None = None,
                 until: datetime | None = None) -> dict[str, Any]:
    """The report for ``[since, until]`` (aware times; None: from the first event / until
    now) as one JSON-ready document with stable keys."""
    until = (until or datetime.now(UTC)).astimezone(UTC)
    since = since.astimezone(UTC) if since is not None else None
    if since is not None and since > until:
        raise MloopError(f"--since {since.isoformat()} is after --until {until.isoformat()}: "
                         f"the period is empty")
    chain = verify_chain(project.store)  # first: the reader must know if the rest holds
    q = sa.select(EventRow).where(EventRow.at <= until).order_by(EventRow.id)
    if since is not None:
        q = q.where(EventRow.at >= since)
    with project.store.session() as s:
        decisions = [d for d in map(_decision, s.scalars(q)) if d is not None]
    counts = {c: sum(d["category"] == c for d in decisions) for c in CATEGORIES}
    people: dict[str, int] = {}
    for d in decisions:
        people[d["who"]] = people.get(d["who"], 0) + 1
    return {"model": project.config.model_name, "project": project.name,
            "since": since.isoformat() if since is not None else None,
            "until": until.isoformat(), "generated_at": datetime.now(UTC).isoformat(
                timespec="seconds"),
            "chain": chain.to_dict(), "counts": counts,
            "people": [{"who": k, "decisions": v} for k, v in sorted(
                people.items(), key=lambda kv: (-kv[1], kv[0]))],
            "decisions": decisions, "served": _served(project, since, until)}


def _snap(s: dict[str, Any] | None) -> str:
    if not s:
        return NOT_RECORDED
    if s.get("missing"):
        return f"{s['digest'][:12]} (snapshot missing from the store)"
    return f"{s['digest'][:12]} ({s.get('rows', '?'):,} rows, from {s.get('source')})" \
        if isinstance(s.get("rows"), int) else f"{s['digest'][:12]}"


def audit_report_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (the monitoring report's frame)."""
    from mloop.monitoring.report import _table, render

    esc = html.escape
    c = report["chain"]
    if c["ok"]:
        notes = ["hashes and keyed MACs"]
        if c["checkpoint"]:
            notes.append(f"length checked against the checkpoint outside the store "
                         f"({c['checkpoint']} events)")
        if c["unkeyed"]:
            notes.append(f"{c['unkeyed']} event(s) from before keying")
        verdict = (f"<p class='ok'><b>Audit chain intact</b>: {c['events']} events verified "
                   f"({esc('; '.join(notes))}).</p>")
    else:
        verdict = (f"<p class='bad'><b>Audit chain BROKEN</b>: {esc(str(c['problem']))}. "
                   f"The decisions below may be incomplete or altered.</p>")
    period = f"{report['since'] or 'the first event'} to {report['until']}"
    parts = [f"<p>Model <b>{esc(report['model'])}</b> of project {esc(report['project'])}, "
             f"{esc(period)}; generated {esc(report['generated_at'])}.</p>", verdict,
             "<h2>Summary</h2>",
             _table(["decision", "count"], [[esc(k), v] for k, v in report["counts"].items()]),
             "<h2>Who acted</h2>",
             _table(["who", "decisions"], [[esc(p["who"]), p["decisions"]]
                                           for p in report["people"]]),
             "<h2>Decisions</h2>"]
    if report["decisions"]:
        parts.append(_table(["#", "when (UTC)", "decision", "event", "version", "who", "why"],
                            [[d["id"], esc(d["at"][:19]), esc(d["category"]), esc(d["kind"]),
                              "" if d["version"] is None else f"v{d['version']}",
                              esc(d["who"]), esc(d["why"])] for d in report["decisions"]]))
    else:
        parts.append("<p class='muted'>No decision recorded in this period.</p>")
    parts.append("<h2>What served, and the data behind it</h2>")
    if report["served"]:
        rows = []
        for s in report["served"]:
            data = s["data"]
            err = data.get("error")
            rows.append([f"v{s['version']}", esc(s["alias"]), f"{s['traffic']:.0%}",
                         esc(s["from"]), esc(s["to"] or "still serving"),
                         esc(f"{s['action']} by {s['put_there_by']}: {s['why']}"),
                         esc(err) if err else esc(_snap(data.get("train"))),
                         "" if err else esc(_snap(data.get("holdout"))),
                         "" if err else esc(_snap(data.get("source")))])
        parts.append(_table(["version", "alias", "traffic", "from", "to", "put there",
                             "train snapshot", "holdout", "source"], rows))
    else:
        parts.append("<p class='muted'>No version served in this period.</p>")
    return render(f"Audit report: {report['model']}", "".join(parts))
