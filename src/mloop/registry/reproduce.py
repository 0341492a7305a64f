"""Reproduce a version: re-execute its recorded pipeline on its recorded snapshots and params,
then compare the metrics with the recorded ones.

The configuration is the ``mloop.yaml`` logged on the version's pipeline run, not today's file.
Steps that read the outside world (``cache=False``, e.g. ``ingest``) are not re-read: their
recorded outputs are reused, and the current source is only hashed to report whether the data
under the recorded path has changed since. Registration is not repeated.
"""

from __future__ import annotations

import math
from typing import Any

from mloop.config import parse_config
from mloop.data.canonical import table_digest
from mloop.data.source import read_source
from mloop.errors import MloopError, PipelineDefinitionError, RunNotFoundError
from mloop.pipeline.artifacts import load_output
from mloop.pipeline.runner import build_graph, execute_step, finish_pipeline_run, start_pipeline_run
from mloop.project import Project
from mloop.registry.lineage import lineage
from mloop.tracking import git_info


def _recorded_config(project: Project, mlflow_run_id: str) -> str:
    import mlflow.artifacts

    path = mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path="mloop.yaml",
                                               tracking_uri=project.uris["tracking_uri"])
    with open(path, encoding="utf-8") as f:
        return f.read()


def reproduce(project: Project, version: int) -> dict[str, Any]:
    lin = lineage(project, version)
    run_id = lin["pipeline_run"].get("run_id")
    if not run_id or lin["pipeline_run"].get("missing"):
        raise RunNotFoundError(f"version {version} records no pipeline run mloop knows; it "
                               f"cannot be reproduced")
    recorded = project.store.get_pipeline_run(run_id)
    text = _recorded_config(project, recorded.mlflow_run_id or "")
    config = parse_config(text, file=f"mloop.yaml recorded with pipeline run {run_id[:12]}")
    warnings: list[str] = []
    code = lin["code"]
    head = git_info(project.root).get("git_commit")
    if code["git_commit"] and head != code["git_commit"]:
        warnings.append(f"code differs: v{version} was trained at commit "
                        f"{code['git_commit'][:12]}, the tree is now at "
                        f"{(head or 'no commit')[:12]}")
    if code["git_dirty"] == "true":
        warnings.append(f"v{version} was trained from a dirty tree: uncommitted changes are "
                        f"not recorded")

    recorded_source = (lin["data"].get("source") or {}).get("digest")
    table, _ = read_source(config.data, project.root, config.features.time_column,
                           codec=project.codec)
    current_source = table_digest(table)
    data_same = current_source == recorded_source

    rp = Project(root=project.root, config=config)
    graph = build_graph(rp)
    run = start_pipeline_run(rp, graph)
    rp.mlflow.set_tag(run.mlflow_run_id or "", "mloop.reproduces", f"{lin['model']}/{version}")
    original = {s.step: s for s in project.store.step_runs(recorded.id)
                if s.status == "succeeded"}
    try:
        for node in graph.order():
            if node.name == "register":
                continue
            if not node.step.cache:  # read the outside world: reuse what was read then
                prior = original.get(node.name)
                if prior is None:
                    raise MloopError(f"pipeline run {run_id} has no successful '{node.name}' "
                                     f"to reuse")
                sid = rp.store.start_step(pipeline_run_id=run.id, step=node.name,
                                          cache_key=prior.cache_key, inputs=prior.inputs,
                                          mlflow_run_id=None)
                rp.store.finish_step(sid, status="succeeded", cache_hit=True,
                                     outputs=prior.outputs, duration_s=0.0)
                continue
            execute_step(rp, run, graph, node.name, use_cache=False)
    except BaseException as exc:
        finish_pipeline_run(rp, run, status="failed", error=str(exc))
        raise
    finish_pipeline_run(rp, run, status="succeeded")
    evaluate = next((s for s in rp.store.step_runs(run.id) if s.step == "evaluate"), None)
    if evaluate is None:
        raise PipelineDefinitionError("the recorded pipeline has no 'evaluate' step: nothing "
                                      "to compare")
    now = load_output(evaluate.outputs["output"], rp.outputs, rp.snapshots)["metrics"]
    tol = project.config.gates.reproduce_tolerance
    recorded_metrics = dict(lin["metrics"])  # tags keep 6 significant digits...
    if "evaluate" in original:  # ...the recorded evaluate output keeps them all
        recorded_metrics = load_output(original["evaluate"].outputs["output"], project.outputs,
                                       project.snapshots)["metrics"]
    comparison = []
    for name, then in sorted(recorded_metrics.items()):
        value = now.get(name)
        ok = value is not None and math.isclose(value, then, rel_tol=0.0, abs_tol=tol)
        comparison.append({"metric": name, "recorded": then, "reproduced": value,
                           "difference": None if value is None else value - then,
                           "same": bool(ok)})
    metrics_same = all(c["same"] for c in comparison)
    problems = []
    if not data_same:
        problems.append(f"the data at {config.data.path or 'data.sql'} changed since "
                        f"v{version} was trained: digest {current_source[:12]} now, "
                        f"{(recorded_source or '?')[:12]} recorded (reproduced on the recorded "
                        f"snapshot)")
    if not metrics_same:
        problems.append(f"metrics differ beyond the tolerance {tol:g}")
    return {"model": lin["model"], "version": version, "reproduced_run_id": run.id,
            "recorded_run_id": run_id, "reproduced": data_same and metrics_same,
            "data": {"recorded_digest": recorded_source, "current_digest": current_source,
                     "same": data_same},
            "metrics": comparison, "tolerance": tol, "warnings": warnings,
            "problems": problems}
