"""A model card: one registered version documented from what mloop and MLflow recorded.

Google's Model Card Toolkit asks a team to fill in a card; here every section is read back
from a record that already exists, so the card cannot drift from the truth: intended use and
limitations as ``mloop.yaml`` states them (``model.description``, ``model.limitations``), the
training data (snapshot digest, rows, period and profile, from the snapshot store), the
holdout metrics (the pipeline's MLflow run), the gates and their slices (mloop's store), the
serving history (deployment rows) with the drift and performance of every monitored window
the version answered in, and the lineage (:func:`mloop.registry.lineage.lineage`).

Nothing is computed from the data or the model here and nothing is guessed: a fact that was
never recorded is ``None`` (an empty list for a history) and its dotted path is listed under
``not_recorded``, which the renderings print as "not recorded". Summaries (counts, ranges)
are taken over the recorded numbers only, and every number keeps the value it was stored
with. This module sits in the monitoring layer because a card reads monitored windows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from mloop.errors import MloopError
from mloop.project import Project

CARD_VERSION = 1
TOP_VALUES = 5  # a categorical column's most frequent values shown in the profile summary


def build_card(project: Project, version: int) -> dict[str, Any]:
    """The card of ``version`` as one JSON-ready dict (stable keys, ``CARD_VERSION``).

    Raises ModelNotFoundError naming the version when it is not registered; every other
    missing record becomes ``None`` and an entry of ``not_recorded``."""
    from mloop.registry.lineage import lineage

    lin = lineage(project, version)  # ModelNotFoundError for an unknown version
    mv = project.tracking.model_version(project.config.model_name, version)
    tags = dict(mv.tags) if mv is not None else {}
    card: dict[str, Any] = {
        "card_version": CARD_VERSION,
        "model": lin["model"], "version": version,
        "registered_at": _ms_iso(lin["created_at"]),
        "aliases": lin["aliases"],
        "task": tags.get("mloop.task"), "target": tags.get("mloop.target"),
        "estimator": _estimator(project, lin),
        "intended_use": {
            "description": project.config.model.description,
            "limitations": project.config.model.limitations,
            "source": "mloop.yaml: model.description, model.limitations (as configured now)",
        },
        "training_data": _training_data(project, lin),
        "metrics": _metrics(project, tags),
        "gates": _gates(project, version),
        "serving": _serving(project, version),
        "lineage": lin,
    }
    card["slices"] = _slices(card["gates"])
    card["not_recorded"] = _missing(card)
    return card


def _ms_iso(ms: int | None) -> str | None:
    """MLflow's milliseconds since the epoch as an ISO time (UTC)."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def _estimator(project: Project, lin: dict[str, Any]) -> str | None:
    """The estimator the train step fitted: the class it recorded (tag ``mloop.estimator`` of
    its MLflow run), else its ``model.estimator`` parameter; None when neither was recorded
    (a parameter left unset is logged as null: the default by task, named by the tag)."""
    for step in lin["pipeline_run"].get("steps", []):
        run = project.tracking.run(step["mlflow_run_id"]) if step.get("mlflow_run_id") else None
        fitted = dict(run.tags).get("mloop.estimator") if run is not None else None
        if fitted:
            return str(fitted)
        value = step["params"].get("model.estimator")
        if value and value not in ("null", "None"):
            return str(value)
    return None


# ------------------------------------------------------------------------------ data

def _training_data(project: Project, lin: dict[str, Any]) -> dict[str, Any]:
    data = lin["data"]
    train = data.get("train")
    out: dict[str, Any] = {"train": None, "holdout": _snapshot_brief(data.get("holdout")),
                           "source": _snapshot_brief(data.get("source"))}
    if train is None:
        return out
    brief = _snapshot_brief(train) or {}
    profile = None
    if not train.get("missing"):
        try:
            profile = project.snapshots.profile(train["digest"])
        except (MloopError, OSError, ValueError):
            profile = None
    brief["period"] = _period(profile, project.config.features.time_column)
    brief["profile"] = _profile_summary(profile)
    out["train"] = brief
    return out


