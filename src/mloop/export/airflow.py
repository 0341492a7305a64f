"""``mloop export airflow``: the project's pipeline as an Airflow 3 DAG, one task per step.

The DAG file imports nothing from mloop: every task is a ``BashOperator`` running the mloop CLI
(``airflow.mloop_bin``) on the project (``airflow.project_dir``), so Airflow and mloop can live
in separate environments or images (Airflow 3.3 pins fastapi below the version mloop's lock
holds; see ``scripts/airflow_env.sh``). Tasks:

- ``materialize_features`` (only with ``features.store: feast``), first: ``mloop features
  materialize`` brings the online store up to now (an event), so the model this run may
  promote is served features as fresh as its training data;
- ``create_run``: ``mloop runs create PIPELINE`` prints the new pipeline run's id alone on its
  last line, which BashOperator pushes to XCom;
- one task per step: ``mloop step run PIPELINE STEP --run-id ... --retries 0``, wired like the
  steps' data dependencies. The id comes from XCom through an environment variable (never
  pasted into the shell text). Airflow does the retrying, as often as the step would retry in
  ``mloop run`` (its own ``retries`` or ``pipeline.retries``), waiting
  ``pipeline.retry_backoff_seconds`` doubled on each try, as ``mloop run`` does;
- ``gate`` (when the pipeline has a ``register`` step): ``mloop runs gate``, which gates the
  registered version and, with ``gates.auto_promote``, promotes it, as ``mloop run`` does
  after the steps.

Steps pass data through mloop's stores by digest, so the stores must be shared by the workers
(a local SQLite store works when every task runs on one machine, as with ``airflow dags test``
or a LocalExecutor).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from mloop._version import __version__
from mloop.errors import ConfigError, PipelineDefinitionError
from mloop.export.files import step_tasks, write_export
from mloop.pipeline.runner import build_graph
from mloop.project import Project

TASK_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")  # Airflow's task and DAG ids, ASCII only
RUN_ENV_VAR = "MLOOP_PIPELINE_RUN"  # not run_id: Airflow reserves that name in a task's context


@dataclass
class DagSpec:
    """Everything the DAG file says, before it is rendered."""

    dag_id: str
    project: str
    pipeline: str
    schedule: str | None
    cli: str  # shell words: the mloop executable and -C <project folder>
    retry_delay_s: float
    steps: dict[str, tuple[list[str], int]]  # step -> (upstream steps, retries)
    create_task: str = "create_run"
    gate_task: str | None = "gate"
    gate_upstream: list[str] = field(default_factory=list)
    gate_retries: int = 0
    materialize_task: str | None = None  # with a feature store: before create_run

    @property
    def tasks(self) -> list[str]:
        """Task ids in dependency order."""
        return [*([self.materialize_task] if self.materialize_task else []),
                self.create_task, *self.steps, *([self.gate_task] if self.gate_task else [])]


def _free_id(wanted: str, taken: set[str]) -> str:
    name = wanted
    while name in taken:
        name = f"mloop_{name}"
    return name


def _no_template(value: str, key: str) -> str:
    if any(mark in value for mark in ("{{", "{%", "{#")):
        raise ConfigError(f"'airflow.{key}': '{value}' holds Jinja markup, which Airflow "
                          f"would render in the task's command", key=f"airflow.{key}")
    return value


def dag_spec(project: Project, pipeline: str | None = None) -> DagSpec:
    """The DAG of ``pipeline`` (default: the project's), from the graph and ``airflow:``."""
    cfg = project.config
    graph = build_graph(project, pipeline)
    for name in (graph.pipeline, *graph.nodes):
        if not TASK_ID.match(name):
            raise PipelineDefinitionError(f"'{name}' cannot be an Airflow task id (letters, "
                                          f"digits, '_', '.', '-'): rename the pipeline or "
                                          f"step")
    af = cfg.airflow
    project_dir = af.project_dir or str(project.root)
    cli = shlex.join([_no_template(af.mloop_bin, "mloop_bin"), "-C",
                      _no_template(project_dir, "project_dir")])
    steps, sinks = step_tasks(project, graph)
    taken = set(graph.nodes)
    create_task = _free_id("create_run", taken)
    gate_task = _free_id("gate", taken | {create_task}) if "register" in graph.nodes else None
    used = taken | {create_task} | ({gate_task} if gate_task else set())
    materialize_task = _free_id("materialize_features", used) \
        if cfg.features.store == "feast" else None
    return DagSpec(dag_id=af.dag_id or cfg.project, project=cfg.project,
                   pipeline=graph.pipeline, schedule=af.schedule, cli=cli,
                   retry_delay_s=cfg.pipeline.retry_backoff_seconds, steps=steps,
                   create_task=create_task, gate_task=gate_task, gate_upstream=sinks,
                   gate_retries=cfg.pipeline.retries, materialize_task=materialize_task)


def _py(value: object) -> str:
    """A Python literal (JSON's strings, numbers, lists and null are Python's too)."""
    return "None" if value is None else json.dumps(value)


def _long(line: str) -> str:
    """A line of data (a path) may be longer than the linters' 100 characters."""
    return line if len(line) <= 100 else f"{line}  # noqa: E501"


def render_dag(spec: DagSpec) -> str:
    """The DAG file's source."""
    steps = "\n".join(_long(f"    {_py(name)}: ({_py(up)}, {retries}),")
                      for name, (up, retries) in spec.steps.items())
    run_ref = f"{{{{ ti.xcom_pull(task_ids='{spec.create_task}') }}}}"
    lines = [
        f"# Generated by `mloop export airflow` (mloop {__version__}) from the project "
        f"'{spec.project}'.",
        "# Re-running the export overwrites this file: change the `airflow:` section of "
        "mloop.yaml instead.",
        f'"""The mloop pipeline \'{spec.pipeline}\' of the project \'{spec.project}\' as an '
        f'Airflow DAG.',
        "",
        f"{spec.create_task} starts a pipeline run (`mloop runs create`) and prints its id, "
        "which BashOperator",
        "pushes to XCom. Each step task runs one step in its own process (`mloop step run`), "
        "reading its",
        "inputs from mloop's stores by digest."
        + (f" {spec.gate_task} gates the registered version and, with" if spec.gate_task
           else ""),
        *(["gates.auto_promote, promotes it (`mloop runs gate`), as `mloop run` does."]
          if spec.gate_task else []),
        "The workers need the mloop CLI and the project where MLOOP says, and shared stores.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from datetime import timedelta",
        "",
        "import pendulum",
        "from airflow.providers.standard.operators.bash import BashOperator",
        "from airflow.sdk import DAG",
        "",
        "# shell words: the mloop executable and -C <the project's folder>",
        _long(f"MLOOP = {_py(spec.cli)}"),
        f"PIPELINE = {_py(spec.pipeline)}",
        "# step -> (the steps whose outputs it reads, retries)",
        "STEPS: dict[str, tuple[list[str], int]] = {",
        steps,
        "}",
        "# the pipeline run's id, as an environment variable of the tasks (never as shell text)",
        f"RUN = {{{_py(RUN_ENV_VAR)}: {_py(run_ref)}}}",
        "",
        "with DAG(",
        _long(f"    dag_id={_py(spec.dag_id)},"),
        _long(f"    description={_py(f'mloop pipeline {spec.pipeline} of {spec.project}')},"),
        f"    schedule={_py(spec.schedule)},",
        '    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),',
        "    catchup=False,",
        "    max_active_runs=1,",
        '    tags=["mloop"],',
        f"    default_args={{\"retry_delay\": timedelta(seconds={spec.retry_delay_s!r}),",
        '                  "retry_exponential_backoff": 2.0},',
        ") as dag:",
        f"    create_run = BashOperator(task_id={_py(spec.create_task)},",
        '                              bash_command=f"{MLOOP} runs create {PIPELINE}")',
        *_materialize_lines(spec),
        "    tasks: dict[str, BashOperator] = {}",
        "    for name, (upstream, retries) in STEPS.items():",
        "        tasks[name] = BashOperator(",
        "            task_id=name,",
        f'            bash_command=f\'{{MLOOP}} step run {{PIPELINE}} {{name}} --run-id '
        f'"${RUN_ENV_VAR}" \'',
        "                         \"--retries 0\",  # Airflow retries the task",
        "            env=RUN, append_env=True, retries=retries, do_xcom_push=False)",
        "        for up in upstream:",
        "            tasks[up] >> tasks[name]",
        "        if not upstream:",
        "            create_run >> tasks[name]",
    ]
    if spec.gate_task:
        lines += [
            f"    gate = BashOperator(task_id={_py(spec.gate_task)},",
            f'                        bash_command=f\'{{MLOOP}} runs gate "${RUN_ENV_VAR}"\',',
            f"                        env=RUN, append_env=True, retries={spec.gate_retries},",
            "                        do_xcom_push=False)",
            (f"    tasks[{_py(spec.gate_upstream[0])}] >> gate" if len(spec.gate_upstream) == 1
             else _long(f"    [tasks[name] for name in {_py(spec.gate_upstream)}] >> gate")),
        ]
    return "\n".join(lines) + "\n"


def _materialize_lines(spec: DagSpec) -> list[str]:
    """The feature store's materialization, before the run starts (none without a store).
    Its retries are ``pipeline.retries``: it resumes from where the last one ended."""
    if spec.materialize_task is None:
        return []
    return [
        "    # the online store up to now (`mloop features materialize`, an event), first",
        f"    materialize = BashOperator(task_id={_py(spec.materialize_task)},",
        '                               bash_command=f"{MLOOP} features materialize",',
        f"                               retries={spec.gate_retries}, do_xcom_push=False)",
        "    materialize >> create_run",
    ]


def airflow_dag(project: Project, pipeline: str | None = None) -> str:
    """The text of the DAG file `mloop export airflow` writes (no file is touched)."""
    return render_dag(dag_spec(project, pipeline))


def dag_file_name(spec: DagSpec) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', spec.dag_id)}.py"


def write_airflow(project: Project, out: Path, pipeline: str | None = None) -> Path:
    """Write the DAG file into ``out`` (new, empty, or a previous airflow export; see
    :mod:`mloop.export.files`); return its path."""
    spec = dag_spec(project, pipeline)
    [path] = write_export(out, {dag_file_name(spec): render_dag(spec)},
                          generator="mloop export airflow", project=project.config.project)
    return path
