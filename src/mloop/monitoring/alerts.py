"""Getting monitoring out: Prometheus gauges, alerting rules, a Grafana dashboard, a webhook.

The gauges describe the newest evaluated window of each model (read from mloop's store at
scrape time, so any process exposing them agrees). The alerting rules and the dashboard are
generated from the same metric names and the project's policy, so they cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from mloop.collector import StoreCollector, gauge
from mloop.config import WebhookConfig
from mloop.metrics import HIGHER_IS_BETTER
from mloop.project import Project
from mloop.store.db import as_utc
from mloop.store.models import EventRow, MonitorWindowRow

log = logging.getLogger("mloop.monitoring")

GAUGES = {
    "mloop_monitor_window_rows": "Rows in the newest evaluated window",
    "mloop_monitor_drifted": "1 if the newest window drifted (dataset verdict)",
    "mloop_monitor_drift_share": "Share of features drifting in the newest window",
    "mloop_monitor_prediction_drifted": "1 if predictions drifted from the holdout's",
    "mloop_monitor_quality_findings": "Data-quality findings in the newest window",
    "mloop_monitor_metric_value": "Task metric on the newest window's labelled rows",
    "mloop_monitor_reference_metric": "The champion's holdout value of the same metric",
    "mloop_monitor_label_coverage": "Share of the newest window's rows with a label",
    "mloop_monitor_estimated_metric_value": "The newest window's metric estimated without "
    "labels: from its logged probabilities (CBPE, classification) or its logged inputs and "
    "predictions (DLE, regression)",
    "mloop_monitor_estimate_reference_metric": "The version's holdout value of the estimated "
    "metric (what the estimate is compared with)",
    "mloop_monitor_estimate_calibrated": "1 if the estimate passed the version's holdout check "
    "(CBPE: calibrated probabilities; DLE: the cross-fitted loss model), 0 if not (absent: "
    "not checked)",
    "mloop_monitor_window_end_timestamp_seconds": "End of the newest evaluated window",
}
FEATURE_GAUGES = {
    "mloop_monitor_feature_drift_score": "Drift score of a feature in the newest window",
    "mloop_monitor_feature_drift_threshold": "Calibrated threshold of that score (iid)",
    "mloop_monitor_feature_drift_temporal_threshold": "The reference period's own "
    "chunk-to-chunk variation of that score (temporal calibration; absent when iid-only)",
    "mloop_monitor_feature_drifted": "1 if the feature drifted in the newest window",
}


class MonitorCollector(StoreCollector[tuple[int, MonitorWindowRow | None]]):
    """A Prometheus collector reading the newest window of ``project``'s model."""

    what = "monitor gauges"
    log = logging.getLogger("mloop.monitoring")

    def read(self) -> tuple[int, MonitorWindowRow | None]:
        model = self.project.config.model_name
        with self.project.store.session() as s:
            damaged = s.scalar(sa.select(sa.func.count()).select_from(EventRow).where(
                EventRow.kind == "log.segment_quarantined"))
            row = s.scalars(sa.select(MonitorWindowRow).where(
                MonitorWindowRow.model == model).order_by(MonitorWindowRow.end.desc(),
                                                          MonitorWindowRow.id.desc())
                .limit(1)).first()
        return damaged or 0, row

    def families(self, data: tuple[int, MonitorWindowRow | None]) -> Iterator[Any]:
        damaged, row = data
        model = self.project.config.model_name
        quarantined = gauge(
            "mloop_inference_log_quarantined_segments", "Inference-log and label segments "
            "found unreadable and moved to quarantine (log.segment_quarantined events)")
        quarantined.add_metric([], float(damaged))
        yield quarantined
        if row is None:
            return
        estimated = (row.report or {}).get("estimated") or {}
        status = estimated.get("status")
        values = {
            "mloop_monitor_estimated_metric_value": estimated.get("value"),
            "mloop_monitor_estimate_reference_metric": estimated.get("reference"),
            "mloop_monitor_estimate_calibrated": (None if status not in ("calibrated",
                                                                         "uncalibrated")
                                                  else float(status == "calibrated")),
            "mloop_monitor_window_rows": row.rows,
            "mloop_monitor_drifted": _flag(row.drifted),
            "mloop_monitor_drift_share": row.drift_share,
            "mloop_monitor_prediction_drifted": _flag(row.prediction_drifted),
            "mloop_monitor_quality_findings": row.quality_findings,
            "mloop_monitor_metric_value": row.metric_value,
            "mloop_monitor_reference_metric": row.reference_metric,
            "mloop_monitor_label_coverage": row.label_coverage,
            "mloop_monitor_window_end_timestamp_seconds": as_utc(row.end).timestamp(),
        }
        labels = ["model", "window"]
        for name, helptext in GAUGES.items():
            value = values[name]
            if value is None:
                continue
            g = gauge(name, helptext, labels)
            g.add_metric([model, row.spec], float(value))
            yield g
        columns = ((row.report or {}).get("drift") or {}).get("columns", [])
        fams = {n: gauge(n, h, [*labels, "feature"]) for n, h in FEATURE_GAUGES.items()}
        for c in columns:
            key = [model, row.spec, c["column"]]
            fams["mloop_monitor_feature_drift_score"].add_metric(key, float(c["score"]))
            if c.get("threshold") is not None:
                fams["mloop_monitor_feature_drift_threshold"].add_metric(
                    key, float(c["threshold"]))
            if c.get("temporal_threshold") is not None:
                fams["mloop_monitor_feature_drift_temporal_threshold"].add_metric(
                    key, float(c["temporal_threshold"]))
            fams["mloop_monitor_feature_drifted"].add_metric(key, float(bool(c["drifted"])))
        if columns:
            yield from fams.values()


