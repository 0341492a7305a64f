"""``mloop export github-actions|gitlab-ci``: CI workflows that carry a model to production.

Three moments, the same on both platforms:

- **pull request / merge request**: ``mloop ci check`` trains the branch's candidate, gates it
  against the base environment's champion and writes a Markdown report, which the workflow posts
  on the request (``gh pr comment`` on GitHub, the merge request notes API on GitLab) before
  failing the job when a gate failed;
- **merge to the default branch**: the same check, then the candidate is promoted to staging;
- **production**: a job after it, held by the platform's manual approval (a GitHub environment
  ``production`` with required reviewers; a GitLab job with ``when: manual``).

Every mloop command the workflows run is in :data:`COMMANDS`, one place to change when the
environment commands change. Secrets never appear in the files: each ``${VAR}`` mloop.yaml
refers to is passed from the platform's secrets (GitHub) or CI/CD variables (GitLab) by name.
The files are written via temp + rename, and never over a file another tool wrote
(:mod:`mloop.export.files`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mloop._version import __version__
from mloop.errors import MloopError
from mloop.export.files import check_export_file, write_export_file
from mloop.export.k8s import config_vars
from mloop.project import Project

__all__ = ["COMMANDS", "GITHUB_FILES", "WorkflowOptions", "github_workflows", "gitlab_ci",
           "workflow_options", "write_github_actions", "write_gitlab_ci"]

GITHUB_GENERATOR = "mloop export github-actions"
GITLAB_GENERATOR = "mloop export gitlab-ci"
GITHUB_FILES = ("mloop-ci.yml", "mloop-promote.yml")
REPORT_DIR = "ci-report"

# The mloop commands the workflows run, in the shell of the job (``$VERSION``: the version the
# previous command printed). ``{base}`` is the base environment.
COMMANDS = {
    "check": "mloop ci check --base-env {base} --report " + REPORT_DIR + "/report.md",
    "check_json": ("mloop ci check --base-env {base} --report " + REPORT_DIR
                   + "/report.md --json > ci-check.json"),
    "promote_staging": ('mloop models promote "$VERSION" --to staging --reason '
                        '"merged as commit $COMMIT" --json > promote.json'),
    # the person who let the production job run is recorded as the approval
    # (promotion.approval), then the promotion cites it
    "approve_prod": ('mloop --env staging models approve "$VERSION" --to prod --by "$APPROVER" '
                     '--reason "$APPROVAL" --json'),
    "promote_prod": ('mloop --env staging models promote "$VERSION" --to prod --reason '
                     '"approved for production in CI ($APPROVAL)" --json'),
}
# GitHub: the required reviewers who approved this run's deployment to the environment
_GH_APPROVERS = ('APPROVER=$(gh api "repos/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID/'
                 'approvals" --jq \'[.[].user.login] | join(",")\')')
# reads a key of a JSON file mloop wrote (no jq on GitLab's python image)
_READ = "python -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])'"


@dataclass(frozen=True)
class WorkflowOptions:
    """What a workflow needs to know besides the project: where it lives in the repository,
    how CI installs mloop, which branch is main and which environment PRs are gated against."""

    project_dir: str  # relative to the repository root; "." when the project is the root
    install: str
    branch: str = "main"
    base_env: str = "staging"
    python: str = "3.11"
    secrets: tuple[str, ...] = ()


def _repo_root(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return folder
    return None


def workflow_options(project: Project, *, install: str | None = None, branch: str = "main",
                     base_env: str = "staging") -> WorkflowOptions:
    """The options for ``project``: its folder relative to the enclosing git repository (the
    project itself when there is none), ``pip install mloop==<this version>`` unless told."""
    root = project.root.resolve()
    repo = _repo_root(root)
    rel = root.relative_to(repo).as_posix() if repo is not None else "."
    for name, value in (("--branch", branch), ("--base-env", base_env)):
        if not value or any(c.isspace() or c in "'\"$`\\" for c in value):
            raise MloopError(f"{name} '{value}': must be a non-empty name without spaces, "
                             f"quotes or $")
    return WorkflowOptions(project_dir=rel or ".",
                           install=install or f"pip install 'mloop=={__version__}'",
                           branch=branch, base_env=base_env,
                           secrets=tuple(config_vars(project)))


# ------------------------------------------------------------------------------ YAML


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job scripts) as ``|`` blocks a person can read."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(header: list[str], doc: dict[str, Any]) -> str:
    body = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=10_000,
                     default_flow_style=False)
    return "\n".join(header) + "\n" + body


def _header(generator: str, project: Project, what: str) -> list[str]:
    return [f"# Generated by `{generator}` (mloop {__version__}) from the project "
            f"'{project.config.project}': {what}.",
            "# Re-running the export overwrites this file; edit the export's options instead."]


# ------------------------------------------------------------------------------ GitHub


def _gh_setup(opts: WorkflowOptions) -> list[dict[str, Any]]:
    return [{"uses": "actions/checkout@v4"},
            {"uses": "actions/setup-python@v5", "with": {"python-version": opts.python}},
            {"name": "Install mloop", "run": opts.install}]


def _gh_job(opts: WorkflowOptions, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    job: dict[str, Any] = {"runs-on": "ubuntu-latest", **extra, "timeout-minutes": 60,
                           "defaults": {"run": {"working-directory": opts.project_dir}}}
    if opts.secrets:
        job["env"] = {v: f"${{{{ secrets.{v} }}}}" for v in opts.secrets}
    job["steps"] = _gh_setup(opts) + steps
    return job


def _report_path(opts: WorkflowOptions) -> str:
    return REPORT_DIR if opts.project_dir == "." else f"{opts.project_dir}/{REPORT_DIR}"


def github_pr_workflow(opts: WorkflowOptions) -> dict[str, Any]:
    """On a pull request: check, post the report as a comment, fail when a gate failed. The
    check's exit code is kept so the comment is posted either way."""
    check = COMMANDS["check"].format(base=opts.base_env)
    steps: list[dict[str, Any]] = [
        {"name": f"Train and gate the candidate against the {opts.base_env} champion",
         "id": "check",
         "run": f"set +e\n{check}\necho \"exit-code=$?\" >> \"$GITHUB_OUTPUT\"\n"},
        {"name": "Post the report on the pull request", "if": "always()",
         "env": {"GH_TOKEN": "${{ github.token }}",
                 "PR": "${{ github.event.pull_request.number }}"},
         "run": f'gh pr comment "$PR" --body-file {REPORT_DIR}/report.md'},
        {"name": "Keep the report and its plots", "if": "always()",
         "uses": "actions/upload-artifact@v4",
         "with": {"name": "mloop-ci-report", "path": _report_path(opts)}},
        {"name": "Fail when a gate failed", "if": "steps.check.outputs.exit-code != '0'",
         "run": 'echo "a gate failed: see the report"; exit 1'},
    ]
    return {"name": "mloop ci check",
            "on": {"pull_request": {"branches": [opts.branch]}},
            "permissions": {"contents": "read", "pull-requests": "write"},
            "concurrency": {"group": "mloop-ci-${{ github.event.pull_request.number }}",
                            "cancel-in-progress": True},
            "jobs": {"ci-check": _gh_job(opts, steps)}}


