"""`mloop export airflow`: the DAG's shape from the graph and mloop.yaml, safe writes, and the
exported DAG run for real by Airflow 3 (`airflow dags test`), whose registered version must
have the same lineage as one from `mloop run`.

Airflow lives in its own environment (.venv-airflow, `scripts/airflow_env.sh`): the DAG runs
the mloop CLI of this environment, so Airflow never imports mloop.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mloop.errors import ConfigError, MloopError, PipelineDefinitionError, StepFailedError
from mloop.export.airflow import airflow_dag, dag_spec, write_airflow
from mloop.export.files import MARKER
from mloop.pipeline.dsl import _mloop_source_digest
from mloop.pipeline.runner import create_run, registered_version, run_single_step
from mloop.project import open_project

from .helpers import (
    FLAKY_TRAIN,
    MLOOP_BIN,
    REPO,
    STEPS,
    append_config,
    check_one_run_each_step_once,
    check_same_lineage_as_mloop_run,
    clashing_pipeline,
    copy_bike,
    copy_flights_feast,
    mloop_run_meanwhile,
    run_cli,
    run_process_group,
)


@pytest.fixture
def bike(tmp_path: Path) -> Path:
    return copy_bike(tmp_path / "bike_sharing")


def _assert_ruff_clean(path: Path) -> None:
    """The DAG file passes ruff's strict rules on its own (no project config)."""
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--isolated", "--line-length", "100",
                           "--target-version", "py311", "--select",
                           "E,F,W,I,B,UP,SIM,RUF", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ the DAG

def test_one_task_per_step_in_dependency_order_between_create_run_and_gate(bike: Path) -> None:
    spec = dag_spec(open_project(bike))
    assert spec.dag_id == "bike-sharing" and spec.pipeline == "tabular"
    assert spec.tasks == ["create_run", *STEPS, "gate"]
    assert spec.steps["register"][0] == ["evaluate", "snapshot", "split", "train"]
    assert spec.gate_upstream == ["register"]
    assert spec.schedule is None  # triggered by hand unless airflow.schedule says otherwise
    assert spec.cli == f"mloop -C {bike}"  # the project where it was exported, by default

    text = airflow_dag(open_project(bike))
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import | ast.ImportFrom)
                for a in n.names}
    # Airflow 3's BashOperator, and nothing from mloop: the tasks run its CLI
    assert imported == {"__future__", "datetime", "pendulum", "airflow.sdk",
                        "airflow.providers.standard.operators.bash"}
    # the run id travels in an environment variable, never pasted into the shell command,
    # and nothing is named run_id (Airflow reserves it in the task context)
    assert "\"MLOOP_PIPELINE_RUN\": \"{{ ti.xcom_pull(task_ids='create_run') }}\"" in text
    assert '--run-id "$MLOOP_PIPELINE_RUN"' in text
    assert not re.search(r"\brun_id\b", text)


def test_names_schedule_executable_and_retries_come_from_config(bike: Path) -> None:
    append_config(bike, """
    pipeline:
      retries: 2
      retry_backoff_seconds: 5
    airflow:
      dag_id: bikes_nightly
      schedule: "0 3 * * *"
      mloop_bin: /opt/mloop env/bin/mloop
      project_dir: /app/project
    """)
    spec = dag_spec(open_project(bike))
    assert (spec.dag_id, spec.schedule) == ("bikes_nightly", "0 3 * * *")
    assert spec.cli == "'/opt/mloop env/bin/mloop' -C /app/project"  # shell-quoted
    assert spec.retry_delay_s == 5.0
    # validate declares retries=0 (a failed expectation is deterministic); others inherit
    assert {s: r for s, (_, r) in spec.steps.items()} == {**dict.fromkeys(STEPS, 2),
                                                          "validate": 0}
    text = airflow_dag(open_project(bike))
    assert 'schedule="0 3 * * *"' in text
    assert "timedelta(seconds=5.0)" in text and '"retry_exponential_backoff": 2.0' in text
    assert '"validate": (["ingest"], 0),' in text and '"train": (["split"], 2),' in text
    assert "--retries 0" in text  # one attempt per Airflow try: Airflow alone retries


