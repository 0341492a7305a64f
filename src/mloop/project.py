"""Opening a project: find mloop.yaml, resolve store URIs, build the stores and clients.

This is the composition root every entry point (CLI, server, controller, ``mloop step run``)
goes through, so they all see the same stores.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mloop.config import CONFIG_FILE, STORE_ENV_VARS, ProjectConfig, load_config
from mloop.errors import ProjectNotFoundError

if TYPE_CHECKING:  # imported where used: a read command needs few of them (pyarrow, ORM)
    from mloop.data.snapshot import SnapshotStore
    from mloop.storage import Codec, ObjectStore
    from mloop.store.db import Store
    from mloop.tracking_read import TrackingReader


def find_project_root(start: Path | None = None) -> Path:
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / CONFIG_FILE).is_file():
            return folder
    raise ProjectNotFoundError(
        f"no {CONFIG_FILE} in {here} or any parent folder; run `mloop init NAME` to create a "
        f"project, or pass --project PATH")


ENV_VAR = "MLOOP_ENV"
"""Names the environment when no ``--env`` is given: set by ``mloop --env NAME serve`` for its
worker processes, and by a deployment (a pod, a CI job) that runs in one environment."""


@dataclass
class Project:
    root: Path
    config: ProjectConfig  # with the environment's overrides laid over (in_environment)
    env: str | None = None  # None: the project defines no environments

    @property
    def name(self) -> str:
        return self.config.project

    @functools.cached_property
    def uris(self) -> dict[str, str]:
        """Every store URI, absolute, after environment overrides (``MLOOP_*_URI``)."""
        from mloop.storage import resolve_uri

        stores = self.config.stores.model_dump()
        # a store an environment names is that environment's: an MLOOP_*_URI meant for the
        # process's default stores must not turn staging's registry into dev's
        pinned = self._pinned_stores
        out: dict[str, str] = {}
        for key, env in STORE_ENV_VARS.items():
            value = stores.get(key) if key in pinned else (os.environ.get(env)
                                                           or stores.get(key))
            if value is None:
                continue
            out[key] = resolve_uri(value, self.root)
        out.setdefault("registry_uri", out["tracking_uri"])
        if "://" not in out["artifact_root"]:
            out["artifact_root"] = Path(out["artifact_root"]).as_uri()
        return out

    @property
    def _pinned_stores(self) -> set[str]:
        if self.env is None:
            return set()
        return set(self.config.environments[self.env].stores.model_fields_set)

    @property
    def artifact_location(self) -> str | None:
        """Where a new MLflow experiment keeps its artifacts. With a tracking server (http)
        and no ``artifact_root`` set in mloop.yaml or ``MLOOP_ARTIFACT_ROOT``, the server
        decides (its ``--artifacts-destination``, proxied: clients need no object-store
        credentials); the local default folder would be a path on this machine only."""
        explicit = ("artifact_root" in self.config.stores.model_fields_set
                    or (os.environ.get(STORE_ENV_VARS["artifact_root"])
                        and "artifact_root" not in self._pinned_stores))
        if self.uris["tracking_uri"].startswith(("http://", "https://")) and not explicit:
            return None
        return self.uris["artifact_root"]

    @functools.cached_property
    def store(self) -> Store:
        from mloop.store.db import Store

        # the audit key and checkpoint stay beside the project, whichever store it uses
        return Store(self.uris["store_uri"], keys_dir=self.root / ".mloop" / "keys")

    @functools.cached_property
    def snapshots(self) -> SnapshotStore:
        from mloop.config import RollingReference
        from mloop.data.snapshot import SnapshotStore
        from mloop.storage import ObjectStore

        prof = self.config.profile
        reference = self.config.monitoring.reference
        rolling = reference.rolling.text if isinstance(reference, RollingReference) else None
        return SnapshotStore(ObjectStore(self.uris["data_uri"], codec=self.codec), bins=prof.bins,
                             top_k=prof.top_k, time_column=self.config.features.time_column,
                             window=self.config.monitoring.window,
                             exclude=(self.config.target, *self.config.features.exclude),
                             rolling=rolling)

    @functools.cached_property
    def outputs(self) -> ObjectStore:
        from mloop.storage import ObjectStore

        return ObjectStore(self.uris["outputs_uri"], codec=self.codec)

    @functools.cached_property
    def log_store(self) -> ObjectStore:
        """The inference log's store (answer segments, labels, quarantine)."""
        from mloop.storage import ObjectStore

        return ObjectStore(self.uris["inference_log_uri"], codec=self.codec)

    @functools.cached_property
    def codec(self) -> Codec | None:
        """What seals files at rest (``security.encryption``), or None: every store of the
        project is given the same one. Its keys load on first use, not here."""
        enc = self.config.security.encryption
        if enc is None:
            return None
        from mloop.security.encryption import EnvelopeCodec

        return EnvelopeCodec.from_config(enc, self.root)

    def sealed_stores(self) -> dict[str, ObjectStore]:
        """The stores encryption at rest covers, by their mloop.yaml key."""
        return {"data_uri": self.snapshots.objects, "outputs_uri": self.outputs,
                "inference_log_uri": self.log_store}

    @functools.cached_property
    def mlflow(self):  # -> MlflowClient (imported lazily: mlflow import costs ~1 s)
        import mlflow
        from mlflow.tracking import MlflowClient

        # With a tracking server MLflow prints "View run ... at: URL" on stdout at every run's
        # end (and asks the server for the run to do so): stdout is mloop's (--json documents).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        # The sklearn flavour's log_model only speaks the fluent API; point it at our stores.
        mlflow.set_tracking_uri(self.uris["tracking_uri"])
        mlflow.set_registry_uri(self.uris["registry_uri"])
        if any(self.uris[k].startswith(("http://", "https://"))
               for k in ("tracking_uri", "registry_uri")):
            from mloop.prometheus_env import load_mlflow_plugins

            load_mlflow_plugins()  # its REST client's plugins import Feast when installed
        return MlflowClient(tracking_uri=self.uris["tracking_uri"],
                            registry_uri=self.uris["registry_uri"])

    def aim_mlflow(self):  # -> MlflowClient
        """``self.mlflow``, with MLflow's module-global URIs (its fluent API: downloads,
        ``log_model``) aimed at this project's stores again: a process holding two
        environments (a promotion) aims before each fluent call, not once per project."""
        import mlflow

        client = self.mlflow
        mlflow.set_tracking_uri(self.uris["tracking_uri"])
        mlflow.set_registry_uri(self.uris["registry_uri"])
        return client

    @functools.cached_property
    def tracking(self) -> TrackingReader:
        """Reads of MLflow's registry and runs: straight from its SQL schema when it is one
        mloop knows (no MLflow import), else through ``self.mlflow``."""
        from mloop.tracking_read import open_reader

        return open_reader(self.uris["tracking_uri"], self.uris["registry_uri"],
                           lambda: self.mlflow)

    @functools.cached_property
    def experiment_id(self) -> str:
        from mloop.tracking import get_or_create_experiment

        return get_or_create_experiment(self.mlflow, self.name, self.artifact_location)


def open_project(path: str | Path | None = None, *, env: str | None = None) -> Project:
    """The project whose mloop.yaml is in ``path`` or the nearest folder above it (default:
    the current folder), its config validated. Stores and clients are built on first use, so
    opening a project costs only reading its config.

    ``env`` (else ``MLOOP_ENV``, else the first environment of the promotion order) picks one
    of the project's ``environments``: its stores and serving settings replace the project's.
    A project without environments ignores ``MLOOP_ENV`` and refuses an explicit ``env``."""
    root = find_project_root(Path(path) if path else None)
    config = load_config(root / CONFIG_FILE)
    if env is None:
        env = (os.environ.get(ENV_VAR) or None) if config.environments else None
        env = env or config.default_environment
    if env is None:
        return Project(root=root, config=config)
    return Project(root=root, config=config.in_environment(env), env=env)
