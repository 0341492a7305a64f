"""Run, then gate (mloop.registry.training): the registered version, its evaluation and what
the gates made of it, read one way by `mloop run`, tune, the demo and the loop's retrain."""

from __future__ import annotations

from pathlib import Path

import pytest

from mloop.errors import CandidateNotRegisteredError
from mloop.project import open_project
from mloop.registry.training import train_candidate

from .helpers import SMALL_CONFIG

pytestmark = pytest.mark.slow

NO_REGISTER = """\
from mloop import pipeline, step


@step
def count(cfg_rows):
    return cfg_rows * 2


@pipeline(name="numbers")
def numbers(cfg):
    count(cfg_rows=cfg.validation.min_rows)
"""


def test_a_run_reports_its_version_evaluation_and_why_it_was_not_promoted(
        make_project) -> None:
    project = open_project(make_project())
    trained = train_candidate(project)
    assert trained.version == 1
    assert trained.registered is not None and trained.registered["name"] == "rentals"
    assert trained.evaluation is not None and set(trained.evaluation["metrics"]) == {"mae",
                                                                                  "rmse"}
    gating = trained.gating
    assert gating is not None and gating.gates["passed"] and not gating.promoted
    assert gating.note == ("every gate passed; gates.auto_promote is off in mloop.yaml, so the "
                           "champion is unchanged (none yet)")
    assert gating.command == 'mloop models promote 1 --reason "every gate passed"'


def test_a_failed_gate_names_the_gate_and_the_override(make_project) -> None:
    config = SMALL_CONFIG + "gates:\n  auto_promote: true\n  absolute: [{metric: mae, max: 0.5}]\n"
    gating = train_candidate(open_project(make_project(config))).gating
    assert gating is not None and not gating.promoted
    assert gating.note.startswith("gate(s) failed: absolute.mae.max (mae ")
    assert gating.note.endswith("<= 0.5 required); the champion is unchanged (none yet)")
    assert gating.command == ('mloop models promote 1 --force --reason "why the failed gate '
                              'is acceptable"')


def test_auto_promote_makes_the_first_candidate_champion_and_a_rerun_says_so(
        make_project) -> None:
    project = open_project(make_project(SMALL_CONFIG + "gates: {auto_promote: true}\n"))
    first = train_candidate(project).gating
    assert first is not None and first.promoted and first.command is None
    assert first.note == "promoted v1 to champion (was nothing): every gate passed"
    again = train_candidate(project).gating  # every step cached: the same version
    assert again is not None and not again.promoted
    assert (again.note, again.command) == ("v1 is already the champion", None)


def test_a_pipeline_without_a_register_step_is_a_clear_error_not_stop_iteration(
        make_project) -> None:
    root = make_project(SMALL_CONFIG + "pipeline: {entry: 'pipeline:numbers'}\n",
                        files={"pipeline.py": NO_REGISTER})
    trained = train_candidate(open_project(root))
    assert trained.registered is None and trained.gating is None
    with pytest.raises(CandidateNotRegisteredError,
                       match=f"pipeline run {trained.pipeline_run_id} has registered no model "
                             f"version"):
        trained.version  # noqa: B018


def test_the_loops_retrain_of_a_pipeline_without_register_names_the_run(
        make_project, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from mloop.loop.retrain import TrainingData, retrain

    root = make_project(SMALL_CONFIG + "pipeline: {entry: 'pipeline:numbers'}\n",
                        files={"pipeline.py": NO_REGISTER})
    now = datetime.now(UTC)
    data = TrainingData(str(root / "data" / "rentals.parquet"), rows=600, labelled_rows=600,
                        original_rows=0, since=now, until=now)
    with pytest.raises(CandidateNotRegisteredError, match="has registered no model version"):
        retrain(open_project(root), data)