def _flag(value: bool | None) -> float | None:
    return None if value is None else float(bool(value))


# ---------------------------------------------------------------------------- rules

def alert_rules(project: Project) -> dict[str, Any]:
    """Prometheus alerting rules for the project's policy (``promtool check rules`` clean)."""
    from mloop.metrics import DEFAULTS, HIGHER_IS_BETTER, monitored_metric

    cfg = project.config.monitoring
    model = project.config.model_name
    sel = f'model="{model}"'
    task = project.config.task or "regression"
    metric = monitored_metric(task, project.config.metrics[0] if project.config.metrics
                              else DEFAULTS[task][0])
    higher = HIGHER_IS_BETTER.get(metric, False)
    worse = (f"mloop_monitor_metric_value{{{sel}}} < mloop_monitor_reference_metric{{{sel}}} "
             f"* {1 - cfg.performance_margin:g}") if higher else (
        f"mloop_monitor_metric_value{{{sel}}} > mloop_monitor_reference_metric{{{sel}}} "
        f"* {1 + cfg.performance_margin:g}")

    estimated = _estimated_metric(task, project.config.metrics)
    trigger = project.config.loop.triggers.estimated_performance
    est_margin = trigger.margin if trigger is not None else cfg.performance_margin
    op, factor = ("<", 1 - est_margin) if HIGHER_IS_BETTER.get(estimated, False) else \
        (">", 1 + est_margin)
    est_worse = (f"mloop_monitor_estimated_metric_value{{{sel}}} {op} "
                 f"mloop_monitor_estimate_reference_metric{{{sel}}} * {factor:g} "
                 f"and mloop_monitor_estimate_calibrated{{{sel}}} == 1")

    def rule(name: str, expr: str, severity: str, summary: str, for_: str = "0m"
             ) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": for_,
                "labels": {"severity": severity, "model": model},
                "annotations": {"summary": summary,
                                "description": "Plots and numbers: `mloop monitor report "
                                               "--html monitoring.html`"}}

    monitoring = [
        rule("MloopDatasetDrift", f"mloop_monitor_drifted{{{sel}}} == 1", "warning",
             f"Input drift on {model}: {{{{ $value }}}} (newest window)"),
        rule("MloopFeatureDrift", f"mloop_monitor_feature_drifted{{{sel}}} == 1", "info",
             f"Feature {{{{ $labels.feature }}}} of {model} drifted"),
        rule("MloopPredictionDrift", f"mloop_monitor_prediction_drifted{{{sel}}} == 1",
             "warning", f"Predictions of {model} drifted from its holdout predictions"),
        rule("MloopDataQuality", f"mloop_monitor_quality_findings{{{sel}}} > 0", "warning",
             f"{{{{ $value }}}} data-quality finding(s) in the newest window of {model}"),
        rule("MloopPerformanceDegraded", worse, "critical",
             f"{metric} of {model} on labelled traffic is more than "
             f"{cfg.performance_margin:.0%} worse than its holdout value"),
        rule("MloopEstimatedPerformanceDegraded", est_worse, "warning",
             f"{estimated} of {model} estimated without labels is more than "
             f"{est_margin:.0%} worse than its holdout value (a calibrated estimate)"),
        rule("MloopLowLabelCoverage",
             f"mloop_monitor_label_coverage{{{sel}}} < {cfg.min_label_coverage:g}", "info",
             f"Under {cfg.min_label_coverage:.0%} of {model}'s newest window is labelled",
             for_="6h"),
        rule("MloopMonitorStale",
             f"time() - mloop_monitor_window_end_timestamp_seconds{{{sel}}} > "
             f"{3 * _window_seconds(cfg.window)}", "warning",
             f"No monitoring window of {model} evaluated for three window lengths"),
    ]
    serving = [
        rule("MloopServingErrors",
             'sum(rate(mloop_requests_total{status=~"5.."}[5m])) > 0', "critical",
             "The mloop server answers with 5xx errors", for_="5m"),
        rule("MloopModelLoadFailed", "increase(mloop_model_load_failures_total[15m]) > 0",
             "warning", "A version failed to load; the previous one keeps serving"),
        rule("MloopInferenceLogDrops",
             'increase(mloop_inference_log_rows_total{outcome="dropped"}[15m]) > 0', "warning",
             "The inference log dropped rows (its buffer was full)"),
        rule("MloopInferenceLogQuarantine",
             'increase(mloop_inference_log_rows_total{outcome="quarantined"}[15m]) > 0 '
             'or delta(mloop_inference_log_quarantined_segments[15m]) > 0', "warning",
             "Inference-log rows or segments could not be stored or read and were set aside "
             "in the log's quarantine folder (see `mloop events --type log.`)"),
        rule("MloopLatencyHigh",
             "histogram_quantile(0.99, sum by (le) "
             "(rate(mloop_request_latency_seconds_bucket[5m]))) > 0.5", "warning",
             "p99 latency of the mloop server is above 500 ms", for_="10m"),
    ]
    groups = [{"name": f"mloop-monitoring-{model}", "rules": monitoring},
              {"name": "mloop-serving", "rules": serving}]
    rates = project.config.cost_rates
    if rates.budget_per_day is not None:  # mloop_cost_last_day: mloop.loop.cost.CostCollector
        budget = f"{rates.budget_per_day:g} {rates.currency}"
        cost = rule("MloopCostOverBudget",
                    f"mloop_cost_last_day{{{sel}}} > {rates.budget_per_day:g}", "warning",
                    f"{{{{ $value }}}} {rates.currency} spent on {model} in the last 24 h, "
                    f"over costs.budget_per_day ({budget}); the loop holds retrains")
        cost["annotations"]["description"] = "Runs, trials, retrains and serving: `mloop cost " \
                                             "--by day`"
        groups.append({"name": f"mloop-cost-{model}", "rules": [cost]})
    return {"groups": groups}


