"""`mloop ci check`: a pull request's candidate trained, gated against the champion and
reported (metrics and deltas, gates, slices, data and config diff, plots) without promoting.

One project is trained once per module: v1 champion on the rentals table, v2 registered
(not promoted) from a changed mloop.yaml on more rows. Tests work on copies of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mloop.errors import MloopError, RunNotFoundError
from mloop.project import open_project
from mloop.registry.aliases import champion_version
from mloop.registry.ci_check import CiCheck, run_ci_check
from mloop.registry.ci_report import render_markdown, write_report

from .helpers import copy_project, rentals_frame, run_cli, train_champion

# one worker trains the module's project once (with --dist loadgroup, pyproject's addopts)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ci_check")]

CONFIG = """\
project: rentals
data: {path: data/rentals.parquet}
target: cnt
features: {time_column: ts}
split: {holdout: 0.25}
model:
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
  params: {max_iter: MAX_ITER, random_state: 0}
metrics: [mae, rmse]
gates:
  auto_promote: true
  absolute: [{metric: mae, max: MAE_MAX}]
  non_inferiority: {metric: mae, margin: 20.0, resamples: 200}
  slices: [{column: weather, margin: 50.0, min_size: 10}]
"""


def _config(max_iter: int = 30, mae_max: float = 100.0) -> str:
    return CONFIG.replace("MAX_ITER", str(max_iter)).replace("MAE_MAX", str(mae_max))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project (v1 champion, v2 a candidate from a changed config and more rows) and the
    pipeline run that registered v2."""
    from mloop.pipeline.runner import run_pipeline

    root = train_champion(tmp_path_factory.mktemp("ci") / "proj", _config(), rentals_frame())
    (root / "mloop.yaml").write_text(_config(max_iter=40))
    rentals_frame(n=720, seed=1).to_parquet(root / "data" / "rentals.parquet", index=False)
    result = run_pipeline(open_project(root))
    assert result.status == "succeeded"
    return root, result.run_id


@pytest.fixture
def project_root(trained: tuple[Path, str], tmp_path: Path) -> Path:
    return copy_project(trained[0], tmp_path)


def _tighten(root: Path, mae_max: float) -> None:
    (root / "mloop.yaml").write_text(_config(max_iter=40, mae_max=mae_max))


def test_a_run_is_gated_against_the_champion_and_nothing_is_promoted(
        trained: tuple[Path, str], project_root: Path) -> None:
    check = run_ci_check(open_project(project_root), run_id=trained[1], base_env="default")
    assert (check.version, check.base.version, check.base.env) == (2, 1, "default")
    assert check.passed and not check.trained
    assert champion_version(open_project(project_root)) == 1  # auto_promote is on: still no
    mae = next(m for m in check.metrics if m["metric"] == "mae")
    assert mae["delta"] == pytest.approx(mae["candidate"] - mae["champion"])
    assert mae["better"] is (mae["delta"] < 0)
    gates = {r["gate"]: r["status"] for r in check.gates["results"]}
    assert gates["absolute.mae.max"] == "pass" and gates["non_inferiority.mae"] == "pass"
    assert [s["column"] for s in check.slices] == ["weather"]
    assert {x["slice"] for x in check.slices[0]["slices"]} == {"Clear", "Mist", "Rain"}


def test_the_data_diff_names_snapshots_rows_and_profile_changes(
        trained: tuple[Path, str], project_root: Path) -> None:
    check = run_ci_check(open_project(project_root), run_id=trained[1])
    snaps = {s["role"]: s for s in check.data["snapshots"]}
    assert snaps["source"]["candidate_rows"] == 720 and snaps["source"]["champion_rows"] == 600
    assert not snaps["train"]["same"]
    temp = next(p for p in check.data["train_profile"] if p["column"] == "temp")
    assert temp["change"] == "changed" and "mean" in temp["stats"]


def test_the_config_diff_is_against_the_champions_recorded_mloop_yaml(
        trained: tuple[Path, str], project_root: Path) -> None:
    check = run_ci_check(open_project(project_root), run_id=trained[1])
    assert check.config["status"] == "changed"
    diff = check.config["diff"]
    assert "-  params: {max_iter: 30, random_state: 0}" in diff
    assert "+  params: {max_iter: 40, random_state: 0}" in diff


