"""What each model costs: the CPU-hours and memory of every pipeline run, tuning trial and
retrain, and the CPU of serving per 1,000 predictions, priced with ``costs`` (mloop.yaml).

Nothing is estimated here; everything is read from what the work recorded where it ran:

* a pipeline run (``mloop run``, a retrain, the data steps of ``mloop tune``, an Airflow or
  Kubeflow run step by step): ``mloop.cpu_seconds``, ``mloop.peak_memory_mb`` and
  ``mloop.memory_gb_hours`` on its MLflow parent run (:mod:`mloop.pipeline.usage`);
* a tuning trial: the same metrics on its own MLflow run;
* a retrain: its pipeline run, marked as the loop's by the controller's saved history;
* serving: the CPU-seconds and rows each inference-log segment records in its metadata
  (:func:`mloop.traffic.inference_log.segment_usage`).

Cost = CPU-hours x ``cpu_hour`` + GB-hours of peak memory x ``gb_hour`` (serving: CPU only;
a server's memory is held whether or not it predicts, so it is no cost per prediction).
Times are wall clock, UTC: a run counts on the day it started, serving on the day its rows
were committed. Runs recorded before mloop logged these metrics are not counted.

``costs.budget_per_day`` turns the same sums into a guard: the loop holds a retrain when the
last 24 hours' spend plus what the previous retrain cost would exceed it
(:func:`budget_guard`), and ``mloop_cost_last_day`` (:class:`CostCollector`) lets Prometheus
alert on it (the rule comes from :func:`mloop.monitoring.alerts.alert_rules`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from mloop.collector import StoreCollector, gauge
from mloop.config import CostRates
from mloop.errors import MloopError
from mloop.pipeline.usage import CPU, GB_HOURS, PEAK, SECONDS
from mloop.project import Project

By = Literal["run", "version", "day"]
BY_CHOICES: tuple[str, ...] = ("run", "version", "day")
DAY = timedelta(days=1)


@dataclass(frozen=True)
class RunCost:
    """One priced unit of training work."""

    kind: str  # pipeline | retrain | tune (the study's data steps) | trial
    run: str  # mloop's pipeline run id; a trial's MLflow run id
    mlflow_run_id: str
    started_at: datetime
    version: int | None  # the version it registered (a trial: the one its study trained)
    cpu_seconds: float
    peak_memory_mb: float
    memory_gb_hours: float
    seconds: float
    cost: float


@dataclass(frozen=True)
class ServingCost:
    """What one version's predictions cost, from the inference log's recorded CPU."""

    version: int
    predictions: int
    cpu_seconds: float
    cost: float

    @property
    def cpu_seconds_per_1k(self) -> float | None:
        return self.cpu_seconds / self.predictions * 1000 if self.predictions else None

    @property
    def cost_per_1k(self) -> float | None:
        return self.cost / self.predictions * 1000 if self.predictions else None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "predictions": self.predictions,
                "cpu_seconds": round(self.cpu_seconds, 4), "cost": _sig(self.cost),
                "cpu_seconds_per_1k_predictions": _sig_or_none(self.cpu_seconds_per_1k),
                "cost_per_1k_predictions": _sig_or_none(self.cost_per_1k)}


@dataclass
class CostReport:
    """``mloop cost``: priced runs grouped ``by``, serving per version, totals, budget."""

    by: str
    since: datetime | None
    until: datetime | None
    rates: CostRates
    runs: list[RunCost]
    serving: list[ServingCost]
    serving_by_day: dict[str, ServingCost] = field(default_factory=dict)
    spent_last_day: float | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One row per run, version or day (the ``--by`` choice), the same keys in each."""
        if self.by == "run":
            return [_row(r.run, [r], kind=r.kind, started_at=r.started_at, version=r.version)
                    for r in self.runs]
        groups: dict[Any, list[RunCost]] = {}
        if self.by == "version":
            for r in self.runs:
                groups.setdefault(r.version, []).append(r)
            served = {s.version: s for s in self.serving}
            keys = sorted(set(groups) | set(served), key=lambda v: (v is None, v or 0))
            return [_row(k, groups.get(k, []), serving=served.get(k) if k is not None else None)
                    for k in keys]
        for r in self.runs:
            groups.setdefault(r.started_at.strftime("%Y-%m-%d"), []).append(r)
        days = sorted(set(groups) | set(self.serving_by_day))
        return [_row(d, groups.get(d, []), serving=self.serving_by_day.get(d)) for d in days]

    def totals(self) -> dict[str, Any]:
        cpu = sum(r.cpu_seconds for r in self.runs)
        training = sum(r.cost for r in self.runs)
        serving = sum(s.cost for s in self.serving)
        return {"runs": len(self.runs), "cpu_seconds": round(cpu, 4),
                "cpu_hours": _sig(cpu / 3600),
                "memory_gb_hours": _sig(sum(r.memory_gb_hours for r in self.runs)),
                "training_cost": _sig(training),
                "predictions": sum(s.predictions for s in self.serving),
                "serving_cpu_seconds": round(sum(s.cpu_seconds for s in self.serving), 4),
                "serving_cost": _sig(serving), "cost": _sig(training + serving)}

    def to_dict(self) -> dict[str, Any]:
        budget = self.rates.budget_per_day
        return {
            "by": self.by, "since": _iso(self.since), "until": _iso(self.until),
            "currency": self.rates.currency,
            "rates": {"cpu_hour": self.rates.cpu_hour, "gb_hour": self.rates.gb_hour},
            "rows": self.rows(), "serving": [s.to_dict() for s in self.serving],
            "totals": self.totals(),
            "budget": None if budget is None else {
                "per_day": budget, "spent_last_day": _sig_or_none(self.spent_last_day),
                "over": (self.spent_last_day or 0.0) > budget},
        }


