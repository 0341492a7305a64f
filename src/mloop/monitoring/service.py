"""``mloop monitor``: evaluate every new window of the inference log, once, and keep the report.

Reference = the profile of the champion's training snapshot (computed when the snapshot was
taken; never recomputed here) and, for prediction drift, the profile of the champion's
predictions on its holdout snapshot (computed once per version and kept in the outputs store).
Performance joins the window's request ids with the labels that have arrived; windows still
missing labels are re-scored on later runs as labels come in. It is the version's primary
metric; ROC AUC and log loss are computed from the probabilities the server logged
(``_proba_<class>``). Labelled rows logged without probabilities (logs older than those
columns, a model without ``predict_proba``) are judged on accuracy instead, against the
holdout's accuracy, and the window's report says why. A window also carries an estimate
of its metric made without labels (``report["estimated"]``): a classifier's from its logged
probabilities (CBPE, :mod:`mloop.monitoring.estimate`), a regression model's from its logged
inputs and predictions (DLE, :mod:`mloop.monitoring.loss_estimate`); each with the version's
holdout value of that metric (``reference``), which the estimated-performance trigger and
alert compare it with.

``monitoring.reference`` may replace the training profile by a profile of the log's own
recent traffic or of the same period a cycle ago (:mod:`mloop.monitoring.reference`); each
window's report records which reference it used (``report["reference"]``).

It also carries a multivariate check beside the per-column verdicts
(``report["multivariate"]``: the share of rows outside the reference's joint support,
:mod:`mloop.monitoring.joint`); it is reported, not yet a trigger.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from mloop.errors import MloopError
from mloop.monitoring.drift import NullModel
from mloop.monitoring.evaluate import evaluate_window
from mloop.monitoring.joint import JointReference, check_joint, joint_reference
from mloop.monitoring.reference import choose_reference
from mloop.monitoring.windows import read_rows, row_windows, time_windows
from mloop.monitoring.windows_store import WindowSpec, window_summary
from mloop.project import Project
from mloop.security.pii import PiiPolicy
from mloop.store.db import as_utc, json_safe, utcnow
from mloop.store.models import MonitorWindowRow

PREDICTION = "_prediction"
log = logging.getLogger("mloop.monitoring")


@dataclass
class Reference:
    version: int
    profile: dict[str, Any]
    features: list[str]
    prediction_profile: dict[str, Any] | None
    task: str
    metric: str | None
    metric_value: float | None
    # what a window is judged on when the primary metric needs probabilities it lacks
    fallback_metric: str | None = None
    fallback_value: float | None = None
    # every metric the version's holdout evaluation recorded (tags mloop.metric.<name>)
    holdout_metrics: dict[str, float] = field(default_factory=dict)
    # inputs security.pii keeps out of comparison (dropped, masked, hashed numbers): why
    skipped: dict[str, str] = field(default_factory=dict)
    # the multivariate check's reference (stored sample, index), or why there is none
    joint: JointReference | str = "not loaded"


def reference_for(project: Project, version: int) -> Reference:
    """The training profile and holdout-prediction profile of ``version``."""
    from mloop.metrics import label_metric, monitored_metric
    from mloop.registry.candidates import get_version

    mv = get_version(project, version)
    tags = dict(mv.tags or {})
    train = tags.get("mloop.snapshot.train")
    if not train:
        raise MloopError(f"v{version} has no training snapshot recorded (tag "
                         f"mloop.snapshot.train): it was not trained by mloop, so there is no "
                         f"reference profile to monitor against")
    profile = project.snapshots.profile(train)
    task = tags.get("mloop.task", project.config.task or "regression")
    inputs = _signature_inputs(project, version)
    features = [c for c in inputs if profile["columns"].get(c, {}).get("kind")
                in ("numeric", "categorical")]
    skipped: dict[str, str] = {}
    pii = PiiPolicy.of(project.config, project.root, create_key=False, key_required=False)
    if pii is not None:  # compare like with like: the log holds what the policy kept
        profile, features, skipped = pii.reference(profile, features)
    metric = monitored_metric(task, tags.get("mloop.primary_metric"))
    fallback = label_metric(task, metric)

    def holdout(name: str) -> float | None:
        value = tags.get(f"mloop.metric.{name}")
        return float(value) if value is not None else None

    return Reference(version, profile, features, _prediction_profile(project, version, tags),
                     task, metric, holdout(metric), fallback, holdout(fallback),
                     {k.removeprefix("mloop.metric."): float(v) for k, v in tags.items()
                      if k.startswith("mloop.metric.")}, skipped,
                     joint_reference(profile, project.snapshots.joint_sample(train)))


def logged_probabilities(table: pa.Table) -> tuple[list[str], np.ndarray | None]:
    """The classes and (rows, classes) probabilities the server logged for ``table``'s rows;
    None if any row has none (written before probabilities were logged, or by a model
    without them). A class missing from some version's columns has probability 0 there."""
    from mloop.traffic.inference_log import PROBA_PREFIX

    names = [n for n in table.column_names if n.startswith(PROBA_PREFIX)]
    if not names or not table.num_rows:
        return [n.removeprefix(PROBA_PREFIX) for n in names], None
    values = np.column_stack([table.column(n).to_numpy(zero_copy_only=False)
                              .astype(np.float64) for n in names])
    missing = np.isnan(values)
    if missing.all(axis=1).any():
        return [n.removeprefix(PROBA_PREFIX) for n in names], None
    return [n.removeprefix(PROBA_PREFIX) for n in names], np.where(missing, 0.0, values)


