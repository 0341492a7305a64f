"""Request rows checked against the model's signature before anything reaches the model.

A request is turned into columns (one Python list per input) and every problem is collected,
not just the first, so a 422 names each bad field at once. Per-value checks are plain Python
type tests: no pydantic model and no DataFrame per request (those cost more than the model
on a one-row call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

# Signature type -> accepted JSON value types (bool is excluded from numbers on purpose:
# ``true`` for a temperature is a client bug, not 1.0).
_NUMERIC = ("double", "float")
_INTEGER = ("long", "integer")
MAX_ERRORS = 50


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    required: bool


@dataclass
class FieldError:
    field: str
    problem: str
    row: int | None = None
    value: Any = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"field": self.field, "problem": self.problem}
        if self.row is not None:
            out["row"] = self.row
        if self.value is not None:
            out["value"] = _short(self.value)
        return out


class InputError(Exception):
    """The request cannot be scored; ``errors`` says why, field by field (HTTP 422)."""

    def __init__(self, errors: list[FieldError], message: str = "input does not match the "
                                                                 "model signature") -> None:
        super().__init__(message)
        self.errors = errors
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "fields": [e.to_dict() for e in self.errors]}


def _short(value: Any) -> Any:
    text = repr(value)
    return value if len(text) <= 80 else text[:77] + "..."


@dataclass
class InputSchema:
    columns: list[Column]
    names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [c.name for c in self.columns]

    @classmethod
    def from_mlflow(cls, schema: Any) -> InputSchema:
        cols = []
        for c in schema.inputs:
            kind = getattr(c.type, "name", str(c.type))
            cols.append(Column(c.name, kind, bool(getattr(c, "required", True))))
        return cls(cols)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "type": c.type, "required": c.required} for c in self.columns]

    # ---------------------------------------------------------------------- request shapes

    def from_records(self, records: Any, *, where: str = "records") -> tuple[dict[str, list], int]:
        """``[{"temp": 0.3, ...}, ...]`` → columns; unknown or missing keys are errors."""
        if not isinstance(records, list) or not records:
            raise InputError([FieldError(where, "must be a non-empty list of objects")])
        errors: list[FieldError] = []
        known = set(self.names)
        cols: dict[str, list] = {n: [] for n in self.names}
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                errors.append(FieldError(where, "each row must be an object", row=i))
                continue
            for key in rec.keys() - known:
                errors.append(FieldError(key, "unknown field (not in the model signature)", row=i))
            for c in self.columns:
                cols[c.name].append(rec.get(c.name, _MISSING))
            if len(errors) >= MAX_ERRORS:
                raise InputError(errors)
        return self._check(cols, len(records), errors)

    def from_columns(self, columns: Any, *, where: str = "columns") -> tuple[dict[str, list], int]:
        """``{"temp": [0.3, 0.4], ...}`` → columns; every list must have the same length."""
        if not isinstance(columns, dict) or not columns:
            raise InputError([FieldError(where, "must be an object of equal-length lists")])
        errors = [FieldError(k, "unknown field (not in the model signature)")
                  for k in columns.keys() - set(self.names)]
        lengths = {len(v) for v in columns.values() if isinstance(v, list)}
        for k, v in columns.items():
            if not isinstance(v, list):
                errors.append(FieldError(k, "must be a list of values"))
        if len(lengths) > 1:
            errors.append(FieldError(where, f"lists have different lengths {sorted(lengths)}"))
        n = lengths.pop() if len(lengths) == 1 else 0
        if n == 0 and not errors:
            errors.append(FieldError(where, "no rows"))
        if len(lengths) > 1 or n == 0 or any(not isinstance(v, list) for v in columns.values()):
            raise InputError(errors)
        cols = {c.name: list(columns[c.name]) if c.name in columns else [_MISSING] * n
                for c in self.columns}
        return self._check(cols, n, errors)

    def from_split(self, split: Any, *, where: str = "dataframe_split"
                   ) -> tuple[dict[str, list], int]:
        """pandas' ``orient="split"``: ``{"columns": [...], "data": [[...], ...]}``."""
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) \
                or not isinstance(split.get("data"), list):
            raise InputError([FieldError(where, "must be an object with 'columns' (list) and "
                                                "'data' (list of rows)")])
        names, data = split["columns"], split["data"]
        bad = [FieldError(where + ".data", f"row has {len(r) if isinstance(r, list) else '?'} "
                                           f"values for {len(names)} columns", row=i)
               for i, r in enumerate(data) if not isinstance(r, list) or len(r) != len(names)]
        if bad:
            raise InputError(bad[:MAX_ERRORS])
        columns = {str(name): [r[j] for r in data] for j, name in enumerate(names)}
        if not data:
            raise InputError([FieldError(where + ".data", "no rows")])
        return self.from_columns(columns, where=where)

    # ------------------------------------------------------------------------- the checks

    def _check(self, cols: dict[str, list], n: int, errors: list[FieldError] | None = None
               ) -> tuple[dict[str, list], int]:
        errors = errors if errors is not None else []
        for c in self.columns:
            values = cols[c.name]
            for i, v in enumerate(values):
                if v is _MISSING:
                    errors.append(FieldError(c.name, "missing", row=i))
                elif v is None or (isinstance(v, float) and math.isnan(v)):
                    if c.required:
                        errors.append(FieldError(c.name, "null where the signature requires a "
                                                 "value", row=i))
                    values[i] = None
                elif not _accepts(c.type, v):
                    errors.append(FieldError(c.name, f"expected {c.type}, got "
                                                     f"{type(v).__name__}", row=i, value=v))
                if len(errors) >= MAX_ERRORS:
                    raise InputError(errors)
        if errors:
            raise InputError(errors)
        return cols, n

    def frame(self, cols: dict[str, list]) -> Any:
        """Columns → the DataFrame the model takes, with the signature's dtypes (int JSON
        numbers become float64 where the model takes doubles; nulls become NaN / None)."""
        import pandas as pd

        data: dict[str, Any] = {}
        for c in self.columns:
            values = cols[c.name]
            if c.type in _NUMERIC:
                data[c.name] = np.array([np.nan if v is None else v for v in values],
                                        dtype="float64")
            elif c.type in _INTEGER:
                if any(v is None for v in values):
                    data[c.name] = np.array([np.nan if v is None else v for v in values],
                                            dtype="float64")
                else:
                    data[c.name] = np.array(values, dtype="int64")
            elif c.type == "boolean":
                data[c.name] = np.array(values, dtype=object if None in values else bool)
            elif c.type == "datetime":
                data[c.name] = pd.to_datetime(pd.Series(values, dtype=object))
            else:
                data[c.name] = np.array(values, dtype=object)
        return pd.DataFrame(data, copy=False)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


_INT64 = 2 ** 63


def _accepts(kind: str, v: Any) -> bool:
    if kind in _NUMERIC:
        # integers beyond int64 are valid JSON but fit no column the log (or model) keeps
        if isinstance(v, int) and not isinstance(v, bool):
            return -_INT64 <= v < _INT64
        return isinstance(v, float) and math.isfinite(v)
    if kind in _INTEGER:
        if isinstance(v, int) and not isinstance(v, bool):
            return -_INT64 <= v < _INT64
        return isinstance(v, float) and v.is_integer() and -_INT64 <= v < _INT64
    if kind == "string":
        return isinstance(v, str)
    if kind == "boolean":
        return isinstance(v, bool)
    if kind == "datetime":
        if not isinstance(v, str):
            return False
        try:
            datetime.fromisoformat(v)
        except ValueError:
            return False
        return True
    if kind == "binary":
        return isinstance(v, str)
    return True
