"""Promotion, rollback and the deployment history.

MLflow's aliases say what serves now; mloop's store says what served when, who moved it and
why. Each change is one transaction in mloop's store (the alias row with its revision, the
closed and opened deployment rows, the audit event) around the alias change in MLflow: if
MLflow refuses, the transaction is rolled back; if the commit fails after MLflow changed, the
MLflow aliases are put back. A promotion names the champion it was gated against; if another
promotion got there first, it fails with a message instead of silently overwriting.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from mloop.errors import GateFailedError, MloopError, PromotionError
from mloop.project import Project
from mloop.registry.aliases import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    mlflow_alias,
    require_champion,
    stored_alias,
)
from mloop.registry.candidates import version_record
from mloop.registry.gate_report import stored_gate_report
from mloop.security.audit import add_event, current_actor
from mloop.store.db import as_utc, utcnow
from mloop.store.models import AliasRow, DeploymentRow

_UNSET: Any = object()


@dataclass
class AliasChange:
    model: str
    alias: str
    version: int | None  # None: the alias was removed
    replaced: int | None
    action: str
    actor: str
    reason: str
    at: str
    # promotions only: the gate report it rests on (passed, evaluated_at, against, reused)
    gates: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _set_mlflow_alias(project: Project, alias: str, version: int | None) -> None:
    from mloop.tracking_read import SqlTrackingReader
    from mloop.tracking_sql import set_model_alias

    name, reader = project.config.model_name, project.tracking
    if isinstance(reader, SqlTrackingReader):  # the row MlflowClient writes, no MLflow import
        if version is None:
            with contextlib.suppress(Exception):
                set_model_alias(reader.registry, name, alias, None)
        else:
            set_model_alias(reader.registry, name, alias, version)
        return
    client = project.mlflow
    if version is None:
        with contextlib.suppress(Exception):
            client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))


class _Conflict(Exception):
    """A unique key collided at flush (a concurrent first promotion, or another event taking
    the same place in the audit chain): re-read and try again."""


def _restore(project: Project, alias: str, version: int | None) -> str | None:
    """Put one MLflow alias back; return an error description instead of raising."""
    try:
        _set_mlflow_alias(project, alias, version)
    except Exception as exc:
        return f"'{alias}' could not be put back to {_v(version)} ({exc})"
    return None


def change_alias(project: Project, alias: str, version: int | None, *, expected: int | None,
                 action: str, reason: str, actor: str | None = None,
                 details: dict[str, Any] | None = None, attempts: int = 5,
                 traffic: float = 1.0) -> AliasChange:
    """Move ``alias`` to ``version`` (None: remove it) if it still points at ``expected``;
    record everything, with the share of traffic the new holder gets."""
    for attempt in range(attempts):
        try:
            return _change_alias_once(project, alias, version, expected=expected,
                                      action=action, reason=reason,
                                      actor=actor or current_actor(), details=details,
                                      traffic=traffic)
        except _Conflict:
            if attempt == attempts - 1:
                raise PromotionError(
                    f"could not record the change of '{alias}' after {attempts} attempts "
                    f"(concurrent writers); {alias} unchanged") from None
    raise AssertionError("unreachable")


def _change_alias_once(project: Project, alias: str, version: int | None, *,
                       expected: int | None, action: str, reason: str, actor: str,
                       details: dict[str, Any] | None, traffic: float = 1.0) -> AliasChange:
    name = project.config.model_name
    now = utcnow()
    old_previous = mlflow_alias(project, PREVIOUS)
    with project.store.engine.connect().execution_options(immediate=True) as conn, \
            Session(bind=conn) as s:
        s.begin()
        q = sa.select(AliasRow).where(AliasRow.model == name, AliasRow.alias == alias)
        if conn.dialect.name != "sqlite":
            q = q.with_for_update()
        row = s.scalars(q).first()
        actual = row.version if row is not None else None
        if actual != expected:
            s.rollback()
            raise PromotionError(
                f"'{alias}' of '{name}' moved from {_v(expected)} to {_v(actual)} while this "
                f"{action} of v{version} was prepared (another change won); {alias} stays "
                f"{_v(actual)}. Gate v{version} against {_v(actual)} and try again.")
        # Nothing reaches the database before the flush below, so every unique-key collision
        # (alias row, audit chain) surfaces there, before MLflow is touched.
        with s.no_autoflush:
            if version is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(AliasRow(model=name, alias=alias, version=version, revision=1,
                               updated_at=now))
            else:
                row.version, row.revision, row.updated_at = version, row.revision + 1, now
            for open_row in s.scalars(sa.select(DeploymentRow).where(
                    DeploymentRow.model == name, DeploymentRow.alias == alias,
                    DeploymentRow.ended_at.is_(None))):
                open_row.ended_at = now
            if version is not None:
                s.add(DeploymentRow(model=name, version=version, alias=alias, traffic=traffic,
                                    action=action, started_at=now, actor=actor, reason=reason))
            add_event(s, action, {"model": name, "alias": alias, "version": version,
                                  "replaced": actual, "reason": reason, "traffic": traffic
                                  if version is not None else 0.0, **(details or {})},
                      store=project.store, actor=actor)
        try:
            s.flush()
        except sa.exc.IntegrityError:
            s.rollback()
            raise _Conflict() from None
        try:
            _set_mlflow_alias(project, alias, version)
            if alias == CHAMPION and actual is not None:
                _set_mlflow_alias(project, PREVIOUS, actual)
        except Exception as exc:
            s.rollback()
            problems = [p for p in (_restore(project, alias, actual),) if p]
            raise PromotionError(
                f"MLflow refused the alias change ({exc}); mloop recorded nothing"
                + (f"; {'; '.join(problems)}" if problems else f", {alias} stays {_v(actual)}")
            ) from exc
        try:
            s.commit()
        except Exception as exc:
            problems = [p for p in (
                _restore(project, alias, actual),
                _restore(project, PREVIOUS, old_previous) if alias == CHAMPION else None,
            ) if p]
            state = ("; ".join(problems) + ": run `mloop models history` to see the "
                     "disagreement") if problems else f"MLflow aliases put back, {alias} " \
                f"stays {_v(actual)}"
            raise PromotionError(f"recording the change failed ({exc}); {state}") from exc
    return AliasChange(name, alias, version, actual, action,
                       actor, reason, now.isoformat(timespec="seconds"))


def _v(version: int | None) -> str:
    return "nothing" if version is None else f"v{version}"


def promote(project: Project, version: int, *, reason: str, force: bool = False,
            actor: str | None = None, expected_champion: Any = _UNSET,
            gate_report: Any = None, details: dict[str, Any] | None = None) -> AliasChange:
    """Make ``version`` the champion if its gates passed against the current champion.

    Gates run now unless a report computed against the same champion under the same gate
    config is at hand (``gate_report``, or the newest stored one). ``force`` promotes despite
    failed gates and records the override. ``details`` go into the promotion's audit event
    (a promotion from another environment names its source there).
    """
    if not reason.strip():
        raise MloopError("a promotion needs a reason (--reason \"...\"): it goes in the history")
    version_record(project, version)
    champion = stored_alias(project) if expected_champion is _UNSET else expected_champion
    if champion == version:
        raise PromotionError(f"v{version} is already the champion")
    # Gates hold against the champion being replaced and under today's gate config: a stored
    # report is reused only when both are what it was computed with (gate_report.py), else
    # the gates run now. An older result may predate a stricter gate or another champion.
    report = gate_report if gate_report is not None else stored_gate_report(project, version,
                                                                             champion)
    if report is None or (report.champion != champion and champion is not None):
        from mloop.registry.gates import evaluate_gates

        report = evaluate_gates(project, version)
    passed = report.passed
    summary = "; ".join(f"'{r.gate}' ({r.message})" for r in report.results
                        if r.status == "fail")
    if not passed and not force:
        raise GateFailedError(
            f"Version {version} of '{project.config.model_name}' failed gate(s) {summary}; "
            f"champion unchanged ({_v(champion)}). Use --force --reason to override.")
    action = "promote" if passed else "override"
    change = change_alias(project, CHAMPION, version, expected=champion, action=action,
                          reason=reason, actor=actor,
                          details={"gates_passed": passed, "forced": force and not passed,
                                   "gates_evaluated_at": report.evaluated_at,
                                   "gates_reused": report.reused, **(details or {})})
    change.gates = {"passed": passed, "evaluated_at": report.evaluated_at,
                    "against": report.champion, "reused": report.reused,
                    "failed": [r.gate for r in report.results if r.status == "fail"]}
    if stored_alias(project, CHALLENGER) == version:
        # the challenger graduated: it must not come back as canary after a later rollback
        change_alias(project, CHALLENGER, None, expected=version, action="stop",
                     reason=f"v{version} promoted to champion", actor=actor)
    return change


def rollback(project: Project, *, reason: str, to: int | None = None,
             actor: str | None = None) -> AliasChange:
    """Move the champion back to the previous champion, or to ``to`` (which must have been
    champion before: a version that never served goes through ``promote`` and its gates)."""
    if not reason.strip():
        raise MloopError("a rollback needs a reason (--reason \"...\"): it goes in the history")
    name = project.config.model_name
    current = require_champion(project, needed_for="nothing to roll back")
    served = [d for d in history(project)["deployments"] if d["alias"] == CHAMPION]
    earlier = [d["version"] for d in served if d["version"] != current]
    if to is None:
        if not earlier:
            raise PromotionError(f"v{current} is the only version that has been champion; "
                                 f"nothing to roll back to")
        to = earlier[0]  # history is newest first
    elif to == current:
        raise PromotionError(f"v{to} is already the champion")
    elif to not in earlier:
        raise PromotionError(f"v{to} has never been champion of '{name}'; promote it instead "
                             f"(its gates apply)")
    version_record(project, to)
    return change_alias(project, CHAMPION, to, expected=current, action="rollback",
                        reason=reason, actor=actor)


def _iso(dt: datetime | None) -> str | None:
    dt = as_utc(dt)
    return dt.isoformat(timespec="seconds") if dt is not None else None


def history(project: Project, *, at: datetime | None = None) -> dict[str, Any]:
    """Every alias change (newest first), what served at ``at``, and any disagreement
    between mloop's record and MLflow's aliases (changed behind mloop's back)."""
    name = project.config.model_name
    q = (sa.select(DeploymentRow).where(DeploymentRow.model == name)
         .order_by(DeploymentRow.started_at.desc(), DeploymentRow.id.desc()))
    with project.store.session() as s:
        rows = list(s.scalars(q))
    deployments = [{"version": r.version, "alias": r.alias, "traffic": r.traffic,
                    "action": r.action, "started_at": _iso(r.started_at),
                    "ended_at": _iso(r.ended_at), "actor": r.actor, "reason": r.reason}
                   for r in rows]
    out: dict[str, Any] = {"model": name, "deployments": deployments}
    if at is not None:
        when = as_utc(at)
        serving: dict[str, dict[str, Any]] = {}
        for r in rows:
            start, end = as_utc(r.started_at), as_utc(r.ended_at)
            if start <= when and (end is None or end > when):
                serving.setdefault(r.alias, {"version": r.version, "traffic": r.traffic})
        out["at"] = when.isoformat(timespec="seconds")
        out["serving"] = serving
    out["drift"] = alias_drift(project)
    return out


def alias_drift(project: Project) -> list[dict[str, Any]]:
    """Aliases whose MLflow value differs from what mloop recorded."""
    out = []
    for alias in (CHAMPION, CHALLENGER):
        recorded, actual = stored_alias(project, alias), mlflow_alias(project, alias)
        if recorded != actual:
            out.append({"alias": alias, "mloop": recorded, "mlflow": actual,
                        "message": f"MLflow says '{alias}' is {_v(actual)} but mloop recorded "
                                   f"{_v(recorded)}: changed outside mloop"})
    return out


def gate_and_promote(project: Project, version: int) -> dict[str, Any]:
    """What ``mloop run`` (and later the controller) does with a fresh candidate: gate it
    against the current champion and, with ``gates.auto_promote``, promote it if it passed."""
    from mloop.registry.gates import evaluate_gates

    champion = stored_alias(project)
    report = evaluate_gates(project, version)
    out: dict[str, Any] = {"gates": report.to_dict(), "promotion": None,
                           "promotion_error": None}
    if project.config.gates.auto_promote and report.passed and champion != version:
        try:
            out["promotion"] = promote(project, version, expected_champion=champion,
                                       reason="auto-promote: every gate passed",
                                       gate_report=report).to_dict()
        except MloopError as exc:  # e.g. another promotion won the race: report, don't fail
            out["promotion_error"] = str(exc)
    return out
