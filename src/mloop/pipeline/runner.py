"""Executing pipelines: one step at a time, in this process or another.

``execute_step`` is the single way a step runs: the local runner calls it for each node in
order, and ``mloop step run PIPELINE STEP --run-id R`` calls it in a fresh process (that is
what Airflow and Kubeflow tasks invoke). Inputs arrive as digests recorded by upstream step
runs, outputs leave as digests, so no state passes through memory between steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mloop._version import __version__
from mloop.errors import (
    CandidateNotRegisteredError,
    ConfigError,
    MloopError,
    PipelineDefinitionError,
    StepFailedError,
)
from mloop.memory import PeakMemory
from mloop.pipeline.artifacts import load_output, output_exists, save_output
from mloop.pipeline.context import StepContext, apply_parent_effect
from mloop.pipeline.dsl import Graph, Node
from mloop.pipeline.loader import load_overrides, load_pipeline
from mloop.pipeline.usage import STEP_CPU, log_usage, run_usage
from mloop.project import Project
from mloop.store.db import utcnow
from mloop.store.models import PipelineRunRow
from mloop.tracking import BatchLogger, bind_logger, git_info, log_params, unbind_logger

EventHook = Callable[[str, str, dict[str, Any]], None]


@dataclass
class StepOutcome:
    step: str
    status: str
    cache_hit: bool
    duration_s: float
    peak_memory_mb: float | None
    outputs: dict[str, Any]
    mlflow_run_id: str | None
    attempts: int = 1
    error: str | None = None


@dataclass
class RunResult:
    run_id: str
    mlflow_run_id: str
    status: str
    steps: list[StepOutcome] = field(default_factory=list)
    error: str | None = None


def build_graph(project: Project, pipeline_name: str | None = None) -> Graph:
    """The project's pipeline as a graph, with mloop.yaml's step overrides applied."""
    try:
        pipe = load_pipeline(project.config.pipeline.entry, project.root)
        if pipeline_name is not None and pipeline_name != pipe.name:
            raise PipelineDefinitionError(
                f"this project's pipeline is '{pipe.name}' (pipeline.entry), not "
                f"'{pipeline_name}'")
        overrides = load_overrides(project.config.pipeline.steps, project.root)
        return pipe.build(project.config, overrides=overrides)
    except ConfigError as exc:
        raise project.config.locate(exc) from None


def cache_key(node: Node, input_digests: dict[str, str]) -> str:
    """What makes a step's result reusable: its code, its inputs' digests, its params."""
    body = json.dumps({"source": node.step.source_hash, "inputs": input_digests,
                       "params": node.params}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def step_retries(project: Project, node: Node) -> int:
    """How often a failing step is run again: its own ``retries``, else ``pipeline.retries``."""
    return node.step.retries if node.step.retries is not None else (
        project.config.pipeline.retries)


def start_pipeline_run(project: Project, graph: Graph, *,
                       config_text: str | None = None) -> PipelineRunRow:
    """Create the run in mloop's store and its MLflow parent run.

    ``config_text`` is the mloop.yaml logged with the run (default: the project's file); a
    caller that runs with an overridden configuration (``mloop tune``'s parameters) logs the
    configuration it really ran, so ``mloop models reproduce`` re-runs the same thing."""
    config_hash = project.config.config_hash()
    row = project.store.create_pipeline_run(project=project.name, pipeline=graph.pipeline,
                                            config_hash=config_hash)
    client = project.mlflow
    tags = {"mloop.pipeline_run_id": row.id, "mloop.pipeline": graph.pipeline,
            "mloop.config_hash": config_hash, "mloop.version": __version__,
            "mloop.steps": ",".join(graph.nodes)}
    tags.update({f"mloop.{k}": v for k, v in git_info(project.root).items()})
    parent = client.create_run(project.experiment_id, run_name=f"{graph.pipeline}-{row.id[:8]}",
                               tags=tags)
    if config_text is None:
        config_text = (project.root / "mloop.yaml").read_text(encoding="utf-8")
    client.log_text(parent.info.run_id, config_text, "mloop.yaml")
    project.store.update_pipeline_run(row.id, mlflow_run_id=parent.info.run_id,
                                      experiment_id=project.experiment_id, status="running")
    return project.store.get_pipeline_run(row.id)


def finish_pipeline_run(project: Project, run: PipelineRunRow, *, status: str,
                        error: str | None = None) -> None:
    """End the run in mloop's store and MLflow, with what its steps used logged on the
    parent run (``mloop.cpu_seconds`` ...: see :mod:`mloop.pipeline.usage`)."""
    project.store.update_pipeline_run(run.id, status=status, ended_at=utcnow(), error=error)
    if run.mlflow_run_id:
        log_usage(project, run.mlflow_run_id, run_usage(project, run.id))
        project.mlflow.set_terminated(run.mlflow_run_id,
                                      "FINISHED" if status == "succeeded" else "FAILED")


def _resolve_inputs(project: Project, run: PipelineRunRow, node: Node) -> dict[str, Any]:
    refs: dict[str, Any] = {}
    for pname, ref in node.inputs.items():
        upstream = project.store.latest_step_run(run.id, ref.node)
        if upstream is None:
            raise PipelineDefinitionError(
                f"step '{node.name}' needs the output of '{ref.node}', which has not succeeded "
                f"in pipeline run {run.id}; run `mloop step run {run.pipeline} {ref.node} "
                f"--run-id {run.id}` first")
        refs[pname] = upstream.outputs[ref.output]
    return refs


def _replay_effects(project: Project, parent_run_id: str | None,
                    effects: list[dict[str, Any]] | None) -> None:
    """Apply a step's recorded parent-run effects to ``parent_run_id`` (used on cache hits,
    so a fully cached pipeline run still shows its metrics and dataset inputs in MLflow)."""
    if not parent_run_id:
        return
    for effect in effects or []:
        apply_parent_effect(project, parent_run_id, effect)


def _record_failure(project: Project, step_run_id: int, mlrun_id: str, error: str, tb: str,
                    **fields: Any) -> None:
    project.store.finish_step(step_run_id, status="failed", error=error, traceback=tb,
                              **fields)
    client = project.mlflow
    client.set_tag(mlrun_id, "mloop.error", error[:5000])
    client.log_text(mlrun_id, tb or error, "traceback.txt")
    client.set_terminated(mlrun_id, "FAILED")


def _cache_hit(project: Project, node: Node, key: str) -> Any:
    """The earlier execution to reuse, if its outputs still exist and the step accepts them."""
    cached = project.store.find_cached(node.name, key)
    if cached is None or not all(output_exists(o, project.outputs, project.snapshots)
                                 for o in cached.outputs.values()):
        return None
    if node.step.cache_valid is not None:
        values = {k: load_output(ref, project.outputs, project.snapshots)
                  for k, ref in cached.outputs.items()}
        if not node.step.cache_valid(project, values):
            return None
    return cached


def execute_step(project: Project, run: PipelineRunRow, graph: Graph, name: str, *,
                 use_cache: bool = True, on_event: EventHook | None = None,
                 retries: int | None = None) -> StepOutcome:
    """Run one node of ``graph`` as part of pipeline run ``run``; record everything.

    ``retries`` overrides :func:`step_retries` (0 when an orchestrator does the retrying).

    Whatever goes wrong after the step run is recorded (a user exception, or mloop's own
    bookkeeping failing), the step run and its MLflow run end as failed, never "running".
    """
    node = graph.node(name)
    input_refs = _resolve_inputs(project, run, node)
    key = cache_key(node, {k: v["digest"] for k, v in input_refs.items()})
    mlrun = project.mlflow.create_run(project.experiment_id, run_name=name, tags={
        "mlflow.parentRunId": run.mlflow_run_id or "", "mloop.pipeline_run_id": run.id,
        "mloop.step": name, "mloop.cache_key": key})
    mlrun_id = mlrun.info.run_id
    step_run_id = project.store.start_step(pipeline_run_id=run.id, step=name, cache_key=key,
                                           inputs=input_refs, mlflow_run_id=mlrun_id)
    try:
        return _execute(project, run, node, key, input_refs, mlrun_id, step_run_id,
                        use_cache=use_cache, notify=on_event or (lambda *_: None),
                        retries=retries)
    except StepFailedError:
        raise
    except Exception as exc:
        error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        with contextlib.suppress(Exception):  # the store itself may be what failed
            _record_failure(project, step_run_id, mlrun_id, error, tb)
        raise StepFailedError(name, run.id, error, tb) from exc


def _execute(project: Project, run: PipelineRunRow, node: Node, key: str,
             input_refs: dict[str, Any], mlrun_id: str, step_run_id: int, *,
             use_cache: bool, notify: EventHook, retries: int | None) -> StepOutcome:
    store, client, name = project.store, project.mlflow, node.name
    log_params(client, mlrun_id, node.params, secrets=project.config.secrets)
    notify("start", name, {"mlflow_run_id": mlrun_id})

    cached = None
    if use_cache and project.config.pipeline.cache and node.step.cache:
        cached = _cache_hit(project, node, key)
    if cached is not None:
        _replay_effects(project, run.mlflow_run_id, cached.effects)
        store.finish_step(step_run_id, status="succeeded", cache_hit=True,
                          outputs=cached.outputs, duration_s=0.0, effects=cached.effects)
        client.set_tag(mlrun_id, "mloop.cache", "hit")
        client.set_tag(mlrun_id, "mloop.cached_from_run", cached.pipeline_run_id)
        with BatchLogger(client, mlrun_id, tracking_uri=project.uris["tracking_uri"]) as lg:
            lg.log_metrics({"cache_hit": 1.0, "duration_s": 0.0})
        client.set_terminated(mlrun_id, "FINISHED")
        notify("cached", name, {})
        return StepOutcome(name, "succeeded", True, 0.0, None, cached.outputs, mlrun_id)

    retries = step_retries(project, node) if retries is None else retries
    backoff = project.config.pipeline.retry_backoff_seconds
    logger = BatchLogger(client, mlrun_id, tracking_uri=project.uris["tracking_uri"])
    ctx = StepContext(project=project, pipeline_run_id=run.id, step=name,
                      mlflow_run_id=mlrun_id, parent_mlflow_run_id=run.mlflow_run_id or "",
                      logger=logger)
    started, cpu_started = time.perf_counter(), time.process_time()
    attempt, error, tb, outputs = 0, None, None, {}
    token = bind_logger(logger)
    mem = PeakMemory()
    try:
        with mem:
            while True:
                attempt += 1
                ctx.effects.clear()
                try:
                    kwargs = {p: load_output(ref, project.outputs, project.snapshots)
                              for p, ref in input_refs.items()}
                    kwargs.update(node.params)
                    if node.step.wants_ctx:
                        kwargs["ctx"] = ctx
                    result = node.step.fn(**kwargs)
                    values = (result,) if len(node.step.outputs) == 1 else tuple(result)
                    if len(values) != len(node.step.outputs):
                        raise PipelineDefinitionError(
                            f"step '{name}' declares outputs {node.step.outputs} but returned "
                            f"{len(values)} value(s)")
                    outputs = {o: save_output(v, project.outputs)
                               for o, v in zip(node.step.outputs, values, strict=True)}
                    error = None
                    break
                except Exception as exc:  # a user step may raise anything; we record it
                    error = f"{type(exc).__name__}: {exc}"
                    tb = traceback.format_exc()
                    # mloop's own errors (bad config, failed expectations) are deterministic:
                    # retrying them only delays the message.
                    if attempt > retries or isinstance(exc, MloopError):
                        break
                    wait = backoff * 2 ** (attempt - 1)
                    notify("retry", name, {"attempt": attempt, "error": error, "wait_s": wait})
                    time.sleep(wait)
    finally:
        unbind_logger(token)
        duration = time.perf_counter() - started
        logger.log_metrics({"duration_s": duration, "peak_memory_mb": mem.peak_mb,
                            STEP_CPU: time.process_time() - cpu_started,
                            "cache_hit": 0.0, "attempts": float(attempt)})
        logger.close()

    client.set_tag(mlrun_id, "mloop.cache", "miss")
    if error is None:
        store.finish_step(step_run_id, status="succeeded", outputs=outputs, duration_s=duration,
                          peak_memory_mb=mem.peak_mb, attempts=attempt,
                          effects=list(ctx.effects))
        client.set_terminated(mlrun_id, "FINISHED")
        notify("done", name, {"duration_s": duration})
        return StepOutcome(name, "succeeded", False, duration, mem.peak_mb, outputs, mlrun_id,
                           attempt)
    _record_failure(project, step_run_id, mlrun_id, error, tb or "", duration_s=duration,
                    peak_memory_mb=mem.peak_mb, attempts=attempt)
    notify("failed", name, {"error": error})
    raise StepFailedError(name, run.id, error, tb or "")


def run_pipeline(project: Project, *, use_cache: bool = True,
                 on_event: EventHook | None = None,
                 config_text: str | None = None) -> RunResult:
    """Build the graph, start a pipeline run and execute every step in dependency order.

    A failing step marks the run failed and stops it: later steps (register included) never
    run, so nothing half-trained reaches the registry.
    """
    graph = build_graph(project)
    run = start_pipeline_run(project, graph, config_text=config_text)
    result = RunResult(run.id, run.mlflow_run_id or "", "running")
    if on_event:
        on_event("pipeline", graph.pipeline, {"run_id": run.id, "steps": list(graph.nodes)})
    try:
        for node in graph.order():
            result.steps.append(execute_step(project, run, graph, node.name,
                                             use_cache=use_cache, on_event=on_event))
    except BaseException as exc:  # incl. KeyboardInterrupt: the run must not stay "running"
        result.status, result.error = "failed", str(exc) or type(exc).__name__
        with contextlib.suppress(Exception):
            finish_pipeline_run(project, run, status="failed", error=result.error)
        raise
    finish_pipeline_run(project, run, status="succeeded")
    result.status = "succeeded"
    return result


def run_single_step(project: Project, pipeline_name: str, step_name: str, run_id: str, *,
                    use_cache: bool = True, retries: int | None = None) -> StepOutcome:
    """The per-step entry point: one step of an existing run, in this (fresh) process.

    When it completes the last outstanding step, the pipeline run is marked succeeded.
    """
    graph = build_graph(project, pipeline_name)
    run = project.store.get_pipeline_run(run_id)
    if run.pipeline != graph.pipeline:
        raise PipelineDefinitionError(
            f"pipeline run {run.id} belongs to pipeline '{run.pipeline}', not '{pipeline_name}'")
    if run.config_hash != project.config.config_hash():
        raise PipelineDefinitionError(
            f"mloop.yaml changed since pipeline run {run.id} started (config hash "
            f"{run.config_hash[:12]}, now {project.config.config_hash()[:12]}); its steps must "
            f"all see one configuration: start a new run with `mloop runs create`")
    graph.node(step_name)
    try:
        outcome = execute_step(project, run, graph, step_name, use_cache=use_cache,
                               retries=retries)
    except StepFailedError as exc:
        finish_pipeline_run(project, run, status="failed", error=str(exc))
        raise
    done = {s.step for s in project.store.step_runs(run.id) if s.status == "succeeded"}
    if set(graph.nodes) <= done and run.status != "succeeded":
        finish_pipeline_run(project, run, status="succeeded")
    return outcome


def create_run(project: Project, pipeline_name: str | None = None) -> PipelineRunRow:
    """Start an empty pipeline run for an orchestrator to fill step by step."""
    return start_pipeline_run(project, build_graph(project, pipeline_name))


def registered_version(project: Project, run_id: str) -> int:
    """The model version that pipeline run ``run_id`` registered (its ``register`` step)."""
    run = project.store.get_pipeline_run(run_id)
    step = project.store.latest_step_run(run.id, "register")
    if step is None or "output" not in step.outputs:
        raise CandidateNotRegisteredError(run.id)
    registered = load_output(step.outputs["output"], project.outputs, project.snapshots)
    return int(registered["version"])