def test_a_feast_project_materializes_its_online_store_before_the_run(
        bike: Path, tmp_path: Path) -> None:
    """With `features.store: feast` the first task is `mloop features materialize` (the
    loop's materialization, an event), upstream of create_run; without one, no such task."""
    root = copy_flights_feast(tmp_path / "flights_feast")
    append_config(root, "\npipeline: {retries: 2}\n")
    spec = dag_spec(open_project(root))
    assert spec.tasks == ["materialize_features", "create_run", *STEPS, "gate"]
    text = airflow_dag(open_project(root))
    assert 'bash_command=f"{MLOOP} features materialize",' in text
    assert "retries=2, do_xcom_push=False)" in text  # it resumes where the last one ended
    tree = ast.parse(text)
    wired = [ast.unparse(n.value) for n in ast.walk(tree)
             if isinstance(n, ast.Expr) and isinstance(n.value, ast.BinOp)]
    assert "materialize >> create_run" in wired
    path = write_airflow(open_project(root), tmp_path / "dags")
    _assert_ruff_clean(path)

    assert dag_spec(open_project(bike)).materialize_task is None
    assert "materialize" not in airflow_dag(open_project(bike))


def test_airflow_settings_do_not_change_the_config_hash(bike: Path) -> None:
    before = open_project(bike).config.config_hash()
    append_config(bike, """
    airflow: {dag_id: other, schedule: "@daily", mloop_bin: /x/mloop, project_dir: /p}
    """)
    assert open_project(bike).config.config_hash() == before


@pytest.mark.parametrize(("extra", "key"), [
    ("airflow: {schedule: every day}", "airflow.schedule"),
    ("airflow: {dag_id: 'bike sharing'}", "airflow.dag_id"),
    ("airflow: {mloop_binary: mloop}", "airflow.mloop_binary"),
])
def test_bad_airflow_values_name_the_key(bike: Path, extra: str, key: str) -> None:
    append_config(bike, "\n" + extra + "\n")
    with pytest.raises(ConfigError) as info:
        open_project(bike)
    assert info.value.key == key and info.value.line is not None


def test_jinja_in_a_path_is_refused(bike: Path) -> None:
    append_config(bike, "\nairflow: {project_dir: '/data/{{ ds }}'}\n")
    with pytest.raises(ConfigError, match=r"'airflow.project_dir'.*Jinja"):
        dag_spec(open_project(bike))


def test_a_custom_pipeline_keeps_its_wiring_and_task_names_never_clash(make_project) -> None:
    root = make_project(files={"pipeline.py": clashing_pipeline("left")})
    append_config(root, "\npipeline: {entry: 'pipeline:custom'}\n")
    spec = dag_spec(open_project(root))
    assert spec.create_task == "mloop_create_run"  # the step keeps its name
    assert spec.gate_task is None  # no register step: nothing to gate
    assert spec.tasks == ["mloop_create_run", "create_run", "gate", "left", "join"]
    assert spec.steps["join"] == (["gate", "left"], 0)
    assert spec.steps["gate"] == (["create_run"], 3)
    text = airflow_dag(open_project(root))
    ast.parse(text)
    assert "task_ids='mloop_create_run'" in text and "runs gate" not in text


def test_an_unknown_pipeline_name_is_a_clear_error(bike: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineDefinitionError,
                       match=r"this project's pipeline is 'tabular' .*not 'nightly'"):
        write_airflow(open_project(bike), tmp_path / "dags", pipeline="nightly")
    assert not (tmp_path / "dags").exists()


def test_the_dag_file_is_ruff_clean(bike: Path, tmp_path: Path) -> None:
    path = write_airflow(open_project(bike), tmp_path / "dags")
    _assert_ruff_clean(path)


