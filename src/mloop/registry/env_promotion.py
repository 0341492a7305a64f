"""Carrying a version from one environment's registry to the next (``mloop models promote V
--to staging|prod``).

MLflow's ``copy_model_version`` copies within one registry; environments have their own
registries (and often their own tracking servers and buckets), so the version's files are
copied the way any MLflow client can: downloaded from the source, logged as the artifacts of a
new run in the target's experiment, and registered there as a NEW version whose tags point
back (``mloop.source.env``, ``.version``, ``.run_id``, ``.gates``, ``.gate.*``) and carry its
lineage (snapshot digests, metrics, config hash, ``mloop.origin.run_id``: the run that trained
it). The snapshots it was trained and gated on are copied into the target's data store
(content-addressed: a copy is the same digest).

Then the target's own gates judge it against the target's champion. A version that fails is
deleted again, with its run: the target's registry and aliases stay as they were, and the
refusal is recorded in the target's audit chain (``env.promotion_refused``). One that passes
becomes the target's champion through :func:`mloop.registry.promotion.promote`, whose
``promote`` event in the target's chain carries the source, the soak and the approval.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mloop.errors import GateFailedError, MloopError, PromotionError
from mloop.project import Project
from mloop.registry.candidates import version_files, version_record
from mloop.registry.environments import (
    find_approval,
    needs_approval,
    needs_soak,
    require_distinct,
    soak_status,
)
from mloop.registry.verdict import TAG as VERDICT_TAG
from mloop.registry.verdict import Verdict
from mloop.security.audit import append_event, current_actor

# judged again in the target (gates), or rewritten for it (source ties, role, compiled graph)
_NOT_CARRIED = ("mloop.gates", "mloop.gate.", "mloop.source.", "mloop.role", VERDICT_TAG)


@dataclass
class EnvPromotion:
    """What ``promote_to_environment`` did: the new version in ``target`` and its ties."""

    model: str
    source_env: str
    source_version: int
    target_env: str
    version: int
    replaced: int | None
    gates: dict[str, Any]
    soak: dict[str, Any] | None
    approval: dict[str, Any] | None
    actor: str
    reason: str
    at: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _already_there(target: Project, run_id: str | None, source_env: str | None
                   ) -> int | None:
    for mv in target.tracking.model_versions(target.config.model_name):
        if (mv.tags.get("mloop.source.run_id") == run_id
                and mv.tags.get("mloop.source.env") == source_env):
            return mv.version
    return None


def _carried_tags(source: Project, version: int, rec: Any) -> dict[str, str]:
    tags = {k: v for k, v in rec.tags.items() if not k.startswith(_NOT_CARRIED)}
    tags.update({f"mloop.source.gate.{k[len('mloop.gate.'):]}": v
                 for k, v in rec.tags.items() if k.startswith("mloop.gate.")})
    tags.update({
        "mloop.source.env": str(source.env), "mloop.source.version": str(version),
        "mloop.source.run_id": str(rec.run_id),
        "mloop.source.gates": rec.tags.get("mloop.gates", "not run"),
        "mloop.origin.run_id": rec.tags.get("mloop.origin.run_id") or str(rec.run_id),
        "mloop.role": "candidate",
    })
    return tags


def _carry_compiled_graph(source: Project, client: Any, run_id: str, tag: str | None
                          ) -> str | None:
    """The version's stored compiled graph (``mloop.compiled``), logged into the new run too,
    and the tag pointing at that copy; None when there is none to carry (the server then
    compiles at load, as for any version without one)."""
    import tempfile
    from pathlib import PurePosixPath

    verdict = Verdict.from_tag(tag)
    artifact = verdict.artifact if verdict is not None else None
    if verdict is None or not artifact or not artifact.get("run_id") or not artifact.get("path"):
        return None
    path = PurePosixPath(str(artifact["path"]))
    with tempfile.TemporaryDirectory(prefix="mloop-promote-") as tmp:
        local = source.mlflow.download_artifacts(str(artifact["run_id"]), str(path), tmp)
        client.log_artifact(run_id, local, str(path.parent))
    verdict.artifact = {**artifact, "run_id": run_id}
    return verdict.to_tag()


def _register_copy(source: Project, target: Project, version: int, rec: Any
                   ) -> tuple[int, str, bool]:
    """The version's files as a new version of ``target``'s model; returns (version, run id,
    whether the registered model was created here)."""
    from mlflow.exceptions import MlflowException

    files = version_files(source, version)  # in place, or downloaded from the source
    client, name = target.mlflow, target.config.model_name
    run = client.create_run(target.experiment_id,
                            run_name=f"{source.env}-v{version}",
                            tags={"mloop.source.env": str(source.env),
                                  "mloop.source.version": str(version),
                                  "mloop.source.run_id": str(rec.run_id)})
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(files.path), artifact_path="model")
        for key, value in rec.metrics.items():
            client.log_metric(run_id, key, value)
        tags = _carried_tags(source, version, rec)
        compiled = _carry_compiled_graph(source, client, run_id, rec.tags.get(VERDICT_TAG))
        if compiled is not None:
            tags[VERDICT_TAG] = compiled
        client.set_terminated(run_id)
        created = False
        try:
            client.get_registered_model(name)
        except MlflowException:
            with contextlib.suppress(MlflowException):
                client.create_registered_model(name, tags={"mloop.managed": "true"})
                created = True
        mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                         run_id=run_id,
                                         tags=tags,
                                         description=rec.description)
    except Exception:
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
        raise
    return int(mv.version), run_id, created


def _discard(target: Project, version: int, run_id: str, created: bool) -> None:
    """Take a refused copy back out of ``target``'s registry (best effort, then re-raise the
    refusal: the caller's error is the one that matters)."""
    client, name = target.mlflow, target.config.model_name
    with contextlib.suppress(Exception):
        client.delete_model_version(name, str(version))
    with contextlib.suppress(Exception):
        client.delete_run(run_id)
    if created:
        with contextlib.suppress(Exception):
            client.delete_registered_model(name)


