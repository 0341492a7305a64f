"""Online lookups for serving: the feature views' current values for a batch of entity rows,
read from the online store in one call, with the entities the store does not know named.

A server opens this once (Feast's ``FeatureStore`` and its online-store connection are
reused by every request) and calls :meth:`OnlineFeatures.lookup` once per micro-batch, in the
model's thread: Feast's read is blocking, and the event loop must not wait on it.

An entity is unknown to a view when every feature of that view came back null for it: that is
what Feast answers for a key it never materialized (a new carrier, a typo). A single null
among values that did come back is a value like any other, and the model's signature decides
whether it may be null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mloop.errors import OnlineStoreError
from mloop.features.repo import FeatureRepo

# Feast's value types of join keys -> the MLflow signature type a request carries them as
_KEY_TYPES = {"STRING": "string", "INT64": "long", "INT32": "integer", "BYTES": "binary",
              "BOOL": "boolean", "DOUBLE": "double", "FLOAT": "float"}


@dataclass(frozen=True)
class Unknown:
    """An entity row a view has no values for: the view, and its join keys with their values."""

    view: str
    keys: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    """One lookup: per looked-up column (the feature's name), a value per entity row (None:
    no value), and per row the entities no view knows (empty for a row that is complete)."""

    columns: dict[str, list[Any]]
    unknown: list[list[Unknown]]


class OnlineFeatures:
    """The project's Feast repo, read online: ``refs`` ("view:feature") by their views' join
    keys. Construct once per server: opening the repo imports Feast and connects."""

    def __init__(self, repo: FeatureRepo, refs: Sequence[str]) -> None:
        self.repo = repo
        self.refs = list(refs)
        self.store_type = str(getattr(repo.store.config.online_store, "type", "online"))
        self.views: dict[str, list[str]] = {}  # view -> its features among the refs
        for ref in self.refs:
            view, _, feature = ref.partition(":")
            self.views.setdefault(view, []).append(feature)
        self.join_keys = {view: repo.join_keys(view) for view in self.views}

    @property
    def names(self) -> list[str]:
        """The looked-up columns, named as the training table names them (the feature)."""
        return [ref.partition(":")[2] for ref in self.refs]

    def key_types(self) -> dict[str, str]:
        """Each join key's signature type (from its entity's value type; string when the
        entity does not say)."""
        out: dict[str, str] = {}
        for entity in self.repo.store.list_entities():
            kind = getattr(getattr(entity, "value_type", None), "name", "STRING")
            out[entity.join_key] = _KEY_TYPES.get(kind, "string")
        return out

    def subset(self, names: Sequence[str]) -> OnlineFeatures:
        """The same store, looking up only the refs whose feature is in ``names`` (a model
        version's signature: one trained on fewer features needs fewer)."""
        wanted = set(names)
        return OnlineFeatures(self.repo, [r for r in self.refs
                                          if r.partition(":")[2] in wanted])

    def lookup(self, entity_rows: list[dict[str, Any]]) -> Batch:
        """The refs' current values for each row (a dict holding at least every view's join
        keys), in one read of the online store. Raises OnlineStoreError when the store cannot
        be read (connection refused, tables missing), whatever Feast or its client raised."""
        if not self.refs:
            return Batch({}, [[] for _ in entity_rows])
        keys = sorted({k for ks in self.join_keys.values() for k in ks})
        # duplicates are common in a micro-batch (many flights of one carrier): read each once
        index: dict[tuple[Any, ...], int] = {}
        unique: list[dict[str, Any]] = []
        where = []
        for row in entity_rows:
            key = tuple(row[k] for k in keys)
            at = index.get(key)
            if at is None:
                at = index[key] = len(unique)
                unique.append({k: row[k] for k in keys})
            where.append(at)
        try:
            response = self.repo.store.get_online_features(
                features=self.refs, entity_rows=unique).to_dict()
        except Exception as exc:  # redis, sqlite3, Feast: the store is the boundary here
            raise OnlineStoreError(
                f"the online feature store ({self.store_type}) could not be read: "
                f"{type(exc).__name__}: {exc}", store=self.store_type) from exc
        names = self.names
        columns = {n: [response[n][i] for i in where] for n in names}
        missing: list[list[Unknown]] = []
        for u in range(len(unique)):
            gone = [Unknown(view, {k: unique[u][k] for k in self.join_keys[view]})
                    for view, features in self.views.items()
                    if all(response[f][u] is None for f in features)]
            missing.append(gone)
        return Batch(columns, [missing[i] for i in where])

