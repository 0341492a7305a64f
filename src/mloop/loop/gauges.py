"""The loop's own numbers as Prometheus gauges, read from mloop's store at scrape time (the
controller saves them in its state), so whichever server a scrape reaches tells the same."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from mloop.project import Project

log = logging.getLogger("mloop.loop")

GAUGES = {
    "mloop_loop_time_to_detect_hours": ("time_to_detect_hours",
                                        "Mean event time from drift onset to the trigger"),
    "mloop_loop_time_to_deploy_hours": ("time_to_deploy_hours",
                                        "Mean event time from trigger to new champion"),
    "mloop_loop_retrain_seconds": ("retrain_seconds", "Mean wall time of a retrain"),
    "mloop_loop_deployment_success_rate": ("deployment_success_rate",
                                           "Share of finished retrains that became champion"),
    "mloop_loop_rollback_frequency": ("rollback_frequency",
                                      "Share of finished retrains rolled back in probation"),
    "mloop_loop_retrain_cpu_seconds_total": ("retrain_cpu_seconds_total",
                                             "CPU-seconds spent retraining"),
    "mloop_loop_retrain_peak_memory_mb": ("retrain_peak_memory_mb_max",
                                          "Largest peak memory of a retrain"),
}
OUTCOMES = ("promoted", "rolled_back", "rejected", "failed")


class LoopCollector:
    """Prometheus collector over ``loop_metrics(project)``."""

    def __init__(self, project: Project) -> None:
        self.project = project

    def describe(self) -> list[Any]:
        return []  # unchecked collector: samples are produced at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from mloop.loop.controller import loop_metrics
        from mloop.loop.state import load_state

        model = self.project.config.model_name
        try:
            state = load_state(self.project)
            if not state.revision:
                return  # no controller has run for this model
            numbers = loop_metrics(self.project, state)
        except Exception as exc:  # a scrape must not crash the server
            log.warning("loop gauges unavailable: %s", exc)
            return
        retrains = GaugeMetricFamily("mloop_loop_retrains", "Retrains by outcome",
                                     labels=["model", "outcome"])
        for outcome in OUTCOMES:
            retrains.add_metric([model, outcome], float(numbers[outcome]))
        yield retrains
        probation = GaugeMetricFamily("mloop_loop_on_probation",
                                      "1 while a retrained challenger is on probation",
                                      labels=["model"])
        probation.add_metric([model], float(state.probation is not None))
        yield probation
        for name, (key, helptext) in GAUGES.items():
            if numbers.get(key) is None:
                continue
            g = GaugeMetricFamily(name, helptext, labels=["model"])
            g.add_metric([model], float(numbers[key]))
            yield g
        cost = GaugeMetricFamily("mloop_loop_retrain_cost", "Money spent retraining (the "
                                 "config's CPU and memory rates)", labels=["model", "currency"])
        cost.add_metric([model, numbers["currency"]], float(numbers["retrain_cost"]))
        yield cost
