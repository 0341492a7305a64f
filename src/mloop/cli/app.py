"""The ``mloop`` command line: parses, calls the services, renders. No logic of its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from mloop.cli.render import emit_json, err, fmt_metrics, out, short, table
from mloop.errors import MloopError, StepFailedError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mloop: pipelines, tracked runs, gated models, serving, monitoring, "
                       "retraining — one loop.")
runs_app = typer.Typer(no_args_is_help=True, help="Pipeline runs: list, show, create.")
data_app = typer.Typer(no_args_is_help=True, help="Snapshots: content-addressed data + profile.")
step_app = typer.Typer(no_args_is_help=True, help="Run one step of a pipeline run.")
db_app = typer.Typer(no_args_is_help=True, help="mloop's own metadata store.")
models_app = typer.Typer(no_args_is_help=True, help="Registered versions and their gates.")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident event chain.")
deploy_app = typer.Typer(no_args_is_help=True, help="Challengers: canary (a share of traffic) "
                                                    "or shadow (a copy of it).")
labels_app = typer.Typer(no_args_is_help=True, help="Late ground truth, joined by request id.")
monitor_app = typer.Typer(invoke_without_command=True,
                          help="Data quality, drift and performance of the inference log's "
                               "windows against the champion's training profile.")
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens for `mloop serve` (stored as "
                                                    "hashes).")
export_app = typer.Typer(no_args_is_help=True, help="Hand the project to other systems: "
                                                    "Kubernetes manifests and a Dockerfile, "
                                                    "an Airflow DAG, a Kubeflow pipeline.")
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
app.add_typer(step_app, name="step")
app.add_typer(db_app, name="db")
app.add_typer(models_app, name="models")
app.add_typer(audit_app, name="audit")
app.add_typer(deploy_app, name="deploy")
app.add_typer(labels_app, name="labels")
app.add_typer(tokens_app, name="tokens")
app.add_typer(monitor_app, name="monitor")
app.add_typer(export_app, name="export")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
ProjectOpt = Annotated[
    Path | None,
    typer.Option("--project", "-C", help="Project folder (default: search upward from here).",
                 envvar="MLOOP_PROJECT"),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Run every step, ignore the cache.")]

_state: dict[str, Any] = {"debug": False, "project": None}


@app.callback()
def _root(
    project: ProjectOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    _state["project"] = project
    _state["debug"] = debug or bool(os.environ.get("MLOOP_DEBUG"))


def _open():
    from mloop.project import open_project

    return open_project(_state["project"])


# ------------------------------------------------------------------------------ init / run

@app.command()
def init(
    name: Annotated[str, typer.Argument(help="Folder to create (its name is the project name).")],
    template: Annotated[str, typer.Option(help="Project template.")] = "tabular",
    json_: JsonOpt = False,
) -> None:
    """Scaffold a project: mloop.yaml, pipeline.py and a data/ folder."""
    from mloop.scaffold import init_project

    target = Path(name)
    written = init_project(target, template=template, name=target.resolve().name)
    if json_:
        emit_json({"project": target.resolve().name, "root": str(target.resolve()),
                   "files": [str(p) for p in written]})
        return
    for p in written:
        out.print(f"created {p}")
    out.print(f"next: put your data in {target / 'data'}, edit {target / 'mloop.yaml'}, then "
              f"`cd {name} && mloop run`")


@app.command()
def run(no_cache: NoCacheOpt = False, json_: JsonOpt = False) -> None:
    """Run the project's pipeline: ingest → validate → snapshot → split → train → evaluate →
    register."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from mloop.pipeline.runner import run_pipeline
    from mloop.status import show_run

    project = _open()
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

        try:
            result = run_pipeline(project, use_cache=not no_cache, on_event=on_event)
        except StepFailedError as exc:
            progress.stop()
            if json_:
                emit_json(show_run(project, exc.run_id))
            raise
    detail = show_run(project, result.run_id)
    reg = next((s for s in detail["steps"] if s["step"] == "register"), None)
    if reg is not None:
        from mloop.pipeline.artifacts import load_output

        detail["registered"] = load_output(reg["outputs"]["output"], project.outputs,
                                           project.snapshots)
    ev = next((s for s in detail["steps"] if s["step"] == "evaluate"), None)
    if ev is not None:
        from mloop.pipeline.artifacts import load_output

        detail["evaluation"] = load_output(ev["outputs"]["output"], project.outputs,
                                           project.snapshots)
    if "registered" in detail:
        from mloop.registry.promotion import gate_and_promote

        with err.status("gating the candidate against the champion"):
            detail.update(gate_and_promote(project, detail["registered"]["version"]))
    if json_:
        emit_json(detail)
        return
    _print_run(detail)
    if "registered" in detail:
        r = detail["registered"]
        out.print(f"registered [bold]{r['name']}[/] version [bold]{r['version']}[/] "
                  f"({r['model_uri']})")
    if "evaluation" in detail:
        out.print(f"holdout: {fmt_metrics(detail['evaluation']['metrics'])}")
    if detail.get("gates"):
        _print_gates(detail["gates"])
        _print_promotion(detail)


def _print_promotion(detail: dict[str, Any]) -> None:
    if detail.get("promotion"):
        p = detail["promotion"]
        out.print(f"[green]promoted[/] v{p['version']} to champion (was "
                  f"{'v' + str(p['replaced']) if p['replaced'] else 'nothing'})")
    elif detail.get("promotion_error"):
        out.print(f"[red]not promoted:[/] {detail['promotion_error']}")
    elif not detail["gates"]["passed"]:
        out.print("[red]not promoted:[/] a gate failed; the champion is unchanged")


def _print_run(d: dict[str, Any]) -> None:
    out.print(f"pipeline run [bold]{d['run_id']}[/] ({d['pipeline']}): {d['status']}, "
              f"{d['duration_s']}s, {d['cache_hits']}/{d['steps_total']} cached, "
              f"MLflow run {d['mlflow_run_id']}")
    out.print(table("steps", ["step", "status", "cache", "duration s", "peak MB", "attempts"],
                    [[s["step"], s["status"], "hit" if s["cache_hit"] else "miss",
                      s["duration_s"], s["peak_memory_mb"], s["attempts"]]
                     for s in d.get("steps", [])]))
    if d.get("error"):
        out.print(f"[red]{d['error']}")


