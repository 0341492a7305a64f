"""The model's aliases: their names, who holds them, and the champion lookup.

MLflow's aliases say what serves now; mloop's store records every change to them
(:mod:`mloop.registry.promotion` makes the changes, through this module's readers). The
champion is the version mloop recorded; MLflow's alias counts only when mloop never set one (a
model promoted by hand in MLflow's UI). Gates, promotion and deployment all ask here, so none
of them imports another to learn who the champion is.
"""

from __future__ import annotations

from mloop.project import Project
from mloop.store.models import AliasRow

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"


def stored_alias(project: Project, alias: str = CHAMPION) -> int | None:
    """The version mloop recorded for ``alias`` (None: never set, or removed)."""
    with project.store.session() as s:
        row = s.get(AliasRow, (project.config.model_name, alias))
        return row.version if row is not None else None


def mlflow_alias(project: Project, alias: str = CHAMPION) -> int | None:
    """The version MLflow's alias names (None: unset, or its version was deleted)."""
    return project.tracking.alias(project.config.model_name, alias)


def champion_version(project: Project) -> int | None:
    """The champion as mloop recorded it; MLflow's alias only if mloop never set one."""
    recorded = stored_alias(project, CHAMPION)
    return recorded if recorded is not None else mlflow_alias(project, CHAMPION)
