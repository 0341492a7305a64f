"""Continuous integration for models: ``mloop ci check``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from mloop.cli._common import JsonOpt, NoCacheOpt, open_project_as
from mloop.cli.render import emit_json, err

ci_app = typer.Typer(no_args_is_help=True, help="Continuous integration for models: check a "
                                                "pull request's candidate.")


@ci_app.command("check")
def ci_check(
    base_env: Annotated[str | None, typer.Option(
        "--base-env", help="Environment whose champion the candidate is gated against "
                           "(default: the project's own registry).")] = None,
    run_id: Annotated[str | None, typer.Option(
        "--run-id", help="Take this pipeline run's registered version instead of running "
                         "the pipeline.")] = None,
    report_path: Annotated[Path | None, typer.Option(
        "--report", help="Write the Markdown report here (plots as PNG files next to it); "
                         "default: print it on stdout.")] = None,
    no_cache: NoCacheOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Run the pipeline (or take --run-id's), gate the candidate against the base champion
    and report metrics and deltas, gates, slices, data and config changes; promote nothing.
    Exit 1 when a gate fails."""
    from mloop.registry.ci_check import run_ci_check
    from mloop.registry.ci_report import check_report_path, render_markdown, write_report

    if report_path is not None:
        check_report_path(report_path)  # before minutes of training
    project = open_project_as("train")
    check = run_ci_check(project, base_env=base_env, run_id=run_id, use_cache=not no_cache)
    if report_path is not None:
        for kind, path in write_report(check, report_path).items():
            err.print(f"wrote {path} ({kind})")
    if json_:
        emit_json(check.to_dict())
    elif report_path is None:
        sys.stdout.write(render_markdown(check))
    verdict = "every gate passed" if check.passed else "a gate failed"
    err.print(f"v{check.version} against the {check.base.env} champion "
              f"({'v' + str(check.base.version) if check.base.version else 'none'}): {verdict}")
    if not check.passed:
        raise typer.Exit(1)
