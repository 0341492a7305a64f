"""Request bodies → a parser for the routed version's signature.

A body is decoded once (orjson on the raw bytes); turning it into checked columns waits until
the request is routed, because the champion and a canary may have different signatures. So
each format yields a :data:`Parser`: a function of the version's ``InputSchema``.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from mloop.serving.edge import HTTPError
from mloop.serving.schema import FieldError, InputError, InputSchema, Rows

Parser = Callable[[InputSchema], Rows]


def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; 400 naming the problem when it is not one, or when it is
    ambiguous: a key twice in one object (orjson, like most parsers, would keep the last one
    silently: ``{"temp": 1, "temp": 40}`` would be scored as 40).

    orjson also reads an integer beyond 64 bits as the nearest float, which would hide that
    the value does not fit its column. Both are rare, and found without a second parse of
    every body (see :func:`_needs_exact_parse`); only then is the body parsed again, exactly,
    by the standard library.
    """
    if not raw.strip():
        raise HTTPError(400, {"error": "empty body; expected JSON"})
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, {"error": f"malformed JSON: {exc}"}) from None
    if _needs_exact_parse(raw, body):
        body = _exact_parse(raw)
    return body


_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_INT = b"0" * 20  # 2^64 has 20 digits: shorter integers orjson reads exactly


def _needs_exact_parse(raw: bytes, body: Any) -> bool:
    """True when ``body`` may have lost a duplicate key or a big integer.

    Every key in the text is followed by a colon, so the colons in ``raw`` (plus escaped
    ones, ``\\u003a``, which decode to a colon) are at least the keys in the text plus the
    colons inside its strings. :func:`_keys_and_colons` counts keys of the parsed body and
    colons in its top-level strings, which can only be fewer; the two are equal only if no
    key was dropped. A one-row body costs about a microsecond here.
    """
    if _LONG_INT in raw.translate(_DIGITS):
        return True
    colons = raw.count(b":")
    if b"\\u" in raw:
        colons += raw.count(b"\\u003a") + raw.count(b"\\u003A")
    return colons != _keys_and_colons(body)


def _keys_and_colons(body: Any) -> int:
    """Keys of the body, its objects and its lists of objects, plus the colons in its
    top-level strings (an ISO timestamp has two). Deeper keys are not counted: a body that has
    any takes the exact parse, which is rare (no request format nests deeper)."""
    if type(body) is list:
        return sum(map(len, body)) if body and set(map(type, body)) == {dict} else 0
    if type(body) is not dict:
        return 0
    n = len(body)
    for v in body.values():
        t = type(v)
        if t is dict:
            n += len(v)
            for w in v.values():
                if type(w) is list and w and type(w[0]) is dict and set(map(type, w)) == {dict}:
                    n += sum(map(len, w))
        elif t is list:
            if v and type(v[0]) is dict and set(map(type, v)) == {dict}:
                n += sum(map(len, v))
        elif t is str:
            n += v.count(":")
    return n


