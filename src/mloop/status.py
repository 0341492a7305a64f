"""Read-side services behind ``mloop status``, ``mloop runs`` and ``mloop data``: plain dicts
with stable keys, rendered as tables by the CLI or printed as JSON with ``--json``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mloop.project import Project
    from mloop.store.models import PipelineRunRow, StepRunRow


def _iso(dt: Any) -> str | None:
    return dt.isoformat(timespec="seconds") if dt is not None else None


def _step_dict(s: StepRunRow) -> dict[str, Any]:
    return {"step": s.step, "status": s.status, "cache_hit": bool(s.cache_hit),
            "duration_s": round(s.duration_s, 3) if s.duration_s is not None else None,
            "peak_memory_mb": s.peak_memory_mb, "attempts": s.attempts,
            "mlflow_run_id": s.mlflow_run_id, "cache_key": s.cache_key,
            "outputs": s.outputs, "error": s.error}


def run_summary(project: Project, row: PipelineRunRow,
                steps: list[StepRunRow] | None = None) -> dict[str, Any]:
    """One pipeline run as a dict; ``steps``: its step rows when the caller read them already
    (else one query here)."""
    if steps is None:
        steps = project.store.step_runs(row.id)
    duration = ((row.ended_at - row.started_at).total_seconds()
                if row.ended_at and row.started_at else None)
    return {"run_id": row.id, "pipeline": row.pipeline, "status": row.status,
            "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at),
            "duration_s": round(duration, 3) if duration is not None else None,
            "mlflow_run_id": row.mlflow_run_id, "experiment_id": row.experiment_id,
            "config_hash": row.config_hash,
            "steps_total": len(steps), "cache_hits": sum(1 for s in steps if s.cache_hit),
            "error": row.error}


def list_runs(project: Project, limit: int = 20, *,
              with_steps: bool = False) -> list[dict[str, Any]]:
    """The project's newest ``limit`` pipeline runs, newest first; two queries whatever the
    limit (the steps of all of them are read at once). ``with_steps``: each carries its
    steps as :func:`show_run` gives them."""
    rows = project.store.list_pipeline_runs(project=project.name, limit=limit)
    steps = project.store.step_runs_of([r.id for r in rows])
    out = []
    for r in rows:
        summary = run_summary(project, r, steps[r.id])
        if with_steps:
            summary["steps"] = [_step_dict(s) for s in steps[r.id]]
        out.append(summary)
    return out


def show_run(project: Project, run_id: str) -> dict[str, Any]:
    """One pipeline run (by id or unique prefix) with its steps and the traceback of the
    last failed one; RunNotFoundError naming it when there is none."""
    row = project.store.get_pipeline_run(run_id)
    steps = project.store.step_runs(row.id)
    out = run_summary(project, row, steps)
    out["steps"] = [_step_dict(s) for s in steps]
    failed = [s for s in steps if s.status == "failed"]
    out["traceback"] = failed[-1].traceback if failed else None
    return out


def model_versions(project: Project, limit: int = 10) -> list[dict[str, Any]]:
    """The newest ``limit`` versions of the project's model with their aliases, gate verdict,
    lineage tags and holdout metrics (read without MLflow when the store allows)."""
    out = []
    for mv in project.tracking.model_versions(project.config.model_name, limit=limit):
        tags = mv.tags
        out.append({
            "name": mv.name, "version": mv.version,
            "created_at": mv.creation_timestamp, "run_id": mv.run_id,
            "aliases": list(mv.aliases),
            "gates": tags.get("mloop.gates"),  # passed | failed | None (never gated)
            "pipeline_run_id": tags.get("mloop.pipeline_run_id"),
            "snapshot_train": tags.get("mloop.snapshot.train"),
            "snapshot_holdout": tags.get("mloop.snapshot.holdout"),
            "primary_metric": tags.get("mloop.primary_metric"),
            "metrics": mv.metrics,
        })
    return out


def snapshots(project: Project, limit: int = 10, *,
              with_profiles: bool = False) -> list[dict[str, Any]]:
    """The newest ``limit`` snapshots recorded in the store. ``with_profiles``: each carries
    ``profile``, one row per column (kind, type, missing rate, a one-line summary) read from
    the profile stored beside it, or None when that file is missing or unreadable."""
    out = []
    for s in project.store.list_snapshots(limit):
        row: dict[str, Any] = {"digest": s.digest, "rows": s.rows, "columns": s.columns,
                               "source": s.source, "created_at": _iso(s.created_at)}
        if with_profiles:
            row["profile"] = profile_summary(project, s.digest)
        out.append(row)
    return out


def profile_summary(project: Project, digest: str) -> list[dict[str, Any]] | None:
    """A snapshot's stored profile as one row per column; None when it has none."""
    from mloop.data.profile import column_summary
    from mloop.errors import MloopError

    try:
        prof = project.snapshots.profile(digest)
    except (MloopError, OSError, ValueError):
        return None
    return [{"column": name, "kind": c.get("kind"), "type": c.get("type"),
             "missing_rate": c.get("missing_rate"), "summary": column_summary(c)}
            for name, c in prof.get("columns", {}).items()]


def project_status(project: Project) -> dict[str, Any]:
    from mloop.tracking import redact

    stores = {k: redact(v, project.config.secrets) for k, v in project.uris.items()}
    from mloop.registry.promotion import alias_drift

    return {"project": project.name, "root": str(project.root), "env": project.env,
            "stores": stores,
            "drift": alias_drift(project),
            "runs": list_runs(project, limit=5), "models": model_versions(project, limit=5),
            "snapshots": snapshots(project, limit=5)}


def snapshot_file(project: Project, path: Path) -> dict[str, Any]:
    """Snapshot a CSV/Parquet file or folder into the project's data store."""
    from mloop.data.source import read_file_table

    table = read_file_table(path)
    snap, created = project.snapshots.put(table, source=str(path.resolve()))
    project.store.record_snapshot(digest=snap.digest, rows=snap.rows, columns=len(snap.schema),
                                  source=snap.source, uri=snap.uri)
    return {"digest": snap.digest, "created": created, "rows": snap.rows,
            "schema": snap.schema, "source": snap.source, "uri": snap.uri,
            "profile": project.snapshots.profile(snap.digest)}
