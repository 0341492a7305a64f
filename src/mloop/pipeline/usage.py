"""What a pipeline run used, recorded on its MLflow parent run so `mloop cost` can price it
from MLflow alone, after the fact and whoever ran it (the local runner, an Airflow or Kubeflow
task per step).

Each step logs its own ``cpu_seconds`` (this process's CPU time while the step ran, its
input loading and output saving included), ``duration_s`` and ``peak_memory_mb``; when the run
ends, the parent run gets their sums over every executed step (cache hits cost nothing,
retried and failed attempts count):

* ``mloop.cpu_seconds``: the steps' CPU-seconds;
* ``mloop.peak_memory_mb``: the largest step peak (resident memory);
* ``mloop.memory_gb_hours``: each step's peak GB times its hours, summed (memory held is
  priced per GB-hour, like a container's request);
* ``mloop.seconds``: the steps' wall time.

A tuning trial logs the same four on its own run (:mod:`mloop.tuning.study`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mloop.project import Project

CPU = "mloop.cpu_seconds"
PEAK = "mloop.peak_memory_mb"
GB_HOURS = "mloop.memory_gb_hours"
SECONDS = "mloop.seconds"
STEP_CPU = "cpu_seconds"  # on each step's run, beside duration_s and peak_memory_mb


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    peak_memory_mb: float
    memory_gb_hours: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {CPU: round(self.cpu_seconds, 4), PEAK: round(self.peak_memory_mb, 1),
                GB_HOURS: self.memory_gb_hours, SECONDS: round(self.seconds, 3)}


def gb_hours(peak_memory_mb: float, seconds: float) -> float:
    """GB-hours of holding ``peak_memory_mb`` for ``seconds``."""
    return peak_memory_mb / 1024 * seconds / 3600


def run_usage(project: Project, run_id: str) -> Usage:
    """The usage of pipeline run ``run_id`` from its step runs (mloop's store: duration and
    peak memory; MLflow: each step's CPU-seconds)."""
    cpu = peak = gbh = seconds = 0.0
    for step in project.store.step_runs(run_id):
        if step.cache_hit or step.mlflow_run_id is None:
            continue
        mem, took = step.peak_memory_mb or 0.0, step.duration_s or 0.0
        peak, seconds, gbh = max(peak, mem), seconds + took, gbh + gb_hours(mem, took)
        record = project.tracking.run(step.mlflow_run_id)
        cpu += (record.metrics.get(STEP_CPU, 0.0) if record is not None else 0.0)
    return Usage(cpu, peak, gbh, seconds)


def log_usage(project: Project, mlflow_run_id: str, usage: Usage) -> None:
    """Log ``usage`` as the run's ``mloop.*`` cost metrics (one batch)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    project.mlflow.log_batch(mlflow_run_id, metrics=[
        Metric(k, float(v), now, 0) for k, v in usage.metrics().items()])
