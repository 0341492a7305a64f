"""The cost page: what training and serving cost, per day, per version and per run, from the
same report as `mloop cost` (:mod:`mloop.loop.cost`), priced with the project's ``costs``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from mloop.ui.auth import require_reader
from mloop.ui.render import render

# The report searches MLflow for every run and lists the inference log's segments: about a
# second on a project with a year of retrains. A page view within this long reuses it.
CACHE_SECONDS = 60.0
DEFAULT_DAYS = 30


def cost_page(request: Request) -> Response:
    """Cost per day (chart), per version, the newest runs, and the budget: ``?days=N``
    (default 30, ``0`` for everything recorded)."""
    from mloop.errors import MloopError
    from mloop.ui.charts import cost_by_day_svg

    require_reader(request)
    project = request.app.state.project
    raw = request.query_params.get("days", str(DEFAULT_DAYS))
    if not raw.isdigit() or int(raw) > 3660:
        raise MloopError(f"days '{raw}': a whole number of days from 0 (everything) to 3660")
    days = int(raw)
    since = (datetime.now(UTC) - timedelta(days=days)).replace(
        hour=0, minute=0, second=0, microsecond=0) if days else None
    reports = _reports(request, since)
    by_day, by_version, by_run = (reports[b] for b in ("day", "version", "run"))
    doc = by_day.to_dict()
    return render(request, "cost.html", page="cost", days=days, doc=doc,
                  chart=cost_by_day_svg(doc["rows"], doc["currency"],
                                        budget=project.config.cost_rates.budget_per_day),
                  versions=by_version.rows(), runs=list(reversed(by_run.rows()))[:50],
                  serving=[s.to_dict() for s in by_day.serving])


def _reports(request: Request, since: datetime | None) -> dict[str, Any]:
    """The report by day, version and run, built once per ``CACHE_SECONDS`` and range (one
    search of MLflow and one listing of the log serve all three groupings)."""
    from mloop.loop.cost import CostReport, cost_report

    cache: dict[Any, tuple[float, dict[str, CostReport]]] = \
        request.app.state.__dict__.setdefault("_cost_cache", {})
    key = since.date().isoformat() if since else None
    hit = cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    base = cost_report(request.app.state.project, since=since, by="day")
    out = {b: CostReport(by=b, since=base.since, until=base.until, rates=base.rates,
                         runs=base.runs, serving=base.serving,
                         serving_by_day=base.serving_by_day,
                         spent_last_day=base.spent_last_day) for b in ("day", "version", "run")}
    cache[key] = (time.monotonic(), out)
    return out
