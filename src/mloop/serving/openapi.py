"""The OpenAPI description of the server: every status a route can answer, with its content
type, and request bodies drawn from the serving champion's signature.

The request schemas say what the server accepts, as exactly as JSON Schema can: the columns of
the signature with their types (an integer a double cannot hold exactly is out of range;
``long`` and ``integer`` have their bit widths), fields outside the signature allowed unless
``serving.strict_columns``, one request format at a time. Two rules JSON Schema cannot state
are narrowed instead: ``columns`` (lists of equal length) are shown with one value each, and
a text ``timestamp`` before the current year. So a request built from the spec is accepted,
and tools that test an API against its spec (schemathesis) find the two agree.

The signature part is rebuilt on every read of ``/openapi.json`` (a hot swap can change it);
without a champion the bodies are described without columns.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI

from mloop.serving.formats import MLFLOW_FORMATS, latest_event_time
from mloop.serving.schema import InputSchema

JSON = "application/json"

ERROR = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string"},
    "fields": {"type": "array", "items": {"type": "object", "required": ["field", "problem"],
                                          "properties": {"field": {"type": "string"},
                                                         "problem": {"type": "string"},
                                                         "row": {"type": "integer"},
                                                         "value": {}}}}}}

_WHY = {400: "Malformed or ambiguous JSON (a key twice in one object), malformed CSV",
        401: "No bearer token, or an unknown or revoked one",
        403: "The token's role may not do this",
        404: "None of the request ids is in the inference log",
        409: "The inference log is disabled (serving.inference_log.enabled: false)",
        413: "Body over serving.max_body_bytes",
        415: "Content type not accepted here",
        422: "The body does not match the model signature; each bad field named",
        503: "No model is loaded yet (see /ready), or the inference log is full (on_full: "
             "block)"}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Route ``responses`` for error statuses: JSON bodies naming the problem."""
    return {code: {"description": _WHY[code], "content": {JSON: {"schema": ERROR}}}
            for code in codes}


