"""Point-in-time training tables: the entity table with each row's features as they were known
at its event timestamp (Feast's ``get_historical_features``).

Two things in Feast's file offline store shape how it is called: it keeps one entity row per
(join keys, event timestamp) of each feature view, and it returns rows in its own order. So
each view is joined on the distinct (its keys, timestamp) pairs only, and the values are merged
back onto every entity row by those columns: no row is lost or reordered, and the split that
follows sees the table in the entity table's order. An entity row with no feature value within
the view's TTL keeps a null (validation's ``max_missing_rate`` decides whether that is allowed).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mloop.errors import DataSourceError
from mloop.features.repo import FeatureRepo

_TS = "event_timestamp"


@dataclass(frozen=True)
class FeatureLineage:
    """What a training table's looked-up columns came from, recorded with the run."""

    repo: str
    feature_views: list[str]
    feature_refs: list[str]
    definitions_hash: str

    def as_params(self) -> dict[str, str]:
        """Step-run params (``feast.*``: the step's own arguments already use ``features.*``)."""
        return {"feast.repo": self.repo, "feast.feature_views": ",".join(self.feature_views),
                "feast.definitions_hash": self.definitions_hash}


def _by_view(refs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for ref in refs:
        view, _, feature = ref.partition(":")
        out[view].append(feature)
    return dict(out)


# a feature's declared Feast type -> the numpy dtype its column has in the training table
_DTYPES = {"INT64": "int64", "INT32": "int32", "DOUBLE": "float64", "FLOAT": "float32",
           "BOOL": "bool"}


def _declared_dtypes(repo: FeatureRepo, view: str) -> dict[str, str]:
    out = {}
    for field in repo.store.get_feature_view(view).features:
        kind = getattr(field.dtype.to_value_type(), "name", "")
        if kind in _DTYPES:
            out[field.name] = _DTYPES[kind]
    return out


def _as_declared(column: Any, dtype: str | None) -> Any:
    """A looked-up column in the type its feature view declares, whatever the offline store
    returned: a PostgreSQL ``integer`` comes back int32, ``real`` float32, ``numeric``
    Decimal, where the file store gives the Parquet file's types. So a model trained on one
    store's join sees the same schema as on another's. An integer column with a null becomes
    float64 (NaN), a boolean one objects, as pandas makes them when the join leaves a row
    without a value."""
    import numpy as np

    values = column.to_numpy()
    if dtype is None:
        return values
    if column.isna().any():
        if dtype == "bool":  # pandas keeps True/False/NaN as objects: so does the file store
            return values
        if dtype.startswith("int"):
            dtype = "float64"
    if values.dtype == np.dtype(dtype):
        return values
    return column.astype(dtype).to_numpy()


def training_table(repo: FeatureRepo, entities: pa.Table, *, time_column: str,
                   refs: list[str]) -> tuple[pa.Table, FeatureLineage]:
    """``entities`` with one column per feature reference appended, values as of each row's
    ``time_column`` (naive timestamps are UTC, as in Feast). Raises DataSourceError naming a
    join key or feature the entity table lacks or already has."""
    import pandas as pd

    frame = entities.to_pandas()
    if time_column not in frame.columns:
        raise DataSourceError(f"features.time_column '{time_column}' is not a column of the "
                              f"entity table (columns: {', '.join(frame.columns)})")
    ts = pd.to_datetime(frame[time_column])
    ts = ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts.dt.tz_convert("UTC")
    views = _by_view(refs)
    for view, features in views.items():
        keys = repo.join_keys(view)
        missing = [k for k in keys if k not in frame.columns]
        if missing:
            raise DataSourceError(
                f"feature view '{view}' is keyed by {', '.join(keys)}; the entity table has "
                f"no column {', '.join(repr(k) for k in missing)}")
        clash = [f for f in features if f in frame.columns]
        if clash:
            raise DataSourceError(
                f"feature '{clash[0]}' of view '{view}' is already a column of the entity "
                f"table: drop it from the data or from features.feature_refs")
        pairs = frame[keys].assign(**{_TS: ts}).drop_duplicates(ignore_index=True)
        try:
            job = repo.store.get_historical_features(
                entity_df=pairs, features=[f"{view}:{f}" for f in features])
            values = job.to_df()[[*keys, _TS, *features]]
        except Exception as exc:  # psycopg, Dask, Feast: the offline store is the boundary
            raise repo.offline_error(view, exc) from exc
        values[_TS] = pd.to_datetime(values[_TS], utc=True)
        left = frame[keys].assign(**{_TS: ts})
        joined = left.merge(values, on=[*keys, _TS], how="left", validate="many_to_one")
        declared = _declared_dtypes(repo, view)
        for feature in features:
            frame[feature] = _as_declared(joined[feature], declared.get(feature))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    lineage = FeatureLineage(repo=str(repo.path.name), feature_views=sorted(views),
                             feature_refs=list(refs), definitions_hash=repo.definitions_hash)
    return table, lineage


def online_values(repo: FeatureRepo, rows: list[dict[str, Any]], refs: list[str]
                  ) -> list[dict[str, Any]]:
    """The online store's current values of ``refs`` for each entity row (None: no value)."""
    response = repo.store.get_online_features(features=refs, entity_rows=rows).to_dict()
    names = [r.partition(":")[2] for r in refs]
    return [{n: response[n][i] for n in names} for i in range(len(rows))]
