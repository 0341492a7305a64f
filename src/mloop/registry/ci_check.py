"""``mloop ci check``: what a pull request does to the model, in facts a reviewer can read.

The check trains the branch's candidate (or takes a pipeline run already made), gates it
against the base environment's champion, and gathers what changed beside the verdict:
metrics and their deltas, slices, the data (snapshot digests, rows, profile changes) and the
config (mloop.yaml as logged with each pipeline run). It never promotes: gating is recorded
(the gate report, tags, the audit event) as ``mloop models gate`` records it, and the
champion stays as it was. Rendering the Markdown report and the plots is
:mod:`mloop.registry.ci_report`'s job.

The base champion is looked up in one place, :func:`base_champion`: today a project has one
registry, so the only base is the project's own ("default"); environments repoint it.
"""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mloop.errors import CandidateNotRegisteredError, MloopError
from mloop.project import Project

__all__ = ["DEFAULT_ENV", "BaseChampion", "CiCheck", "base_champion", "run_ci_check"]

DEFAULT_ENV = "default"
# profile statistics compared per column, by kind (what a reviewer can judge at a glance)
_NUMERIC_STATS = ("mean", "std", "min", "max", "missing_rate")
_CATEGORICAL_STATS = ("n_unique", "missing_rate")


@dataclass(frozen=True)
class BaseChampion:
    """The version a pull request's candidate is judged against: its environment's name and
    version (None: no champion yet, so only the absolute gates can judge)."""

    env: str
    version: int | None


def base_project(project: Project, base_env: str | None) -> Project:
    """The project whose champion a pull request is judged against: ``base_env`` of
    mloop.yaml's ``environments`` (None: the project as opened). Without environments only
    the project's own registry exists ("default"); any other name is refused, naming those
    that exist."""
    from mloop.project import open_project

    names = project.config.environment_order
    if base_env is None or (not names and base_env == DEFAULT_ENV) or base_env == project.env:
        return project
    if not names:
        raise MloopError(f"--base-env '{base_env}': this project has no environment of that "
                         f"name; mloop.yaml defines no environments, so the only base is "
                         f"'{DEFAULT_ENV}' (the project's own registry): omit --base-env")
    if base_env not in names:
        raise MloopError(f"--base-env '{base_env}': no such environment; mloop.yaml defines "
                         f"{', '.join(names)}")
    return open_project(project.root, env=base_env)


def base_champion(project: Project, base_env: str | None) -> BaseChampion:
    """The champion of ``base_env`` (see :func:`base_project`)."""
    from mloop.registry.aliases import champion_version

    base = base_project(project, base_env)
    return BaseChampion(base_env or project.env or DEFAULT_ENV, champion_version(base))


@dataclass
class CiCheck:
    """Everything the report says, as data (``to_dict`` is the ``--json`` document)."""

    model: str
    version: int
    pipeline_run_id: str
    base: BaseChampion
    passed: bool
    gates: dict[str, Any]
    metrics: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    data: dict[str, Any]
    config: dict[str, Any]
    trained: bool  # False: --run-id named a run made before
    files: dict[str, str] = field(default_factory=dict)  # report and plots written

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version,
                "pipeline_run_id": self.pipeline_run_id, "base_env": self.base.env,
                "champion": self.base.version, "passed": self.passed, "trained": self.trained,
                "metrics": self.metrics, "gates": self.gates, "slices": self.slices,
                "data": self.data, "config": self.config, "files": self.files}


# ------------------------------------------------------------------ the candidate


def _registered_by(project: Project, run_id: str) -> tuple[str, int]:
    """The full id of pipeline run ``run_id`` (a unique prefix will do) and the version its
    ``register`` step made; RunNotFoundError / CandidateNotRegisteredError otherwise."""
    from mloop.pipeline.artifacts import load_output

    row = project.store.get_pipeline_run(run_id)
    for step in project.store.step_runs(row.id):
        ref = (step.outputs or {}).get("output")
        if step.step == "register" and step.status == "succeeded" and ref is not None:
            value = load_output(ref, project.outputs, project.snapshots)
            if isinstance(value, dict) and "version" in value:
                return row.id, int(value["version"])
    raise CandidateNotRegisteredError(row.id)


def _candidate(project: Project, run_id: str | None, use_cache: bool) -> tuple[str, int, bool]:
    if run_id is not None:
        rid, version = _registered_by(project, run_id)
        return rid, version, False
    from mloop.registry.training import train_candidate

    trained = train_candidate(project, use_cache=use_cache, gate=False)
    return trained.pipeline_run_id, trained.version, True


# ------------------------------------------------------------------ what changed


def _metrics(project: Project, version: int, champion: int | None, base: Project
             ) -> list[dict[str, Any]]:
    from mloop.metrics import HIGHER_IS_BETTER
    from mloop.registry.candidates import version_record

    cand = version_record(project, version).metrics
    champ = version_record(base, champion).metrics if champion is not None else {}
    rows = []
    for key in sorted(set(cand) | set(champ)):
        a, b = champ.get(key), cand.get(key)
        delta = (b - a) if isinstance(a, int | float) and isinstance(b, int | float) else None
        better = None
        if delta is not None and delta != 0:
            name = key.rsplit(".", 1)[-1].removeprefix("holdout_")
            better = (delta > 0) == HIGHER_IS_BETTER.get(name, False)
        rows.append({"metric": key, "candidate": b, "champion": a, "delta": delta,
                     "better": better})
    return rows