def ok(description: str, schema: dict[str, Any], *, media_type: str = JSON,
       headers: dict[str, Any] | None = None) -> dict[int | str, dict[str, Any]]:
    out: dict[str, Any] = {"description": description,
                           "content": {media_type: {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return {200: out}


def _years_before_this_one() -> str:
    """A regex of the years from 1971 to last year (1970 with a positive zone offset is
    before the epoch)."""
    return "|".join(str(y) for y in range(1971, datetime.now(UTC).year))


def timestamp_schema() -> dict[str, Any]:
    """Epoch seconds from 0 to the end of tomorrow (UTC), or ISO 8601 text (shown from 1971
    to last year), or null (now)."""
    iso = (rf"^({_years_before_this_one()})-(0[1-9]|1[0-2])-(0[1-9]|1\d|2[0-8])"
           r"T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-](0\d|1[0-3]):[0-5]\d)?$")
    return {"anyOf": [{"type": "number", "minimum": 0, "maximum": latest_event_time()},
                      {"type": "string", "pattern": iso}, {"type": "null"}],
            "description": "Event time for the inference log: epoch seconds or ISO 8601 "
                           "(no zone: UTC), up to the end of tomorrow (UTC); default now"}


_EXACT = 2 ** 53
_DATETIME = (r"^(1[7-9]\d\d|2[01]\d\d)-(0[1-9]|1[0-2])-(0[1-9]|1\d|2[0-8])"
             r"(T([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{1,6})?(Z|[+-](0\d|1[0-3]):[0-5]\d)?)?$")


def value_schema(kind: str) -> dict[str, Any]:
    """What a value of signature type ``kind`` may be (see ``schema._CONVERTERS``)."""
    if kind in ("double", "float"):
        return {"anyOf": [{"type": "integer", "minimum": -_EXACT, "maximum": _EXACT},
                          {"type": "number", "not": {"type": "integer"}}],
                "description": f"{kind}: a number; an integer only up to ±2^53"}
    if kind in ("long", "integer"):
        bits = 63 if kind == "long" else 31
        return {"type": "integer", "minimum": -2 ** bits, "maximum": 2 ** bits - 1,
                "description": kind}
    if kind in ("string", "binary"):
        return {"type": "string", "description": kind}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "datetime":
        return {"type": "string", "pattern": _DATETIME,
                "description": "datetime: ISO 8601 (no zone: UTC), 1678 to 2261"}
    return {"description": kind}


def _column(kind: str, required: bool) -> dict[str, Any]:
    value = value_schema(kind)
    return value if required else {"anyOf": [value, {"type": "null"}]}


def row_schema(schema: InputSchema, *, strict: bool) -> dict[str, Any]:
    """One row as an object: every signature column present (null only where optional);
    other fields are left out by the server, or refused when ``strict``."""
    return {"type": "object", "required": list(schema.names),
            "properties": {c.name: _column(c.type, c.required) for c in schema.columns},
            "additionalProperties": not strict}


def columns_schema(schema: InputSchema, *, strict: bool) -> dict[str, Any]:
    """Columns as lists of equal length; shown with one value each (JSON Schema cannot say
    "equal length")."""
    def one(value: dict[str, Any]) -> dict[str, Any]:
        return {"type": "array", "items": value, "minItems": 1, "maxItems": 1}

    return {"type": "object", "required": list(schema.names),
            "properties": {c.name: one(_column(c.type, c.required)) for c in schema.columns},
            "additionalProperties": False if strict else one({}),
            "description": "Column name -> list of values, every list the same length "
                           "(shown here with one value each)"}


def _only(key: str, schema: dict[str, Any], others: tuple[str, ...],
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object with ``key`` and none of ``others``."""
    props: dict[str, Any] = {key: schema, **{k: False for k in others if k != key}}
    props.update(extra or {})
    return {"type": "object", "required": [key], "properties": props}


def predict_body(schema: InputSchema | None, *, strict: bool) -> dict[str, Any]:
    extra = {"key": {"type": ["string", "integer", "null"],
                     "description": "Sticky canary routing: the same key, the same version"},
             "timestamp": timestamp_schema()}
    if schema is None:
        records: dict[str, Any] = {"type": "array", "minItems": 1,
                                   "items": {"type": "object"}}
        columns: dict[str, Any] = {"type": "object"}
    else:
        records = {"type": "array", "minItems": 1, "items": row_schema(schema, strict=strict)}
        columns = columns_schema(schema, strict=strict)
    variants = [{**_only("records", records, ("records", "columns"), extra),
                 "additionalProperties": False},
                {**_only("columns", columns, ("records", "columns"), extra),
                 "additionalProperties": False}]
    return {"oneOf": variants, "description": "Rows as 'records' (list of objects) or "
                                              "'columns' (object of equal-length lists)"}


def invocations_body(schema: InputSchema | None, *, strict: bool, classes: bool = False
                     ) -> dict[str, Any]:
    """MLflow's scoring formats, one per request; ``classes``: the model has class
    probabilities (``params.predict_method`` may ask for them)."""
    if schema is None:
        return {"type": "object", "description": "one of " + ", ".join(MLFLOW_FORMATS)}
    row = row_schema(schema, strict=strict)
    records = {"type": "array", "minItems": 1, "items": row}
    n = len(schema.names)
    split = {"type": "object", "required": ["columns", "data"], "properties": {
        "columns": {"type": "array", "minItems": n, "maxItems": n,
                    "prefixItems": [{"const": name} for name in schema.names]},
        "data": {"type": "array", "minItems": 1, "items": {
            "type": "array", "minItems": n, "maxItems": n,
            "prefixItems": [_column(c.type, c.required) for c in schema.columns]}},
        "index": {"description": "ignored (rows are answered in order)"}},
        "description": "pandas' orient='split' (columns shown in the signature's order)"}
    columns = columns_schema(schema, strict=strict)
    # 'inputs' and 'instances' as an object take a value or a list per column (a value is a
    # list of one)
    scalars = {**columns, "properties": {
        c.name: {"anyOf": [_column(c.type, c.required), columns["properties"][c.name]]}
        for c in schema.columns}, "additionalProperties": False if strict else {
        "anyOf": [{"not": {"type": "array"}}, columns["additionalProperties"]]}}
    named: dict[str, dict[str, Any]] = {"dataframe_split": split, "dataframe_records": records,
             "inputs": {"anyOf": [scalars, records]}, "instances": {"anyOf": [scalars, records]}}
    methods = ["predict", "predict_proba"] if classes else ["predict"]
    params = {"anyOf": [{"type": "object", "additionalProperties": False, "properties": {
        "predict_method": {"enum": methods}}}, {"type": "null"}],
        "description": "{'predict_method': 'predict_proba'} answers per-row class "
                       "probabilities (a classifier with them); 'predict' (default) labels"}
    return {"oneOf": [_only(k, v, MLFLOW_FORMATS, {"params": params})
                      for k, v in named.items()]}


def csv_body(schema: InputSchema | None) -> dict[str, Any]:
    """A header row and data rows, shown with plain cells (no quoting, no empty values)."""
    if schema is None:
        return {"type": "string"}
    cell = {"double": r"-?(0|[1-9]\d{0,14})(\.\d{1,6})?",
            "float": r"-?(0|[1-9]\d{0,6})(\.\d{1,3})?", "long": r"-?(0|[1-9]\d{0,17})",
            "integer": r"-?(0|[1-9]\d{0,8})",
            "boolean": "(true|false)", "string": "[A-Za-z][A-Za-z0-9 _.-]{0,15}"}
    if any(c.type not in cell for c in schema.columns):
        return {"type": "string"}
    row = ",".join(cell[c.type] for c in schema.columns)
    return {"type": "string", "pattern": f"^{','.join(schema.names)}\n({row}\n)+$",
            "description": "CSV with a header row (the signature's columns)"}


def bodies(app: FastAPI, spec: dict[str, Any]) -> None:
    """Fill the request bodies of the scoring routes from the champion's signature."""
    state = app.state.mloop
    champion = state.routing.champion
    # what a client sends: with a feature store, the looked-up columns are not in it
    schema = champion.schema if champion is not None else None
    strict = state.config.strict_columns
    paths = spec["paths"]
    paths["/predict"]["post"]["requestBody"] = {"required": True, "content": {
        JSON: {"schema": predict_body(schema, strict=strict)}}}
    classes = champion is not None and champion.model.classes is not None
    paths["/invocations"]["post"]["requestBody"] = {"required": True, "content": {
        JSON: {"schema": invocations_body(schema, strict=strict, classes=classes)},
        "text/csv": {"schema": csv_body(schema)}}}
    task = champion.model.task if champion is not None else \
        state.project.config.task or "regression"
    label = {"type": "number"} if task == "regression" else \
        {"type": ["string", "number", "boolean"]}
    item: dict[str, Any] = {"type": "object", "required": ["request_id", "label"],
            "properties": {"request_id": {"type": "string", "minLength": 1}, "label": label}}
    paths["/feedback"]["post"]["requestBody"] = {"required": True, "content": {JSON: {
        "schema": {"anyOf": [{**item, "properties": {**item["properties"], "labels": False}},
                             {"type": "object", "required": ["labels"], "properties": {
                                 "labels": {"type": "array", "minItems": 1, "items": item}}}],
                   "description": "One {request_id, label} or {labels: [...]}"}}}}


_GUARDED = {"/predict": "post", "/invocations": "post", "/feedback": "post", "/reload": "post",
            "/flush": "post", "/model": "get"}


def bearer(spec: dict[str, Any]) -> None:
    """Auth is on: the guarded routes take a bearer token and answer 401/403."""
    spec.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer",
                   "description": "A token from `mloop tokens create`"}}
    for path, method in _GUARDED.items():
        op = spec["paths"][path][method]
        op["security"] = [{"bearer": []}]
        op["responses"].update({str(k): v for k, v in errors(401, 403).items()})


def describe(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document now (installed as ``app.openapi``)."""
    spec = copy.deepcopy(FastAPI.openapi(app))  # FastAPI builds the static part once
    bodies(app, spec)
    if app.state.auth is not None:
        bearer(spec)
    return spec