def _snapshot_brief(snap: dict[str, Any] | None) -> dict[str, Any] | None:
    if snap is None:
        return None
    if snap.get("missing"):
        return {"digest": snap["digest"], "rows": None, "columns": None, "source": None,
                "created_at": None, "missing": True}
    return {"digest": snap["digest"], "rows": snap.get("rows"), "columns": snap.get("columns"),
            "source": snap.get("source"), "created_at": snap.get("created_at")}


def _period(profile: dict[str, Any] | None, column: str | None) -> dict[str, Any] | None:
    """The time column's first and last value in the training snapshot, as profiled."""
    if profile is None or column is None:
        return None
    stats = profile.get("columns", {}).get(column)
    if not stats or stats.get("kind") != "datetime" or stats.get("min") is None:
        return None
    return {"column": column, "min": stats["min"], "max": stats["max"]}


def _profile_summary(profile: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per column what a reader needs to judge the data: kind, missing rate, and the range
    (numbers), the most frequent values (categories) or the span (times), as profiled."""
    if profile is None:
        return None
    columns = []
    for name, stats in profile.get("columns", {}).items():
        row: dict[str, Any] = {"column": name, "kind": stats.get("kind"),
                               "type": stats.get("type"),
                               "missing_rate": stats.get("missing_rate")}
        kind = stats.get("kind")
        if kind == "numeric":
            row.update({k: stats.get(k) for k in ("mean", "std", "min", "max")})
        elif kind == "categorical":
            row["n_unique"] = stats.get("n_unique")
            row["top"] = dict(list((stats.get("top") or {}).items())[:TOP_VALUES])
        elif kind == "datetime":
            row.update(min=stats.get("min"), max=stats.get("max"))
        columns.append(row)
    return {"rows": profile.get("rows"), "columns": columns}


# --------------------------------------------------------------------- metrics, gates

def _metrics(project: Project, tags: dict[str, str]) -> dict[str, Any]:
    """The holdout metrics from the pipeline's MLflow run (full precision), else the ones
    the version was tagged with at registration (``mloop.metric.*``, 6 significant
    digits); ``values`` None when neither was recorded."""
    parent = tags.get("mloop.mlflow_parent_run_id")
    # a refit's own run measured its holdout in-sample: its tags carry the held-out fit's
    run = project.tracking.run(parent) if parent and "mloop.refit_of" not in tags else None
    holdout = {k: v for k, v in (run.metrics if run is not None else {}).items()
               if k.startswith("holdout_")}  # not the run's cost metrics (mloop.*)
    if holdout:
        return {"source": "mlflow_run", "run_id": parent, "values": holdout}
    tagged = {k[len("mloop.metric."):]: float(v) for k, v in tags.items()
              if k.startswith("mloop.metric.")}
    if tagged:
        return {"source": "version_tags", "run_id": None, "values": tagged}
    return {"source": None, "run_id": None, "values": None}


def _gates(project: Project, version: int) -> dict[str, Any] | None:
    """The version's newest stored gate report, as stored; None: never gated."""
    from mloop.registry.gate_report import latest_gate_report

    report = latest_gate_report(project, version)
    if report is None:
        return None
    return {"passed": report.passed, "evaluated_at": report.evaluated_at,
            "champion": report.champion,
            "results": [{"gate": r.gate, "status": r.status, "value": r.value,
                         "threshold": r.threshold, "message": r.message, "detail": r.detail}
                        for r in report.results]}


def _slices(gates: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The metric on each slice of the holdout, from the slice gates' stored detail."""
    out = []
    for r in (gates or {}).get("results", []):
        if not r["gate"].startswith("slice.") or "slices" not in (r["detail"] or {}):
            continue
        out.append({"gate": r["gate"], "column": r["gate"][len("slice."):],
                    "status": r["status"], "worst_by": r["value"], "margin": r["threshold"],
                    "slices": r["detail"]["slices"]})
    return out


# ---------------------------------------------------------------------------- serving

def _serving(project: Project, version: int) -> dict[str, Any]:
    """The version's deployments (newest first) and every stored window of the project's
    window size in which it answered traffic (oldest first), with their recorded drift and
    performance. A window's numbers are the whole window's: ``shared_with`` names the other
    versions that answered in it (a canary, a shadow, a promotion mid-window)."""
    from mloop.monitoring.windows_store import (
        count_windows,
        get_window,
        list_windows,
        window_spec,
    )
    from mloop.registry.promotion import history

    deployments = [d for d in history(project)["deployments"] if d["version"] == version]
    spec = window_spec(project)
    total = count_windows(project, spec)
    windows = []
    for w in list_windows(project, window=spec, limit=max(total, 1)):
        versions = w.get("versions") or []
        if version not in versions:
            continue
        estimated = w.get("estimated") or {}
        windows.append({
            "id": w["id"], "start": w["start"], "end": w["end"], "rows": w["rows"],
            "shared_with": [v for v in versions if v != version],
            "drifted": w["drifted"], "drift_share": w["drift_share"],
            "drifted_features": _drifted_features(get_window(project, w["id"]))
            if w["drifted"] else [],
            "prediction_drifted": w["prediction_drifted"],
            "quality_findings": w["quality_findings"],
            "metric": w["metric"], "metric_value": w["metric_value"],
            "reference_metric": w["reference_metric"], "label_coverage": w["label_coverage"],
            "estimated_metric": estimated.get("metric"),
            "estimated_value": estimated.get("value"),
        })
    return {"deployments": deployments, "window": spec, "windows": windows,
            "summary": _serving_summary(windows)}


def _drifted_features(window: dict[str, Any]) -> list[str]:
    drift = (window.get("report") or {}).get("drift") or {}
    return [c["column"] for c in drift.get("columns", []) if c.get("drifted")]


def _serving_summary(windows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Counts and ranges over the windows' recorded numbers; None without a window."""
    if not windows:
        return None
    scored = [w for w in windows if w["metric_value"] is not None]
    metrics = sorted({w["metric"] for w in scored})
    return {
        "windows": len(windows), "rows": sum(w["rows"] for w in windows),
        "first": windows[0]["start"], "last": windows[-1]["end"],
        "drifted_windows": sum(1 for w in windows if w["drifted"]),
        "prediction_drifted_windows": sum(1 for w in windows if w["prediction_drifted"]),
        "labelled_windows": len(scored),
        "metric": metrics[0] if len(metrics) == 1 else None,
        "metric_min": min((w["metric_value"] for w in scored), default=None)
        if len(metrics) == 1 else None,
        "metric_max": max((w["metric_value"] for w in scored), default=None)
        if len(metrics) == 1 else None,
    }


# --------------------------------------------------------------------- not recorded

def _missing(card: dict[str, Any]) -> list[str]:
    """Dotted paths of the facts this card could not find a record of."""
    checks = {
        "registered_at": card["registered_at"],
        "task": card["task"], "target": card["target"], "estimator": card["estimator"],
        "intended_use.description": card["intended_use"]["description"],
        "intended_use.limitations": card["intended_use"]["limitations"],
        "training_data.train": card["training_data"]["train"],
        "training_data.holdout": card["training_data"]["holdout"],
        "metrics": card["metrics"]["values"],
        "gates": card["gates"],
        "slices": card["slices"] or None,
        "serving.deployments": card["serving"]["deployments"] or None,
        "serving.windows": card["serving"]["windows"] or None,
        "lineage.pipeline_run": card["lineage"]["pipeline_run"].get("run_id"),
        "lineage.code.git_commit": card["lineage"]["code"]["git_commit"],
    }
    train = card["training_data"]["train"]
    if train is not None:
        checks["training_data.train.period"] = train["period"]
        checks["training_data.train.profile"] = train["profile"]
    return [path for path, value in checks.items() if value is None]