# ------------------------------------------------------------------------------ tune

@app.command()
def tune(
    trials: Annotated[int | None, typer.Option(
        "--trials", min=1, help="The study's total of complete + pruned trials (default: "
                                "tune.trials); a re-run resumes towards it.")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, help="Processes sharing the study: K-1 more are started here "
                                 "(a PostgreSQL store shares it across machines too).")] = 1,
    join: Annotated[str | None, typer.Option(
        "--join", metavar="STUDY", help="Work on STUDY, started by `mloop tune` with the same "
                                        "stores, until it has its trials.")] = None,
    worker_index: Annotated[int | None, typer.Option("--worker-index", hidden=True)] = None,
    json_: JsonOpt = False,
) -> None:
    """Tune the model's parameters (tune.search_space) with Optuna, then train, register and
    gate the best trial like any other candidate."""
    from mloop.tuning import require_optuna

    require_optuna()
    from mloop.tuning.study import join_study, run_study

    project = _open()
    if join is not None:
        def tell(kind: str, info: dict[str, Any]) -> None:
            if kind == "trial" and not json_:
                err.print(f"trial {info['number']} {info['state']}: {_num(info['value'])} "
                          f"({info['done']}/{info['total']} done)", highlight=False)

        done = join_study(project, join, worker_index=worker_index, on_event=tell)
        if json_:
            emit_json(done)
        else:
            out.print(f"worker {done['worker']} ran {len(done['trials'])} trial(s) of "
                      f"{done['study']}")
        return
    with _TuneProgress(disable=json_) as progress:
        result = run_study(project, trials=trials, workers=workers, on_event=progress.on)
    if json_:
        emit_json(result)
        return
    _print_tune(result)


class _TuneProgress:
    """A rich bar: trial k/N and the best value so far."""

    def __init__(self, *, disable: bool) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=err, disable=disable)
        self.task = self.bar.add_task("preparing", total=None)
        self.metric = ""
        self.started = False

    def __enter__(self) -> _TuneProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.bar.stop()

    def on(self, kind: str, info: dict[str, Any]) -> None:
        if not self.started:  # from the first event on: a config error prints alone
            self.bar.start()
            self.started = True
        if kind == "phase":
            self.bar.update(self.task, description=info["text"])
        elif kind == "step" and info["event"] == "start":
            self.bar.update(self.task, description=f"step {info['step']}")
        elif kind == "study":
            self.metric = info["metric"]
            self.bar.update(self.task, total=info["total"], completed=info["done"],
                            description=f"study {info['study']}: {info['metric']} "
                                        f"({info['direction']})")
        elif kind == "trial":
            best = "" if info["best"] is None else (
                f", best {self.metric} {info['best']:.4g} (trial {info['best_trial']})")
            self.bar.update(self.task, completed=info["done"],
                            description=f"trial {info['done']}/{info['total']}{best}")


def _print_tune(result: dict[str, Any]) -> None:
    t, metric = result["trials"], result["metric"]
    out.print(f"study [bold]{result['study']}[/] ({result['storage']}): {t['complete']} "
              f"complete, {t['pruned']} pruned, {t['failed']} failed of {t['total']} "
              f"({t['before_this_run']} before this run); {metric} on "
              f"{result['validation_rows']} validation rows of the training snapshot")

    def params(p: dict[str, Any]) -> str:
        return ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in p.items())

    best = result["best"]
    rows = [["configured", b["trial"], _num(b["value"]), params(b["params"])]
            for b in [result["baseline"]] if b is not None]
    rows.append(["best", best["trial"], _num(best["value"]), params(best["params"])])
    out.print(table(f"validation {metric}", ["", "trial", metric, "params"], rows))
    r = result["registered"]
    out.print(f"registered [bold]{r['name']}[/] version [bold]{r['version']}[/] from trial "
              f"{best['trial']} (pipeline run {short(result['pipeline_run_id'])})")
    out.print(f"holdout: {fmt_metrics(result['evaluation']['metrics'])}")
    if result.get("gates"):
        _print_gates(result["gates"])
        _print_promotion(result)


# ------------------------------------------------------------------------------ status

@app.command()
def status(json_: JsonOpt = False) -> None:
    """Last runs, model versions and snapshots, on one screen."""
    from mloop.status import project_status

    s = project_status(_open())
    if json_:
        emit_json(s)
        return
    out.print(f"project [bold]{s['project']}[/] at {s['root']}")
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


# ------------------------------------------------------------------------------ runs

@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(min=1)] = 20, json_: JsonOpt = False) -> None:
    """Pipeline runs, newest first."""
    from mloop.status import list_runs

    rows = list_runs(_open(), limit=limit)
    if json_:
        emit_json({"runs": rows})
        return
    out.print(table("pipeline runs", ["run", "pipeline", "status", "started", "s", "cached",
                                      "error"],
                    [[r["run_id"], r["pipeline"], r["status"], r["started_at"], r["duration_s"],
                      f"{r['cache_hits']}/{r['steps_total']}", short(r["error"], 60)]
                     for r in rows]))


@runs_app.command("show")
def runs_show(run_id: str, json_: JsonOpt = False) -> None:
    """One pipeline run with its steps, durations, memory and cache hits."""
    from mloop.status import show_run

    d = show_run(_open(), run_id)
    if json_:
        emit_json(d)
        return
    _print_run(d)
    if d.get("traceback"):
        err.print(d["traceback"])


@runs_app.command("create")
def runs_create(pipeline: Annotated[str | None, typer.Argument()] = None,
                json_: JsonOpt = False) -> None:
    """Start an empty pipeline run for an orchestrator to fill with `mloop step run`."""
    from mloop.pipeline.runner import create_run

    row = create_run(_open(), pipeline)
    if json_:
        emit_json({"run_id": row.id, "pipeline": row.pipeline,
                   "mlflow_run_id": row.mlflow_run_id})
        return
    sys.stdout.write(row.id + "\n")  # the id alone, plain: scripts and XCom read this line


