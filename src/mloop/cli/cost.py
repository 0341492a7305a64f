"""``mloop cost``: what each pipeline run, tuning trial, retrain and served version cost
(the service is :mod:`mloop.loop.cost`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, iso_arg, open_project, report
from mloop.cli.render import num, out, table


def cost(
    since: Annotated[str | None, typer.Option(
        help="ISO time (UTC unless it names a zone): runs started and serving rows committed "
             "at or after.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time: ... before.")] = None,
    by: Annotated[str, typer.Option(help="One row per run, version or day (UTC).")] = "run",
    json_: JsonOpt = False,
) -> None:
    """CPU-hours, peak memory and their cost for every pipeline run, tuning trial and
    retrain; serving cost per 1,000 predictions per version; priced with `costs`."""
    from mloop.loop.cost import cost_report

    start, end = iso_arg(since, "--since"), iso_arg(until, "--until")
    result = cost_report(open_project(), since=start, until=end, by=by).to_dict()
    report(result, json_, _render)


def _render(r: dict[str, Any]) -> None:
    cur = r["currency"]
    first = {"run": "run", "version": "version", "day": "day (UTC)"}[r["by"]]
    extra = ["kind", "started", "version"] if r["by"] == "run" else ["runs"]
    rows = []
    for row in r["rows"]:
        lead = [row["kind"], (row["started_at"] or "")[:19], row["version"]] \
            if r["by"] == "run" else [row["runs"]]
        rows.append([row["key"] if row["key"] is not None else "-", *lead,
                     num(row["cpu_hours"]), num(row["peak_memory_mb"]),
                     num(row["memory_gb_hours"]), num(row["training_cost"]),
                     row["predictions"] or "", num(row["serving_cost"]) if row["predictions"]
                     else "", num(row["cost"])])
    out.print(table(f"Cost ({cur}; {r['rates']['cpu_hour']:g}/CPU-hour, "
                    f"{r['rates']['gb_hour']:g}/GB-hour)",
                    [first, *extra, "CPU-hours", "peak MB", "GB-hours", "training",
                     "predictions", "serving", "cost"], rows, no_wrap=(first,)))
    if r["serving"]:
        out.print(table(f"Serving per version ({cur})",
                        ["version", "predictions", "CPU-s", "CPU-s / 1k", "cost",
                         "cost / 1k predictions"],
                        [[s["version"], s["predictions"], num(s["cpu_seconds"]),
                          num(s["cpu_seconds_per_1k_predictions"]), num(s["cost"]),
                          num(s["cost_per_1k_predictions"])] for s in r["serving"]]))
    t = r["totals"]
    out.print(f"total {num(t['cost'])} {cur}: training {num(t['training_cost'])} "
              f"({t['runs']} runs, {num(t['cpu_hours'])} CPU-hours), serving "
              f"{num(t['serving_cost'])} ({t['predictions']} predictions)", highlight=False)
    if r["budget"] is not None:
        b = r["budget"]
        out.print(f"budget {b['per_day']:g} {cur}/day: {num(b['spent_last_day'])} spent in the "
                  f"last 24 h" + (" [bold red]over budget[/]" if b["over"] else ""))