def github_promote_workflow(opts: WorkflowOptions) -> dict[str, Any]:
    """On a push to main: check and promote to staging; then production, held until a
    required reviewer of the ``production`` environment approves."""
    staging = [
        {"name": "Train, gate and promote to staging", "id": "promote",
         "env": {"COMMIT": "${{ github.sha }}"},
         "run": (f"{COMMANDS['check_json'].format(base=opts.base_env)}\n"
                 f"VERSION=$({_READ} ci-check.json version)\n"
                 f"{COMMANDS['promote_staging']}\n"
                 f"echo \"version=$({_READ} promote.json version)\" >> \"$GITHUB_OUTPUT\"\n")},
    ]
    prod = [
        {"name": "Promote the staging version to production",
         "env": {"VERSION": "${{ needs.staging.outputs.version }}",
                 "GH_TOKEN": "${{ github.token }}",
                 "APPROVAL": "GitHub environment production, run ${{ github.run_id }}"},
         "run": (f"{_GH_APPROVERS}\n{COMMANDS['approve_prod']}\n"
                 f"{COMMANDS['promote_prod']}\n")},
    ]
    return {"name": "mloop promote",
            "on": {"push": {"branches": [opts.branch]}},
            # actions: read lets the production job read who approved its deployment
            "permissions": {"contents": "read", "actions": "read"},
            "concurrency": {"group": "mloop-promote", "cancel-in-progress": False},
            "jobs": {
                "staging": _gh_job(opts, staging, environment="staging",
                                   outputs={"version": "${{ steps.promote.outputs.version }}"}),
                # required reviewers: Settings > Environments > production
                "production": _gh_job(opts, prod, needs="staging", environment="production"),
            }}