# ------------------------------------------------------------------------------ what the tasks run

@pytest.mark.slow  # two `mloop` processes
def test_the_tasks_commands_one_try_each_airflow_retrying_then_the_gate(make_project) -> None:
    """The DAG's sequence by hand: `runs create` prints the id alone; a step with
    `--retries 0` fails on its first try although pipeline.retries is 2 (Airflow retries
    it), succeeds on the next; after the last step the run has succeeded; `runs gate`
    gates and promotes the version it registered."""
    from .helpers import SMALL_CONFIG

    config = SMALL_CONFIG + ("pipeline:\n  steps:\n    train: flaky:train\n  retries: 2\n"
                             "  retry_backoff_seconds: 0.05\ngates: {auto_promote: true}\n")
    root = make_project(config, files={"flaky.py": FLAKY_TRAIN})
    created = run_cli("-C", str(root), "runs", "create", "tabular")
    run_id = created.stdout.strip()
    assert created.stdout == run_id + "\n" and re.fullmatch(r"[0-9a-f]{32}", run_id)

    spec = dag_spec(open_project(root))
    assert spec.steps["train"] == (["split"], 2)
    for name in spec.steps:
        if name == "train":
            with pytest.raises(StepFailedError, match="feature store timed out"):
                run_single_step(open_project(root), "tabular", name, run_id, retries=0)
            assert open_project(root).store.get_pipeline_run(run_id).status == "failed"
        outcome = run_single_step(open_project(root), "tabular", name, run_id, retries=0)
        assert (outcome.status, outcome.attempts) == ("succeeded", 1)
    assert (root / "attempts.txt").read_text() == "2"
    project = open_project(root)
    run = project.store.get_pipeline_run(run_id)
    assert (run.status, run.error) == ("succeeded", None)
    assert registered_version(project, run_id) == 1

    gated = json.loads(run_cli("-C", str(root), "runs", "gate", run_id, "--json").stdout)
    assert (gated["gates"]["version"], gated["gates"]["passed"]) == (1, True)
    assert gated["promotion"]["version"] == 1  # auto_promote: the first champion
    champion = open_project(root).mlflow.get_model_version_by_alias("rentals", "champion")
    assert int(champion.version) == 1


def test_gate_needs_a_registered_version(make_project) -> None:
    root = make_project()
    run = create_run(open_project(root))
    with pytest.raises(MloopError, match=f"pipeline run {run.id} has registered no model "
                                         f"version"):
        registered_version(open_project(root), run.id)


# ------------------------------------------------------------------------------ writing

def test_an_occupied_out_folder_is_refused_and_a_reexport_replaces_its_file(
        bike: Path, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "other_dag.py").write_text("# someone else's DAG\n")
    with pytest.raises(MloopError, match=re.escape(
            f"--out {dags}: the folder is not empty and was not written by "
            f"`mloop export airflow`")):
        write_airflow(open_project(bike), dags)
    assert [p.name for p in dags.iterdir()] == ["other_dag.py"]

    out = tmp_path / "dags" / "bike"
    path = write_airflow(open_project(bike), out)
    assert path == out / "bike_sharing.py"
    assert json.loads((out / MARKER).read_text())["generator"] == "mloop export airflow"
    append_config(bike, "\nairflow: {schedule: '@daily'}\n")
    assert write_airflow(open_project(bike), out) == path
    assert 'schedule="@daily"' in path.read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "bike_sharing.py"])

    k8s = tmp_path / "k8s"  # another exporter's folder is not ours to write in
    from mloop.export.k8s import write_k8s
    write_k8s(open_project(bike), k8s)
    with pytest.raises(MloopError, match="not written by `mloop export airflow`"):
        write_airflow(open_project(bike), k8s)


