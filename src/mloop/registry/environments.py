"""Environments (dev, staging, prod) as a promotion sees them: which one a version comes
from, whether it has soaked long enough where it serves, and who approved its way on.

Each environment is the same project over its own stores (``Project.env``, opened by
:func:`mloop.project.open_project`); this module only reads them and records approvals.
Carrying a version across is :mod:`mloop.registry.env_promotion`.

**Soak**, precisely: a version may leave an environment it was itself promoted into (every
one but the first of ``promotion.order``) only when, in that environment's store,

- it is the champion now, through a deployment row still open (``ended_at`` unset) that
  started at ``t0`` with ``now - t0 >= promotion.soak``; and
- no *breach* was recorded in that environment's audit chain at or after ``t0``: a
  ``monitor.alert`` for the model (an alert while it served is about it), a ``gate`` event
  for the version that failed, a ``serve.load_failed`` or ``serve.challenger_error`` for it,
  or a ``rollback`` / ``loop.probation_rollback`` that replaced it.

A breach does not expire: the version must be promoted again (a fresh ``t0``) to soak anew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mloop.errors import MloopError, PromotionError
from mloop.project import Project
from mloop.registry.aliases import CHAMPION
from mloop.registry.candidates import version_record
from mloop.security.audit import append_event, current_actor, list_events
from mloop.store.db import as_utc, utcnow
from mloop.store.models import DeploymentRow

APPROVAL_EVENT = "approval"
BREACH_KINDS = ("monitor.alert", "gate", "serve.load_failed", "serve.challenger_error",
                "rollback", "loop.probation_rollback")


def source_environment(project: Project, target: str, given: str | None = None) -> str:
    """The environment a promotion ``--to target`` starts from: the one before ``target`` in
    the promotion order. ``given`` (an explicit ``--env``) must be that one: a version
    travels the order one step at a time, never around staging."""
    config = project.config
    order = config.environment_order
    if not order:
        raise MloopError("--to needs environments: this project defines none (add "
                         "'environments:' and 'promotion.order' to mloop.yaml)")
    if target not in order:
        raise MloopError(f"unknown environment '{target}' for --to; the promotion order is "
                         f"{' -> '.join(order)}")
    at = order.index(target)
    if at == 0:
        raise MloopError(f"'{target}' is the first environment of the promotion order "
                         f"({' -> '.join(order)}): versions are registered there by a run, "
                         f"not promoted into it")
    expected = order[at - 1]
    if given is not None and given != expected:
        raise MloopError(f"a version reaches '{target}' from '{expected}' (promotion order "
                         f"{' -> '.join(order)}), not from '{given}'")
    return expected


@dataclass(frozen=True)
class SoakStatus:
    """How long ``version`` has served as champion in ``env``, and whether that is enough."""

    env: str
    version: int
    required: timedelta
    required_text: str
    since: datetime | None  # start of its open champion deployment; None: not serving
    served: timedelta
    breaches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.since is not None and self.served >= self.required and not self.breaches

    @property
    def remaining(self) -> timedelta:
        return max(self.required - self.served, timedelta(0))

    def to_dict(self) -> dict[str, Any]:
        return {"env": self.env, "version": self.version, "required": self.required_text,
                "since": self.since.isoformat(timespec="seconds") if self.since else None,
                "served_seconds": round(self.served.total_seconds()),
                "remaining_seconds": round(self.remaining.total_seconds()),
                "breaches": self.breaches, "met": self.met}

    def refusal(self, target: str) -> str:
        """Why the version may not go on to ``target`` yet, for a person to act on."""
        head = f"v{self.version} may not go to '{target}' yet: promotion.soak is " \
               f"{self.required_text} as champion in '{self.env}' without a breach"
        if self.since is None:
            return f"{head}, and it is not serving there (promote it to '{self.env}' first)"
        if self.breaches:
            kinds = ", ".join(f"{b['kind']} at {b['at']}" for b in self.breaches[:3])
            return (f"{head}, and {len(self.breaches)} breach(es) were recorded since it "
                    f"started serving at {self.since.isoformat(timespec='seconds')}: {kinds}")
        return (f"{head}; it has served {_span(self.served)} since "
                f"{self.since.isoformat(timespec='seconds')}, {_span(self.remaining)} remain")


def _span(length: timedelta) -> str:
    """``25h05m``; under an hour with its seconds (``4m30s``): a short soak, as in a trial
    or a test, would otherwise read ``0h00m remain`` while seconds still remain."""
    seconds = math.ceil(length.total_seconds())
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _is_breach(kind: str, payload: dict[str, Any], model: str, version: int) -> bool:
    if payload.get("model") != model:
        return False
    if kind == "monitor.alert":
        return True
    if kind == "gate":
        return payload.get("version") == version and payload.get("passed") is False
    if kind in ("rollback", "loop.probation_rollback"):
        return payload.get("replaced") == version
    return payload.get("version") == version


def soak_status(project: Project, version: int, *, now: datetime | None = None
                ) -> SoakStatus:
    """``version``'s soak in ``project``'s environment, judged at ``now`` (default: the
    clock; a test passes a later instant rather than sleep through a day)."""
    soak = project.config.promotion.soak
    required = soak if soak is not None else timedelta(0)
    text = soak.text if soak is not None else "0s"
    now = as_utc(now) if now is not None else utcnow()
    name = project.config.model_name
    with project.store.session() as s:
        row = s.scalars(sa.select(DeploymentRow).where(
            DeploymentRow.model == name, DeploymentRow.alias == CHAMPION,
            DeploymentRow.version == version, DeploymentRow.ended_at.is_(None))
            .order_by(DeploymentRow.started_at.desc()).limit(1)).first()
        since = as_utc(row.started_at) if row is not None else None
    env = project.env or "default"
    if since is None:
        return SoakStatus(env, version, required, text, None, timedelta(0))
    breaches = [{"kind": e.kind, "at": as_utc(e.at).isoformat(timespec="seconds"),
                 "event_id": e.id}
                for e in list_events(project.store, limit=10_000, kinds=BREACH_KINDS,
                                     since=since)
                if as_utc(e.at) <= now and _is_breach(e.kind, e.payload or {}, name, version)]
    return SoakStatus(env, version, required, text, since, max(now - since, timedelta(0)),
                      sorted(breaches, key=lambda b: b["event_id"]))


def needs_soak(project: Project) -> bool:
    """Does a version leaving ``project``'s environment need to have soaked there? Yes for
    every environment but the first of the order (where versions are born), when
    ``promotion.soak`` is set."""
    order = project.config.environment_order
    return (project.config.promotion.soak is not None and project.env is not None
            and bool(order) and project.env != order[0])


def needs_approval(target: Project) -> bool:
    return bool(target.env and target.config.promotion.approval.get(target.env))


def approve(source: Project, target: Project, version: int, *, by: str, reason: str = "",
            actor: str | None = None) -> dict[str, Any]:
    """Record in ``target``'s audit chain that operator ``by`` approved ``source``'s
    ``version`` for promotion into ``target`` (``mloop models approve``). The approval names
    the version by its source environment, number and training run, so it cannot be spent
    on another version."""
    if not by.strip():
        raise MloopError("an approval needs the approving operator's name (--by NAME)")
    rec = version_record(source, version)
    payload = {"model": target.config.model_name, "env": target.env,
               "source_env": source.env, "source_version": version,
               "source_run_id": rec.run_id, "by": by.strip(), "reason": reason}
    append_event(target.store, APPROVAL_EVENT, payload, actor=actor or current_actor())
    recorded = find_approval(source, target, version, rec.run_id)
    return {**payload, **(recorded or {})}


def find_approval(source: Project, target: Project, version: int, run_id: str | None
                  ) -> dict[str, Any] | None:
    """The newest approval in ``target``'s chain for exactly this version, or None."""
    for e in list_events(target.store, limit=10_000, kind=APPROVAL_EVENT):
        p = e.payload or {}
        if (p.get("model") == target.config.model_name and p.get("source_env") == source.env
                and p.get("source_version") == version and p.get("source_run_id") == run_id):
            return {"by": p.get("by"), "actor": e.actor, "event_id": e.id,
                    "at": as_utc(e.at).isoformat(timespec="seconds")}
    return None


def require_distinct(source: Project, target: Project) -> None:
    """Two environments that share a registry or a store would promote a version onto
    itself: refuse, naming the shared store."""
    from mloop.tracking import redact

    for key in ("registry_uri", "store_uri"):
        if source.uris[key] == target.uris[key]:
            raise PromotionError(
                f"environments '{source.env}' and '{target.env}' share {key} "
                f"({redact(source.uris[key], source.config.secrets)}); give "
                f"'{target.env}' its own under environments.{target.env}.stores in mloop.yaml")
