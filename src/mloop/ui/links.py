"""Links into MLflow's own UI, where it shows a thing better than the dashboard (a run's
params, metrics and artifacts; a model version's page).

mloop has no setting for MLflow's UI address, so the tracking URI decides: an MLflow server
(``http(s)://``) serves its UI at that same address, and each run id becomes a link. With a
database as the tracking store (SQLite by default, or PostgreSQL) no MLflow UI runs; run ids
are shown as text, and the page says once how to start one on this project's store.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from mloop.project import Project


@dataclass(frozen=True)
class MlflowUi:
    """Where MLflow's UI is (``base``, None without a server) or how to start one
    (``hint``, a shell command with the store's password redacted)."""

    base: str | None
    hint: str | None

    def run_url(self, run_id: str | None, experiment_id: str | None = None) -> str | None:
        """The run's page; MLflow's UI finds the experiment itself when it is not known."""
        if self.base is None or not run_id:
            return None
        if experiment_id:
            return f"{self.base}/#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}"
        return f"{self.base}/#/runs/{quote(run_id)}"

    def version_url(self, model: str, version: int) -> str | None:
        if self.base is None:
            return None
        return f"{self.base}/#/models/{quote(model, safe='')}/versions/{version}"


def mlflow_ui(tracking_uri: str, *, secrets: frozenset[str] | set[str] = frozenset()
              ) -> MlflowUi:
    """MLflow's UI for a project tracked at ``tracking_uri`` (absolute, as
    ``Project.uris`` gives it); ``secrets`` are hidden in the hint like everywhere else."""
    from mloop.tracking import redact

    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        host = parts.netloc.rpartition("@")[2]  # never a password in a link
        return MlflowUi(base=urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", "")),
                        hint=None)
    store = redact(tracking_uri, secrets)
    return MlflowUi(base=None, hint=f"mlflow ui --backend-store-uri {shlex.quote(store)}")


def project_mlflow_ui(project: Project) -> MlflowUi:
    """MLflow's UI for this project's tracking store (:func:`mlflow_ui`)."""
    return mlflow_ui(project.uris["tracking_uri"], secrets=project.config.secrets)