@runs_app.command("gate")
def runs_gate(run_id: str, json_: JsonOpt = False) -> None:
    """Gate the version pipeline run RUN_ID registered against the champion and, with
    gates.auto_promote, promote it: what `mloop run` does after the steps."""
    from mloop.pipeline.runner import registered_version
    from mloop.registry.promotion import gate_and_promote

    project = _open()
    result = gate_and_promote(project, registered_version(project, run_id))
    if json_:
        emit_json(result)
        return
    _print_gates(result["gates"])
    _print_promotion(result)


# ------------------------------------------------------------------------------ step

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

    o = run_single_step(_open(), pipeline, step_name, run_id, use_cache=not no_cache,
                        retries=retries)
    d = {"step": o.step, "status": o.status, "cache_hit": o.cache_hit,
         "duration_s": round(o.duration_s, 3), "peak_memory_mb": o.peak_memory_mb,
         "outputs": o.outputs, "mlflow_run_id": o.mlflow_run_id, "attempts": o.attempts}
    if json_:
        emit_json(d)
        return
    out.print(f"{o.step}: {o.status} ({'cache hit' if o.cache_hit else 'ran'}, "
              f"{o.duration_s:.2f}s)")
    for k, v in o.outputs.items():
        out.print(f"  {k}: {v['kind']} {v['digest']}")


# ------------------------------------------------------------------------------ data

@data_app.command("snapshot")
def data_snapshot(path: Annotated[Path, typer.Argument(help="CSV/Parquet file or folder.")],
                  json_: JsonOpt = False) -> None:
    """Store a content-addressed snapshot of a file, with its profile."""
    from mloop.status import snapshot_file

    d = snapshot_file(_open(), path)
    if json_:
        emit_json(d)
        return
    verb = "created" if d["created"] else "already stored"
    out.print(f"snapshot [bold]{d['digest']}[/] ({verb}): {d['rows']} rows, "
              f"{len(d['schema'])} columns")
    cols = d["profile"]["columns"]
    out.print(table("profile", ["column", "kind", "type", "missing", "summary"], [
        [name, c["kind"], c["type"], f"{c['missing_rate']:.1%}", _summary(c)]
        for name, c in cols.items()]))


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

    rows = snapshots(_open(), limit=100)
    if json_:
        emit_json({"snapshots": rows})
        return
    out.print(table("snapshots", ["digest", "rows", "cols", "created", "source"],
                    [[x["digest"], x["rows"], x["columns"], x["created_at"], x["source"]]
                     for x in rows]))


@data_app.command("profile")
def data_profile(digest: str, json_: JsonOpt = False) -> None:
    """The stored profile of a snapshot (by digest or unique prefix)."""
    project = _open()
    prof = project.snapshots.profile(digest)
    if json_:
        emit_json(prof)
        return
    out.print(table(f"profile of {digest} ({prof['rows']} rows)",
                    ["column", "kind", "type", "missing", "summary"],
                    [[n, c["kind"], c["type"], f"{c['missing_rate']:.1%}", _summary(c)]
                     for n, c in prof["columns"].items()]))


# ------------------------------------------------------------------------------ models

@models_app.command("list")
def models_list(limit: Annotated[int, typer.Option(min=1)] = 20, json_: JsonOpt = False) -> None:
    """Versions with aliases, gate status, metrics and training snapshot."""
    from mloop.status import model_versions

    rows = model_versions(_open(), limit=limit)
    if json_:
        emit_json({"versions": rows})
        return
    out.print(table("model versions", ["version", "aliases", "gates", "metrics",
                                       "train snapshot", "pipeline run"],
                    [[m["version"], ",".join(m["aliases"]), m["gates"] or "not run",
                      fmt_metrics(m["metrics"]), short(m["snapshot_train"]),
                      short(m["pipeline_run_id"])] for m in rows]))


@models_app.command("gate")
def models_gate(version: Annotated[int, typer.Argument(min=1)], json_: JsonOpt = False) -> None:
    """Run the gates from mloop.yaml on VERSION; exit 1 if any gate fails."""
    from mloop.registry.gates import evaluate_gates

    report = evaluate_gates(_open(), version)
    if json_:
        emit_json(report.to_dict())
    else:
        _print_gates(report.to_dict())
    if not report.passed:
        raise typer.Exit(1)


def _print_gates(report: dict[str, Any]) -> None:
    champ = f"champion v{report['champion']}" if report["champion"] else "no champion yet"
    out.print(f"gates for [bold]{report['model']}[/] v{report['version']} ({champ}): "
              + ("[green]passed" if report["passed"] else "[red]failed"))
    colour = {"pass": "green", "fail": "red", "skip": "yellow"}
    out.print(table("gates", ["gate", "result", "value", "threshold", "detail"],
                    [[r["gate"], f"[{colour[r['status']]}]{r['status']}", _num(r["value"]),
                      _num(r["threshold"]), r["message"]] for r in report["results"]]))


ReasonOpt = Annotated[str, typer.Option("--reason", help="Why: recorded in the history.")]


def _print_change(change: Any, json_: bool) -> None:
    if json_:
        emit_json(change.to_dict())
        return
    was = f"v{change.replaced}" if change.replaced is not None else "nothing"
    now = f"v{change.version}" if change.version is not None else "nothing"
    out.print(f"{change.action}: '{change.alias}' of {change.model} is now "
              f"[bold]{now}[/] (was {was}) by {change.actor}: {change.reason}")


