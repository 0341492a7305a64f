"""A gate report, as stored, and when an earlier one still holds.

Gating loads the candidate and the champion and predicts on the holdout: seconds of work. A
promotion right after ``mloop run`` (or ``mloop models gate``) would repeat exactly that work
on exactly the same inputs: the holdout belongs to the version, the champion is the same, and
the gate config is the same. So a stored report is reused when all three still hold; it is
never reused across a change of champion, of the gate config, of the latency measurement's
thread count or of mloop's release (:func:`gates_config_hash`). This module stays light (no
numpy, pandas or MLflow import): a promotion that reuses a report pays for none of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC
from typing import Any

from mloop._version import __version__
from mloop.project import Project


@dataclass
class GateResult:
    gate: str
    status: str  # pass | fail | skip
    value: float | None
    threshold: float | None
    message: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateReport:
    model: str
    version: int
    champion: int | None
    passed: bool
    evaluated_at: str
    results: list[GateResult]
    # set when this report was read back from the store instead of computed now
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gates_config_hash(project: Project) -> str:
    """What a gate report depends on besides the two versions: the gates, the task's metric
    choice, the thread count latency is measured with, and mloop's own release."""
    cfg = project.config
    body = json.dumps({
        "gates": cfg.gates.model_dump(mode="json"),
        "task": cfg.task, "target": cfg.target, "metrics": cfg.metrics,
        "model_threads": cfg.serving.model_threads,
        "mloop": __version__,
    }, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def stored_gate_report(project: Project, version: int,
                       champion: int | None) -> GateReport | None:
    """The newest stored report of ``version`` if it was computed against ``champion`` under
    today's gate config; else None (the caller gates again)."""
    run = project.store.latest_gate_runs(project.config.model_name).get(version)
    if run is None or run.champion_version != champion:
        return None
    if run.gates_hash is None or run.gates_hash != gates_config_hash(project):
        return None
    rows = project.store.gate_results(run.id)
    if any(r.message is None for r in rows):  # stored before messages were kept
        return None
    at = run.evaluated_at
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return GateReport(run.model, run.version, run.champion_version, bool(run.passed),
                      at.isoformat(timespec="seconds"),
                      [GateResult(r.gate, r.status, r.value, r.threshold, r.message or "",
                                  dict(r.detail or {})) for r in rows],
                      reused=True)


def latest_gate_report(project: Project, version: int) -> GateReport | None:
    """The newest stored gate report of ``version``, whatever champion and gate config it
    ran under (what a page shows as "its gates"; a promotion uses
    :func:`stored_gate_report`, which also checks both still hold). None: never gated."""
    run = project.store.latest_gate_runs(project.config.model_name).get(version)
    if run is None:
        return None
    at = run.evaluated_at if run.evaluated_at.tzinfo else run.evaluated_at.replace(tzinfo=UTC)
    return GateReport(run.model, run.version, run.champion_version, bool(run.passed),
                      at.isoformat(timespec="seconds"),
                      [GateResult(r.gate, r.status, r.value, r.threshold, r.message or "",
                                  dict(r.detail or {}))
                       for r in project.store.gate_results(run.id)], reused=True)


def fmt_value(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def record_gate_report(project: Project, report: GateReport) -> None:
    """Store the results, tag the MLflow version, append the audit event."""
    from mloop.security.audit import append_event
    from mloop.tracking_read import SqlTrackingReader
    from mloop.tracking_sql import set_model_version_tags

    project.store.record_gate_run(report, gates_hash=gates_config_hash(project))
    name = report.model
    tags = {"mloop.gates": "passed" if report.passed else "failed",
            "mloop.gates.evaluated_at": report.evaluated_at}
    for r in report.results:
        tags[f"mloop.gate.{r.gate}"] = (f"{r.status} value={fmt_value(r.value)} "
                                        f"threshold={fmt_value(r.threshold)}")
    reader = project.tracking
    if isinstance(reader, SqlTrackingReader):  # the rows MlflowClient writes, no client opened
        set_model_version_tags(reader.registry, name, report.version, tags)
    else:
        for key, value in tags.items():
            project.mlflow.set_model_version_tag(name, str(report.version), key, value)
    append_event(project.store, "gate", {
        "model": name, "version": report.version, "champion": report.champion,
        "passed": report.passed,
        "results": {r.gate: [r.status, r.value, r.threshold] for r in report.results}})
