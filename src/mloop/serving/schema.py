"""Request rows checked against the model's signature before anything reaches the model.

A request is turned into columns (one Python list per input) and every problem is collected,
not just the first, so a 422 names each bad field at once. Per-value checks are plain Python
type tests: no pydantic model and no DataFrame per request (those cost more than the model
on a one-row call).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np
import orjson

from mloop.errors import MloopError

# Signature types by the numpy dtype the model gets (see ``frame``); what each accepts from a
# request is in ``_CONVERTERS`` at the end.
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


class InputError(MloopError):
    """The request cannot be scored; ``errors`` says why, field by field (HTTP 422)."""

    def __init__(self, errors: list[FieldError], message: str = "input does not match the "
                                                                 "model signature") -> None:
        super().__init__(message)
        self.errors = errors
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "fields": [e.to_dict() for e in self.errors]}


class Rows(NamedTuple):
    """A request's rows checked against a signature: one list per signature column (and
    only those), the row count, and the fields outside the signature that were left out
    (name -> rows it appeared in)."""

    columns: dict[str, list]
    n: int
    ignored: dict[str, int]


def _short(value: Any) -> Any:
    """The offending value as the error body shows it: itself, or its text cut to 80
    characters (and an integer JSON encoders cannot write as a number, as text)."""
    text = repr(value)
    if len(text) > 80:
        return text[:77] + "..."
    if type(value) is int and not -2 ** 63 <= value < 2 ** 64:
        return text
    if type(value) in (list, dict):  # e.g. [2**70] where a double was expected
        try:
            orjson.dumps(value)
        except TypeError:
            return text
    return value


@dataclass
class InputSchema:
    columns: list[Column]
    names: list[str] = field(init=False)
    # fields a request must not carry, with why (a served feature store looks them up)
    refused: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = [c.name for c in self.columns]
        # for one_row: every signature value of a record at once, and each column's converter
        self._values: Callable[[dict[str, Any]], tuple[Any, ...]] = (
            itemgetter(*self.names) if len(self.names) > 1 else _one_value(self.names))
        self._converters = [_CONVERTERS.get(c.type, _as_is) for c in self.columns]

    @classmethod
    def from_mlflow(cls, schema: Any) -> InputSchema:
        cols = []
        for c in schema.inputs:
            kind = getattr(c.type, "name", str(c.type))
            cols.append(Column(c.name, kind, bool(getattr(c, "required", True))))
        return cls(cols)

    def extra_columns(self, names: list[str], *, source: str, strict: bool) -> list[str]:
        """A file's columns outside the signature, for batch scoring: the model never gets
        them; with ``strict`` (``serving.strict_columns``) they are an error, as on the
        server. A column named twice is an error either way (which one is the input?)."""
        twice = sorted(n for n, k in Counter(names).items() if k > 1)
        if twice:
            raise MloopError(f"{source}: column(s) {twice} appear more than once")
        known = set(self.names)
        extra = [n for n in names if n not in known]
        if extra and strict:
            raise MloopError(f"{source}: column(s) {extra} are not in the model signature "
                             f"(serving.strict_columns: true refuses them); drop them, or set "
                             f"serving.strict_columns: false to pass them through unscored")
        return extra

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": c.name, "type": c.type, "required": c.required} for c in self.columns]

    # ---------------------------------------------------------------------- request shapes

    def from_records(self, records: Any, *, where: str = "records", strict: bool = False
                     ) -> Rows:
        """``[{"temp": 0.3, ...}, ...]`` → columns; a missing key is an error, a key outside
        the signature is ignored (and reported in ``Rows.ignored``), or an error if
        ``strict``."""
        if type(records) is list and len(records) == 1:
            quick = self._one_row(records[0])
            if quick is not None:
                return quick
        if not isinstance(records, list) or not records:
            raise InputError([FieldError(where, "must be a non-empty list of objects")])
        errors: list[FieldError] = []
        known = set(self.names)
        width = len(known)
        refused = self.refused
        ignored: dict[str, int] = {}
        cols: dict[str, list] = {n: [] for n in self.names}
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                errors.append(FieldError(where, "each row must be an object", row=i))
                continue
            # a row with more keys than the signature has names has extra ones (with as many
            # or fewer, any unknown key comes with a missing one, which is an error anyway,
            # but a refused one is named too)
            if len(rec) > width or (refused and not refused.keys().isdisjoint(rec)):
                for key in rec.keys() - known:
                    if key in refused:
                        errors.append(FieldError(key, refused[key], row=i))
                    elif strict:
                        errors.append(FieldError(key, _STRICT, row=i))
                    else:
                        ignored[key] = ignored.get(key, 0) + 1
            for c in self.columns:
                cols[c.name].append(rec.get(c.name, _MISSING))
            if len(errors) >= MAX_ERRORS:
                raise InputError(errors)
        return self._check(cols, len(records), errors, ignored)

    def _one_row(self, rec: Any) -> Rows | None:
        """The common request, one record with exactly the signature's fields and a valid
        value in each, checked and converted as :meth:`_check` would (the same converters)
        without building the per-column lists first; None for anything else (a missing,
        extra, null or refused value), which the general path then answers, errors named."""
        if type(rec) is not dict or len(rec) != len(self.names):
            return None
        try:
            values = self._values(rec)  # KeyError: a field missing (so another is extra)
        except KeyError:
            return None
        cols: dict[str, list] = {}
        for name, convert, v in zip(self.names, self._converters, values, strict=True):
            t = type(v)
            # the two commonest fields inline (a call per field is a fifth of this check)
            if t is float and convert is _double:
                if v - v != 0.0:  # NaN (null) or ±inf: the general path names it
                    return None
                cols[name] = [v]
                continue
            if t is str and convert is _string:
                cols[name] = [v]
                continue
            if v is None or (t is float and v != v):  # null: required or not
                return None
            out = convert(v)
            if out is _BAD:
                return None
            cols[name] = [out]
        return Rows(cols, 1, {})

    def from_columns(self, columns: Any, *, where: str = "columns", strict: bool = False
                     ) -> Rows:
        """``{"temp": [0.3, 0.4], ...}`` → columns; every list must have the same length
        (the ignored ones too: the body must be one table)."""
        if not isinstance(columns, dict) or not columns:
            raise InputError([FieldError(where, "must be an object of equal-length lists")])
        extra = sorted(columns.keys() - set(self.names))
        errors = [FieldError(k, self.refused[k]) for k in extra if k in self.refused]
        if strict:
            errors += [FieldError(k, _STRICT) for k in extra if k not in self.refused]
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
        return self._check(cols, n, errors, {} if strict else dict.fromkeys(extra, n))

    def from_split(self, split: Any, *, where: str = "dataframe_split", strict: bool = False
                   ) -> Rows:
        """pandas' ``orient="split"``: ``{"columns": [...], "data": [[...], ...]}``. A column
        named twice is an error: which of the two the model should see is anyone's guess."""
        if not isinstance(split, dict) or not isinstance(split.get("columns"), list) \
                or not isinstance(split.get("data"), list):
            raise InputError([FieldError(where, "must be an object with 'columns' (list) and "
                                                "'data' (list of rows)")])
        names, data = [str(n) for n in split["columns"]], split["data"]
        if len(set(names)) != len(names):
            twice = sorted(n for n, k in Counter(names).items() if k > 1)
            raise InputError([FieldError(n, f"column named more than once in {where}.columns")
                              for n in twice])
        bad = [FieldError(where + ".data", f"row has {len(r) if isinstance(r, list) else '?'} "
                                           f"values for {len(names)} columns", row=i)
               for i, r in enumerate(data) if not isinstance(r, list) or len(r) != len(names)]
        if bad:
            raise InputError(bad[:MAX_ERRORS])
        columns = {name: [r[j] for r in data] for j, name in enumerate(names)}
        if not data:
            raise InputError([FieldError(where + ".data", "no rows")])
        return self.from_columns(columns, where=where, strict=strict)

    # ------------------------------------------------------------------------- the checks

    def _check(self, cols: dict[str, list], n: int, errors: list[FieldError],
               ignored: dict[str, int]) -> Rows:
        """Check every value against its column's type and convert it, in place, to the one
        Python type the inference log stores for that type (ints in double columns become
        floats, integral floats in long columns ints). A value the type cannot hold exactly
        is refused, so what is answered can always be logged as it was sent."""
        for c in self.columns:
            values = cols[c.name]
            convert = _CONVERTERS.get(c.type, _as_is)
            for i, v in enumerate(values):
                if v is _MISSING:
                    errors.append(FieldError(c.name, "missing", row=i))
                elif v is None or (type(v) is float and v != v):
                    if c.required:
                        errors.append(FieldError(c.name, "null where the signature requires a "
                                                 "value", row=i))
                    values[i] = None
                else:
                    out = convert(v)
                    if out is _BAD:
                        errors.append(FieldError(c.name, _problem(c.type, v), row=i, value=v))
                    elif out is not v:
                        values[i] = out
                if len(errors) >= MAX_ERRORS:
                    raise InputError(errors)
        if errors:
            raise InputError(errors)
        return Rows(cols, n, ignored)

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


