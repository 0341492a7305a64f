"""`mloop tune`: Optuna studies on mloop's store, nested trial runs, the best trial registered
with its lineage and gated; several workers sharing one PostgreSQL study."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from mloop.config import parse_config
from mloop.errors import ConfigError

from .helpers import SMALL_CONFIG, require


@pytest.fixture(autouse=True, scope="module")
def _optuna() -> None:
    """Every test here runs Optuna: skipped without it, failed under CI (helpers.require)."""
    require("optuna", install="pip install 'mloop[tune]'")


TUNE = """\
tune:
  trials: 6
  seed: 0
  search_space:
    learning_rate: {type: float, low: 0.05, high: 0.3, log: true}
    max_iter: {type: int, low: 20, high: 120, step: 10}
    max_leaf_nodes: {type: int, low: 4, high: 31}
"""


def _study(project, name: str):
    import optuna

    from mloop.tuning.study import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(project))


# ------------------------------------------------------------------------------ config

def test_tune_is_left_out_of_the_config_hash() -> None:
    plain = parse_config(SMALL_CONFIG)
    tuned = parse_config(SMALL_CONFIG + TUNE)
    assert tuned.tune is not None and set(tuned.tune.search_space) == {
        "learning_rate", "max_iter", "max_leaf_nodes"}
    assert plain.config_hash() == tuned.config_hash()


@pytest.mark.parametrize(("space", "message"), [
    ("max_iter: {type: int, low: 120, high: 20}",
     "mloop.yaml:20: 'tune.search_space.max_iter': low (120) is above high (20)"),
    ("max_iter: {type: integer, low: 20, high: 120}",
     "mloop.yaml:20: 'tune.search_space.max_iter.type': Input should be 'float', 'int' or "
     "'categorical'"),
    ("loss: {type: categorical, choices: []}",
     "mloop.yaml:20: 'tune.search_space.loss': a categorical parameter needs a non-empty"),
    ("learning_rate: {type: float, low: 0, high: 1, log: true}",
     "'tune.search_space.learning_rate': a log scale needs low > 0"),
    ("max_iter: {type: int, low: 20.5, high: 120}",
     "'tune.search_space.max_iter': an int parameter needs a whole 'low'"),
])
def test_a_bad_search_space_is_a_config_error_naming_the_key(space: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(SMALL_CONFIG + f"tune:\n  search_space:\n    {space}\n")
    assert message in str(info.value)


def test_an_empty_search_space_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"'tune.search_space': empty"):
        parse_config(SMALL_CONFIG + "tune:\n  search_space: {}\n")


def test_stages_are_shared_across_trials_and_end_at_the_total() -> None:
    from mloop.tuning.study import stages

    assert stages(30) == [10, 20, 30]
    assert stages(100) == [10, 20, 40, 80, 100]
    assert stages(5) == [5]


@pytest.mark.parametrize(("space", "key", "message"), [
    ("max_iter: {type: int, low: 120, high: 20}", "tune.search_space.max_iter",
     "low (120) is above high (20)"),
    ("max_itr: {type: int, low: 20, high: 120}", "tune.search_space.max_itr",
     "HistGradientBoostingRegressor has no parameter 'max_itr' (did you mean 'max_iter'?)"),
    ("max_iter: {type: number, low: 20, high: 120}", "tune.search_space.max_iter.type",
     "Input should be 'float', 'int' or 'categorical'"),
])
def test_mloop_tune_with_a_bad_search_space_exits_1_naming_the_key(
        make_project, capsys: pytest.CaptureFixture[str], space: str, key: str,
        message: str) -> None:
    from mloop.cli.app import main

    root = make_project(SMALL_CONFIG + f"tune:\n  search_space:\n    {space}\n")
    assert main(["-C", str(root), "tune", "--trials", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / 'mloop.yaml'}:20: '{key}'")
    assert message in err
    assert not (root / ".mloop" / "mloop-optuna.db").exists()  # nothing ran


def test_mloop_tune_without_a_tune_section_says_what_to_add(
        make_project, capsys: pytest.CaptureFixture[str]) -> None:
    from mloop.cli.app import main

    root = make_project()
    assert main(["-C", str(root), "tune"]) == 1
    assert "no 'tune' section: add one with a search_space" in capsys.readouterr().err


# ------------------------------------------------------------------------------ studies

@pytest.mark.slow
def test_a_study_on_sqlite_registers_and_gates_its_best_trial(make_project) -> None:
    import mlflow.artifacts
    from optuna.trial import TrialState

    from mloop.project import open_project
    from mloop.registry.gates import load_version
    from mloop.tuning.study import run_study

    root = make_project(SMALL_CONFIG + TUNE)
    project = open_project(root)
    result = run_study(project)

    # six trials, done (complete or pruned), numbered once each; trial 0 is the config's
    study = _study(project, result["study"])
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert result["trials"]["complete"] + result["trials"]["pruned"] == 6
    assert trials[0].user_attrs["mloop.baseline"] is True
    assert trials[0].params == {"learning_rate": 0.1, "max_iter": 30, "max_leaf_nodes": 31}
    best = study.best_trial
    assert result["best"] == {"trial": best.number, "value": best.value, "params": best.params}
    assert best.value <= result["baseline"]["value"]  # mae: lower is better

    # one parent run ("tune") with the data steps and one nested run per trial
    client = project.mlflow
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["mloop.pipeline"] == "tune"
    assert parent.data.tags["mloop.tune.study"] == result["study"]
    nested = client.search_runs([project.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trial_runs = {int(r.data.tags["mloop.tune.trial"]): r for r in nested
                  if "mloop.tune.trial" in r.data.tags}
    assert sorted(trial_runs) == list(range(6))
    assert {r.data.tags["mloop.step"] for r in nested if "mloop.step" in r.data.tags} == {
        "ingest", "validate", "snapshot", "split"}
    for t in trials:
        run = trial_runs[t.number]
        assert run.data.tags["mloop.tune.state"] == t.state.name.lower()
        assert {k: float(v) for k, v in run.data.params.items()} == pytest.approx(t.params)
        assert "val_mae" in run.data.metrics and "duration_s" in run.data.metrics
        assert run.info.status == "FINISHED"
    assert trial_runs[best.number].data.metrics["val_mae"] == pytest.approx(best.value)

    # the best trial went through the pipeline: a candidate tagged with study and trial,
    # whose estimator has the best trial's parameters, gated
    version = result["registered"]["version"]
    mv = client.get_model_version(result["registered"]["name"], str(version))
    assert mv.tags["mloop.tune.study"] == result["study"]
    assert mv.tags["mloop.tune.trial"] == str(best.number)
    assert mv.tags["mloop.pipeline_run_id"] == result["pipeline_run_id"]
    estimator = load_version(project, version).sklearn_model.steps[-1][1]
    assert {k: estimator.get_params()[k] for k in best.params} == best.params
    assert result["gates"]["version"] == version and result["gates"]["results"]
    assert "mloop.gates" in mv.tags
    # the pipeline reused the study's data steps and logged the configuration it ran
    run_row = project.store.get_pipeline_run(result["pipeline_run_id"])
    cached = {s.step for s in project.store.step_runs(run_row.id) if s.cache_hit}
    assert {"validate", "snapshot", "split"} <= cached
    logged = mlflow.artifacts.download_artifacts(
        run_id=run_row.mlflow_run_id, artifact_path="mloop.yaml",
        tracking_uri=project.uris["tracking_uri"])
    effective = parse_config(Path(logged).read_text())
    assert effective.model.params == {"random_state": 0, **best.params}
    assert effective.config_hash() == run_row.config_hash

    # running it again resumes the same study towards the new total
    again = run_study(open_project(root), trials=7)
    assert again["study"] == result["study"]
    assert again["trials"]["before_this_run"] == 6
    assert len(_study(project, result["study"]).get_trials()) == 7


@pytest.mark.slow
def test_trials_that_keep_failing_stop_the_study_with_the_error(make_project) -> None:
    from mloop.errors import MloopError
    from mloop.project import open_project
    from mloop.tuning.study import run_study

    root = make_project(SMALL_CONFIG + "tune:\n  search_space:\n    loss: {type: categorical, "
                                       "choices: [no_such_loss]}\n")
    project = open_project(root)
    with pytest.raises(MloopError, match=r"3 trials in a row failed .* the last: trial 2: "
                                         r"InvalidParameterError: .*no_such_loss"):
        run_study(project, trials=5)
    (row,) = project.store.list_pipeline_runs()
    assert row.pipeline == "tune" and row.status == "failed"
    assert not project.mlflow.search_registered_models()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_postgres_study_and_run_exactly_n_trials(
        make_project, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna.trial import TrialState

    from mloop.project import open_project
    from mloop.tuning.study import run_study

    monkeypatch.setenv("MLOOP_STORE_URI", pg_url)  # the started worker inherits it
    root = make_project(SMALL_CONFIG + TUNE.replace("trials: 6", "trials: 8"))
    project = open_project(root)
    result = run_study(project, workers=2)
    trials = _study(project, result["study"]).get_trials()
    # exactly N trials in all (none beyond), numbered once each, all done
    assert sorted(t.number for t in trials) == list(range(8))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # both processes ran some: this one and the `mloop tune --join` it started
    pids = {t.user_attrs["mloop.pid"] for t in trials}
    assert len(pids) == 2, result["by_worker"]
    assert sum(result["by_worker"].values()) == 8
    assert result["registered"]["version"] == 1 and result["gates"]["version"] == 1
    # the study is in the store's own database, in a schema of its own
    assert project.store.url == pg_url
    tables = set(sa.inspect(project.store.engine).get_table_names(schema="optuna"))
    assert {"studies", "trials", "alembic_version"} <= tables
    assert not (root / ".mloop" / "mloop-optuna.db").exists()
    project.store.engine.dispose()


def test_the_budget_storage_creates_no_trial_beyond_the_total(tmp_path: Path) -> None:
    """Optuna creates trials through ``_create_new_trial`` (behind its storage cache): if a
    new Optuna version bypassed it, the shared total would silently stop holding."""
    import optuna

    from mloop.tuning.study import BudgetStorage, StudyFull

    storage = BudgetStorage(f"sqlite:///{tmp_path / 'optuna.db'}", {})
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 0.5})
    storage.budget = 3
    with pytest.raises(StudyFull):
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=10)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert study.trials[0].params == {"x": 0.5}