@models_app.command("promote")
def models_promote(
    version: Annotated[int, typer.Argument(min=1)],
    reason: ReasonOpt,
    force: Annotated[bool, typer.Option("--force", help="Promote despite failed gates "
                                                        "(recorded as an override).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Make VERSION the champion, if its gates passed against the current champion."""
    from mloop.registry.promotion import promote

    _print_change(promote(_open(), version, reason=reason, force=force), json_)


@models_app.command("rollback")
def models_rollback(
    reason: ReasonOpt,
    to: Annotated[int | None, typer.Option("--to", min=1, help="A version that was champion "
                                                               "before.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Move the champion back to the previous champion (or --to an earlier one)."""
    from mloop.registry.promotion import rollback

    _print_change(rollback(_open(), reason=reason, to=to), json_)


@models_app.command("history")
def models_history(
    at: Annotated[str | None, typer.Option("--at", help="ISO time: what served then.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Every champion change, what served at a given time, and aliases changed outside mloop."""
    from datetime import datetime

    from mloop.registry.promotion import history

    when = None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise MloopError(f"--at '{at}' is not an ISO time like 2026-11-20T10:00") from None
    h = history(_open(), at=when)
    if json_:
        emit_json(h)
        return
    for d in h["drift"]:
        err.print(f"[red]warning:[/] {d['message']}")
    if "serving" in h:
        serving = ", ".join(f"{a}=v{x['version']} ({x['traffic']:.0%})"
                            for a, x in h["serving"].items()) or "nothing"
        out.print(f"at {h['at']}: {serving}")
    out.print(table(f"deployment history of {h['model']}",
                    ["version", "alias", "action", "from", "to", "actor", "reason"],
                    [[d["version"], d["alias"], d["action"], d["started_at"],
                      d["ended_at"] or "now", d["actor"], d["reason"]]
                     for d in h["deployments"]]))


@models_app.command("lineage")
def models_lineage(version: Annotated[int, typer.Argument(min=1)],
                   json_: JsonOpt = False) -> None:
    """VERSION -> run -> pipeline run -> snapshots -> source, code commit, config, params."""
    from rich.tree import Tree

    from mloop.registry.lineage import lineage

    lin = lineage(_open(), version)
    if json_:
        emit_json(lin)
        return
    root = Tree(f"[bold]{lin['model']}[/] v{lin['version']} "
                f"{' '.join(lin['aliases'])} gates={lin['gates'] or 'not run'} "
                f"{fmt_metrics(lin['metrics'])}")
    root.add(f"MLflow run {lin['run']['mlflow_run_id']}")
    pr = lin["pipeline_run"]
    pnode = root.add(f"pipeline run {pr.get('run_id')} ({pr.get('pipeline')}, "
                     f"{pr.get('status')}, {pr.get('started_at')})")
    code = lin["code"]
    pnode.add(f"code: git {code['git_commit'] or 'not a git tree'}"
              f"{' (dirty)' if code['git_dirty'] == 'true' else ''}, mloop "
              f"{code['mloop_version']}, config {short(lin['config_hash'])}")
    for st in pr.get("steps", []):
        snode = pnode.add(f"{st['step']} {'(cache hit)' if st['cache_hit'] else ''} -> "
                          + ", ".join(f"{k}={short(v)}" for k, v in st["outputs"].items()))
        for k, v in st["params"].items():
            if k.startswith("model."):  # the rest is in --json and `mloop models diff`
                snode.add(f"[dim]{k} = {v}")
    dnode = root.add("data")
    for role, snap in lin["data"].items():
        if snap:
            dnode.add(f"{role}: {snap['digest']} ({snap.get('rows')} rows) "
                      f"from {snap.get('source')}")
    out.print(root)


@models_app.command("diff")
def models_diff(a: Annotated[int, typer.Argument(min=1)],
                b: Annotated[int, typer.Argument(min=1)],
                all_: Annotated[bool, typer.Option("--all", help="Show equal rows too.")] = False,
                json_: JsonOpt = False) -> None:
    """Two versions side by side: params, metrics, data digests, gate results, code."""
    from mloop.registry.lineage import diff

    d = diff(_open(), a, b)
    if json_:
        emit_json(d)
        return
    for section in ("params", "metrics", "data", "gates", "code"):
        rows = d[section] if all_ else [r for r in d[section] if not r["same"]]
        same = sum(r["same"] for r in d[section])
        title = f"{section} ({same} equal{' not shown' if not all_ and same else ''})"
        out.print(table(title, ["", f"v{a}", f"v{b}"], [[r["key"], r["a"], r["b"]]
                                                       for r in rows]))


@models_app.command("reproduce")
def models_reproduce(version: Annotated[int, typer.Argument(min=1)],
                     json_: JsonOpt = False) -> None:
    """Re-run VERSION's recorded pipeline on its recorded snapshots and params; compare
    metrics. Exit 1 when the data changed or the metrics differ beyond the tolerance."""
    from mloop.registry.reproduce import reproduce

    with err.status(f"reproducing v{version}"):
        r = reproduce(_open(), version)
    if json_:
        emit_json(r)
    else:
        for w in r["warnings"]:
            err.print(f"[yellow]warning:[/] {w}")
        out.print(table(f"v{version} reproduced as pipeline run {short(r['reproduced_run_id'])}",
                        ["metric", "recorded", "reproduced", "difference", ""],
                        [[c["metric"], _num(c["recorded"]), _num(c["reproduced"]),
                          _num(c["difference"]), "same" if c["same"] else "[red]differs"]
                         for c in r["metrics"]]))
        for p in r["problems"]:
            out.print(f"[red]{p}")
        if r["reproduced"]:
            out.print("[green]reproduced")
    if not r["reproduced"]:
        raise typer.Exit(1)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4g}"


# ------------------------------------------------------------------------------ the loop

@app.command("loop")
def loop_cmd(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit (for cron, "
                                                      "Airflow, a Kubernetes CronJob).")] = False,
    every: Annotated[float, typer.Option(min=1, help="Seconds between passes.")] = 60.0,
    json_: JsonOpt = False,
) -> None:
    """The controller: monitor new windows, judge canaries, retrain and roll out by policy."""
    import time

    from mloop.loop.controller import run_once

    project = _open()
    while True:
        result = run_once(project)
        if json_:
            result.pop("monitor", None)
            emit_json(result)
        else:
            _print_pass(result)
        if once:
            return
        time.sleep(every)


def _print_pass(result: dict[str, Any]) -> None:
    mon = result.get("monitor") or {}
    out.print(f"event time {result.get('now') or 'n/a'}: {len(mon.get('evaluated', []))} new "
              f"window(s), triggers: "
              f"{', '.join(t['trigger'] for t in result.get('triggers', [])) or 'none'}")
    for a in result["actions"]:
        detail = {k: v for k, v in a.items() if k not in ("action", "triggers")}
        out.print(f"  [bold]{a['action']}[/] {detail}")


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the run, summary.json and "
                                                        "loop.html.")] = Path("mloop-demo"),
    until: Annotated[str, typer.Option(help="Replay up to this date (2013-01-01: all of "
                                            "2011-2012; earlier for a quick run).")] =
    "2013-01-01",
    label_delay_days: Annotated[float, typer.Option(help="Labels arrive this long after the "
                                                         "prediction.")] = 2.0,
    json_: JsonOpt = False,
) -> None:
    """The whole loop on the bike data: train, serve, replay 2011-2012 over HTTP with late
    labels, let the controller retrain/canary/promote; compare with the frozen model."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mloop.demo import DemoOptions, run_demo

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
        "{task.completed:,.0f}/{task.fields[hours]} h"), TimeElapsedColumn(), console=err,
        disable=json_)
    task = bar.add_task("preparing", total=None, hours="?")

    def on(kind: str, info: dict[str, Any]) -> None:
        if kind == "phase":
            bar.update(task, description=info["text"])
        elif kind == "replay":
            bar.update(task, total=info["total"], completed=0, hours=f"{info['total']:,}",
                       description="replaying 2011-2012 over HTTP")
        elif kind == "progress":
            bar.update(task, completed=info["done"],
                       description=f"replaying: {info['now'][:10]}")
            for a in info["actions"]:
                err.print(f"  {info['now'][:10]} [bold]{a['action']}[/] "
                          f"{a.get('version', '') and 'v' + str(a.get('version'))} "
                          f"{a.get('reason', a.get('guard', ''))}", highlight=False)

    with bar:
        summary = run_demo(DemoOptions(out=out_dir, end=until,
                                       label_delay_days=label_delay_days), progress=on)
    if json_:
        emit_json({k: v for k, v in summary.items() if k != "history"})
        return
    out.print(table("MAE per month (rentals/hour)", ["month", "hours", "frozen", "loop",
                                                     "served by"],
                    [[m["month"], f"{m['hours']:,}", f"{m['mae_frozen']:.1f}",
                      f"{m['mae_loop']:.1f}", ", ".join(f"v{v}" for v in m["versions"])]
                     for m in summary["months"]]))
    loop = summary["loop"]
    out.print(f"2012 MAE: loop [bold]{_num(summary['mae_2012_loop'])}[/] vs frozen "
              f"{_num(summary['mae_2012_frozen'])}; retrains {loop['retrains']}, promoted "
              f"{loop['promoted']}, rolled back {loop['rolled_back']}, rejected "
              f"{loop['rejected']}; time to detect {_num(loop['time_to_detect_hours'])} h, "
              f"to deploy {_num(loop['time_to_deploy_hours'])} h (event time); "
              f"{summary['seconds']} s in all")
    out.print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'loop.html'}")


@app.command()
def events(
    since: Annotated[str | None, typer.Option(help="ISO time: only events at or after.")] =
    None,
    type_: Annotated[str | None, typer.Option("--type", help="An event kind, or a prefix "
                                                             "ending in '.' (loop.).")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events."
                                         )] = False,
    json_: JsonOpt = False,
) -> None:
    """Every action and its cause, newest first (the audit chain)."""
    import json as _json
    import time

    from mloop.security.audit import list_events

    project = _open()
    rows = list_events(project.store, limit=limit, kind=type_,
                       since=_iso_arg(since, "--since"))

    def show(batch: list[Any]) -> None:
        for e in batch:
            body = {"id": e.id, "at": e.at.isoformat(timespec="seconds"), "kind": e.kind,
                    "actor": e.actor, "payload": e.payload}
            if json_:
                sys.stdout.write(_json.dumps(body, default=str) + "\n")
            else:
                summary = _json.dumps(e.payload, default=str)
                out.print(f"{body['at']}  [bold]{e.kind}[/]  {e.actor}  "
                          f"{summary[:160]}{'…' if len(summary) > 160 else ''}",
                          highlight=False)

    show(rows)
    last = max((e.id for e in rows), default=0)
    while follow:
        time.sleep(1.0)
        new = list(reversed(list_events(project.store, limit=1000, kind=type_,
                                        after_id=last)))
        show(new)
        last = max([last, *(e.id for e in new)])


# ------------------------------------------------------------------------------ audit

@audit_app.command("verify")
def audit_verify(json_: JsonOpt = False) -> None:
    """Recompute the event chain's hashes; exit 1 and name the first broken row if any."""
    from mloop.security.audit import verify_chain

    report = verify_chain(_open().store)
    if json_:
        emit_json({"ok": report.ok, "events": report.events,
                   "first_bad_id": report.first_bad_id, "problem": report.problem})
    elif report.ok:
        out.print(f"audit chain intact: {report.events} events")
    else:
        sys.stderr.write(f"audit chain broken: {report.problem}\n")
    if not report.ok:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------ serving

@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default serving.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default serving.port).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes (default "
                                                            "serving.workers).")] = None,
    auth: Annotated[bool | None, typer.Option(
        "--auth/--no-auth", help="Require bearer tokens (default: on unless bound to "
                                 "loopback).")] = None,
    tls_cert: Annotated[str | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[str | None, typer.Option(help="TLS private key (PEM).")] = None,
) -> None:
    """Serve the champion (and challenger) over HTTP until SIGINT/SIGTERM."""
    from mloop.serving.server import serve as run_server

    project = _open()
    cfg = project.config.serving
    shown = f"{'https' if tls_cert or cfg.tls_cert else 'http'}://{host or cfg.host}:" \
            f"{port if port is not None else cfg.port}"
    err.print(f"serving '{project.config.model_name}' on {shown} (docs at {shown}/docs)")
    run_server(project, host=host, port=port, workers=workers, auth=auth, tls_cert=tls_cert,
               tls_key=tls_key)


@deploy_app.command("canary")
def deploy_canary(
    version: Annotated[int, typer.Argument(min=1)],
    weight: Annotated[float, typer.Option(help="Share of traffic (0..1).")] = 0.1,
    reason: Annotated[str, typer.Option(help="Why: recorded in the history.")] = "canary",
    json_: JsonOpt = False,
) -> None:
    """VERSION becomes the challenger and answers WEIGHT of the traffic."""
    from mloop.serving.deploy import deploy_challenger

    _print_change(deploy_challenger(_open(), version, mode="canary", weight=weight,
                                    reason=reason), json_)


@deploy_app.command("shadow")
def deploy_shadow(
    version: Annotated[int, typer.Argument(min=1)],
    reason: Annotated[str, typer.Option(help="Why: recorded in the history.")] = "shadow",
    json_: JsonOpt = False,
) -> None:
    """VERSION is scored on a copy of every request; its answers are logged, never returned."""
    from mloop.serving.deploy import deploy_challenger

    _print_change(deploy_challenger(_open(), version, mode="shadow", reason=reason), json_)


@deploy_app.command("stop-challenger")
def deploy_stop(
    reason: Annotated[str, typer.Option(help="Why: recorded in the history.")] =
    "challenger stopped",
    json_: JsonOpt = False,
) -> None:
    """Remove the challenger: the champion answers everything again."""
    from mloop.serving.deploy import stop_challenger

    _print_change(stop_challenger(_open(), reason=reason), json_)


@deploy_app.command("status")
def deploy_status(json_: JsonOpt = False) -> None:
    """What should serve now: champion, challenger, mode and traffic share."""
    from mloop.serving.deploy import desired_state

    state = desired_state(_open()).to_dict()
    if json_:
        emit_json(state)
        return
    out.print(table("deployment", ["role", "version", "mode", "traffic"], [
        ["champion", short(state["champion"]), "", f"{1 - state['weight']:.0%}"],
        ["challenger", short(state["challenger"]), state["mode"] or "",
         f"{state['weight']:.0%}"]]))


@app.command()
def predict(
    # str, not Path: Path("s3://b/k") would lose a slash (--engine spark reads URIs)
    input: Annotated[str, typer.Option("--input", "-i", help="Parquet or CSV file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Parquet file to write (a "
                                        "folder with --engine spark).")],
    version: Annotated[int | None, typer.Option(min=1, help="Default: the champion.")] = None,
    chunk_rows: Annotated[int, typer.Option(min=1, help="Rows per chunk (bounds memory).")] =
    50_000,
    engine: Annotated[str, typer.Option(help="local (chunks in this process) or spark "
                                             "(mloop\\[spark]; INPUT/OUTPUT may be folders or "
                                             "s3:// URIs, OUTPUT is a Parquet folder).")] =
    "local",
    master: Annotated[str | None, typer.Option(help="Spark master (--engine spark). Default: "
                                                    "spark.master in mloop.yaml, local[2].")] =
    None,
    json_: JsonOpt = False,
) -> None:
    """Batch scoring: stream INPUT through a version, write predictions to OUTPUT."""
    if engine not in ("local", "spark"):
        raise MloopError(f"--engine '{engine}': expected local or spark")
    if engine == "spark":
        from mloop.serving.spark_batch import predict_spark

        result = predict_spark(_open(), input, output, version=version, master=master,
                               progress=not json_)
        if json_:
            emit_json(result)
            return
        out.print(f"scored {result['rows']:,} rows with v{result['version']} on Spark "
                  f"{result['spark_version']} ({result['master']}) in {result['seconds']} s "
                  f"-> {result['output']}")
        return
    if master is not None:
        raise MloopError("--master is for --engine spark")
    from mloop.serving.batch import predict_file

    result = predict_file(_open(), Path(input), Path(output), version=version,
                          chunk_rows=chunk_rows, progress=not json_)
    if json_:
        emit_json(result)
        return
    out.print(f"scored {result['rows']:,} rows with v{result['version']} in "
              f"{result['seconds']} s ({result['rows_per_s']:,} rows/s, peak RSS "
              f"{result['peak_rss_mb']} MB) -> {result['output']}")


@labels_app.command("ingest")
def labels_ingest(
    file: Annotated[Path, typer.Argument(help="CSV or Parquet with request_id,label.")],
    json_: JsonOpt = False,
) -> None:
    """Store ground truth by request id; ids the inference log does not hold are reported
    (and make the exit code 1), never stored."""
    from mloop.serving.labels import read_label_file, store_labels
    from mloop.storage import ObjectStore

    project = _open()
    task = project.config.task or "regression"
    labels = read_label_file(file, task)
    result = store_labels(ObjectStore(project.uris["inference_log_uri"]), labels, task=task,
                          source=f"file:{file.name}")
    if json_:
        emit_json(result)
    else:
        out.print(f"stored {result['stored']} label(s) from {file}")
        if result["unknown"]:
            shown = ", ".join(result["unknown_ids"][:10])
            err.print(f"[yellow]{result['unknown']} unknown request id(s), not stored: "
                      f"{shown}{' ...' if result['unknown'] > 10 else ''}")
    if result["unknown"]:
        raise typer.Exit(1)


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="predict or admin.")] = "predict",
    name: Annotated[str, typer.Option(help="A label for the token.")] = "",
    json_: JsonOpt = False,
) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    from mloop.security.tokens import create_token

    tok = create_token(_open().store, role=role, name=name)
    if json_:
        emit_json(tok.__dict__)
        return
    err.print(f"token {tok.id} ({tok.role}, '{tok.name}'); shown once, keep it secret:")
    sys.stdout.write(tok.token + "\n")