def _estimated_metric(task: str, metrics: list[str] | None) -> str:
    """What a window's label-free estimate is of, for the project's primary metric: CBPE's
    accuracy or ROC AUC for a classifier, DLE's MAE or RMSE for regression."""
    from mloop.metrics import DEFAULTS
    from mloop.monitoring.estimate import ESTIMABLE
    from mloop.monitoring.loss_estimate import estimated_metric

    primary = (metrics or DEFAULTS[task])[0]
    if task == "regression":
        return estimated_metric(primary)
    return primary if primary in ESTIMABLE else "accuracy"


def _window_seconds(spec: str) -> int:
    from mloop.monitoring.windows_store import WindowSpec

    w = WindowSpec.parse(spec)
    return int(w.length.total_seconds()) if w.length else 86400


def rules_yaml(project: Project) -> str:
    import yaml

    return yaml.safe_dump(alert_rules(project), sort_keys=False, width=100)


# ------------------------------------------------------------------------ dashboard

def grafana_dashboard(project: Project) -> dict[str, Any]:
    """A Grafana dashboard (JSON model, Prometheus datasource variable) for the same metrics."""
    model = project.config.model_name
    sel = f'model="{model}"'

    def panel(i: int, title: str, exprs: list[tuple[str, str]], kind: str = "timeseries",
              w: int = 12) -> dict[str, Any]:
        return {"id": i, "type": kind, "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"x": (i - 1) % 2 * 12 if w == 12 else 0, "y": (i - 1) // 2 * 8,
                            "w": w, "h": 8},
                "targets": [{"refId": chr(65 + n), "expr": e, "legendFormat": legend}
                            for n, (e, legend) in enumerate(exprs)]}

    panels = [
        panel(1, "Dataset drift (share of features)",
              [(f"mloop_monitor_drift_share{{{sel}}}", "drift share")]),
        panel(2, "Feature drift score", [(f"mloop_monitor_feature_drift_score{{{sel}}}",
                                          "{{feature}}")]),
        panel(3, "Performance on labelled traffic",
              [(f"mloop_monitor_metric_value{{{sel}}}", "window"),
               (f"mloop_monitor_reference_metric{{{sel}}}", "holdout"),
               (f"mloop_monitor_estimated_metric_value{{{sel}}}", "estimated (no labels)")]),
        panel(4, "Label coverage", [(f"mloop_monitor_label_coverage{{{sel}}}", "coverage")]),
        panel(5, "Data-quality findings", [(f"mloop_monitor_quality_findings{{{sel}}}",
                                            "findings")]),
        panel(6, "Requests by status and version",
              [("sum by (status, version) (rate(mloop_requests_total[5m]))",
                "{{status}} v{{version}}")]),
        panel(7, "Latency p50 / p99",
              [("histogram_quantile(0.5, sum by (le) "
                "(rate(mloop_request_latency_seconds_bucket[5m])))", "p50"),
               ("histogram_quantile(0.99, sum by (le) "
                "(rate(mloop_request_latency_seconds_bucket[5m])))", "p99")]),
        panel(8, "Micro-batch size (rows per predict)",
              [("sum(rate(mloop_batch_rows_sum[5m])) / sum(rate(mloop_batch_rows_count[5m]))",
                "mean rows")]),
    ]
    return {"title": f"mloop · {model}", "uid": f"mloop-{model}"[:40], "schemaVersion": 39,
            "version": 1, "editable": True, "time": {"from": "now-7d", "to": "now"},
            "tags": ["mloop"], "panels": panels,
            "templating": {"list": [{"name": "datasource", "type": "datasource",
                                     "query": "prometheus", "label": "Prometheus"}]}}


