"""The KFP side of ``mloop export kubeflow``: the components and the pipeline, built with the kfp
SDK (``mloop[kubeflow]``) and compiled to KFP's v2 YAML. Imported only when exporting, by
:mod:`mloop.export.kubeflow`, which checks that kfp is there first.

The component functions below are copied into the YAML as source (that is how KFP runs a
Python component: its executor imports the function from the text), so each imports what it
uses and nothing of mloop: it runs the mloop CLI. No ``from __future__ import annotations`` in
this module: KFP reads the functions' annotations as types, not strings.
"""

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp import compiler, dsl

if TYPE_CHECKING:
    from mloop.export.kfp_spec import PipelineSpec


# ---------------------------------------------------------------- what the tasks run (as text)
# The pipeline run's id travels as `mloop_run`, never `run_id`: KFP and its backends have
# their own run ids and reserved names.

def create_run(mloop_bin: str, project_dir: str, pipeline: str) -> str:
    """`mloop runs create PIPELINE`: the new pipeline run's id, its stdout's last line."""
    import subprocess

    proc = subprocess.run([mloop_bin, "-C", project_dir, "runs", "create", pipeline],
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"mloop runs create {pipeline}: exit code {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def run_step(mloop_bin: str, project_dir: str, pipeline: str, step: str, mloop_run: str):
    """`mloop step run PIPELINE STEP --run-id R --retries 0`: KFP retries the task."""
    import subprocess

    code = subprocess.run([mloop_bin, "-C", project_dir, "step", "run", pipeline, step,
                           "--run-id", mloop_run, "--retries", "0"]).returncode
    if code:
        raise SystemExit(f"mloop step run {pipeline} {step}: exit code {code}")


def materialize_features(mloop_bin: str, project_dir: str):
    """`mloop features materialize`: the online store up to now (an event)."""
    import subprocess

    code = subprocess.run([mloop_bin, "-C", project_dir, "features", "materialize"]).returncode
    if code:
        raise SystemExit(f"mloop features materialize: exit code {code}")


def gate(mloop_bin: str, project_dir: str, mloop_run: str):
    """`mloop runs gate R`: gate (and, with gates.auto_promote, promote) what R registered."""
    import subprocess

    code = subprocess.run([mloop_bin, "-C", project_dir, "runs", "gate", mloop_run]).returncode
    if code:
        raise SystemExit(f"mloop runs gate {mloop_run}: exit code {code}")


# ---------------------------------------------------------------- the pipeline

def _component(func: Any, name: str, image: str) -> Any:
    """``func`` as a lightweight Python component named ``name`` (the task's name in the
    pipeline) on ``image``. ``install_kfp_package=False`` and no ``packages_to_install``: the
    task starts with no pip install, so the image must hold mloop and kfp (``mloop[kubeflow]``,
    as the image of `mloop export k8s` does)."""
    comp = dsl.component(func, base_image=image, install_kfp_package=False)
    # one component per task, named after it: KFP names a task after its component
    return type(comp)(component_spec=dataclasses.replace(comp.component_spec, name=name),
                      python_func=comp.python_func)


def build_pipeline(spec: "PipelineSpec") -> Any:
    """The KFP pipeline function of ``spec``."""
    backoff = f"{max(1, math.ceil(spec.retry_backoff_s))}s"  # KFP takes whole seconds

    def no_cache(task: Any, retries: int, display: str) -> Any:
        # KFP would otherwise reuse a finished task's outputs, a new run would get an old id
        task.set_caching_options(False)
        task.set_display_name(display)
        if retries:
            task.set_retry(num_retries=retries, backoff_duration=backoff, backoff_factor=2.0)
        return task

    @dsl.pipeline(name=spec.name, description=spec.description)
    def mloop_pipeline(mloop_bin: str = spec.mloop_bin, project_dir: str = spec.project_dir):
        created = no_cache(_component(create_run, spec.create_task, spec.image)(
            mloop_bin=mloop_bin, project_dir=project_dir, pipeline=spec.pipeline), 0,
            "create run")
        if spec.materialize_task:  # the feature store's online store first (resumable)
            created.after(no_cache(_component(materialize_features, spec.materialize_task,
                                              spec.image)(
                mloop_bin=mloop_bin, project_dir=project_dir), spec.gate_retries,
                "materialize features"))
        tasks: dict[str, Any] = {}
        for step, (upstream, retries) in spec.steps.items():
            tasks[step] = no_cache(_component(run_step, spec.task_names[step], spec.image)(
                mloop_bin=mloop_bin, project_dir=project_dir, pipeline=spec.pipeline,
                step=step, mloop_run=created.output), retries, step)
            tasks[step].after(*(tasks[up] for up in upstream))
        if spec.gate_task:
            gated = no_cache(_component(gate, spec.gate_task, spec.image)(
                mloop_bin=mloop_bin, project_dir=project_dir, mloop_run=created.output),
                spec.gate_retries, "gate")
            gated.after(*(tasks[s] for s in spec.gate_upstream))

    return mloop_pipeline


def compile_pipeline(spec: "PipelineSpec") -> str:
    """The compiled pipeline: KFP's v2 YAML (IR) text."""
    with tempfile.TemporaryDirectory(prefix="mloop-kfp-") as tmp:
        path = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(spec), package_path=str(path))
        return path.read_text(encoding="utf-8")
