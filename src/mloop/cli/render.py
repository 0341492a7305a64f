"""Output helpers: rich tables for people, one JSON document on stdout for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

out = Console()  # stdout: tables, or the JSON document
err = Console(stderr=True)  # progress and messages, so stdout stays machine-readable


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, default=str, indent=2) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def short(value: str | None, n: int = 12) -> str:
    return (value or "")[:n]


def fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