# -------------------------------------------------------------------------- webhook

def breaches(summary: dict[str, Any], margin: float) -> list[str]:
    """Why a window is worth telling someone about (empty: it is not): what ``mloop
    monitor`` records and posts, and what the dashboard lists as open alerts. ``margin``
    is ``monitoring.performance_margin``, in the direction of the window's metric."""
    metric_higher_is_better = HIGHER_IS_BETTER.get(summary.get("metric") or "", False)
    out = []
    if summary.get("drifted"):
        out.append(f"input drift in {summary.get('drift_share', 0):.0%} of features")
    if summary.get("prediction_drifted"):
        out.append("prediction drift")
    if summary.get("quality_findings"):
        out.append(f"{summary['quality_findings']} data-quality finding(s)")
    value, ref = summary.get("metric_value"), summary.get("reference_metric")
    if value is not None and ref is not None:
        bad = value < ref * (1 - margin) if metric_higher_is_better else \
            value > ref * (1 + margin)
        if bad:
            out.append(f"{summary.get('metric')} {value:.4g} vs holdout {ref:.4g}")
    return out


def post_webhook(cfg: WebhookConfig, payload: dict[str, Any]) -> dict[str, Any]:
    """POST ``payload``; retry connection errors and 5xx with backoff. Returns the outcome
    (never raises: an unreachable receiver must not stop monitoring)."""
    import requests

    body = json.dumps(payload, default=str)
    headers = {"Content-Type": "application/json", **cfg.headers}
    last = ""
    for attempt in range(cfg.retries + 1):
        try:
            r = requests.post(cfg.url, data=body, headers=headers, timeout=cfg.timeout_seconds)
            if r.status_code < 500:
                return {"delivered": r.ok, "status": r.status_code, "attempts": attempt + 1}
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}"
        time.sleep(cfg.backoff_seconds * 2 ** attempt)
    log.warning("webhook %s failed after %d attempts: %s", cfg.url, cfg.retries + 1, last)
    return {"delivered": False, "error": last, "attempts": cfg.retries + 1}