class _DuplicateKeyError(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKeyError(k)
        out[k] = v
    return out


def _exact_parse(raw: bytes) -> Any:
    """The standard library's parse: every integer exact, every object's keys checked."""
    import json

    try:
        return json.loads(raw, object_pairs_hook=_unique)
    except _DuplicateKeyError as exc:
        raise HTTPError(400, {"error": f"ambiguous JSON: key '{exc.key}' appears twice in one "
                                       f"object; send each key once",
                              "fields": [{"field": exc.key,
                                          "problem": "duplicate key in one JSON object"}]}
                        ) from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise HTTPError(400, {"error": f"malformed JSON: {exc}"}) from None


@dataclass(frozen=True)
class PredictRequest:
    """A /predict body: rows (as a parser), the sticky routing key and the event time."""

    parser: Parser
    key: str | None
    timestamp: float


PREDICT_FIELDS = frozenset({"records", "columns", "key", "timestamp"})


def predict_request(body: Any, *, strict: bool = False) -> PredictRequest:
    """mloop's own body: ``records`` (list of objects) or ``columns`` (object of lists), an
    optional ``key`` and ``timestamp``; anything else is named in a 422. Row fields outside
    the signature are left out (or refused, with ``strict``)."""
    if not isinstance(body, dict):
        raise InputError([FieldError("body", "must be an object with 'records' or "
                                             "'columns'")])
    if "records" in body and "columns" in body:
        raise InputError([FieldError(k, "the body has both 'records' and 'columns': send the "
                                        "rows once") for k in ("records", "columns")])
    key = body.get("key")
    if key is not None and (type(key) is bool or not isinstance(key, str | int)):
        raise InputError([FieldError("key", "must be a string")])
    ts = event_time(body.get("timestamp"))
    parser: Parser
    if "records" in body:
        records = body["records"]
        parser = lambda s: s.from_records(records, strict=strict)  # noqa: E731
    elif "columns" in body:
        columns = body["columns"]
        parser = lambda s: s.from_columns(columns, strict=strict)  # noqa: E731
    else:
        raise InputError([FieldError("body", "needs 'records' (list of objects) or "
                                             "'columns' (object of lists)")])
    extra = body.keys() - PREDICT_FIELDS
    if extra:
        raise InputError([FieldError(k, "unknown top-level field") for k in sorted(extra)])
    return PredictRequest(parser, None if key is None else str(key), ts)


def latest_event_time() -> int:
    """The end of tomorrow (UTC), in epoch seconds: the latest event time a request may
    carry. A whole day of slack for clocks, and a bound that moves once a day, so the OpenAPI
    spec can state it."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(today.timestamp()) + 2 * 86_400


def event_time(value: Any) -> float:
    """Event time in epoch seconds, from 1970 to the end of tomorrow (UTC): epoch
    milliseconds and far-future dates are client bugs, and would not fit the log's day
    partitions."""
    if value is None:
        return time.time()
    ts: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        ts = float(value)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
            ts = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):
            ts = None
    if ts is None:
        raise InputError([FieldError("timestamp", "must be ISO 8601 or epoch seconds",
                                     value=value)])
    if not 0 <= ts <= latest_event_time():
        raise InputError([FieldError("timestamp", "must be between 1970 and the end of "
                                     "tomorrow, UTC (epoch seconds, not milliseconds)",
                                     value=value)])
    return ts


MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")


def mlflow_parser(body: Any, *, strict: bool = False) -> Parser:
    """MLflow's JSON scoring formats → a parser for the routed version's schema."""
    if not isinstance(body, dict):
        raise InputError([FieldError("body", "must be an object with one of dataframe_split, "
                                             "dataframe_records, inputs, instances")])
    keys = [k for k in MLFLOW_FORMATS if k in body]
    if len(keys) != 1:
        raise InputError([FieldError("body", "needs exactly one of dataframe_split, "
                                             "dataframe_records, inputs, instances "
                                             f"(got {sorted(body)})")])
    k = keys[0]
    payload = body[k]
    if k == "dataframe_split":
        return lambda s: s.from_split(payload, strict=strict)
    if k == "dataframe_records":
        return lambda s: s.from_records(payload, where=k, strict=strict)
    if isinstance(payload, dict):
        return lambda s: s.from_columns(
            {c: v if isinstance(v, list) else [v] for c, v in payload.items()}, where=k,
            strict=strict)
    return lambda s: s.from_records(payload, where=k, strict=strict)


def csv_parser(raw: bytes, *, strict: bool = False) -> Parser:
    """A CSV body (header row first) → a parser converting each cell to the signature's
    type."""
    header, rows = parse_csv(raw)
    return lambda s: s.from_split(typed_csv(s, header, rows), strict=strict)


def parse_csv(raw: bytes) -> tuple[list[str], list[list[str]]]:
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HTTPError(400, {"error": f"malformed CSV: {exc}"}) from None
    rows = [r for r in rows if r]
    if len(rows) < 2:
        raise HTTPError(400, {"error": "CSV needs a header row and at least one data row"})
    return rows[0], rows[1:]


def typed_csv(schema: InputSchema, header: list[str], rows: list[list[str]]) -> dict[str, Any]:
    """CSV cells are text: convert each to the signature's type, naming any that fail."""
    kinds = {c.name: c.type for c in schema.columns}
    errors: list[FieldError] = []
    data = []
    for i, row in enumerate(rows):
        out: list[Any] = []
        for name, cell in zip(header, row, strict=False):
            kind = kinds.get(name)
            if cell == "":
                out.append(None)
            elif kind in ("double", "float", "long", "integer"):
                try:  # an integer literal stays exact (a long beyond 2^53 too)
                    out.append(int(cell))
                except ValueError:
                    try:
                        out.append(float(cell))
                    except ValueError:
                        errors.append(FieldError(name, f"expected {kind}", row=i, value=cell))
                        out.append(None)
            elif kind == "boolean":
                low = cell.lower()
                if low in ("true", "false", "1", "0"):
                    out.append(low in ("true", "1"))
                else:
                    errors.append(FieldError(name, "expected boolean", row=i, value=cell))
                    out.append(None)
            else:
                out.append(cell)
        out.extend([None] * (len(header) - len(row)))
        data.append(out[:len(header)] if len(row) <= len(header) else out + row[len(header):])
        if len(errors) >= 50:
            break
    if errors:
        raise InputError(errors)
    return {"columns": header, "data": data}