def test_the_report_and_its_plots_are_written_side_by_side(
        trained: tuple[Path, str], project_root: Path, tmp_path: Path) -> None:
    check = run_ci_check(open_project(project_root), run_id=trained[1])
    files = write_report(check, tmp_path / "out" / "report.md")
    text = (tmp_path / "out" / "report.md").read_text()
    for heading in ("### Metrics", "### Gates", "### Slices", "### Data", "### Config",
                    "### Plots"):
        assert heading in text
    assert "✅ every gate passed" in text and "rentals v2" in text
    assert "![metrics](report-metrics.png)" in text and "![slices](report-slices.png)" in text
    for kind in ("plot_metrics", "plot_slices"):
        assert Path(files[kind]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report-metrics.png", "report-slices.png", "report.md"]  # no temporary left


def test_the_cli_exits_1_on_a_failed_gate_and_still_writes_the_report(
        trained: tuple[Path, str], project_root: Path, tmp_path: Path) -> None:
    _tighten(project_root, mae_max=0.5)
    report = tmp_path / "pr" / "report.md"
    proc = run_cli("ci", "check", "--run-id", trained[1], "--report", str(report), "--json",
                   cwd=project_root, check=False)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["passed"] is False and doc["files"]["report"] == str(report)
    failed = [r for r in doc["gates"]["results"] if r["status"] == "fail"]
    assert [r["gate"] for r in failed] == ["absolute.mae.max"]
    text = report.read_text()
    assert "❌ a gate failed" in text and "| absolute.mae.max | ❌ fail |" in text
    assert champion_version(open_project(project_root)) == 1


def test_without_a_run_id_the_pipeline_runs_first(trained: tuple[Path, str],
                                                  project_root: Path) -> None:
    runs = {r.id for r in open_project(project_root).store.list_pipeline_runs()}
    proc = run_cli("ci", "check", cwd=project_root)  # the report on stdout
    new = {r.id for r in open_project(project_root).store.list_pipeline_runs()} - runs
    assert len(new) == 1  # a run of its own (its steps cached: the branch changed nothing)
    assert proc.stdout.startswith("## mloop ci check: ✅ every gate passed")
    assert f"(pipeline run `{new.pop()}`)" in proc.stdout and "**rentals v2**" in proc.stdout
    assert "_Plots are written with `--report`" in proc.stdout
    assert champion_version(open_project(project_root)) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--base-env", "staging"], "--base-env 'staging': this project has no environment"),
    (["--run-id", "feedfacecafe"], "no pipeline run 'feedfacecafe'"),
    (["--report", "report.txt"], "--report report.txt: the report is Markdown"),
    (["--report", "."], "--report .: is a folder"),
])
def test_bad_options_fail_by_name_before_anything_is_trained(
        project_root: Path, args: list[str], message: str) -> None:
    runs_before = len(open_project(project_root).store.list_pipeline_runs())
    proc = run_cli("ci", "check", *args, cwd=project_root, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(open_project(project_root).store.list_pipeline_runs()) == runs_before
    assert not (project_root / "report.txt").exists()


def test_an_unknown_run_or_environment_is_named_by_the_service(project_root: Path) -> None:
    project = open_project(project_root)
    with pytest.raises(RunNotFoundError):
        run_ci_check(project, run_id="nope-not-a-run")
    with pytest.raises(MloopError, match="this project has no environment"):
        run_ci_check(project, base_env="prod")


def test_a_run_that_registered_no_version_is_named(project_root: Path) -> None:
    empty = json.loads(run_cli("runs", "create", "--json", cwd=project_root).stdout)["run_id"]
    proc = run_cli("ci", "check", "--run-id", empty, cwd=project_root, check=False)
    assert proc.returncode == 1
    assert f"pipeline run {empty} has registered no model version" in proc.stderr


def test_a_champion_without_a_recorded_config_says_not_recorded() -> None:
    from mloop.registry.ci_check import BaseChampion

    check = CiCheck(model="m", version=2, pipeline_run_id="r", base=BaseChampion("default", 1),
                    passed=True, gates={"results": []}, metrics=[], slices=[],
                    data={"snapshots": [], "train_profile": None},
                    config={"status": "not recorded", "diff": None, "missing": "champion"},
                    trained=False)
    text = render_markdown(check)
    assert "_Not recorded: the champion's pipeline run logged no mloop.yaml._" in text
