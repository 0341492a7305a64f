"""The loop's own numbers as Prometheus gauges, read from mloop's store at scrape time (the
controller saves them in its state), so whichever server a scrape reaches tells the same."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from mloop.collector import StoreCollector, gauge
from mloop.loop.state import LoopState, load_state

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


class LoopCollector(StoreCollector[tuple[LoopState, dict[str, Any]]]):
    """Prometheus collector over ``loop_metrics(project)``."""

    what = "loop gauges"
    log = logging.getLogger("mloop.loop")

    def read(self) -> tuple[LoopState, dict[str, Any]] | None:
        from mloop.loop.controller import loop_metrics

        state = load_state(self.project)
        if not state.revision:
            return None  # no controller has run for this model
        return state, loop_metrics(self.project, state)

    def families(self, data: tuple[LoopState, dict[str, Any]]) -> Iterator[Any]:
        state, numbers = data
        model = self.project.config.model_name
        retrains = gauge("mloop_loop_retrains", "Retrains by outcome", ["model", "outcome"])
        for outcome in OUTCOMES:
            retrains.add_metric([model, outcome], float(numbers[outcome]))
        yield retrains
        probation = gauge("mloop_loop_on_probation",
                          "1 while a retrained challenger is on probation", ["model"])
        probation.add_metric([model], float(state.probation is not None))
        yield probation
        for name, (key, helptext) in GAUGES.items():
            if numbers.get(key) is None:
                continue
            g = gauge(name, helptext, ["model"])
            g.add_metric([model], float(numbers[key]))
            yield g
        cost = gauge("mloop_loop_retrain_cost", "Money spent retraining (the config's CPU and "
                     "memory rates)", ["model", "currency"])
        cost.add_metric([model, numbers["currency"]], float(numbers["retrain_cost"]))
        yield cost
