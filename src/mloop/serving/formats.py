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
from mloop.serving.schema import FieldError, InputError, InputSchema

Parser = Callable[[InputSchema], tuple[dict[str, list], int]]


def parse_json(raw: bytes) -> Any:
    """The JSON document in ``raw``; 400 naming the problem when it is not one."""
    if not raw.strip():
        raise HTTPError(400, {"error": "empty body; expected JSON"})
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, {"error": f"malformed JSON: {exc}"}) from None


@dataclass(frozen=True)
class PredictRequest:
    """A /predict body: rows (as a parser), the sticky routing key and the event time."""

    parser: Parser
    key: str | None
    timestamp: float


PREDICT_FIELDS = frozenset({"records", "columns", "key", "timestamp"})


def predict_request(body: Any) -> PredictRequest:
    """mloop's own body: ``records`` (list of objects) or ``columns`` (object of lists), an
    optional ``key`` and ``timestamp``; anything else is named in a 422."""
    if not isinstance(body, dict):
        raise InputError([FieldError("body", "must be an object with 'records' or "
                                             "'columns'")])
    key = body.get("key")
    if key is not None and not isinstance(key, str | int):
        raise InputError([FieldError("key", "must be a string")])
    ts = event_time(body.get("timestamp"))
    parser: Parser
    if "records" in body:
        records = body["records"]
        parser = lambda s: s.from_records(records)  # noqa: E731
    elif "columns" in body:
        columns = body["columns"]
        parser = lambda s: s.from_columns(columns)  # noqa: E731
    else:
        raise InputError([FieldError("body", "needs 'records' (list of objects) or "
                                             "'columns' (object of lists)")])
    extra = body.keys() - PREDICT_FIELDS
    if extra:
        raise InputError([FieldError(k, "unknown top-level field") for k in sorted(extra)])
    return PredictRequest(parser, None if key is None else str(key), ts)


def event_time(value: Any) -> float:
    """Event time in epoch seconds, between 1970 and a day from now (epoch milliseconds and
    far-future dates are client bugs, and would not fit the log's day partitions)."""
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
    if not 0 <= ts <= time.time() + 86_400:
        raise InputError([FieldError("timestamp", "must be between 1970 and now (epoch "
                                     "seconds, not milliseconds)", value=value)])
    return ts


MLFLOW_FORMATS = ("dataframe_split", "dataframe_records", "inputs", "instances")


def mlflow_parser(body: Any) -> Parser:
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
        return lambda s: s.from_split(payload)
    if k == "dataframe_records":
        return lambda s: s.from_records(payload, where=k)
    if isinstance(payload, dict):
        return lambda s: s.from_columns(
            {c: v if isinstance(v, list) else [v] for c, v in payload.items()}, where=k)
    return lambda s: s.from_records(payload, where=k)


def csv_parser(raw: bytes) -> Parser:
    """A CSV body (header row first) → a parser converting each cell to the signature's
    type."""
    header, rows = parse_csv(raw)
    return lambda s: s.from_split(typed_csv(s, header, rows))


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
                try:
                    num = float(cell)
                    out.append(int(num) if kind in ("long", "integer") and num.is_integer()
                               else num)
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
