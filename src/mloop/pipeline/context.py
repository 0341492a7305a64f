"""What a running step can reach: its project, run ids, the metric logger, and the parent run.

Whatever a step records on the pipeline's parent run (holdout metrics, dataset inputs) goes
through ``log_parent_metrics`` / ``log_parent_input``: the runner stores these effects with the
step run and replays them when a later run reuses the step from the cache, so every pipeline
run in MLflow shows its metrics and data even when nothing was recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mloop.project import Project
    from mloop.tracking import BatchLogger


def apply_parent_effect(project: Project, run_id: str, effect: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    from mloop.tracking import log_snapshot_input

    if effect["kind"] == "metrics":
        now = int(time.time() * 1000)
        project.mlflow.log_batch(run_id, metrics=[
            Metric(k, float(v), now, 0) for k, v in effect["values"].items()])
    elif effect["kind"] == "input":
        log_snapshot_input(project.mlflow, run_id, **effect["snapshot"])


@dataclass
class StepContext:
    project: Project
    pipeline_run_id: str
    step: str
    mlflow_run_id: str
    parent_mlflow_run_id: str
    logger: BatchLogger
    effects: list[dict[str, Any]] = field(default_factory=list)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.logger.log_metric(key, value, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.project.mlflow.set_tag(self.mlflow_run_id, k, v)

    def _effect(self, effect: dict[str, Any]) -> None:
        self.effects.append(effect)
        if self.parent_mlflow_run_id:
            apply_parent_effect(self.project, self.parent_mlflow_run_id, effect)

    def log_parent_metrics(self, values: dict[str, float]) -> None:
        """Metrics that describe the whole pipeline run (e.g. holdout scores)."""
        self._effect({"kind": "metrics", "values": {k: float(v) for k, v in values.items()}})

    def log_input(self, *, name: str, digest: str, source: str, schema: dict[str, str],
                  rows: int, context: str, on_parent: bool = True) -> None:
        """A snapshot this step used, as an MLflow dataset input on the step's run and (by
        default) on the pipeline's parent run."""
        from mloop.tracking import log_snapshot_input

        snap: dict[str, Any] = {"name": name, "digest": digest, "source": source,
                                "schema": schema, "rows": rows, "context": context}
        log_snapshot_input(self.project.mlflow, self.mlflow_run_id, **snap)
        if on_parent:
            self._effect({"kind": "input", "snapshot": snap})
