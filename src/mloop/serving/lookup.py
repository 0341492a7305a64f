"""Serving with a feature store: a request carries entity keys and request-time features, the
server looks the rest up and scores the assembled rows.

With ``features.store: feast`` a version's signature holds columns the ingest step joined from
Feast's feature views. A client sends everything else (the join keys among it); a looked-up
column it sends anyway is refused with a 422 naming it, so a client can never override what
the store says (that would be training/serving skew by the back door). Per micro-batch, in the
model's thread, the batch's entity rows are read from the online store in one call, each row
is completed and checked against the signature exactly like a request's values, and only the
complete rows are predicted. A row whose entity a feature view does not know, or whose
looked-up value the signature refuses, fails its own request (422 naming the join key and
value); the other requests of the batch are answered. An online store that cannot be read
fails the whole batch with 503 and the reason: nothing is predicted on missing features.

The answered request's columns are the full feature vector, so the inference log, and with it
drift and quality monitoring, sees the looked-up columns like any other input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from mloop.errors import OnlineStoreError
from mloop.features.lookup import OnlineFeatures
from mloop.serving.edge import HTTPError
from mloop.serving.schema import Column, FieldError, InputError, InputSchema, check_value


@dataclass(frozen=True)
class _Looked:
    """A completed row's model output and its looked-up values (in ``ModelLookup.names``
    order)."""

    output: Any
    values: tuple[Any, ...]


@dataclass(frozen=True)
class _Refused:
    """A row that could not be completed: why, field by field (row numbers set per request)."""

    errors: list[FieldError]


class ModelLookup:
    """One version's lookups: what a request must carry (``request``), which columns the
    store adds (``names``), and the batch scorer the version's micro-batcher runs."""

    def __init__(self, online: OnlineFeatures, schema: InputSchema) -> None:
        self.online = online.subset(schema.names)
        self.names = self.online.names
        looked = set(self.names)
        by_name = {c.name: c for c in schema.columns}
        self._columns = [by_name[n] for n in self.names]
        self.keys = sorted({k for ks in self.online.join_keys.values() for k in ks})
        types = online.key_types()
        sent = [c if c.name not in self.keys else Column(c.name, c.type, True)
                for c in schema.columns if c.name not in looked]
        # a join key outside the signature is still sent: the lookup needs it (and the log
        # keeps it), the model never sees it
        sent += [Column(k, types.get(k, "string"), True) for k in self.keys
                 if k not in by_name]
        views = {ref.partition(":")[2]: ref.partition(":")[0] for ref in self.online.refs}
        refused = {n: f"looked up from the feature store (feature view '{views[n]}'): send "
                      f"the entity's join keys ({', '.join(self.online.join_keys[views[n]])}) "
                      f"instead" for n in self.names}
        self.request = InputSchema(sent, refused=refused)

    def scorer(self, predict: Callable[[dict[str, list]], list[Any]]
               ) -> Callable[[dict[str, list]], list[Any]]:
        """``predict`` (the version's ``score_columns``) behind a lookup: what the
        micro-batcher runs instead of it."""
        return lambda cols: self.score(predict, cols)

    def score(self, predict: Callable[[dict[str, list]], list[Any]], cols: dict[str, list]
              ) -> list[Any]:
        """One micro-batch: one read of the online store, the rows completed and checked,
        the complete ones predicted. One entry per row (``_Looked`` or ``_Refused``), as the
        batcher splits results by slicing. OnlineStoreError becomes 503 for the whole batch."""
        n = len(cols[self.keys[0]]) if self.keys else len(next(iter(cols.values())))
        entity_rows = [{k: cols[k][i] for k in self.keys} for i in range(n)]
        try:
            batch = self.online.lookup(entity_rows)
        except OnlineStoreError as exc:
            raise HTTPError(503, {"error": str(exc), "store": exc.store},
                            {"Retry-After": "5"}) from exc
        out: list[Any] = [None] * n
        complete: list[int] = []
        looked: list[tuple[Any, ...]] = []
        for i in range(n):
            errors = [FieldError(key, f"unknown to the online feature store: feature view "
                                      f"'{u.view}' has no values for {key}={value!r} (a new "
                                      f"entity, or not materialized yet)", value=value)
                      for u in batch.unknown[i] for key, value in u.keys.items()]
            values = []
            if not errors:
                for column in self._columns:
                    value, problem = check_value(column, batch.columns[column.name][i])
                    if problem is not None:
                        errors.append(FieldError(column.name, f"looked up from the feature "
                                                 f"store: {problem}", value=value))
                    values.append(value)
            if errors:
                out[i] = _Refused(errors)
            else:
                complete.append(i)
                looked.append(tuple(values))
        if complete:
            full = {k: [v[i] for i in complete] for k, v in cols.items()} \
                if len(complete) < n else dict(cols)
            for j, name in enumerate(self.names):
                full[name] = [row[j] for row in looked]
            preds = predict(full)
            for i, pred, row_values in zip(complete, preds, looked, strict=True):
                out[i] = _Looked(pred, row_values)
        return out

    def merge(self, rows: list[Any], cols: dict[str, list]) -> tuple[list[Any], dict[str, list]]:
        """One request's batch entries → its model outputs and its full columns (the
        request's plus the looked-up ones). InputError (422) naming every row that could not
        be completed, with its join key and value."""
        errors = [replace(e, row=i) for i, r in enumerate(rows) if type(r) is _Refused
                  for e in r.errors]
        if errors:
            unknown = sorted({f"{e.field}={e.value!r}" for e in errors
                              if e.problem.startswith("unknown")})
            raise InputError(errors, (f"entity unknown to the online feature store: "
                                      f"{', '.join(unknown)}") if unknown else
                             "a looked-up feature does not match the model signature")
        full = dict(cols)
        for j, name in enumerate(self.names):
            full[name] = [r.values[j] for r in rows]
        return [r.output for r in rows], full