def _row(key: Any, runs: list[RunCost], *, kind: str | None = None,
         started_at: datetime | None = None, version: int | None = None,
         serving: ServingCost | None = None) -> dict[str, Any]:
    cpu = sum(r.cpu_seconds for r in runs)
    training = sum(r.cost for r in runs)
    serving_cost = serving.cost if serving is not None else 0.0
    return {
        "key": key, "kind": kind, "started_at": _iso(started_at), "version": version,
        "runs": len(runs), "cpu_seconds": round(cpu, 4), "cpu_hours": _sig(cpu / 3600),
        "peak_memory_mb": max((r.peak_memory_mb for r in runs), default=None),
        "memory_gb_hours": _sig(sum(r.memory_gb_hours for r in runs)),
        "training_cost": _sig(training),
        "predictions": serving.predictions if serving is not None else 0,
        "serving_cpu_seconds": round(serving.cpu_seconds, 4) if serving is not None else 0.0,
        "serving_cost": _sig(serving_cost),
        "cost_per_1k_predictions": _sig_or_none(serving.cost_per_1k) if serving else None,
        "cost": _sig(training + serving_cost),
    }


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _sig(value: float) -> float:
    """Eight significant digits: money per 1,000 predictions can be 1e-9 of a currency."""
    return float(f"{value:.8g}")


def _sig_or_none(value: float | None) -> float | None:
    return None if value is None else _sig(value)


def price(rates: CostRates, *, cpu_seconds: float, memory_gb_hours: float = 0.0) -> float:
    """Money for ``cpu_seconds`` of CPU and ``memory_gb_hours`` of memory at ``rates``."""
    return cpu_seconds / 3600 * rates.cpu_hour + memory_gb_hours * rates.gb_hour


# ------------------------------------------------------------------------------ reading