def github_workflows(project: Project, opts: WorkflowOptions) -> dict[str, str]:
    """File name -> text of the two GitHub Actions workflows (nothing written)."""
    return {
        "mloop-ci.yml": _dump(_header(GITHUB_GENERATOR, project, "pull request check"),
                              github_pr_workflow(opts)),
        "mloop-promote.yml": _dump(_header(GITHUB_GENERATOR, project,
                                           "promotion to staging, then production"),
                                   github_promote_workflow(opts)),
    }


def write_github_actions(project: Project, out: Path, opts: WorkflowOptions) -> list[Path]:
    """Write both workflows into the folder ``out`` (e.g. ``.github/workflows``), beside any
    others there; refused whole, before anything is written, when either file exists and was
    not written by this export."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MloopError(f"--out {out}: is a file; name the workflows folder, e.g. "
                         f".github/workflows")
    files = github_workflows(project, opts)
    for name in files:
        check_export_file(out / name, generator=GITHUB_GENERATOR, suffixes=(".yml",))
    return [write_export_file(out / name, text, generator=GITHUB_GENERATOR, suffixes=(".yml",))
            for name, text in files.items()]


# ------------------------------------------------------------------------------ GitLab


def _gl_note() -> str:
    """Post the report as a merge request note. The job token cannot write notes, so this
    needs a project access token (api scope) in the CI/CD variable MLOOP_GITLAB_TOKEN."""
    return ('curl --fail --silent --show-error --request POST '
            '--header "PRIVATE-TOKEN: $MLOOP_GITLAB_TOKEN" '
            f'--data-urlencode "body@{REPORT_DIR}/report.md" '
            '"$CI_API_V4_URL/projects/$CI_PROJECT_ID/merge_requests/$CI_MERGE_REQUEST_IID/notes"')


def gitlab_pipeline(opts: WorkflowOptions) -> dict[str, Any]:
    cd = [] if opts.project_dir == "." else [f'cd "{opts.project_dir}"']
    on_main = {"if": f'$CI_COMMIT_BRANCH == "{opts.branch}"'}
    doc: dict[str, Any] = {
        "stages": ["check", "staging", "production"],
        "default": {"image": f"python:{opts.python}", "before_script": [*cd, opts.install]},
    }
    doc["ci-check"] = {
        "stage": "check",
        "rules": [{"if": '$CI_PIPELINE_SOURCE == "merge_request_event"'}],
        "script": [COMMANDS["check"].format(base=opts.base_env)],
        # runs when the check failed too: the report says which gate
        "after_script": [*cd, _gl_note()],
        "artifacts": {"when": "always", "paths": [_report_path(opts) + "/"],
                      "expire_in": "30 days"},
    }
    doc["promote-staging"] = {
        "stage": "staging",
        "rules": [on_main],
        "environment": {"name": "staging"},
        "variables": {"COMMIT": "$CI_COMMIT_SHA"},
        "script": [COMMANDS["check_json"].format(base=opts.base_env),
                   f"VERSION=$({_READ} ci-check.json version)",
                   COMMANDS["promote_staging"],
                   f'echo "VERSION=$({_READ} promote.json version)" > "$CI_PROJECT_DIR/'
                   f'staging.env"'],
        "artifacts": {"reports": {"dotenv": "staging.env"}},
    }
    doc["promote-production"] = {
        "stage": "production",
        "needs": ["promote-staging"],
        "rules": [{**on_main, "when": "manual"}],  # a person presses play; nothing else does
        "allow_failure": False,
        "environment": {"name": "production"},
        "variables": {"APPROVAL": "GitLab manual job $CI_JOB_ID by $GITLAB_USER_LOGIN",
                      "APPROVER": "$GITLAB_USER_LOGIN"},  # who pressed play
        "script": [COMMANDS["approve_prod"], COMMANDS["promote_prod"]],
    }
    return doc


def gitlab_ci(project: Project, opts: WorkflowOptions) -> str:
    """The text of ``.gitlab-ci.yml`` (nothing written). Secrets come from CI/CD variables of
    the same names, which GitLab exports to every job."""
    header = _header(GITLAB_GENERATOR, project, "merge request check, promotion")
    if opts.secrets:
        header.append(f"# Set these CI/CD variables (masked): {', '.join(opts.secrets)}, and "
                      f"MLOOP_GITLAB_TOKEN (api scope) to post the report.")
    else:
        header.append("# Set the CI/CD variable MLOOP_GITLAB_TOKEN (a project access token, "
                      "api scope, masked) to post the report.")
    return _dump(header, gitlab_pipeline(opts))


def write_gitlab_ci(project: Project, out: Path, opts: WorkflowOptions) -> Path:
    return write_export_file(out, gitlab_ci(project, opts), generator=GITLAB_GENERATOR,
                             suffixes=(".yml", ".yaml"))

