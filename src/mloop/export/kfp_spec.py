"""What a compiled Kubeflow pipeline says, as plain data: :mod:`mloop.export.kubeflow` works
it out from the project (no kfp needed), :mod:`mloop.export.kfp_pipeline` builds it with the kfp
SDK. Its own module so that each of the two depends on it and not on the other."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PipelineSpec:
    """Everything the compiled pipeline says, before kfp builds it."""

    name: str  # KFP's pipeline name
    description: str
    project: str
    pipeline: str  # mloop's
    image: str
    mloop_bin: str
    project_dir: str
    retry_backoff_s: float
    steps: dict[str, tuple[list[str], int]]  # step -> (upstream steps, retries)
    task_names: dict[str, str]  # step -> its KFP task's name
    create_task: str = "create-run"
    gate_task: str | None = "gate"
    gate_upstream: list[str] = field(default_factory=list)
    gate_retries: int = 0
    materialize_task: str | None = None  # with a feature store: before create_task

    @property
    def tasks(self) -> list[str]:
        """KFP task names in dependency order."""
        return [*([self.materialize_task] if self.materialize_task else []),
                self.create_task, *(self.task_names[s] for s in self.steps),
                *([self.gate_task] if self.gate_task else [])]
