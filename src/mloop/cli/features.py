"""The feature store: ``mloop features materialize|check``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, iso_arg, open_project, report
from mloop.cli.render import out, table

features_app = typer.Typer(no_args_is_help=True,
                           help="The Feast feature store: online store and skew check.")


@features_app.command("materialize")
def features_materialize(
    until: Annotated[str | None, typer.Option(
        "--until", help="ISO 8601 instant to materialize up to (UTC when no zone; "
                        "default: now).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Copy the feature views' latest values up to --until into the online store (an event)."""
    from mloop.features.service import materialize_features

    end = iso_arg(until, "--until") or datetime.now(UTC)

    def render(d: dict[str, Any]) -> None:
        out.print(f"materialized {', '.join(d['feature_views'])} up to {d['until']}")

    report(materialize_features(open_project(), until=end), json_, render)


@features_app.command("check")
def features_check(
    at: Annotated[str | None, typer.Option(
        "--at", help="ISO 8601 instant to compare at (default: where the last "
                     "materialization ended).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1,
                                       help="Distinct entities to compare.")] = 100,
    json_: JsonOpt = False,
) -> None:
    """Offline (point-in-time join) and online values for the same entities and instant must
    be identical; exits 1 listing each difference."""
    from mloop.features.service import check_features

    result = check_features(open_project(), limit=limit, at=iso_arg(at, "--at"))

    def render(d: dict[str, Any]) -> None:
        out.print(f"{d['compared']} values of {d['entities']} entities compared at {d['at']}: "
                  + ("identical" if d["ok"] else f"{len(d['mismatches'])} differ"))
        if d["mismatches"]:
            out.print(table("offline/online skew", ["entity", "feature", "offline", "online"],
                            [[str(m["entity"]), m["feature"], str(m["offline"]),
                              str(m["online"])] for m in d["mismatches"][:50]]))

    report(result, json_, render)
    if not result["ok"]:
        raise typer.Exit(1)