def check_value(column: Column, value: Any) -> tuple[Any, str | None]:
    """``value`` converted for ``column`` as a request's would be, or the problem with it
    (for values the server adds itself, e.g. features looked up from a feature store)."""
    if value is None or (type(value) is float and value != value):
        return None, ("null where the signature requires a value" if column.required
                      else None)
    out = _CONVERTERS.get(column.type, _as_is)(value)
    if out is _BAD:
        return None, _problem(column.type, value)
    return out, None


def _one_value(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``itemgetter`` of zero or one name, which answers a tuple like that of several."""
    return lambda rec: tuple(rec[n] for n in names)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


_BAD: Any = object()  # a converter's answer for a value its type cannot hold exactly
_STRICT = "unknown field (not in the model signature; serving.strict_columns refuses it)"
_EXACT_DOUBLE = 2 ** 53  # every integer up to this magnitude is a double exactly
_RANGE = {"long": 2 ** 63, "integer": 2 ** 31}
# datetime64[ns] (what pandas, and so the model, holds) spans 1677-09-21 to 2262-04-11:
# whole days inside that, [1677-09-22, 2262-04-11)
_FIRST_DAY, _AFTER_LAST_DAY = datetime(1677, 9, 22), datetime(2262, 4, 11)


def _double(v: Any) -> Any:
    t = type(v)  # exact types: bool is no number here (``true`` for a temperature is a bug)
    if t is float:
        return v if math.isfinite(v) else _BAD
    if t is int:
        return float(v) if -_EXACT_DOUBLE <= v <= _EXACT_DOUBLE else _BAD
    return _BAD


def _integral(bound: int) -> Any:
    def convert(v: Any) -> Any:
        t = type(v)
        if t is int:
            return v if -bound <= v < bound else _BAD
        if t is float and v.is_integer() and -bound <= v < bound:
            return int(v)
        return _BAD
    return convert


def _string(v: Any) -> Any:
    return v if type(v) is str else _BAD


def _boolean(v: Any) -> Any:
    return v if type(v) is bool else _BAD


def _datetime(v: Any) -> Any:
    """ISO 8601 text → the same instant as naive UTC ISO text (a batch mixing zones, or
    zoned and naive times, would make one DataFrame column fail for every request in it)."""
    if type(v) is not str:
        return _BAD
    try:
        dt = datetime.fromisoformat(v)
        if dt.tzinfo is not None:
            dt = dt.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        return _BAD
    if not _FIRST_DAY <= dt < _AFTER_LAST_DAY:
        return _BAD
    out = dt.isoformat()
    return v if out == v else out


def _as_is(v: Any) -> Any:
    return v


_CONVERTERS: dict[str, Any] = {
    "double": _double, "float": _double, "long": _integral(_RANGE["long"]),
    "integer": _integral(_RANGE["integer"]), "string": _string, "boolean": _boolean,
    "datetime": _datetime, "binary": _string,
}


def _problem(kind: str, v: Any) -> str:
    """Why ``v`` is no ``kind`` (only called for a refused value)."""
    t = type(v)
    if kind in _NUMERIC:
        if t is float:
            return f"must be a finite {kind}"
        if t is int:
            return (f"integer beyond ±2^53 cannot be held exactly by a {kind} (send it as a "
                    f"float, or use a long column)")
    elif kind in _INTEGER:
        if t is int or (t is float and v.is_integer()):
            bits = 64 if kind == "long" else 32
            return f"out of range for {kind} ({bits}-bit signed integer)"
        if t is float:
            return (f"expected {kind}, got a number with a fraction" if math.isfinite(v)
                    else f"expected {kind}, got {v}")
    elif kind == "datetime" and t is str:
        return ("expected an ISO 8601 date-time between 1677-09-22 and 2262-04-10")
    return f"expected {kind}, got {t.__name__}"
