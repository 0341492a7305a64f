"""A refit carries the evidence of the held-out fit it repeats.

A retrain fits the project's model on its window minus the most recent fifth, which it holds
out to gate on. Once those gates pass, the loop fits the same recipe again on every row of
the window (``split.refit``) and rolls that version out: the most recent days are the ones a
model serving tomorrow most needs. The refit has seen its holdout, so anything measured on it
there is in-sample. What judges it is therefore the held-out fit's record, carried over and
named as such: the gate report (plus a ``refit`` line saying whose it is), the holdout metrics
that monitoring compares live performance with (tags ``mloop.metric.*``) and, through
``mloop.refit_of``, the residuals the performance estimates learn from. The canary that
follows still judges the refit itself, on live traffic.
"""

from __future__ import annotations

from dataclasses import replace

from mloop.errors import MloopError
from mloop.project import Project
from mloop.registry.candidates import get_version
from mloop.registry.gate_report import GateReport, GateResult, record_gate_report

__all__ = ["REFIT_OF", "adopt_held_out_evidence", "held_out_version"]

REFIT_OF = "mloop.refit_of"


def held_out_version(project: Project, version: int, tags: dict[str, str] | None = None
                     ) -> int:
    """The version whose holdout was really held out for ``version``: its held-out fit when it
    is a refit, else itself."""
    tags = tags if tags is not None else dict(get_version(project, version).tags or {})
    of = tags.get(REFIT_OF)
    return int(of) if of else version


def adopt_held_out_evidence(project: Project, refit: int, held_out: int,
                            report: GateReport) -> GateReport:
    """Tag ``refit`` as the refit of ``held_out`` and record the held-out fit's gate report
    as its own, with a ``refit`` line; returns that report. MloopError when ``refit`` was not
    fitted on its holdout (a pipeline that ignores ``split.refit``)."""
    from mloop.tracking_read import SqlTrackingReader
    from mloop.tracking_sql import set_model_version_tags

    refit_tags = dict(get_version(project, refit).tags or {})
    if refit_tags.get("mloop.refit") != "true":
        raise MloopError(f"v{refit} was not fitted on its holdout (no 'mloop.refit' tag): the "
                         f"project's pipeline does not pass split.refit to its split step")
    held_tags = dict(get_version(project, held_out).tags or {})
    tags = {REFIT_OF: str(held_out), "mloop.metrics_from": f"v{held_out} (held-out fit)",
            **{k: v for k, v in held_tags.items() if k.startswith("mloop.metric.")}}
    name = project.config.model_name
    reader = project.tracking
    if isinstance(reader, SqlTrackingReader):
        set_model_version_tags(reader.registry, name, refit, tags)
    else:
        for key, value in tags.items():
            project.mlflow.set_model_version_tag(name, str(refit), key, value)
    carried = replace(report, version=refit, reused=False, results=[
        GateResult("refit", "pass", None, None,
                   f"v{refit} is v{held_out}'s recipe fitted on its train and holdout rows; "
                   f"the other results are v{held_out}'s, on rows it had not seen",
                   {"held_out_version": held_out}),
        *report.results])
    record_gate_report(project, carried)
    return carried
