"""Output helpers: rich tables for people, one JSON document on stdout for scripts."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _stdout_width() -> int | None:
    """None on a terminal (rich fits its width). For a pipe, a file or a CI log, where rich
    would assume 80 columns and cut table cells with '…', a width that fits every table whole
    (``COLUMNS`` still wins when set)."""
    stdout = sys.stdout
    if "COLUMNS" in os.environ or stdout is None or stdout.isatty():
        return None
    return 200


out = Console(width=_stdout_width())  # stdout: tables, or the JSON document
err = Console(stderr=True)  # progress and messages, so stdout stays machine-readable


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, default=str, indent=2) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: list[list[Any]], *,
          no_wrap: tuple[str, ...] = ()) -> Table:
    """A rich table; the ``no_wrap`` columns are never wrapped nor cut (the others give way
    when the terminal is narrow)."""
    t = Table(title=title, title_justify="left", header_style="bold")
    for i, c in enumerate(columns):
        width = max((len(str(r[i])) for r in rows), default=0) if c in no_wrap else None
        t.add_column(c, no_wrap=c in no_wrap, min_width=width)
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def short(value: str | None, n: int = 12) -> str:
    return (value or "")[:n]


def fmt_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def num(x: float | None) -> str:
    """A metric for a table cell: four significant digits, blank when missing."""
    return "" if x is None else f"{x:.4g}"


def print_gates(report: dict[str, Any]) -> None:
    """A gate report: the verdict line, then one row per gate with its value and threshold."""
    champ = f"champion v{report['champion']}" if report["champion"] else "no champion yet"
    out.print(f"gates for [bold]{report['model']}[/] v{report['version']} ({champ}): "
              + ("[green]passed" if report["passed"] else "[red]failed"))
    colour = {"pass": "green", "fail": "red", "skip": "yellow"}
    out.print(table("gates", ["gate", "result", "value", "threshold", "detail"],
                    [[r["gate"], f"[{colour[r['status']]}]{r['status']}", num(r["value"]),
                      num(r["threshold"]), r["message"]] for r in report["results"]]))


def print_promotion(detail: dict[str, Any]) -> None:
    """What gating did with a candidate: promoted, or why not and the command that would."""
    if detail.get("promotion"):
        p = detail["promotion"]
        out.print(f"[green]promoted[/] v{p['version']} to champion (was "
                  f"{'v' + str(p['replaced']) if p['replaced'] else 'nothing'})")
        return
    note, command = detail["promotion_note"], detail["promote_command"]
    if command is None:  # e.g. it is already the champion
        out.print(note, markup=False, highlight=False)
        return
    colour = "yellow" if detail["gates"]["passed"] else "red"
    out.print(f"[{colour}]not promoted:[/] {escape(note)}", highlight=False)
    out.print(f"to promote it: {command}", markup=False, highlight=False)


def print_change(change: dict[str, Any]) -> None:
    """One alias change (promote, rollback, canary, shadow, stop)."""
    was = f"v{change['replaced']}" if change["replaced"] is not None else "nothing"
    now = f"v{change['version']}" if change["version"] is not None else "nothing"
    out.print(f"{change['action']}: '{change['alias']}' of {change['model']} is now "
              f"[bold]{now}[/] (was {was}) by {change['actor']}: {change['reason']}")
    gates = change.get("gates")
    if gates:
        against = f"v{gates['against']}" if gates["against"] is not None else "no champion"
        verdict = "passed" if gates["passed"] else f"failed ({', '.join(gates['failed'])})"
        how = ("reused: same champion and gate config" if gates["reused"]
               else "evaluated now")
        out.print(f"  gates {verdict} against {against} at {gates['evaluated_at']} ({how})")


def fields(data: Any, indent: int = 4) -> str:
    """``data`` whole, as indented YAML-style lines: what a person reads best for nested
    payloads (nothing cut, nothing in Python's repr)."""
    import yaml

    text = yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False,
                          allow_unicode=True, default_flow_style=False, width=100)
    pad = " " * indent
    return "\n".join(pad + line for line in text.rstrip("\n").splitlines())
