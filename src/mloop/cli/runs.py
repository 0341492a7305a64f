"""Pipeline runs: ``mloop run``, ``mloop runs list|show|create|gate`` and ``mloop step run``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, NoCacheOpt, open_project, open_project_as, report
from mloop.cli.render import (
    emit_json,
    err,
    fmt_metrics,
    out,
    print_gates,
    print_promotion,
    short,
    table,
)
from mloop.errors import StepFailedError

runs_app = typer.Typer(no_args_is_help=True, help="Pipeline runs: list, show, create.")
step_app = typer.Typer(no_args_is_help=True, help="Run one step of a pipeline run.")


def run(no_cache: NoCacheOpt = False, json_: JsonOpt = False) -> None:
    """Run the project's pipeline: ingest → validate → snapshot → split → train → evaluate →
    register."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mloop.registry.training import train_candidate
    from mloop.status import show_run

    project = open_project_as("train")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def on_event(event: str, name: str, info: dict[str, Any]) -> None:
            if event == "pipeline":
                for s in info["steps"]:
                    tasks[s] = progress.add_task(f"[dim]{s}", total=1)
            elif event == "start":
                progress.update(tasks[name], description=f"{name}")
            elif event in ("done", "cached"):
                tag = "[green]✓" if event == "done" else "[cyan]cached"
                progress.update(tasks[name], completed=1, description=f"{name} {tag}")
            elif event == "retry":
                progress.update(tasks[name], description=f"{name} [yellow]retry "
                                f"{info['attempt']} in {info['wait_s']:.1f}s: {info['error']}")
            elif event == "failed":
                progress.update(tasks[name], description=f"{name} [red]failed")
            elif event == "gate":
                tasks["gate"] = progress.add_task(
                    f"gating v{info['version']} against the champion", total=None)

        try:
            trained = train_candidate(project, use_cache=not no_cache, on_event=on_event)
        except StepFailedError as exc:
            progress.stop()
            if json_:
                emit_json(show_run(project, exc.run_id))
            raise
        if "gate" in tasks:
            progress.update(tasks["gate"], total=1, completed=1,
                            description=f"gating v{trained.version} [green]✓")
    detail = show_run(project, trained.pipeline_run_id)
    if trained.registered is not None:
        detail["registered"] = trained.registered
    if trained.evaluation is not None:
        detail["evaluation"] = trained.evaluation
    if trained.gating is not None:
        detail.update(trained.gating.to_dict())
    report(detail, json_, _print_run_result)


def _print_run_result(detail: dict[str, Any]) -> None:
    print_run(detail)
    if "registered" in detail:
        r = detail["registered"]
        out.print(f"registered [bold]{r['name']}[/] version [bold]{r['version']}[/] "
                  f"({r['model_uri']})")
    if "evaluation" in detail:
        out.print(f"holdout: {fmt_metrics(detail['evaluation']['metrics'])}")
    if detail.get("gates"):
        print_gates(detail["gates"])
        print_promotion(detail)


def print_run(d: dict[str, Any]) -> None:
    out.print(f"pipeline run [bold]{d['run_id']}[/] ({d['pipeline']}): {d['status']}, "
              f"{d['duration_s']}s, {d['cache_hits']}/{d['steps_total']} cached, "
              f"MLflow run {d['mlflow_run_id']}")
    out.print(table("steps", ["step", "status", "cache", "duration s", "peak MB", "attempts"],
                    [[s["step"], s["status"], "hit" if s["cache_hit"] else "miss",
                      s["duration_s"], s["peak_memory_mb"], s["attempts"]]
                     for s in d.get("steps", [])]))
    if d.get("error"):
        out.print(f"[red]{d['error']}")


@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(min=1)] = 20, json_: JsonOpt = False) -> None:
    """Pipeline runs, newest first."""
    from mloop.status import list_runs

    def render(rows: list[dict[str, Any]]) -> None:
        out.print(table("pipeline runs", ["run", "pipeline", "status", "started", "s",
                                          "cached", "error"],
                        [[r["run_id"], r["pipeline"], r["status"], r["started_at"],
                          r["duration_s"], f"{r['cache_hits']}/{r['steps_total']}",
                          short(r["error"], 60)] for r in rows]))

    report(list_runs(open_project(), limit=limit), json_, render,
           to_json=lambda rows: {"runs": rows})


@runs_app.command("show")
def runs_show(run_id: str, json_: JsonOpt = False) -> None:
    """One pipeline run with its steps, durations, memory and cache hits."""
    from mloop.status import show_run

    def render(d: dict[str, Any]) -> None:
        print_run(d)
        if d.get("traceback"):
            err.print(d["traceback"])

    report(show_run(open_project(), run_id), json_, render)


@runs_app.command("create")
def runs_create(pipeline: Annotated[str | None, typer.Argument()] = None,
                json_: JsonOpt = False) -> None:
    """Start an empty pipeline run for an orchestrator to fill with `mloop step run`."""
    from mloop.pipeline.runner import create_run

    row = create_run(open_project_as("train"), pipeline)

    def render(_: dict[str, Any]) -> None:
        sys.stdout.write(row.id + "\n")  # the id alone, plain: scripts and XCom read this line

    report({"run_id": row.id, "pipeline": row.pipeline, "mlflow_run_id": row.mlflow_run_id},
           json_, render)


@runs_app.command("gate")
def runs_gate(run_id: str, json_: JsonOpt = False) -> None:
    """Gate the version pipeline run RUN_ID registered against the champion and, with
    gates.auto_promote, promote it: what `mloop run` does after the steps."""
    from mloop.pipeline.runner import registered_version
    from mloop.registry.training import gate_candidate

    project = open_project_as("train")
    result = gate_candidate(project, registered_version(project, run_id)).to_dict()

    def render(r: dict[str, Any]) -> None:
        print_gates(r["gates"])
        print_promotion(r)

    report(result, json_, render)


@step_app.command("run")
def step_run(
    pipeline: Annotated[str, typer.Argument(help="Pipeline name (e.g. tabular).")],
    step_name: Annotated[str, typer.Argument(metavar="STEP")],
    run_id: Annotated[str, typer.Option("--run-id", help="Existing pipeline run id.")],
    no_cache: NoCacheOpt = False,
    retries: Annotated[int | None, typer.Option(
        "--retries", min=0, help="Run a failing step again this often in this process "
                                 "(default: the step's or pipeline.retries; 0 when the "
                                 "orchestrator retries).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Execute one step of an existing pipeline run in this process."""
    from mloop.pipeline.runner import run_single_step

    o = run_single_step(open_project_as("train"), pipeline, step_name, run_id,
                        use_cache=not no_cache, retries=retries)
    d = {"step": o.step, "status": o.status, "cache_hit": o.cache_hit,
         "duration_s": round(o.duration_s, 3), "peak_memory_mb": o.peak_memory_mb,
         "outputs": o.outputs, "mlflow_run_id": o.mlflow_run_id, "attempts": o.attempts}

    def render(_: dict[str, Any]) -> None:
        out.print(f"{o.step}: {o.status} ({'cache hit' if o.cache_hit else 'ran'}, "
                  f"{o.duration_s:.2f}s)")
        for k, v in o.outputs.items():
            out.print(f"  {k}: {v['kind']} {v['digest']}")

    report(d, json_, render)
