"""Opening the project's Feast repo: its definitions applied to its registry, and their hash.

The repo is a folder inside the project (``features.repo``, default ``feature_repo/``) holding
``feature_store.yaml`` and Python files that define entities and feature views, exactly as
``feast apply`` reads it. mloop applies the definitions itself each time it opens the repo, so a
training run never joins against a registry older than the code it records; the hash of the
definition files goes into the lineage so a changed feature view shows up as a changed input.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloop.config import FeaturesConfig
from mloop.errors import ConfigError, DataSourceError, MloopError
from mloop.extras import require_extra

# two threads must not see a half-changed sys.path while a repo's files are imported
_IMPORT_LOCK = threading.Lock()


@dataclass
class FeatureRepo:
    """An opened Feast repo: the SDK's store, the views' definitions and their hash."""

    path: Path
    store: Any  # feast.FeatureStore (kept untyped: feast is an optional extra)
    definitions_hash: str  # sha256 over feature_store.yaml and every definition file

    @property
    def feature_views(self) -> list[str]:
        return sorted(fv.name for fv in self.store.list_feature_views())

    def resolve_refs(self, cfg: FeaturesConfig) -> list[str]:
        """The configured feature references ("view:feature"), checked against the repo: an
        unknown view or feature names the key, the value and what exists."""
        views = {fv.name: fv for fv in self.store.list_feature_views()}
        if cfg.feature_service:
            try:
                service = self.store.get_feature_service(cfg.feature_service)
            except Exception as exc:  # feast raises its own FeatureServiceNotFoundException
                names = sorted(s.name for s in self.store.list_feature_services())
                raise ConfigError(
                    f"features.feature_service '{cfg.feature_service}' is not defined in "
                    f"{self.path} (defined: {', '.join(names) or 'none'})",
                    key="features.feature_service") from exc
            return [f"{p.name}:{f.name}" for p in service.feature_view_projections
                    for f in p.features]
        refs = list(cfg.feature_refs or [])
        for ref in refs:
            view, _, feature = ref.partition(":")
            if view not in views:
                raise ConfigError(
                    f"features.feature_refs: '{ref}' names feature view '{view}', not defined "
                    f"in {self.path} (defined: {', '.join(sorted(views)) or 'none'})",
                    key="features.feature_refs")
            names = [f.name for f in views[view].features]
            if feature not in names:
                raise ConfigError(
                    f"features.feature_refs: '{ref}': feature view '{view}' has no feature "
                    f"'{feature}' (it has: {', '.join(names)})", key="features.feature_refs")
        return refs

    def join_keys(self, view: str) -> list[str]:
        return list(self.store.get_feature_view(view).join_keys)

    @property
    def offline_store_type(self) -> str:
        """``offline_store.type`` of feature_store.yaml (file, postgres, ...)."""
        return str(getattr(self.store.config.offline_store, "type", "offline"))

    def source_of(self, view: str) -> str:
        """Where a view's rows live, as a user would look for them: the file of a file
        source, the table (or query) of a SQL source such as PostgreSQL's."""
        source = self.store.get_feature_view(view).batch_source
        path = getattr(source, "path", None)
        if isinstance(path, str) and path:
            return f"file '{path}'"
        query = getattr(source, "get_table_query_string", None)
        if callable(query):
            where = str(query())
            return f"query {where}" if where.startswith("(") else f"table '{where}'"
        return f"source '{source.name}'"

    def offline_error(self, view: str, exc: BaseException, *,
                      materializing: bool = False) -> DataSourceError:
        """The error for a view whose offline-store rows could not be read (or materialized):
        names the view, the stores and the table or file, then the first line of what the
        store's client said (psycopg's messages run on with SQL excerpts and carets)."""
        first = (str(exc).strip().splitlines() or [""])[0]
        offline = f"the {self.offline_store_type} offline store ({self.source_of(view)})"
        if materializing:
            online = str(getattr(self.store.config.online_store, "type", "online"))
            doing = f"materialized from {offline} into the {online} online store"
        else:
            doing = f"read from {offline}"
        return DataSourceError(f"feature view '{view}' could not be {doing}: "
                               f"{type(exc).__name__}: {first}")


def _definition_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def definitions_hash(path: Path) -> str:
    """sha256 over feature_store.yaml and the definition files (path and bytes of each)."""
    h = hashlib.sha256()
    for file in [path / "feature_store.yaml", *_definition_files(path)]:
        h.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def import_feast() -> None:
    """Import Feast without letting it switch this process's Prometheus metrics to a folder
    of its own (:mod:`mloop.prometheus_env`). MissingExtraError when it is not installed."""
    from mloop.prometheus_env import keep_prometheus_env

    if "feast.metrics" in sys.modules:
        return
    with keep_prometheus_env():  # feast.metrics: what sets the variable (import feast does)
        require_extra("feast", "feast.metrics", feature="'features.store: feast'")


def _definitions(path: Path) -> list[Any]:
    """Every Feast object the repo's files define at module level (as ``feast apply`` collects
    them; an object imported into two files counts once). Each file is imported under a private
    module name, with the repo first on sys.path so the files can import each other."""
    import importlib.util

    import_feast()
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    kinds = (DataSource, Entity, FeatureView, OnDemandFeatureView, FeatureService)
    found: list[Any] = []
    tag = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    with _IMPORT_LOCK:
        sys.path.insert(0, str(path))
        try:
            for file in _definition_files(path):
                if file.name == "__init__.py":
                    continue
                name = f"_mloop_feast_{tag}_" + "_".join(file.relative_to(path)
                                                        .with_suffix("").parts)
                spec = importlib.util.spec_from_file_location(name, file)
                if spec is None or spec.loader is None:
                    raise MloopError(f"cannot import {file}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                for value in vars(module).values():
                    if isinstance(value, kinds) and not any(value is f for f in found):
                        found.append(value)
        finally:
            sys.path.remove(str(path))
    return found


def _make_local_dirs(path: Path) -> None:
    """Create the folders of a local registry and SQLite online store (the embedded default
    keeps them under the project's .mloop/feast/, which a fresh checkout lacks)."""
    import yaml

    conf = yaml.safe_load((path / "feature_store.yaml").read_text()) or {}
    registry = conf.get("registry")
    online = conf.get("online_store")
    files = [registry.get("path") if isinstance(registry, dict) else registry,
             online.get("path") if isinstance(online, dict) else None]
    for file in files:
        if isinstance(file, str) and "://" not in file:
            (path / file).parent.mkdir(parents=True, exist_ok=True)


def open_repo(root: Path, cfg: FeaturesConfig) -> FeatureRepo:
    """Open ``features.repo`` under the project ``root`` and apply its definitions.

    Raises ConfigError naming the key when the folder or its feature_store.yaml is missing, and
    MloopError with the file's error when a definition file fails to import.
    """
    import_feast()
    from feast import FeatureStore

    path = (root / cfg.repo).resolve()
    if not (path / "feature_store.yaml").is_file():
        raise ConfigError(f"features.repo '{cfg.repo}': no feature_store.yaml in {path}",
                          key="features.repo")
    try:
        objects = _definitions(path)
        _make_local_dirs(path)
        store = FeatureStore(repo_path=str(path))
    except Exception as exc:  # a user's definition file can raise anything
        raise MloopError(f"the Feast repo {path} could not be loaded: "
                         f"{type(exc).__name__}: {exc}") from exc
    store.apply(objects)
    return FeatureRepo(path=path, store=store, definitions_hash=definitions_hash(path))
