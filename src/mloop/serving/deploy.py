"""Who serves what: the champion, and optionally a challenger as canary or shadow.

The challenger is the MLflow alias ``challenger`` plus an open deployment row in mloop's store
that says its mode (``canary`` or ``shadow``) and traffic share; servers poll
``desired_state`` and converge to it. Every change goes through ``change_alias``, so it is a
recorded, audited deployment like a promotion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from mloop.errors import MloopError, PromotionError
from mloop.project import Project
from mloop.registry.aliases import (
    CHALLENGER,
    CHAMPION,
    mlflow_alias,
    require_champion,
    stored_alias,
)
from mloop.registry.candidates import version_record
from mloop.registry.promotion import AliasChange, change_alias
from mloop.store.models import DeploymentRow

MODES = ("canary", "shadow")


@dataclass(frozen=True)
class DesiredState:
    champion: int | None
    challenger: int | None = None
    mode: str | None = None  # canary | shadow
    weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"champion": self.champion, "challenger": self.challenger, "mode": self.mode,
                "weight": self.weight}


def desired_state(project: Project) -> DesiredState:
    """What should serve now, as mloop recorded it (MLflow's alias only if mloop never set a
    champion, e.g. a model promoted by hand in MLflow's UI)."""
    name = project.config.model_name
    champion = stored_alias(project, CHAMPION)
    if champion is None:
        champion = mlflow_alias(project, CHAMPION)
    with project.store.session() as s:
        row = s.scalars(sa.select(DeploymentRow).where(
            DeploymentRow.model == name, DeploymentRow.alias == CHALLENGER,
            DeploymentRow.ended_at.is_(None)).order_by(DeploymentRow.id.desc())).first()
    if row is None or row.version == champion or row.action not in MODES:
        return DesiredState(champion)
    return DesiredState(champion, row.version, row.action,
                        float(row.traffic) if row.action == "canary" else 0.0)


def deploy_challenger(project: Project, version: int, *, mode: str, weight: float = 0.0,
                      reason: str, actor: str | None = None) -> AliasChange:
    """Make ``version`` the challenger: ``canary`` answers ``weight`` of the traffic,
    ``shadow`` is scored on a copy of every request and never answers."""
    if mode not in MODES:
        raise MloopError(f"unknown deployment mode '{mode}' (expected one of {list(MODES)})")
    if mode == "canary" and not 0.0 < weight < 1.0:
        raise MloopError(f"--weight must be between 0 and 1 (exclusive) for a canary, got "
                         f"{weight}")
    if not reason.strip():
        raise MloopError("a deployment needs a reason (--reason \"...\"): it goes in the "
                         "history")
    version_record(project, version)
    champion = require_champion(project, needed_for="a challenger is deployed next to it")
    if champion == version:
        raise PromotionError(f"v{version} is the champion; a challenger must be another "
                             f"version")
    current = stored_alias(project, CHALLENGER)
    return change_alias(project, CHALLENGER, version, expected=current, action=mode,
                        reason=reason, actor=actor,
                        traffic=weight if mode == "canary" else 0.0,
                        details={"mode": mode, "champion": champion})


def stop_challenger(project: Project, *, reason: str, actor: str | None = None) -> AliasChange:
    current = stored_alias(project, CHALLENGER)
    if current is None:
        raise PromotionError(f"'{project.config.model_name}' has no challenger to stop")
    return change_alias(project, CHALLENGER, None, expected=current, action="stop",
                        reason=reason or "challenger stopped", actor=actor)