@pytest.mark.slow  # `mloop` processes
def test_cli_json_and_its_errors(bike: Path, tmp_path: Path) -> None:
    out = tmp_path / "dags"
    proc = run_cli("-C", str(bike), "export", "airflow", "--out", str(out), "--json")
    result = json.loads(proc.stdout)
    assert result["file"] == str(out / "bike_sharing.py") and result["dag_id"] == "bike-sharing"
    assert result["tasks"] == ["create_run", *STEPS, "gate"]

    bad = run_cli("-C", str(bike), "export", "airflow", "--out", str(tmp_path / "x"),
                  "--pipeline", "nightly", check=False)
    assert bad.returncode == 1
    assert "error: this project's pipeline is 'tabular' (pipeline.entry), not 'nightly'" \
        in bad.stderr

    (out / "notes.txt").write_text("mine")
    (out / MARKER).unlink()
    taken = run_cli("-C", str(bike), "export", "airflow", "--out", str(out), check=False)
    assert taken.returncode == 1
    assert f"error: --out {out}: the folder is not empty" in taken.stderr


# ------------------------------------------------------------------------------ real Airflow

def _airflow() -> Path:
    """.venv-airflow's `airflow`, created or synced from requirements-airflow.lock."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / "airflow_env.sh")], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return REPO / proc.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.integration
def test_airflow_runs_the_exported_dag_to_the_same_lineage_as_mloop_run(
        tmp_path: Path) -> None:
    started = time.monotonic()
    # a cache key digests mloop's own source: an edit to it during the test (a developer's
    # tree) changes the keys of later steps, so they are compared only if it stood still
    code_before = _mloop_source_digest.__wrapped__()
    airflow = _airflow()
    env_ready = time.monotonic() - started
    # two fresh copies, the same mloop.yaml: one for `mloop run`, one for Airflow
    extra = f"\nairflow:\n  mloop_bin: {json.dumps(MLOOP_BIN)}\n"
    local = copy_bike(tmp_path / "local", extra)
    orchestrated = copy_bike(tmp_path / "airflow", extra)
    # the local run goes on meanwhile, in its own process
    with mloop_run_meanwhile(local, tmp_path / "local.log") as local_run:
        dags = tmp_path / "dags"
        run_cli("-C", str(orchestrated), "export", "airflow", "--out", str(dags / "bike"))
        home = tmp_path / "airflow_home"
        env = {**os.environ, "AIRFLOW_HOME": str(home),
               "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
        env.pop("MLOOP_PROJECT", None)
        t0 = time.monotonic()
        assert run_process_group([str(airflow), "db", "migrate"], env, tmp_path / "migrate.log",
                          300) == 0, (tmp_path / "migrate.log").read_text()[-3000:]
        t1 = time.monotonic()
        rc = run_process_group([str(airflow), "dags", "test", "bike-sharing"], env,
                        tmp_path / "dags_test.log", 1200)
        t2 = time.monotonic()
        log = (tmp_path / "dags_test.log").read_text()
        assert rc == 0, log[-5000:]
        assert re.search(r"DagRun Finished: dag_id=bike-sharing,.* state=success", log)
        assert local_run.wait(timeout=900) == 0, (tmp_path / "local.log").read_text()[-3000:]
    code_stable = _mloop_source_digest.__wrapped__() == code_before
    print(f"\nairflow env {env_ready:.1f} s, db migrate {t1 - t0:.1f} s, "
          f"dags test {t2 - t1:.1f} s, mloop source unchanged: {code_stable}")

    # Airflow's record: every task succeeded on its first try
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT task_id, state, try_number FROM task_instance "
                          "WHERE dag_id = 'bike-sharing'").fetchall()
    assert sorted(rows) == sorted((t, "success", 1) for t in ["create_run", *STEPS, "gate"])

    # mloop's record: one pipeline run, every step ran once, in one process each
    run_id = check_one_run_each_step_once(orchestrated)
    # the registered version: the same lineage as `mloop run`'s, and gated like it
    check_same_lineage_as_mloop_run(orchestrated, local, run_id, code_stable=code_stable)