@tokens_app.command("list")
def tokens_list(json_: JsonOpt = False) -> None:
    """Tokens (never their values)."""
    from mloop.security.tokens import list_tokens

    rows = list_tokens(_open().store)
    if json_:
        emit_json(rows)
        return
    out.print(table("tokens", ["id", "name", "role", "created", "by", "revoked"],
                    [[r["id"], r["name"], r["role"], r["created_at"], r["created_by"],
                      "yes" if r["revoked"] else ""] for r in rows]))


@tokens_app.command("revoke")
def tokens_revoke(token_id: Annotated[int, typer.Argument(min=1)]) -> None:
    """Revoke a token (servers notice within serving.poll_seconds)."""
    from mloop.security.tokens import revoke_token

    revoke_token(_open().store, token_id)
    out.print(f"token {token_id} revoked")


# ------------------------------------------------------------------------------ monitoring

def _monitoring_config() -> Any:
    """The project's monitoring section if there is a project here, else the defaults."""
    from mloop.config import MonitoringConfig
    from mloop.errors import ProjectNotFoundError

    try:
        return _open().config.monitoring
    except ProjectNotFoundError:
        return MonitoringConfig()


@monitor_app.callback()
def monitor(
    ctx: typer.Context,
    window: Annotated[str | None, typer.Option(help="1d, 6h, 30m or 5000rows (default "
                                                    "monitoring.window).")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time: ignore traffic before.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time: ignore traffic after.")] = None,
    serve_metrics: Annotated[int | None, typer.Option(
        help="Keep running: expose the monitoring gauges on this port (Prometheus) and "
             "evaluate new windows every --every seconds.")] = None,
    every: Annotated[float, typer.Option(min=1, help="Seconds between evaluations with "
                                                     "--serve-metrics.")] = 60.0,
    json_: JsonOpt = False,
) -> None:
    """Evaluate every new complete window since the last run; print a summary table."""
    if ctx.invoked_subcommand is not None:
        return
    from mloop.monitoring.service import run_monitor

    project = _open()
    if serve_metrics is not None:
        _serve_monitor_metrics(project, serve_metrics, every, window)
        return
    result = run_monitor(project, window=window, since=_iso_arg(since, "--since"),
                         until=_iso_arg(until, "--until"))
    if json_:
        emit_json(result)
        return
    rows = result["evaluated"] + result["refreshed"]
    if not rows:
        out.print(f"no new complete {result['window']} window since the last run")
        return
    out.print(table(f"{result['model']}: windows of {result['window']} (reference: champion "
                    f"v{result['champion']})",
                    ["window", "rows", "versions", "drift", "prediction", "quality",
                     "metric", "labels"],
                    [[f"{w['start'][:16]} → {w['end'][:16]}", f"{w['rows']:,}",
                      ",".join(f"v{v}" for v in w["versions"] or []),
                      ("[red]drift" if w["drifted"] else "[green]ok") +
                      f" ({(w['drift_share'] or 0):.0%})",
                      "[red]drift" if w["prediction_drifted"] else "ok",
                      str(w["quality_findings"]),
                      "" if w["metric_value"] is None else
                      f"{w['metric']} {w['metric_value']:.4g} (ref "
                      f"{_num(w['reference_metric'])})",
                      f"{w['label_coverage']:.0%}"] for w in rows]))
    if result["refreshed"]:
        out.print(f"{len(result['refreshed'])} earlier window(s) re-scored with late labels")


def _serve_monitor_metrics(project: Any, port: int, every: float, window: str | None) -> None:
    import time

    from prometheus_client import CollectorRegistry, start_http_server

    from mloop.monitoring.alerts import MonitorCollector
    from mloop.monitoring.service import run_monitor

    registry = CollectorRegistry()
    registry.register(MonitorCollector(project))  # type: ignore[arg-type]
    start_http_server(port, addr="127.0.0.1", registry=registry)
    err.print(f"monitoring gauges on http://127.0.0.1:{port}/metrics; evaluating every "
              f"{every:g} s (Ctrl-C to stop)")
    while True:
        result = run_monitor(project, window=window)
        for w in result["evaluated"]:
            out.print(f"window {w['start'][:16]} → {w['end'][:16]}: {w['rows']:,} rows, "
                      f"{'drift' if w['drifted'] else 'no drift'}")
        time.sleep(every)


@monitor_app.command("rules")
def monitor_rules(
    out_path: Annotated[Path, typer.Option("--out", help="YAML file to write.")] =
    Path("alerts.yml"),
) -> None:
    """Prometheus alerting rules for this project's monitoring policy and its server."""
    from mloop.monitoring.alerts import rules_yaml

    _write_text(out_path, rules_yaml(_open()))


@monitor_app.command("dashboard")
def monitor_dashboard(
    out_path: Annotated[Path, typer.Option("--out", help="JSON file to write.")] =
    Path("grafana-dashboard.json"),
) -> None:
    """A Grafana dashboard (JSON model) over the same metrics."""
    import json

    from mloop.monitoring.alerts import grafana_dashboard

    _write_text(out_path, json.dumps(grafana_dashboard(_open()), indent=2))


def _iso_arg(value: str | None, flag: str) -> Any:
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise MloopError(f"{flag} '{value}': not an ISO 8601 time (e.g. 2012-01-01 or "
                         f"2012-01-01T06:00)") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@monitor_app.command("compare")
def monitor_compare(
    reference: Annotated[Path, typer.Argument(help="Reference table (Parquet/CSV/folder).")],
    current: Annotated[Path, typer.Argument(help="Current table.")],
    columns: Annotated[str | None, typer.Option(help="Comma-separated columns (default: "
                                                     "every numeric/categorical one).")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write a "
                                                  "self-contained HTML report.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Ad-hoc quality and drift of CURRENT against REFERENCE, same engine as `mloop monitor`."""
    from mloop.monitoring.evaluate import compare_files

    cols = [c.strip() for c in columns.split(",")] if columns else None
    report = compare_files(reference, current, _monitoring_config(), columns=cols)
    if html_out is not None:
        from mloop.monitoring.report import compare_html

        _write_text(html_out, compare_html(report))
    if json_:
        report.pop("profile", None)
        emit_json(report)
        return
    _print_monitor_report(report)


@monitor_app.command("report")
def monitor_report(
    window_id: Annotated[int | None, typer.Argument(help="A window id (default: the newest)."
                                                    )] = None,
    html_out: Annotated[Path, typer.Option("--html", help="HTML file to write.")] =
    Path("monitoring.html"),
    window: Annotated[str | None, typer.Option(help="Window size of the history (default "
                                                    "monitoring.window).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Windows in the history.")] = 100,
) -> None:
    """Write a self-contained HTML report: history plots and one window in detail."""
    from mloop.monitoring.report import monitor_html
    from mloop.monitoring.service import get_window, list_windows

    project = _open()
    focus = get_window(project, window_id) if window_id is not None else None
    history = list_windows(project, window=window or (focus or {}).get("spec"), limit=limit,
                           with_reports=True)
    if focus is None and history:
        focus = history[-1]
    reports = [w.pop("report") for w in history]
    _write_text(html_out, monitor_html(project.config.model_name, history, reports, focus))


def _write_text(path: Path, text: str) -> None:
    """Write atomically (temp + rename): a report is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    err.print(f"wrote {path} ({len(text.encode()) // 1024} KiB)")


def _print_monitor_report(report: dict[str, Any]) -> None:
    if report["empty"]:
        out.print("the window is empty: nothing to compare")
        return
    drift = report["drift"]
    out.print(table(f"drift ({report['rows']:,} rows; false-alarm rate "
                    f"{drift['false_alarm_rate']:.0%})",
                    ["column", "method", "score", "threshold", "min effect", "p", "drift"],
                    [[c["column"], c["method"], f"{c['score']:.4g}", f"{c['threshold']:.4g}",
                      f"{c['min_effect']:.3g}", f"{c['p_value']:.2g}",
                      "[red]yes" if c["drifted"] else "[green]no"]
                     for c in drift["columns"]]))
    if report["quality"]:
        out.print(table("quality", ["column", "check", "count", "rate", "examples"],
                        [[f["column"], f["check"], f"{f['count']:,}", f"{f['rate']:.2%}",
                          ", ".join(map(str, f["examples"]))] for f in report["quality"]]))
    verdict = "[red]drifted" if drift["drifted"] else "[green]no drift"
    out.print(f"dataset: {verdict}[/] ({drift['drift_share']:.0%} of columns), "
              f"{len(report['quality'])} quality finding(s), {report['seconds']:.2f} s")


# ------------------------------------------------------------------------------ export

@export_app.command("k8s")
def export_k8s(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write: new, empty, or a "
                                                        "previous export (only its files are "
                                                        "replaced).")],
    json_: JsonOpt = False,
) -> None:
    """Deployment + Service + HPA, a KServe InferenceService, a CronJob for `mloop loop
    --once`, ServiceMonitor + PrometheusRule and a Dockerfile, from mloop.yaml's
    `kubernetes:` section."""
    from mloop.export.k8s import k8s_notes, write_k8s

    project = _open()
    written = write_k8s(project, out_dir)
    notes = k8s_notes(project, out_dir)
    if json_:
        emit_json({"out": str(out_dir), "files": [str(p) for p in written], **notes})
        return
    for p in written:
        out.print(f"wrote {p}")
    for w in notes["warnings"]:
        err.print(f"[yellow]warning:[/] {w}")
    for n in notes["notes"]:
        err.print(f"note: {n}")
    err.print(f"build the image: {notes['build']}")


@export_app.command("airflow")
def export_airflow(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (e.g. a subfolder of "
                                                        "Airflow's DAGs folder): new, empty, or "
                                                        "a previous export.")],
    pipeline: Annotated[str | None, typer.Option(help="Pipeline name (default: the "
                                                      "project's).")] = None,
    json_: JsonOpt = False,
) -> None:
    """An Airflow 3 DAG: `runs create`, one task per step (`mloop step run`) in dependency
    order, then `runs gate`; from mloop.yaml's `airflow:` section."""
    from mloop.export.airflow import dag_spec, write_airflow

    project = _open()
    path = write_airflow(project, out_dir, pipeline=pipeline)
    spec = dag_spec(project, pipeline)
    if json_:
        emit_json({"out": str(out_dir), "file": str(path), "dag_id": spec.dag_id,
                   "pipeline": spec.pipeline, "schedule": spec.schedule, "tasks": spec.tasks})
        return
    out.print(f"wrote {path}")
    err.print(f"DAG '{spec.dag_id}': {' -> '.join(spec.tasks)}")


@export_app.command("kubeflow")
def export_kubeflow(
    out_file: Annotated[Path, typer.Option("--out", help="The pipeline file to write (.yaml): "
                                                         "new, or a previous export.")],
    pipeline: Annotated[str | None, typer.Option(help="Pipeline name (default: the "
                                                      "project's).")] = None,
    json_: JsonOpt = False,
) -> None:
    """A Kubeflow Pipelines (KFP v2) pipeline compiled with the kfp SDK: `runs create`, one
    task per step (`mloop step run`) in dependency order, then `runs gate`; every task on
    `kubeflow.base_image`, which must hold mloop[kubeflow]. From mloop.yaml's `kubeflow:`."""
    from mloop.export.kubeflow import describe, kubeflow_warnings, pipeline_spec, write_kubeflow

    project = _open()
    path = write_kubeflow(project, out_file, pipeline=pipeline)
    info = describe(pipeline_spec(project, pipeline))
    warnings = kubeflow_warnings(project)
    if json_:
        emit_json({"file": str(path), **info, "warnings": warnings})
        return
    out.print(f"wrote {path}")
    err.print(f"pipeline '{info['pipeline_name']}' on {info['image']}: "
              f"{' -> '.join(info['tasks'])}")
    for w in warnings:
        err.print(f"[yellow]warning:[/] {w}")


# ------------------------------------------------------------------------------ db

@db_app.command("upgrade")
def db_upgrade(json_: JsonOpt = False) -> None:
    """Bring mloop's store to the latest schema (Alembic)."""
    from mloop.store.db import Store

    project = _open()
    store = Store(project.uris["store_uri"], upgrade=False)
    before = store.current_revision()
    store.upgrade()
    after = store.current_revision()
    from mloop.tracking import redact

    shown = redact(project.uris["store_uri"], project.config.secrets)
    if json_:
        emit_json({"store_uri": shown, "from": before, "to": after})
        return
    out.print(f"{shown}: {before or 'empty'} -> {after}")


# ------------------------------------------------------------------------------ doctor

@app.command()
def doctor(json_: JsonOpt = False) -> None:
    """Check every configured store and engine is reachable and compatible, one line each
    (tracking, registry, artifacts, mloop's store, object stores, drivers, serving port,
    optional extras). Exit 1 if any check fails."""
    from mloop.doctor import run_doctor, summary

    checks = run_doctor(_open())
    result = summary(checks)
    if json_:
        emit_json(result)
    else:
        style = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
        width = max(len(c.check) for c in checks)
        for c in checks:
            out.print(f"{style[c.status]} {c.check:<{width}}  {c.target}  {c.detail}",
                      markup=True, highlight=False, soft_wrap=True)
    if not result["ok"]:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------ entry point

def main(argv: list[str] | None = None) -> int:
    """Console entry: domain errors become one message and exit code 1 (``--debug``: traceback)."""
    # MLflow's INFO chatter (table creation, ...) would bury mloop's own output.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        app(args=argv)  # standalone: usage errors print themselves and exit 2
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MloopError as exc:
        if _state["debug"]:
            err.print_exception()
        # Plain write: rich would wrap the line, and scripts grep these messages.
        sys.stderr.write(f"error: {exc}\n")
        if isinstance(exc, StepFailedError):
            sys.stderr.write(f"see `mloop runs show {exc.run_id}` for the traceback\n")
        return 1


def entry() -> None:
    sys.exit(main())
