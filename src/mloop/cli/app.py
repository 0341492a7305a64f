"""The ``mloop`` command line: the root only assembles one module per command group and turns
domain errors into one line and an exit code. Parsing, service calls and rendering live in
the group modules; the logic they call lives in the services.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mloop.cli import (
    admin,
    ci,
    cost,
    data,
    export,
    features,
    keys,
    loop,
    models,
    monitor,
    runs,
    serving,
    tune,
    ui,
)
from mloop.cli._common import EnvOpt, ProjectOpt, root_options, set_root_options
from mloop.cli.render import err
from mloop.errors import MloopError, StepFailedError
from mloop.security.actor import set_current_actor

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="mloop: pipelines, tracked runs, gated models, serving, monitoring, "
                       "retraining — one loop.")


@app.callback()
def _root(
    project: ProjectOpt = None,
    env: EnvOpt = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    set_root_options(project=project, debug=debug, env=env)


# Top-level commands, in the order `mloop --help` lists them.
app.command()(admin.init)
app.command()(runs.run)
app.command()(tune.tune)
app.command()(admin.status)
app.command("loop")(loop.loop_cmd)
app.command()(loop.demo)
app.command()(loop.events)
app.command()(cost.cost)
app.command()(serving.serve)
app.command("ui")(ui.ui)
app.command()(serving.predict)
app.command()(admin.doctor)

# Command groups.
app.add_typer(runs.runs_app, name="runs")
app.add_typer(data.data_app, name="data")
app.add_typer(runs.step_app, name="step")
app.add_typer(admin.db_app, name="db")
app.add_typer(models.models_app, name="models")
app.add_typer(loop.audit_app, name="audit")
app.add_typer(serving.deploy_app, name="deploy")
app.add_typer(serving.labels_app, name="labels")
app.add_typer(serving.tokens_app, name="tokens")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(monitor.monitor_app, name="monitor")
app.add_typer(export.export_app, name="export")
app.add_typer(ci.ci_app, name="ci")
app.add_typer(features.features_app, name="features")


def main(argv: list[str] | None = None) -> int:
    """Console entry: domain errors become one message and exit code 1 (``--debug``: traceback)."""
    # MLflow's INFO chatter (table creation, ...) would bury mloop's own output.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    set_root_options(project=None, debug=False)  # a usage error never sees the last call's
    set_current_actor(None)  # nor does a command see the person the last call acted for
    forget_inherited_metrics_folder()
    try:
        app(args=argv)  # standalone: usage errors print themselves and exit 2
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MloopError as exc:
        if root_options().debug:
            err.print_exception()
        # Plain write: rich would wrap the line, and scripts grep these messages.
        sys.stderr.write(f"error: {exc}\n")
        if isinstance(exc, StepFailedError):
            sys.stderr.write(f"see `mloop runs show {exc.run_id}` for the traceback\n")
        return 1


def forget_inherited_metrics_folder() -> None:
    """Drop a ``PROMETHEUS_MULTIPROC_DIR`` this process inherited, unless it is a worker of
    ``mloop serve --workers N`` (which sets it with its own flag). prometheus-client reads the
    variable once, at import, and then keeps every metric value in files named by process
    id in that folder: a server started from a shell where a library (Feast, on import) had
    set it would count on from the values a dead process with the same pid left there."""
    # the names of mloop.serving.metrics (MULTIPROC_ENV, WORKERS_ENV), not imported: that
    # module imports prometheus-client, which must not read the variable before it goes
    if os.environ.get("MLOOP_SERVING_MULTIPROC") != "1":
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        os.environ.pop("PROMETHEUS_MULTIPROCESS_DIR", None)


def entry() -> None:
    sys.exit(main())
