"""The project itself: ``mloop init``, ``mloop status``, ``mloop doctor`` and ``mloop db``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, open_project, report
from mloop.cli.render import err, fmt_metrics, out, short, table

db_app = typer.Typer(no_args_is_help=True, help="mloop's own metadata store.")


def init(
    name: Annotated[str, typer.Argument(help="Folder to create (its name is the project name).")],
    template: Annotated[str, typer.Option(help="Project template.")] = "tabular",
    task: Annotated[str | None, typer.Option(
        help="regression or classification: mloop.yaml names the task and gates candidates "
             "on its quality (default: inferred from the target, size gate only).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Scaffold a project: mloop.yaml (gates with auto_promote on: a candidate that passes
    them serves), pipeline.py and a data/ folder."""
    from mloop.scaffold import init_project

    target = Path(name)
    written = init_project(target, template=template, name=target.resolve().name, task=task)

    def render(_: dict[str, Any]) -> None:
        for p in written:
            out.print(f"created {p}")
        out.print(f"next: put your data in {target / 'data'}, edit {target / 'mloop.yaml'}, "
                  f"then `cd {name} && mloop run` (a candidate that passes the gates in "
                  f"mloop.yaml becomes the champion) and `mloop serve`")

    report({"project": target.resolve().name, "root": str(target.resolve()), "task": task,
            "files": [str(p) for p in written]}, json_, render)


def status(json_: JsonOpt = False) -> None:
    """Last runs, model versions and snapshots, on one screen."""
    from mloop.status import project_status

    report(project_status(open_project()), json_, _print_status)


def _print_status(s: dict[str, Any]) -> None:
    env = f" (environment [bold]{s['env']}[/])" if s["env"] else ""
    out.print(f"project [bold]{s['project']}[/] at {s['root']}{env}")
    for d in s["drift"]:
        err.print(f"[red]warning:[/] {d['message']}")
    out.print(table("recent pipeline runs", ["run", "status", "started", "s", "cached"],
                    [[short(r["run_id"]), r["status"], r["started_at"], r["duration_s"],
                      f"{r['cache_hits']}/{r['steps_total']}"] for r in s["runs"]]))
    out.print(table("model versions", ["version", "aliases", "metrics", "train snapshot",
                                       "pipeline run"],
                    [[m["version"], ",".join(m["aliases"]), fmt_metrics(m["metrics"]),
                      short(m["snapshot_train"]), short(m["pipeline_run_id"])]
                     for m in s["models"]]))
    out.print(table("snapshots", ["digest", "rows", "cols", "source"],
                    [[short(x["digest"]), x["rows"], x["columns"], x["source"]]
                     for x in s["snapshots"]]))


def doctor(json_: JsonOpt = False) -> None:
    """Check every configured store and engine is reachable and compatible, one line each
    (tracking, registry, artifacts, mloop's store, object stores, drivers, serving port,
    optional extras). Exit 1 if any check fails."""
    from mloop.doctor import run_doctor, summary

    checks = run_doctor(open_project())
    result = summary(checks)

    def render(_: dict[str, Any]) -> None:
        style = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        width = max(len(c.check) for c in checks)
        for c in checks:
            out.print(f"{style[c.status]} {c.check:<{width}}  {c.target}  {c.detail}",
                      markup=True, highlight=False, soft_wrap=True)

    report(result, json_, render)
    if not result["ok"]:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(json_: JsonOpt = False) -> None:
    """Bring mloop's store to the latest schema (Alembic)."""
    from mloop.security.people import authorize
    from mloop.store.db import Store
    from mloop.tracking import redact

    project = open_project()
    store = Store(project.uris["store_uri"], upgrade=False)
    before = store.current_revision()  # before the check of who may run this migrates it
    authorize(project.store, "store")
    store.upgrade()
    after = store.current_revision()
    shown = redact(project.uris["store_uri"], project.config.secrets)
    report({"store_uri": shown, "from": before, "to": after}, json_,
           lambda d: out.print(f"{d['store_uri']}: {d['from'] or 'empty'} -> {d['to']}"))
