"""Snapshots: ``mloop data snapshot|list|profile``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, open_project, report
from mloop.cli.render import out, table

data_app = typer.Typer(no_args_is_help=True, help="Snapshots: content-addressed data + profile.")


@data_app.command("snapshot")
def data_snapshot(path: Annotated[Path, typer.Argument(help="CSV/Parquet file or folder.")],
                  json_: JsonOpt = False) -> None:
    """Store a content-addressed snapshot of a file, with its profile."""
    from mloop.status import snapshot_file

    def render(d: dict[str, Any]) -> None:
        verb = "created" if d["created"] else "already stored"
        out.print(f"snapshot [bold]{d['digest']}[/] ({verb}): {d['rows']} rows, "
                  f"{len(d['schema'])} columns")
        out.print(table("profile", ["column", "kind", "type", "missing", "summary"], [
            [name, c["kind"], c["type"], f"{c['missing_rate']:.1%}", _summary(c)]
            for name, c in d["profile"]["columns"].items()]))

    report(snapshot_file(open_project(), path), json_, render)


def _summary(c: dict[str, Any]) -> str:
    if c["kind"] == "numeric" and c.get("mean") is not None:
        return f"mean {c['mean']:.4g} std {c['std']:.4g} [{c['min']:.4g}, {c['max']:.4g}]"
    if c["kind"] == "categorical":
        top = ", ".join(f"{k} {v}" for k, v in list(c["top"].items())[:4])
        return f"{c['n_unique']} values: {top}"
    if c["kind"] == "datetime":
        return f"{c['min']} .. {c['max']}"
    return ""


@data_app.command("list")
def data_list(json_: JsonOpt = False) -> None:
    """Snapshots in the project's store."""
    from mloop.status import snapshots

    def render(rows: list[dict[str, Any]]) -> None:
        out.print(table("snapshots", ["digest", "rows", "cols", "created", "source"],
                        [[x["digest"], x["rows"], x["columns"], x["created_at"], x["source"]]
                         for x in rows]))

    report(snapshots(open_project(), limit=100), json_, render,
           to_json=lambda rows: {"snapshots": rows})


@data_app.command("profile")
def data_profile(digest: str, json_: JsonOpt = False) -> None:
    """The stored profile of a snapshot (by digest or unique prefix)."""

    def render(prof: dict[str, Any]) -> None:
        out.print(table(f"profile of {digest} ({prof['rows']} rows)",
                        ["column", "kind", "type", "missing", "summary"],
                        [[n, c["kind"], c["type"], f"{c['missing_rate']:.1%}", _summary(c)]
                         for n, c in prof["columns"].items()]))

    report(open_project().snapshots.profile(digest), json_, render)
