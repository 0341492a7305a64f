"""What the CLI, the server, the loop and the exports call: the project's feature
repo opened from mloop.yaml, its online store for serving lookups, materialization recorded as
an event, and the skew check on the project's own entities."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mloop.errors import ConfigError
from mloop.features.lookup import OnlineFeatures
from mloop.features.online import check_skew, materialize
from mloop.features.repo import FeatureRepo, open_repo
from mloop.project import Project


def project_repo(project: Project) -> tuple[FeatureRepo, list[str]]:
    """The project's Feast repo and its configured feature references; ConfigError when
    mloop.yaml has no ``features.store``."""
    cfg = project.config.features
    if cfg.store != "feast":
        raise project.config.locate(ConfigError(
            "no feature store configured: set 'features.store: feast' (with feature_refs or "
            "feature_service) in mloop.yaml", key="features"))
    repo = open_repo(project.root, cfg)
    try:
        refs = repo.resolve_refs(cfg)
    except ConfigError as exc:
        raise project.config.locate(exc) from None
    return repo, refs


def online_features(project: Project) -> OnlineFeatures:
    """The project's online store, for a server to read once per micro-batch (opened here,
    once: applying the definitions and connecting cost seconds, never paid per request)."""
    repo, refs = project_repo(project)
    return OnlineFeatures(repo, refs)


def materialize_features(project: Project, *, until: datetime,
                         actor: str | None = None) -> dict[str, Any]:
    """Fill the online store up to ``until`` and record a ``features.materialize`` event."""
    return _materialize(project, until=until, actor=actor, skip_noop=False) or {}


def materialize_due(project: Project, *, until: datetime,
                    actor: str | None = None) -> dict[str, Any] | None:
    """What the loop runs each pass: :func:`materialize_features` when some feature view has
    not reached ``until`` yet; None (nothing copied, no event) when every one has, so a loop
    passing every few minutes over a quiet log does not fill the audit chain with no-ops
    (``materialize`` decides per view, from where its last materialization ended)."""
    return _materialize(project, until=until, actor=actor, skip_noop=True)


def _materialize(project: Project, *, until: datetime, actor: str | None,
                 skip_noop: bool) -> dict[str, Any] | None:
    from mloop.security.audit import append_event

    repo, _refs = project_repo(project)
    done = materialize(repo, until=until)
    if skip_noop and not done["materialized"]:
        return None
    append_event(project.store, "features.materialize", done, actor=actor)
    return done


def check_features(project: Project, *, limit: int = 100,
                   at: datetime | None = None) -> dict[str, Any]:
    """The skew check on up to ``limit`` distinct entities of the project's entity table
    (``data``), at ``at`` or where the last materialization ended."""
    from mloop.data.source import read_source

    repo, refs = project_repo(project)
    table, _ = read_source(project.config.data, project.root,
                           project.config.features.time_column)
    keys = sorted({k for view in {r.partition(":")[0] for r in refs}
                   for k in repo.join_keys(view)})
    rows = table.select(keys).to_pylist()
    entities = list({tuple(r[k] for k in keys): r for r in rows}.values())[:limit]
    return check_skew(repo, entities, refs, at=at).to_dict()
