"""Snapshots, purges, erasure and retention: ``mloop data ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, ReasonOpt, iso_arg, open_project, open_project_as, report
from mloop.cli.render import out, table

data_app = typer.Typer(no_args_is_help=True, help="Snapshots (content-addressed data + profile) "
                                                  "and purges of the inference log.")


@data_app.command("snapshot")
def data_snapshot(path: Annotated[Path, typer.Argument(help="CSV/Parquet file or folder.")],
                  json_: JsonOpt = False) -> None:
    """Store a content-addressed snapshot of a file, with its profile."""
    from mloop.data.profile import column_summary
    from mloop.status import snapshot_file

    def render(d: dict[str, Any]) -> None:
        verb = "created" if d["created"] else "already stored"
        out.print(f"snapshot [bold]{d['digest']}[/] ({verb}): {d['rows']} rows, "
                  f"{len(d['schema'])} columns")
        out.print(table("profile", ["column", "kind", "type", "missing", "summary"], [
            [name, c["kind"], c["type"], f"{c['missing_rate']:.1%}", column_summary(c)]
            for name, c in d["profile"]["columns"].items()]))

    report(snapshot_file(open_project_as("data"), path), json_, render)


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
    from mloop.data.profile import column_summary

    def render(prof: dict[str, Any]) -> None:
        out.print(table(f"profile of {digest} ({prof['rows']} rows)",
                        ["column", "kind", "type", "missing", "summary"],
                        [[n, c["kind"], c["type"], f"{c['missing_rate']:.1%}", column_summary(c)]
                         for n, c in prof["columns"].items()]))

    report(open_project().snapshots.profile(digest), json_, render)


def _print_purge(d: dict[str, Any]) -> None:
    if d["status"] == "nothing":
        out.print(f"no answered row between {d['from']} and {d['to']}"
                  f"{' of v' + str(d['version']) if d['version'] else ''}: nothing purged")
        return
    verb = "purged" if d["status"] == "purged" else "restored"
    out.print(f"{verb} {d['rows']} row(s) from {len(d['segments'])} segment(s) "
              f"[{d['from']} .. {d['to']}){' of v' + str(d['version']) if d['version'] else ''}")
    if d["status"] == "purged":
        out.print(f"purge id [bold]{d['purge_id']}[/] (rows kept in {d['location']}); undo with "
                  f"`mloop data restore {d['purge_id']}`")


@data_app.command("purge")
def data_purge(
    start: Annotated[str, typer.Option("--from", help="First event time (ISO 8601; UTC if no "
                                                      "zone), included.")],
    end: Annotated[str, typer.Option("--to", help="Last event time, excluded.")],
    version: Annotated[int | None, typer.Option(min=1, help="Only rows this version "
                                                            "answered.")] = None,
    reason: ReasonOpt = "",
    json_: JsonOpt = False,
) -> None:
    """Move answered rows of the inference log (from <= event time < to) to quarantine, out of
    monitoring, labels and retraining; recorded as an event, undone by `mloop data restore`.
    Flush a running server first (POST /flush): rows still in its buffer are not purged."""
    from mloop.traffic.purge import purge_rows

    t0, t1 = iso_arg(start, "--from"), iso_arg(end, "--to")
    if t0 is None or t1 is None:  # typer requires both; this only narrows the types
        raise typer.BadParameter("--from and --to are required")
    result = purge_rows(open_project_as("data"), start=t0, end=t1, version=version, reason=reason)
    report(result.to_dict(), json_, _print_purge)


@data_app.command("restore")
def data_restore(purge_id: Annotated[str, typer.Argument(help="The id `mloop data purge` "
                                                              "printed.")],
                 json_: JsonOpt = False) -> None:
    """Put a purge's rows back into the inference log (rows it still holds are not doubled)."""
    from mloop.traffic.purge import restore_purge

    report(restore_purge(open_project_as("data"), purge_id).to_dict(), json_, _print_purge)


@data_app.command("purges")
def data_purges(json_: JsonOpt = False) -> None:
    """Every purge of the inference log: id, range, version, reason, status, rows."""
    from mloop.traffic.purge import list_purges

    def render(rows: list[dict[str, Any]]) -> None:
        out.print(table("purges", ["purge id", "from", "to", "version", "rows", "status",
                                   "reason"],
                        [[m.get("purge_id"), m.get("from"), m.get("to"), m.get("version"),
                          m.get("rows"), m.get("status"), m.get("reason")] for m in rows]))

    report(list_purges(open_project()), json_, render, to_json=lambda rows: {"purges": rows})


def _print_erase(d: dict[str, Any]) -> None:
    what = f"column '{d['column']}'" if d["column"] else "request id"
    out.print(f"erased {d['rows']} row(s) from {len(d['segments'])} segment(s) and "
              f"{d['label_rows']} label(s) from {len(d['label_segments'])} label segment(s) "
              f"matching {d['values']} value(s) of {what}; recorded as data.erased "
              f"(without the values)")


@data_app.command("erase")
def data_erase(
    key: Annotated[list[str] | None, typer.Option(
        "--key", help="COLUMN=VALUE: erase the rows whose input COLUMN holds VALUE (the raw "
                      "value, also for a column security.pii hashes). Repeatable, one "
                      "column.")] = None,
    request_id: Annotated[list[str] | None, typer.Option(
        "--request-id", help="Erase this request's row and labels. Repeatable.")] = None,
    reason: ReasonOpt = "",
    json_: JsonOpt = False,
) -> None:
    """Erase rows of the inference log (and their labels) for good, segment by segment
    atomically; recorded as an event that names the column, never the value. Nothing
    matching is not an error (0 rows, still recorded). Flush a running server first
    (POST /flush): rows still in its buffer are not erased."""
    from mloop.traffic.erase import erase_rows

    result = erase_rows(open_project_as("data"), keys=key or [], request_ids=request_id or [],
                        reason=reason)
    report(result.to_dict(), json_, _print_erase)


@data_app.command("retention")
def data_retention(
    apply: Annotated[bool, typer.Option("--apply", help="Delete now (default: only count "
                                                        "what would be deleted).")] = False,
    json_: JsonOpt = False,
) -> None:
    """What security.retention deletes (every loop pass applies it): log rows and labels
    whose event time is older than the retention."""
    from mloop.errors import ConfigError
    from mloop.traffic.retention import apply_retention

    project = open_project_as("data") if apply else open_project()
    result = apply_retention(project, apply=apply)
    if result is None:
        raise ConfigError("no security.retention is set (e.g. security: {retention: 180d})",
                          file=str(project.root / "mloop.yaml"), key="security.retention")

    def render(d: dict[str, Any]) -> None:
        verb = "deleted" if d["applied"] else "would delete"
        out.print(f"retention {d['retention']} (cutoff {d['cutoff']}): {verb} {d['log_rows']} "
                  f"row(s) in {d['log_segments']} segment(s) and {d['label_rows']} label(s) in "
                  f"{d['label_segments']} label segment(s)"
                  + ("" if d["applied"] else "; --apply to delete"))

    report(result.to_dict(), json_, render)
