"""Run, then gate: the one way a pipeline run becomes a gated candidate.

``mloop run``, ``mloop tune``, the demo and the loop's retrain all need the same three facts
after a pipeline run: which model version its ``register`` step made, what its ``evaluate``
step measured, and what the gates (and ``gates.auto_promote``) made of it. They read them here,
so a run that registered nothing is one clear :class:`CandidateNotRegisteredError` everywhere,
and a candidate left unpromoted always comes with the reason and the command that would
promote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mloop.errors import CandidateNotRegisteredError
from mloop.pipeline.artifacts import load_output
from mloop.pipeline.runner import EventHook, RunResult, run_pipeline
from mloop.project import Project

__all__ = ["GateOutcome", "TrainingOutcome", "gate_candidate", "train_candidate"]


@dataclass(frozen=True)
class GateOutcome:
    """What gating did with ``version``: the gate report, the promotion (or why there was
    none) and, when the version is not champion, the command that would make it one."""

    version: int
    gates: dict[str, Any]
    promotion: dict[str, Any] | None
    promotion_error: str | None
    note: str  # one sentence: promoted, or why not
    command: str | None  # e.g. mloop models promote 3 --reason "..."; None when promoted

    @property
    def promoted(self) -> bool:
        return self.promotion is not None

    def to_dict(self) -> dict[str, Any]:
        return {"gates": self.gates, "promotion": self.promotion,
                "promotion_error": self.promotion_error, "promoted": self.promoted,
                "promotion_note": self.note, "promote_command": self.command}


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished pipeline run and what it made. ``registered`` is None only for a pipeline
    without a ``register`` step; ``gating`` is None when the run was not gated."""

    run: RunResult
    registered: dict[str, Any] | None
    evaluation: dict[str, Any] | None
    gating: GateOutcome | None = None

    @property
    def pipeline_run_id(self) -> str:
        return self.run.run_id

    @property
    def version(self) -> int:
        """The registered version; CandidateNotRegisteredError when the run made none."""
        if self.registered is None:
            raise CandidateNotRegisteredError(self.run.run_id)
        return int(self.registered["version"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pipeline_run_id": self.pipeline_run_id,
                               "mlflow_run_id": self.run.mlflow_run_id,
                               "registered": self.registered, "evaluation": self.evaluation}
        if self.gating is not None:
            out.update(self.gating.to_dict())
        return out


def train_candidate(project: Project, *, use_cache: bool = True,
                    on_event: EventHook | None = None, config_text: str | None = None,
                    gate: bool = True) -> TrainingOutcome:
    """Run the project's pipeline, read its registered version and evaluation and, with
    ``gate``, gate the version against the champion (promoting it with
    ``gates.auto_promote``). A failing step raises StepFailedError as ``run_pipeline`` does;
    ``on_event`` also hears ``("gate", "register", {"version": V})`` before the gates run."""
    result = run_pipeline(project, use_cache=use_cache, on_event=on_event,
                          config_text=config_text)
    outputs = {s.step: s.outputs.get("output") for s in result.steps}
    registered = _load(project, outputs.get("register"))
    evaluation = _load(project, outputs.get("evaluate"))
    outcome = TrainingOutcome(result, registered, evaluation)
    if not gate or registered is None:
        return outcome
    if on_event is not None:
        on_event("gate", "register", {"version": outcome.version})
    return TrainingOutcome(result, registered, evaluation,
                           gate_candidate(project, outcome.version))


def _load(project: Project, ref: dict[str, Any] | None) -> dict[str, Any] | None:
    if ref is None:
        return None
    value = load_output(ref, project.outputs, project.snapshots)
    return value if isinstance(value, dict) else None


def gate_candidate(project: Project, version: int) -> GateOutcome:
    """Gate ``version`` against the champion and promote it with ``gates.auto_promote`` (see
    ``gate_and_promote``); say why when it stays a candidate."""
    from mloop.registry.promotion import gate_and_promote

    result = gate_and_promote(project, version)
    gates, promotion, error = result["gates"], result["promotion"], result["promotion_error"]
    note, command = _explain(version, gates, promotion, error,
                             auto_promote=project.config.gates.auto_promote)
    return GateOutcome(version, gates, promotion, error, note, command)


def _explain(version: int, gates: dict[str, Any], promotion: dict[str, Any] | None,
             error: str | None, *, auto_promote: bool) -> tuple[str, str | None]:
    champion = gates.get("champion")
    if promotion is not None:
        was = f"v{promotion['replaced']}" if promotion.get("replaced") else "nothing"
        return f"promoted v{version} to champion (was {was}): every gate passed", None
    if champion == version:
        return f"v{version} is already the champion", None
    keep = f"the champion is unchanged ({f'v{champion}' if champion else 'none yet'})"
    if not gates["passed"]:
        failed = [f"{r['gate']} ({r['message']})" for r in gates["results"]
                  if r["status"] == "fail"]
        return (f"gate(s) failed: {'; '.join(failed)}; {keep}",
                f'mloop models promote {version} --force --reason "why the failed gate is '
                f'acceptable"')
    command = f'mloop models promote {version} --reason "every gate passed"'
    if error is not None:
        return f"every gate passed but the promotion failed: {error}; {keep}", command
    if not auto_promote:
        return (f"every gate passed; gates.auto_promote is off in mloop.yaml, so {keep}",
                command)
    return f"every gate passed; {keep}", command
