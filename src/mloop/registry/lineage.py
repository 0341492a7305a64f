"""Lineage and diff of registered versions, from what was recorded only.

Every fact here is read back from the version's tags, its MLflow runs and mloop's store rows;
nothing is recomputed or guessed. A missing record shows as missing.
"""

from __future__ import annotations

from typing import Any

from mloop.errors import MloopError
from mloop.project import Project
from mloop.registry.candidates import version_record


def _snapshot(project: Project, digest: str | None) -> dict[str, Any] | None:
    if not digest:
        return None
    try:
        snap = project.snapshots.get(digest)
    except MloopError:
        return {"digest": digest, "missing": True}
    return {"digest": snap.digest, "rows": snap.rows, "source": snap.source,
            "columns": len(snap.schema), "created_at": snap.created_at}


def _data(project: Project, tags: dict[str, str]) -> dict[str, dict[str, Any] | None]:
    data = {role: _snapshot(project, tags.get(f"mloop.snapshot.{role}"))
            for role in ("source", "train", "holdout")}
    if data["source"] is not None:
        data["source"]["origin"] = data["source"].get("source")
    return data


def version_snapshots(project: Project, version: int) -> dict[str, dict[str, Any] | None]:
    """The snapshots behind ``version`` (source, train, holdout), as its tags record them,
    without the pipeline run and its steps :func:`lineage` also reads (an audit report asks
    this for every version that served in a period)."""
    return _data(project, version_record(project, version).tags)


def _compiled(tags: dict[str, str]) -> dict[str, Any] | None:
    """The ONNX compile verdict recorded on the version (``mloop.compiled``, written by the
    register step and by a server's load): whether the graph was verified on the holdout, its
    largest difference, or why not. None: never compiled (compile off, or registered before
    verdicts were recorded). Read from the tag alone: the model is not loaded."""
    from mloop.registry.verdict import TAG, Verdict

    raw = tags.get(TAG)
    verdict = Verdict.from_tag(raw)
    if verdict is None:
        return None if not raw else {"status": "unreadable", "detail": raw[:200]}
    out = verdict.to_dict()
    out.pop("seconds", None)
    return out


def lineage(project: Project, version: int) -> dict[str, Any]:
    """version -> registering run -> pipeline run (steps, config, code) -> snapshots -> source."""
    mv = version_record(project, version)
    tags = mv.tags
    out: dict[str, Any] = {
        "model": mv.name, "version": mv.version, "source": mv.source,
        "created_at": mv.creation_timestamp, "aliases": list(mv.aliases),
        "gates": tags.get("mloop.gates"),
        "metrics": mv.metrics,
        "run": {"mlflow_run_id": mv.run_id},
        "code": {"git_commit": tags.get("mloop.git_commit"),
                 "git_dirty": tags.get("mloop.git_dirty"),
                 "mloop_version": tags.get("mloop.version")},
        "config_hash": tags.get("mloop.config_hash"),
        "compiled": _compiled(tags),
    }
    out["data"] = _data(project, tags)
    run_id = tags.get("mloop.pipeline_run_id")
    pipeline: dict[str, Any] = {"run_id": run_id}
    if run_id:
        try:
            row = project.store.get_pipeline_run(run_id)
        except MloopError:
            pipeline["missing"] = True
        else:
            pipeline.update(pipeline=row.pipeline, status=row.status,
                            mlflow_run_id=row.mlflow_run_id, config_hash=row.config_hash,
                            started_at=row.started_at.isoformat(timespec="seconds"))
            steps = []
            for s in project.store.step_runs(row.id):
                if s.status != "succeeded":
                    continue
                run = project.tracking.run(s.mlflow_run_id) if s.mlflow_run_id else None
                params = dict(run.params) if run is not None else {}
                steps.append({"step": s.step, "cache_hit": bool(s.cache_hit),
                              "cache_key": s.cache_key, "mlflow_run_id": s.mlflow_run_id,
                              "outputs": {k: v["digest"] for k, v in s.outputs.items()},
                              "params": params})
            pipeline["steps"] = steps
    out["pipeline_run"] = pipeline
    return out


def _flat_params(lin: dict[str, Any]) -> dict[str, str]:
    out = {}
    for step in lin["pipeline_run"].get("steps", []):
        for k, v in step["params"].items():
            out[f"{step['step']}.{k}"] = v
    return out


def _gate_summary(project: Project, model: str, version: int) -> dict[str, str]:
    run = project.store.latest_gate_runs(model).get(version)
    if run is None:
        return {}
    return {r.gate: f"{r.status} ({r.value:.4g})" if r.value is not None else r.status
            for r in project.store.gate_results(run.id)}


def _delta(a: Any, b: Any) -> float | None:
    """b - a of two recorded numbers; None when either is missing or not a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return None
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(b) - float(a)
    return None


def diff(project: Project, a: int, b: int) -> dict[str, Any]:
    """Two versions side by side: params, metrics (each with ``delta``, b - a), data
    digests, gate results, code, and each version's compile verdict (``compiled``)."""
    la, lb = lineage(project, a), lineage(project, b)
    sections: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "params": (_flat_params(la), _flat_params(lb)),
        "metrics": (la["metrics"], lb["metrics"]),
        "data": ({k: (v or {}).get("digest") for k, v in la["data"].items()},
                 {k: (v or {}).get("digest") for k, v in lb["data"].items()}),
        "gates": (_gate_summary(project, la["model"], a), _gate_summary(project, lb["model"], b)),
        "code": ({**la["code"], "config_hash": la["config_hash"]},
                 {**lb["code"], "config_hash": lb["config_hash"]}),
    }
    out: dict[str, Any] = {"model": la["model"], "a": a, "b": b,
                           "compiled": {"a": la["compiled"], "b": lb["compiled"]}}
    for name, (left, right) in sections.items():
        rows = []
        for key in sorted(set(left) | set(right)):
            va, vb = left.get(key), right.get(key)
            row = {"key": key, "a": va, "b": vb, "same": va == vb}
            if name == "metrics":
                row["delta"] = _delta(va, vb)
            rows.append(row)
        out[name] = rows
    return out
