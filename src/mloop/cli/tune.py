"""Hyperparameter search: ``mloop tune``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mloop.cli._common import JsonOpt, open_project_as, report
from mloop.cli.render import (
    err,
    fmt_metrics,
    num,
    out,
    print_gates,
    print_promotion,
    short,
    table,
)


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

    project = open_project_as("train")
    if join is not None:
        def tell(kind: str, info: dict[str, Any]) -> None:
            if kind == "trial" and not json_:
                err.print(f"trial {info['number']} {info['state']}: {num(info['value'])} "
                          f"({info['done']}/{info['total']} done)", highlight=False)

        def render_join(done: dict[str, Any]) -> None:
            out.print(f"worker {done['worker']} ran {len(done['trials'])} trial(s) of "
                      f"{done['study']}")

        report(join_study(project, join, worker_index=worker_index, on_event=tell), json_,
               render_join)
        return
    with _TuneProgress(disable=json_) as progress:
        result = run_study(project, trials=trials, workers=workers, on_event=progress.on)
    report(result, json_, _print_tune)


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
        return ", ".join(f"{k}={num(v) if isinstance(v, float) else v}" for k, v in p.items())

    best = result["best"]
    rows = [["configured", b["trial"], num(b["value"]), params(b["params"])]
            for b in [result["baseline"]] if b is not None]
    rows.append(["best", best["trial"], num(best["value"]), params(best["params"])])
    out.print(table(f"validation {metric}", ["", "trial", metric, "params"], rows))
    r = result["registered"]
    out.print(f"registered [bold]{r['name']}[/] version [bold]{r['version']}[/] from trial "
              f"{best['trial']} (pipeline run {short(result['pipeline_run_id'])})")
    out.print(f"holdout: {fmt_metrics(result['evaluation']['metrics'])}")
    if result.get("gates"):
        print_gates(result["gates"])
        print_promotion(result)
