"""The monitoring side of the dashboard: one window's page (its distributions, reference vs
window, prediction drift, quality findings, performance), and the Overview's traffic and
alerts. Every number comes from a stored record: the window's report (written once when
``mloop monitor`` evaluated it) or the serving process's own counters, never the log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mloop.errors import WindowNotFoundError
from mloop.ui.auth import require_reader
from mloop.ui.live import LiveTraffic
from mloop.ui.render import render


def window_href(root: str) -> Any:
    """``href(window id, feature)`` for the heatmap: a window's page, at the feature."""
    from urllib.parse import quote

    from mloop.ui.charts import feature_anchor

    def href(window_id: int, feature: str | None) -> str:
        page = f"{root}/monitoring/windows/{window_id}"
        return page if feature is None else f"{page}#{quote(feature_anchor(feature))}"

    return href


def window_page(request: Request) -> Response:
    """One window against its reference: per feature the reference's share per bin (the
    profile's histogram, as the report kept it) beside the window's, on the same bins; then
    the predictions against the holdout's, the quality findings and the performance."""
    from mloop.monitoring.windows_store import get_window
    from mloop.ui.charts import distribution_svg, feature_anchor

    require_reader(request)
    project = request.app.state.project
    raw = request.path_params["window_id"]
    if not raw.isdigit():
        raise WindowNotFoundError(f"no monitored window '{raw}': a window id is a whole "
                                  f"number (the Monitoring page lists them)")
    window = get_window(project, int(raw))
    report = window.get("report") or {}
    columns = (report.get("drift") or {}).get("columns") or []
    charts = [(c, _recorded(c) and distribution_svg(c)) for c in columns]
    pred = ((report.get("prediction_drift") or {}).get("columns") or [None])[0]
    pred_chart = distribution_svg({**pred, "column": "prediction"}) \
        if pred is not None and _recorded(pred) else None
    return render(request, "window.html", page="monitoring", w=window, report=report,
                  drift=report.get("drift"), charts=charts, pred=pred, pred_chart=pred_chart,
                  quality=report.get("quality") or [], perf=report.get("performance"),
                  anchor=feature_anchor, traffic=window_traffic(window),
                  alerts=open_alerts(project, window))


def _recorded(col: dict[str, Any]) -> bool:
    """Whether a report column holds both histograms (on the same bins) to draw."""
    labels = col.get("labels") or []
    return bool(labels) and len(col.get("reference_hist") or []) == len(labels) == len(
        col.get("window_hist") or [])


# ------------------------------------------------------------------------- the Overview

@dataclass(frozen=True)
class WindowTraffic:
    """A window's traffic as its report recorded it: rows and, when the monitor that
    evaluated it recorded them (``traffic`` in the report), requests and scoring latency."""

    hours: float
    rows: int
    requests: int | None
    p50_ms: float | None
    p99_ms: float | None

    @property
    def per_hour(self) -> float | None:
        """Requests per hour if recorded, else rows per hour (see :attr:`unit`)."""
        count = self.requests if self.requests is not None else self.rows
        return count / self.hours if self.hours > 0 else None

    @property
    def unit(self) -> str:
        return "requests" if self.requests is not None else "rows"


def window_traffic(window: dict[str, Any]) -> WindowTraffic:
    traffic = (window.get("report") or {}).get("traffic") or {}
    latency = traffic.get("latency_ms") or {}
    hours = (datetime.fromisoformat(window["end"])
             - datetime.fromisoformat(window["start"])).total_seconds() / 3600
    return WindowTraffic(hours=hours, rows=window["rows"], requests=traffic.get("requests"),
                         p50_ms=latency.get("p50"), p99_ms=latency.get("p99"))


def open_alerts(project: Any, window: dict[str, Any] | None) -> list[str]:
    """What mloop alerts on now: the monitor's alert rules
    (:func:`mloop.monitoring.alerts.breaches`, what ``mloop monitor`` records as
    ``monitor.alert`` and posts to the webhook) evaluated on the newest window."""
    if window is None:
        return []
    from mloop.monitoring.alerts import breaches

    return breaches(window, project.config.monitoring.performance_margin)


def overview_signals(request: Request, latest: dict[str, Any] | None) -> dict[str, Any]:
    """The Overview's traffic (the newest window's, and the serving process's own counters
    when the dashboard runs inside ``mloop serve --ui``) and its open alerts."""
    from mloop.monitoring.windows_store import get_window

    project = request.app.state.project
    window = get_window(project, latest["id"]) if latest is not None else None
    reader = request.app.state.live
    live: LiveTraffic | None = reader() if reader is not None else None
    return {"traffic": window_traffic(window) if window is not None else None, "live": live,
            "alerts": open_alerts(project, latest)}