def _signature_inputs(project: Project, version: int) -> list[str]:
    """The model's inputs (what the server logs), from the version's MLflow signature. Read
    from its MLmodel file, not MLflow's fluent ``get_model_info``, which follows the
    process's default tracking URI: a fresh `mloop monitor` looked in ./mlflow.db and failed
    ("Registered Model ... not found"), leaving that file behind."""
    from mloop.registry.candidates import version_files

    inputs = version_files(project, version).inputs
    if inputs is None:
        raise MloopError(f"v{version} has no input signature; cannot tell its features")
    return [c.name for c in inputs]


def _prediction_profile(project: Project, version: int, tags: dict[str, str]
                        ) -> dict[str, Any] | None:
    """Profile of the version's predictions on its holdout, computed once and stored."""
    from mloop.data.profile import compute_profile

    key = f"monitoring/prediction-profile-v{version}.json"
    store = project.outputs
    if store.exists(key):
        return json.loads(store.read_bytes(key))
    holdout = tags.get("mloop.snapshot.holdout")
    if not holdout:
        return None
    from mloop.serving.model import load_served

    model = load_served(project, version, warm=False)
    frame = project.snapshots.read_table(holdout).to_pandas()
    cols = {c: [None if (v is None or (isinstance(v, float) and v != v)) else v
                for v in frame[c].tolist()] for c in model.schema.names}
    preds = np.asarray(model.predict_frame(model.schema.frame(cols)))
    column = pa.array(preds.tolist())
    if model.task != "regression":  # the same text a window's labels get (pyarrow's cast)
        column = column.cast(pa.string())
    prof = compute_profile(pa.table({PREDICTION: column}), bins=project.config.profile.bins,
                           top_k=project.config.profile.top_k)
    store.write_bytes(key, json.dumps(prof).encode())
    return prof


def _performance(window: pa.Table, labels: dict[str, Any], ref: Reference
                 ) -> dict[str, Any]:
    from mloop.metrics import compute_metrics

    ids = window.column("_request_id").to_pylist()
    rows = [n for n, i in enumerate(ids) if i in labels]
    out: dict[str, Any] = {"metric": ref.metric, "labelled_rows": len(rows),
                           "coverage": len(rows) / len(ids) if ids else 0.0, "value": None,
                           "reference": ref.metric_value}
    if not rows or not ref.metric:
        return out
    labelled = window.take(pa.array(rows, pa.int64()))
    y = np.asarray([labels[ids[n]] for n in rows])
    p = np.asarray(labelled.column(PREDICTION).to_pylist())
    if ref.task != "regression":
        y, p = y.astype(str), p.astype(str)
    metric, classes, proba = ref.metric, None, None
    if ref.fallback_metric and ref.fallback_metric != metric:
        classes, proba = logged_probabilities(labelled)
        if proba is None:
            out.update(metric=ref.fallback_metric, reference=ref.fallback_value,
                       fallback=f"{metric} needs the class probabilities, and labelled rows "
                                f"were logged without them: judged on {ref.fallback_metric}")
            metric = ref.fallback_metric
    try:
        value = compute_metrics(ref.task, [metric], y, p, proba, classes=classes)[metric]
    except Exception as exc:  # e.g. r2 on one labelled row, a label the model never had
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    if np.isfinite(value):
        out["value"] = value
    else:
        out["error"] = f"{metric} is not defined on these labelled rows (a single class?)"
    return out


