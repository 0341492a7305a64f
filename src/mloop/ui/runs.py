"""The Runs and Snapshots pages: pipeline runs with their steps (status, cache hits,
durations, peak memory) and the data snapshots with their stored profiles. They call the
services ``mloop runs list|show`` and ``mloop data list|profile`` call (:mod:`mloop.status`)
and read stored records only: bounded queries, nothing recomputed."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from mloop.ui.auth import require_reader
from mloop.ui.links import project_mlflow_ui
from mloop.ui.params import int_param
from mloop.ui.render import render

RUNS_LIMIT, RUNS_MAX = 50, 200
SNAPSHOTS_LIMIT, SNAPSHOTS_MAX = 30, 200


def runs_page(request: Request) -> Response:
    """The newest pipeline runs (``?limit=``, default 50) with their steps."""
    from mloop.status import list_runs

    require_reader(request)
    project = request.app.state.project
    limit = int_param(request, "limit", default=RUNS_LIMIT, high=RUNS_MAX)
    runs = list_runs(project, limit=limit, with_steps=True)
    return render(request, "runs.html", page="runs", runs=runs, limit=limit,
                  mlflow=project_mlflow_ui(project))


def run_page(request: Request) -> Response:
    """One pipeline run (by id or unique prefix): each step's status, cache hit, duration,
    peak memory, attempts, outputs and error; a 404 naming it when there is none."""
    from mloop.status import show_run

    require_reader(request)
    project = request.app.state.project
    run = show_run(project, request.path_params["run_id"])
    return render(request, "run.html", page="runs", run=run,
                  mlflow=project_mlflow_ui(project))


def snapshots_page(request: Request) -> Response:
    """The newest snapshots (``?limit=``, default 30), each with its profile's summary."""
    from mloop.status import snapshots

    require_reader(request)
    project = request.app.state.project
    limit = int_param(request, "limit", default=SNAPSHOTS_LIMIT, high=SNAPSHOTS_MAX)
    rows = snapshots(project, limit=limit, with_profiles=True)
    return render(request, "snapshots.html", page="snapshots", snapshots=rows, limit=limit)