def run_costs(project: Project, *, since: datetime | None = None,
              until: datetime | None = None) -> list[RunCost]:
    """Every pipeline run and tuning trial of the project's experiment that recorded its
    usage and started in [since, until), oldest first, priced."""
    from mloop.loop.state import load_state

    rates = project.config.cost_rates
    client = project.mlflow
    where = [f"metrics.`{CPU}` >= 0"]
    if since is not None:
        where.append(f"attributes.start_time >= {int(since.timestamp() * 1000)}")
    if until is not None:
        where.append(f"attributes.start_time < {int(until.timestamp() * 1000)}")
    found: list[Any] = []
    token = None
    while True:
        page = client.search_runs([project.experiment_id], " and ".join(where),
                                  max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            break
    retrains = {run for h in load_state(project).history
                for run in (h.pipeline_run_id, h.refit_run_id) if run}
    by_run, by_study = _versions(project)
    out = []
    for run in found:
        tags, m = run.data.tags, run.data.metrics
        pipeline_run = tags.get("mloop.pipeline_run_id")
        if "mloop.tune.trial" in tags and pipeline_run is None:  # the best trial's
            # training run carries the trial's tags too, and is a pipeline run
            kind, ident = "trial", run.info.run_id
            version = by_study.get(tags.get("mloop.tune.study", ""))
        else:
            ident = pipeline_run or run.info.run_id
            kind = ("retrain" if pipeline_run in retrains else
                    "tune" if tags.get("mloop.pipeline") == "tune" else "pipeline")
            version = by_run.get(ident)
            if version is None and tags.get("mloop.registered_version", "").isdigit():
                version = int(tags["mloop.registered_version"])
        cpu, gbh = float(m.get(CPU, 0.0)), float(m.get(GB_HOURS, 0.0))
        out.append(RunCost(
            kind=kind, run=ident, mlflow_run_id=run.info.run_id,
            started_at=datetime.fromtimestamp(run.info.start_time / 1000, UTC),
            version=version, cpu_seconds=cpu, peak_memory_mb=float(m.get(PEAK, 0.0)),
            memory_gb_hours=gbh, seconds=float(m.get(SECONDS, 0.0)),
            cost=price(rates, cpu_seconds=cpu, memory_gb_hours=gbh)))
    return sorted(out, key=lambda r: (r.started_at, r.run))


def _versions(project: Project) -> tuple[dict[str, int], dict[str, int]]:
    """Registered versions by the pipeline run that trained them, and by the tuning study
    whose best trial they are (the oldest such version)."""
    by_run: dict[str, int] = {}
    by_study: dict[str, int] = {}
    for v in project.tracking.model_versions(project.config.model_name, limit=100_000):
        run = v.tags.get("mloop.pipeline_run_id")
        if run:
            by_run[run] = v.version
        study = v.tags.get("mloop.tune.study")
        if study and v.version < by_study.get(study, v.version + 1):
            by_study[study] = v.version
    return by_run, by_study


def serving_costs(project: Project, *, since: datetime | None = None,
                  until: datetime | None = None) -> tuple[list[ServingCost],
                                                          dict[str, ServingCost]]:
    """Serving per version, and all versions per UTC day, from the inference log's segments
    committed in [since, until)."""
    from mloop.storage import ObjectStore
    from mloop.traffic.inference_log import segment_usage

    rates = project.config.cost_rates
    per_version: dict[int, list[float]] = {}
    per_day: dict[str, list[float]] = {}
    for seg in segment_usage(ObjectStore(project.uris["inference_log_uri"])):
        if (since is not None and seg.committed_at < since) or \
                (until is not None and seg.committed_at >= until):
            continue
        for acc in (per_version.setdefault(seg.version, [0, 0.0]),
                    per_day.setdefault(seg.committed_at.strftime("%Y-%m-%d"), [0, 0.0])):
            acc[0] += seg.rows
            acc[1] += seg.cpu_seconds

    def priced(version: int, acc: list[float]) -> ServingCost:
        return ServingCost(version, int(acc[0]), acc[1], price(rates, cpu_seconds=acc[1]))

    return ([priced(v, acc) for v, acc in sorted(per_version.items())],
            {d: priced(-1, acc) for d, acc in sorted(per_day.items())})


def cost_report(project: Project, *, since: datetime | None = None,
                until: datetime | None = None, by: str = "run",
                now: datetime | None = None) -> CostReport:
    """What ``mloop cost`` prints; MloopError naming the value for a bad ``by`` or an
    empty time range."""
    if by not in BY_CHOICES:
        raise MloopError(f"--by '{by}': choose one of {', '.join(BY_CHOICES)}")
    if since is not None and until is not None and since >= until:
        raise MloopError(f"--since {since.isoformat()} is not before --until "
                         f"{until.isoformat()}: an empty range")
    rates = project.config.cost_rates
    serving, by_day = serving_costs(project, since=since, until=until)
    report = CostReport(by=by, since=since, until=until, rates=rates,
                        runs=run_costs(project, since=since, until=until), serving=serving,
                        serving_by_day=by_day)
    if rates.budget_per_day is not None:
        report.spent_last_day = spent_last_day(project, now=now)
    return report


def spent_last_day(project: Project, *, now: datetime | None = None) -> float:
    """Money spent in the 24 hours before ``now`` (wall clock): runs started and serving
    rows committed in that time."""
    now = now or datetime.now(UTC)
    runs = run_costs(project, since=now - DAY, until=now + timedelta(seconds=1))
    serving, _ = serving_costs(project, since=now - DAY, until=now + timedelta(seconds=1))
    return sum(r.cost for r in runs) + sum(s.cost for s in serving)


def budget_guard(project: Project, *, now: datetime | None = None) -> str | None:
    """Why a retrain would go over ``costs.budget_per_day`` (None: it would not, or no
    budget is set). The next retrain is taken to cost what the last one did."""
    rates = project.config.cost_rates
    budget = rates.budget_per_day
    if budget is None:
        return None
    spent = spent_last_day(project, now=now)
    retrains = [r for r in run_costs(project) if r.kind == "retrain"]
    expected = retrains[-1].cost if retrains else 0.0
    if spent < budget and spent + expected <= budget:
        return None
    cur = rates.currency
    return (f"budget: {spent:.6g} {cur} spent in the last 24 h"
            + (f" + {expected:.6g} {cur} for a retrain (the last one's cost)" if expected
               else "")
            + f" is over costs.budget_per_day {budget:g} {cur}")


# ---------------------------------------------------------------------------- Prometheus

class CostCollector(StoreCollector[tuple[float, CostRates]]):
    """``mloop_cost_last_day{model,currency}`` (the last 24 hours' spend) and
    ``mloop_cost_budget_per_day``, only when ``costs.budget_per_day`` is set. Reading the
    runs costs an MLflow query and a listing of the inference log, so a value is reused for
    ``ttl`` seconds across scrapes."""

    what = "cost gauges"
    log = logging.getLogger("mloop.loop")

    def __init__(self, project: Project, ttl: float = 60.0) -> None:
        super().__init__(project)
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, float] | None = None  # (monotonic time, spent)

    def read(self) -> tuple[float, CostRates] | None:
        rates = self.project.config.cost_rates
        if rates.budget_per_day is None:
            return None
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self.ttl:
                self._cached = (time.monotonic(), spent_last_day(self.project))
            return self._cached[1], rates

    def families(self, data: tuple[float, CostRates]) -> Iterator[Any]:
        spent, rates = data
        labels = [self.project.config.model_name, rates.currency]
        last = gauge("mloop_cost_last_day", "Money spent in the last 24 hours on pipeline "
                     "runs, tuning trials, retrains and serving (mloop cost)",
                     ["model", "currency"])
        last.add_metric(labels, spent)
        yield last
        budget = gauge("mloop_cost_budget_per_day", "costs.budget_per_day",
                       ["model", "currency"])
        budget.add_metric(labels, float(rates.budget_per_day or 0.0))
        yield budget


__all__ = ["BY_CHOICES", "CostCollector", "CostReport", "RunCost", "ServingCost",
           "budget_guard", "cost_report", "price", "run_costs", "serving_costs",
           "spent_last_day"]