def _estimate(project: Project, window: pa.Table, ref: Reference,
              calibrations: dict[int, Any]) -> dict[str, Any] | None:
    """The window's estimate before labels: a classifier's CBPE-style one from its logged
    probabilities, judged by the reference version's holdout calibration; a regression
    model's DLE one from its logged inputs and predictions, by the version's loss model.
    Either is made once per version (and stored), and kept in ``calibrations`` for the run."""
    if ref.task == "regression":
        from mloop.monitoring.loss_estimate import estimated_metric, load_loss_model

        if ref.version not in calibrations:
            try:
                calibrations[ref.version] = load_loss_model(project, ref.version, ref.metric)
            except Exception as exc:  # an estimate must never stop drift and quality
                log.warning("v%s: no loss estimate: %s", ref.version, exc)
                calibrations[ref.version] = f"{type(exc).__name__}: {exc}"
        model = calibrations[ref.version]
        if isinstance(model, str):  # why there is none, in every window's report
            return {"metric": estimated_metric(ref.metric), "value": None, "method": "dle",
                    "status": "unavailable", "error": model}
        return model.estimate(window) if model is not None else None
    from mloop.monitoring.estimate import estimate_window, holdout_calibration

    _, proba = logged_probabilities(window)
    if proba is None:
        return None
    if ref.version not in calibrations:
        calibrations[ref.version] = holdout_calibration(project, ref.version)
    out = estimate_window(proba, metric=ref.metric, calibration=calibrations[ref.version])
    if out is not None:
        check = out.get("calibration") or {}
        out["reference"] = ref.holdout_metrics.get(out["metric"], check.get("realized"))
    return out


def _labels(project: Project) -> dict[str, Any]:
    from mloop.traffic.labels import read_labels

    table = read_labels(project.log_store)
    return dict(zip(table.column("_request_id").to_pylist(), table.column("label").to_pylist(),
                    strict=True))


def _majority_version(window: pa.Table) -> int | None:
    counts = pc.value_counts(window.column("_version")).to_pylist()
    if not counts:
        return None
    return int(max(counts, key=lambda d: (d["counts"], d["values"]))["values"])  # tie: newest


def _versions(window: pa.Table) -> list[int]:
    return sorted(int(v) for v in pc.unique(window.column("_version")).to_pylist())


def traffic_summary(window: pa.Table) -> dict[str, Any]:
    """The window's requests and their scoring latency, kept in its report so the dashboard
    shows them without rescanning the log. A request's rows share its ``_ts`` and
    ``_latency_ms`` (one log entry each), so the distinct pairs are its requests; latency is
    per request, not per row, in milliseconds as the server logged it (time in the model,
    not HTTP)."""
    if not window.num_rows or "_latency_ms" not in window.column_names:
        return {"requests": None, "latency_ms": None}
    pairs = window.select(["_ts", "_latency_ms"]).group_by(["_ts", "_latency_ms"]).aggregate([])
    latency = pairs.column("_latency_ms").to_numpy(zero_copy_only=False).astype(np.float64)
    latency = latency[np.isfinite(latency)]
    quantiles = ({"p50": float(np.percentile(latency, 50)),
                  "p99": float(np.percentile(latency, 99))} if latency.size else None)
    return {"requests": pairs.num_rows, "latency_ms": quantiles}