def promote_to_environment(source: Project, target: Project, version: int, *, reason: str,
                           force: bool = False, actor: str | None = None,
                           now: datetime | None = None) -> EnvPromotion:
    """Carry ``source``'s ``version`` into ``target`` and make it the champion there.

    Refused, with ``target`` unchanged, when: the reason is empty; the two share a registry
    or store; the version has not soaked in ``source`` (when it must: environments.py); the
    target needs an approval and has none for this version; the version is in ``target``
    already; or it fails ``target``'s gates against ``target``'s champion (``force``
    promotes anyway, recorded as an override, as within one environment). ``now`` is the
    instant the soak is judged at (default: the clock).
    """
    from mloop.registry.gate_report import record_gate_report
    from mloop.registry.gates import evaluate_gates
    from mloop.registry.promotion import promote

    if not reason.strip():
        raise MloopError("a promotion needs a reason (--reason \"...\"): it goes in the history")
    require_distinct(source, target)
    actor = actor or current_actor()
    name = target.config.model_name
    rec = version_record(source, version)
    soak = None
    if needs_soak(source):
        status = soak_status(source, version, now=now)
        if not status.met:
            raise PromotionError(status.refusal(str(target.env)))
        soak = status.to_dict()
    approval = None
    if needs_approval(target):
        approval = find_approval(source, target, version, rec.run_id)
        if approval is None:
            raise PromotionError(
                f"promotions into '{target.env}' need an approval (promotion.approval) and "
                f"v{version} of '{source.env}' has none: `mloop --env {source.env} models "
                f"approve {version} --to {target.env} --by NAME`")
    there = _already_there(target, rec.run_id, source.env)
    if there is not None:
        raise PromotionError(f"v{version} of '{source.env}' is in '{target.env}' already, as "
                             f"v{there}")
    for key, digest in rec.tags.items():
        if key.startswith("mloop.snapshot.") and digest:
            source.snapshots.copy_to(target.snapshots, digest)
    new, run_id, created = _register_copy(source, target, version, rec)
    ties = {"source_env": source.env, "source_version": version,
            "source_run_id": rec.run_id, "soak": soak, "approval": approval}
    try:
        report = evaluate_gates(target, new, record=False)
        if not report.passed and not force:
            failed = "; ".join(f"'{r.gate}' ({r.message})" for r in report.results
                               if r.status == "fail")
            raise GateFailedError(
                f"v{version} of '{source.env}' failed gate(s) in '{target.env}' against its "
                f"champion {_v(report.champion)}: {failed}; '{target.env}' unchanged")
        record_gate_report(target, report)
        change = promote(target, new, reason=reason, force=force, actor=actor,
                         gate_report=report, details=ties)
    except GateFailedError as exc:
        _discard(target, new, run_id, created)
        append_event(target.store, "env.promotion_refused",
                     {"model": name, **ties, "reason": reason, "error": str(exc)},
                     actor=actor)
        raise
    except BaseException:
        _discard(target, new, run_id, created)
        raise
    append_event(source.store, "env.promoted",
                 {"model": name, "version": version, "target_env": target.env,
                  "target_version": new, "reason": reason}, actor=actor)
    return EnvPromotion(name, str(source.env), version, str(target.env), new, change.replaced,
                        change.gates or {}, soak, approval, actor, reason, change.at)


def _v(version: int | None) -> str:
    return "nothing" if version is None else f"v{version}"
