"""The model's aliases: their names, who holds them, and the champion lookup.

MLflow's aliases say what serves now; mloop's store records every change to them
(:mod:`mloop.registry.promotion` makes the changes). The champion is the version mloop
recorded; MLflow's alias counts only when mloop never set one (a model promoted by hand in
MLflow's UI). Everything that needs the champion asks here, and :func:`require_champion`
words the "there is none" error once for every command.
"""

from __future__ import annotations

from mloop.errors import ModelNotFoundError
from mloop.project import Project
from mloop.store.models import AliasRow

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

# the command that makes a champion, as the errors suggest it
PROMOTE_HINT = 'mloop models promote VERSION --reason "..."'


def stored_alias(project: Project, alias: str = CHAMPION) -> int | None:
    """The version mloop recorded for ``alias`` (None: never set, or removed)."""
    with project.store.session() as s:
        row = s.get(AliasRow, (project.config.model_name, alias))
        return row.version if row is not None else None


def mlflow_alias(project: Project, alias: str = CHAMPION) -> int | None:
    """The version MLflow's alias names (None: unset, or its version was deleted). Read
    through the project's tracking reader: MLflow's SQL schema directly when it is a known
    revision, MlflowClient otherwise."""
    return project.tracking.alias(project.config.model_name, alias)


def champion_version(project: Project) -> int | None:
    """The champion as mloop recorded it; MLflow's alias only if mloop never set one."""
    recorded = stored_alias(project, CHAMPION)
    return recorded if recorded is not None else mlflow_alias(project, CHAMPION)


def require_champion(project: Project, *, needed_for: str) -> int:
    """The champion's version, or ModelNotFoundError naming the model, what needed a
    champion (``needed_for``, e.g. "nothing to monitor against") and how to make one."""
    version = champion_version(project)
    if version is None:
        name = project.config.model_name
        raise ModelNotFoundError(f"'{name}' has no champion: {needed_for}; make one with "
                                 f"`{PROMOTE_HINT}`", model=name)
    return version