def run_monitor(project: Project, *, window: str | None = None,
                since: datetime | None = None, until: datetime | None = None,
                seed: int = 0) -> dict[str, Any]:
    """Evaluate every complete window newer than the last one evaluated (or ``since``);
    refresh the performance of earlier windows whose labels were incomplete."""
    from mloop.registry.aliases import require_champion

    cfg = project.config.monitoring
    spec = WindowSpec.parse(window or cfg.window)
    name = project.config.model_name
    champion = require_champion(project, needed_for="nothing to monitor against")
    with project.store.session() as s:
        last = s.scalars(sa.select(MonitorWindowRow).where(
            MonitorWindowRow.model == name, MonitorWindowRow.spec == spec.text)
            .order_by(MonitorWindowRow.seq.desc()).limit(1)).first()
        last_end = as_utc(last.end) if last is not None else None
        seq = last.seq if last is not None else 0
        boundary = set((last.report or {}).get("boundary_ids") or []) if last else set()
    start_after = max(filter(None, [last_end, as_utc(since)]), default=None)
    read_since = start_after - timedelta(microseconds=1) if start_after else None
    rows = read_rows(project.log_store, since=read_since, until=until)
    if spec.length:
        windows = time_windows(rows, spec.length, start_after, cfg.lateness_seconds)
    else:
        assert spec.rows is not None
        windows = row_windows(rows, spec.rows, skip_ids=boundary)
    references: dict[int, Reference] = {}
    labels = _labels(project)
    caches: dict[str, dict[tuple, NullModel]] = {}
    calibrations: dict[int, Any] = {}  # per version: CBPE's check or the DLE loss model
    evaluated: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    for start, end, part in windows:
        # judged against the version that answered most of the window (mloop-trained), else
        # the champion: after a promotion, old traffic keeps its own reference
        served = _majority_version(part) or champion
        try:
            ref = references.get(served) or references.setdefault(
                served, reference_for(project, served))
        except MloopError:
            ref = references.get(champion) or references.setdefault(
                champion, reference_for(project, champion))
        chosen = choose_reference(project, ref, start, end)
        ref = chosen.reference
        # null models depend on the reference's histogram and size: one cache per reference
        cache = caches.setdefault(chosen.key, {})
        report = evaluate_window(ref.profile, part, cfg, columns=ref.features,
                                 null_cache=cache, seed=seed, size=spec.text)
        report["reference"] = chosen.record
        report["multivariate"] = check_joint(ref.joint, part,
                                             false_alarm_rate=cfg.false_alarm_rate,
                                             size=spec.text, features=ref.features)
        report["versions"] = _versions(part)
        report["traffic"] = traffic_summary(part)
        report["reference_version"] = ref.version
        if ref.skipped:
            report["skipped_columns"] = ref.skipped
        last_ts = part.column("_ts")[-1]
        report["boundary_ids"] = part.filter(pc.equal(part.column("_ts"), last_ts)).column(
            "_request_id").to_pylist()
        seq += 1
        pred_report = None
        if ref.prediction_profile is not None and PREDICTION in part.column_names:
            pred_report = evaluate_window(ref.prediction_profile, part, cfg,
                                          columns=[PREDICTION], null_cache=cache, seed=seed)
            report["prediction_drift"] = pred_report["drift"]
        perf = _performance(part, labels, ref)
        report["performance"] = perf
        estimated = _estimate(project, part, ref, calibrations)
        if estimated is not None:
            report["estimated"] = estimated
        row = MonitorWindowRow(
            model=name, spec=spec.text, seq=seq, start=start, end=end, rows=part.num_rows,
            reference_version=ref.version,
            drifted=report["drift"]["drifted"] if report["drift"] else None,
            drift_share=report["drift"]["drift_share"] if report["drift"] else None,
            prediction_drifted=(pred_report["drift"]["drifted"]
                                if pred_report and pred_report["drift"] else None),
            quality_findings=len(report["quality"]), metric=perf["metric"],
            metric_value=perf["value"], reference_metric=perf["reference"],
            labelled_rows=perf["labelled_rows"], label_coverage=perf["coverage"],
            report=json_safe(report), evaluated_at=utcnow(),
            performance_at=utcnow() if perf["labelled_rows"] else None)
        with project.store.session(write=True) as s:
            s.add(row)
            s.commit()
            evaluated.append(window_summary(row))
        alert = _alert(project, evaluated[-1])
        if alert is not None:
            alerts.append(alert)
    refreshed = _refresh_performance(project, spec, labels, references) \
        if _labels_changed(project, spec, len(labels)) else []
    for summary in refreshed:
        alert = _alert(project, summary, performance_only=True)
        if alert is not None:
            alerts.append(alert)
    # segments found unreadable on the way were quarantined and skipped: into the audit chain
    from mloop.traffic.quarantine import record_quarantine_events

    quarantined = record_quarantine_events(project.log_store,
                                           project.store)
    choice = cfg.reference
    return {"model": name, "window": spec.text, "champion": champion,
            "reference": choice if isinstance(choice, str) else choice.text,
            "evaluated": evaluated, "refreshed": refreshed, "alerts": alerts,
            "quarantined": quarantined}