def _slices(gates: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in gates["results"]:
        if r["gate"].startswith("slice.") and r["detail"].get("slices"):
            out.append({"gate": r["gate"], "column": r["gate"].removeprefix("slice."),
                        "status": r["status"], "slices": r["detail"]["slices"]})
    return out


def _profile_delta(project: Project, a: str, b: str, base: Project) -> list[dict[str, Any]]:
    """Per column of two snapshots' profiles: the statistics that moved (b, the project's, vs
    a, the base's), columns added or removed."""
    pa_, pb = base.snapshots.profile(a)["columns"], project.snapshots.profile(b)["columns"]
    rows = []
    for col in sorted(set(pa_) | set(pb)):
        if col not in pa_ or col not in pb:
            rows.append({"column": col, "change": "added" if col in pb else "removed"})
            continue
        sa_, sb = pa_[col], pb[col]
        stats = _NUMERIC_STATS if sb.get("kind") == "numeric" else _CATEGORICAL_STATS
        moved = {s: {"champion": sa_.get(s), "candidate": sb.get(s)} for s in stats
                 if sa_.get(s) != sb.get(s)}
        if sa_.get("type") != sb.get("type"):
            moved["type"] = {"champion": sa_.get("type"), "candidate": sb.get("type")}
        if moved:
            rows.append({"column": col, "change": "changed", "stats": moved})
    return rows


def _data(project: Project, version: int, champion: int | None, base: Project
          ) -> dict[str, Any]:
    from mloop.registry.lineage import lineage

    cand = lineage(project, version)["data"]
    champ = lineage(base, champion)["data"] if champion is not None else {}
    snapshots: list[dict[str, Any]] = []
    for role in ("source", "train", "holdout"):
        c, h = cand.get(role) or {}, champ.get(role) or {}
        snapshots.append({"role": role, "candidate": c.get("digest"), "champion": h.get("digest"),
                          "candidate_rows": c.get("rows"), "champion_rows": h.get("rows"),
                          "same": c.get("digest") == h.get("digest")})
    train = next(s for s in snapshots if s["role"] == "train")
    profile: list[dict[str, Any]] | None = None
    if champion is not None and train["candidate"] and train["champion"] and not train["same"]:
        try:
            profile = _profile_delta(project, str(train["champion"]),
                                     str(train["candidate"]), base)
        except MloopError:
            profile = None  # a snapshot or profile no longer there: the digests still say it
    return {"snapshots": snapshots, "train_profile": profile}


def recorded_config(project: Project, pipeline_run_id: str | None) -> str | None:
    """The mloop.yaml logged with a pipeline run (an artifact of its MLflow parent run); None
    when the run or the file was not recorded."""
    if not pipeline_run_id:
        return None
    try:
        row = project.store.get_pipeline_run(pipeline_run_id)
    except MloopError:
        return None
    if not row.mlflow_run_id:
        return None
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="mloop-ci-") as tmp:
        try:
            path = project.mlflow.download_artifacts(row.mlflow_run_id, "mloop.yaml", tmp)
            return Path(path).read_text(encoding="utf-8")
        except (OSError, MlflowException):  # the run logged no mloop.yaml
            return None


def _config(project: Project, run_id: str, champion: int | None, base: Project
            ) -> dict[str, Any]:
    from mloop.registry.candidates import version_record

    cand = recorded_config(project, run_id)
    if champion is None:
        return {"status": "no champion", "diff": None}
    champ_run = version_record(base, champion).tags.get("mloop.pipeline_run_id")
    champ = recorded_config(base, champ_run)
    if champ is None or cand is None:
        return {"status": "not recorded", "diff": None,
                "missing": "champion" if champ is None else "candidate"}
    diff = list(difflib.unified_diff(champ.splitlines(), cand.splitlines(),
                                     f"mloop.yaml (champion v{champion})",
                                     "mloop.yaml (candidate)", lineterm=""))
    return {"status": "changed" if diff else "same", "diff": "\n".join(diff) or None}


# ------------------------------------------------------------------ orchestration


def run_ci_check(project: Project, *, base_env: str | None = None, run_id: str | None = None,
                 use_cache: bool = True) -> CiCheck:
    """Train (or take ``run_id``'s) candidate, gate it against the base champion, and gather
    the changes. Bad options fail before anything is trained."""
    from mloop.registry.gates import evaluate_gates

    base_proj = base_project(project, base_env)
    env = base_env or project.env or DEFAULT_ENV
    rid, version, trained = _candidate(project, run_id, use_cache)
    own = base_proj is project
    # against another environment's champion the report is not stored: a stored report is
    # one a promotion in this registry may reuse, judged against this registry's champion
    report = evaluate_gates(project, version, record=own, base=None if own else base_proj)
    champion = report.champion if (report.champion != version or not own) else None
    base = BaseChampion(env, champion)
    gates = report.to_dict()
    return CiCheck(model=project.config.model_name, version=version, pipeline_run_id=rid,
                   base=base, passed=report.passed, gates=gates,
                   metrics=_metrics(project, version, champion, base_proj),
                   slices=_slices(gates), data=_data(project, version, champion, base_proj),
                   config=_config(project, rid, champion, base_proj), trained=trained)
