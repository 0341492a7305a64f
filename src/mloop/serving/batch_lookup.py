"""Feature-store lookups for batch scoring: a file of entity keys completed, chunk by chunk,
with the looked-up columns a version's signature holds, before it is scored.

With ``features.store: feast`` a file carries what a request carries (the join keys and the
request-time features) and never the looked-up columns: one that does is refused naming
them, as the server's 422 refuses them, so the file can never override what the store says.

Which values complete a row depends on the file, and the mode is reported with the result:

- ``point-in-time``: the file has ``features.time_column``. Each row gets the values as they
  were known at its event time, by the same historical join the ingest step trains on
  (:func:`mloop.features.training.training_table`). A batch of past events (a backfill, a
  re-score after a retrain, an evaluation) must see what the model would have seen then; the
  online store's current values would leak the future into the past and differ from training.
- ``online``: no event time. The rows are scored "now", exactly as the server scores them:
  the online store's current values (:class:`mloop.features.lookup.OnlineFeatures`).

An entity a feature view has no values for (every feature of that view null for the row: a
new carrier, a typo, an event before the view's first value or beyond its TTL) fails the whole
file with an error naming the join key and value(s): nothing is scored on missing features,
and batch scoring writes its output only when every row was scored.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from mloop.errors import DataSourceError
from mloop.features.lookup import OnlineFeatures
from mloop.project import Project
from mloop.serving.schema import InputSchema

ONLINE = "online"
POINT_IN_TIME = "point-in-time"


class BatchLookup:
    """One version's lookups for one file: the mode, the join keys, the looked-up columns."""

    def __init__(self, project: Project, schema: InputSchema, names: list[str],
                 source: str) -> None:
        from mloop.features.service import online_features

        online = online_features(project)
        wanted = set(schema.names)
        self.refs = [r for r in online.refs if r.partition(":")[2] in wanted]
        self.online: OnlineFeatures = online.subset(schema.names)
        self.repo = online.repo
        self.names = self.online.names
        self.views = dict(self.online.views)
        self.keys = sorted({k for ks in self.online.join_keys.values() for k in ks})
        self.source = source
        time_column = project.config.features.time_column
        self.time_column = time_column if time_column and time_column in names else None
        self.mode = POINT_IN_TIME if self.time_column else ONLINE
        sent = [n for n in self.names if n in names]
        if sent:
            raise DataSourceError(
                f"{source}: column(s) {sent} are looked up from the feature store "
                f"(features.store: feast); drop them and keep the join keys "
                f"({', '.join(self.keys)}): a file may not override what the store says")
        missing = [k for k in self.keys if k not in names]
        if missing:
            raise DataSourceError(
                f"{source}: missing join key column(s) {missing}: the feature store's "
                f"lookups need them (found {names})")

    @property
    def passed_through(self) -> set[str]:
        """Columns the lookup reads that are not model inputs (not 'ignored' ones)."""
        return {*self.keys, *([self.time_column] if self.time_column else [])}

    def complete(self, batch: pa.RecordBatch, offset: int) -> pa.RecordBatch:
        """``batch`` with one column per looked-up feature appended; DataSourceError naming
        every unknown entity (join key=value) and its first row."""
        if not self.names:
            return batch
        values = self._point_in_time(batch) if self.time_column else self._online(batch)
        self._check_known(batch, values, offset)
        out = pa.Table.from_batches([batch])
        for name in self.names:
            out = out.append_column(name, pa.array(values[name], from_pandas=True))
        return out.combine_chunks().to_batches()[0]

    def _online(self, batch: pa.RecordBatch) -> dict[str, list[Any]]:
        keys = {k: batch.column(batch.schema.names.index(k)).to_pylist() for k in self.keys}
        rows = [{k: keys[k][i] for k in self.keys} for i in range(batch.num_rows)]
        return self.online.lookup(rows).columns

    def _point_in_time(self, batch: pa.RecordBatch) -> dict[str, list[Any]]:
        from mloop.features.training import training_table

        assert self.time_column is not None
        cols = [*self.keys, self.time_column]
        entities = pa.table({c: batch.column(batch.schema.names.index(c)) for c in cols})
        table, _ = training_table(self.repo, entities, time_column=self.time_column,
                                  refs=self.refs)
        return {n: table.column(n).to_pylist() for n in self.names}

    def _check_known(self, batch: pa.RecordBatch, values: dict[str, list[Any]],
                     offset: int) -> None:
        unknown: dict[str, dict[str, int]] = {}  # view -> "k=v" -> its first row
        for view, features in self.views.items():
            keys = self.online.join_keys[view]
            cols = {k: batch.column(batch.schema.names.index(k)).to_pylist() for k in keys}
            for i in range(batch.num_rows):
                if all(values[f][i] is None or values[f][i] != values[f][i]  # None or NaN
                       for f in features):
                    label = ", ".join(f"{k}={cols[k][i]!r}" for k in keys)
                    unknown.setdefault(view, {}).setdefault(label, offset + i)
        if not unknown:
            return
        parts = []
        for view, found in unknown.items():
            shown = "; ".join(f"{label} (row {row})" for label, row in list(found.items())[:10])
            more = f" and {len(found) - 10} more" if len(found) > 10 else ""
            parts.append(f"feature view '{view}' has no values for {shown}{more}")
        when = ("as of the row's " + repr(self.time_column)) if self.time_column else \
            "in the online store"
        raise DataSourceError(
            f"{self.source}: entity unknown to the feature store ({self.mode}, {when}): "
            f"{'; '.join(parts)} (a new entity, a typo, or not materialized yet); nothing "
            f"written")