def _alert(project: Project, summary: dict[str, Any], *, performance_only: bool = False
           ) -> dict[str, Any] | None:
    """Record a breach in the audit chain and POST it to the webhook, if one is set."""
    from mloop.monitoring.alerts import breaches, post_webhook
    from mloop.security.audit import append_event

    cfg = project.config.monitoring
    probe = summary if not performance_only else {
        k: summary.get(k) for k in ("metric", "metric_value", "reference_metric")}
    reasons = breaches(probe, cfg.performance_margin)
    if not reasons:
        return None
    payload = {"model": project.config.model_name, "window": summary, "reasons": reasons}
    append_event(project.store, "monitor.alert", payload)
    delivery = post_webhook(cfg.webhook, payload) if cfg.webhook is not None else None
    return {**payload, "webhook": delivery}


def _labels_changed(project: Project, spec: WindowSpec, count: int) -> bool:
    """Whether labels arrived since the last run (so re-scoring can read anything new)."""
    key = f"monitoring/labels-seen-{project.config.model_name}-{spec.text}.json"
    store = project.outputs
    seen = json.loads(store.read_bytes(key))["labels"] if store.exists(key) else -1
    if seen != count:
        store.write_bytes(key, json.dumps({"labels": count}).encode())
    return seen != count


def _refresh_performance(project: Project, spec: WindowSpec, labels: dict[str, Any],
                         references: dict[int, Reference]) -> list[dict[str, Any]]:
    """Re-score windows whose label coverage was incomplete and for which labels arrived."""
    name = project.config.model_name
    out: list[dict[str, Any]] = []
    horizon = project.config.monitoring.label_horizon_windows
    with project.store.session() as s:
        recent = list(s.scalars(sa.select(MonitorWindowRow).where(
            MonitorWindowRow.model == name, MonitorWindowRow.spec == spec.text)
            .order_by(MonitorWindowRow.seq.desc()).limit(horizon)))
    rows = [r for r in recent if r.label_coverage < 1.0]
    for row in rows:
        window = read_rows(project.log_store,
                           since=as_utc(row.start) - timedelta(microseconds=1),
                           until=as_utc(row.end))
        if spec.length:
            window = window.filter(pc.less(window.column("_ts"),
                                           pa.scalar(as_utc(row.end), window.column("_ts").type)))
        ids = set(window.column("_request_id").to_pylist()) if window.num_rows else set()
        if sum(1 for i in ids if i in labels) <= row.labelled_rows:
            continue
        version = row.reference_version
        if version is None:
            continue
        ref = references.get(version) or references.setdefault(
            version, reference_for(project, version))
        perf = _performance(window, labels, ref)
        with project.store.session(write=True) as s:
            fresh = s.get(MonitorWindowRow, row.id)
            assert fresh is not None
            fresh.metric_value, fresh.labelled_rows = perf["value"], perf["labelled_rows"]
            fresh.metric, fresh.reference_metric = perf["metric"], perf["reference"]
            fresh.label_coverage, fresh.performance_at = perf["coverage"], utcnow()
            fresh.report = {**fresh.report, "performance": json_safe(perf)}
            s.commit()
            out.append(window_summary(fresh))
    return out
