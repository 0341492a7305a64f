"""Schema and data-quality expectations from mloop.yaml, checked before anything is trained."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mloop.config import ColumnExpectation, ValidationConfig
from mloop.data.profile import column_kind


def _type_ok(expected: str, t: pa.DataType) -> bool:
    return {
        "numeric": pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
        "integer": pa.types.is_integer(t),
        "string": column_kind(t) == "categorical" and not pa.types.is_boolean(t),
        "bool": pa.types.is_boolean(t),
        "datetime": pa.types.is_temporal(t),
    }[expected]


def _examples(values: pa.Array, n: int = 5) -> list[Any]:
    return [v for v in values.unique().to_pylist()[:n]]


def _check_column(name: str, col: pa.ChunkedArray, exp: ColumnExpectation,
                  rows: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if exp.type is not None and not _type_ok(exp.type, col.type):
        out.append({"column": name, "check": "type", "expected": exp.type,
                    "actual": str(col.type)})
        return out
    if exp.max_missing_rate is not None and rows:
        rate = col.null_count / rows
        if rate > exp.max_missing_rate:
            out.append({"column": name, "check": "max_missing_rate",
                        "expected": exp.max_missing_rate, "actual": round(rate, 6)})
    numeric = column_kind(col.type) == "numeric"
    for bound, op, label in ((exp.min, pc.less, "min"), (exp.max, pc.greater, "max")):
        if bound is None:
            continue
        if not numeric:
            out.append({"column": name, "check": label, "expected": f"numeric column for "
                        f"'{label}'", "actual": str(col.type)})
            continue
        bad = col.filter(op(col, pa.scalar(bound).cast(col.type, safe=False)))
        if len(bad):
            out.append({"column": name, "check": label, "expected": bound,
                        "violations": len(bad), "examples": _examples(bad.combine_chunks())})
    if exp.allowed is not None:
        values = col.drop_null()
        allowed = pa.array(exp.allowed).cast(values.type, safe=False) if len(exp.allowed) else None
        bad = values if allowed is None else values.filter(
            pc.invert(pc.is_in(values, value_set=allowed)))
        if len(bad):
            out.append({"column": name, "check": "allowed", "expected": exp.allowed,
                        "violations": len(bad), "examples": _examples(bad.combine_chunks())})
    return out


def validate_table(table: pa.Table, rules: ValidationConfig) -> dict[str, Any]:
    """Check ``table`` against the expectations. Returns a report; ``passed`` says the verdict."""
    rows = table.num_rows
    violations: list[dict[str, Any]] = []
    present = set(table.column_names)
    required = list(dict.fromkeys([*rules.required_columns, *rules.columns]))
    for name in required:
        if name not in present:
            violations.append({"column": name, "check": "required", "expected": "present",
                               "actual": "missing", "columns": table.column_names})
    if rows < rules.min_rows:
        violations.append({"column": None, "check": "min_rows", "expected": rules.min_rows,
                           "actual": rows})
    if rules.max_missing_rate is not None and rows:
        for name in table.column_names:
            rate = table[name].null_count / rows
            if rate > rules.max_missing_rate:
                violations.append({"column": name, "check": "max_missing_rate",
                                   "expected": rules.max_missing_rate, "actual": round(rate, 6)})
    for name, exp in rules.columns.items():
        if name in present:
            violations.extend(_check_column(name, table[name], exp, rows))
    return {"passed": not violations, "rows": rows, "columns": len(table.column_names),
            "violations": violations}


def did_you_mean(name: str, names: list[str]) -> str:
    """`` (did you mean 'cnt'?)`` for the closest of ``names`` (case-insensitively), or ''."""
    import difflib

    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{len(report['violations'])} data expectation(s) failed on {report['rows']} rows:"]
    for v in report["violations"]:
        col = f"column '{v['column']}'" if v.get("column") else "table"
        detail = f"expected {v.get('expected')!r}"
        if "actual" in v:
            detail += f", got {v['actual']!r}"
        if "violations" in v:
            detail += f"; {v['violations']} row(s), e.g. {v.get('examples')}"
        if v["check"] == "required" and v.get("columns") is not None:
            detail += (f"{did_you_mean(v['column'], v['columns'])} (the data's columns: "
                       f"{', '.join(v['columns'])})")
        lines.append(f"  - {col}: {v['check']}: {detail}")
    return "\n".join(lines)
