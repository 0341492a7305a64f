"""What a running step can reach: its project, run ids and the metric logger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mloop.project import Project
    from mloop.tracking import BatchLogger


@dataclass
class StepContext:
    project: Project
    pipeline_run_id: str
    step: str
    mlflow_run_id: str
    parent_mlflow_run_id: str
    logger: BatchLogger

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.logger.log_metric(key, value, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.project.mlflow.set_tag(self.mlflow_run_id, k, v)
