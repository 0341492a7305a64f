"""Hand the project to other systems: ``mloop export k8s|airflow|kubeflow|github-actions|
gitlab-ci|terraform``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mloop.cli._common import JsonOpt, open_project, report
from mloop.cli.render import err, out

if TYPE_CHECKING:
    from mloop.export.ci_workflows import WorkflowOptions
    from mloop.project import Project

export_app = typer.Typer(no_args_is_help=True, help="Hand the project to other systems: "
                                                    "Kubernetes manifests and a Dockerfile, "
                                                    "an Airflow DAG, a Kubeflow pipeline, "
                                                    "CI workflows, a Terraform module.")


@export_app.command("k8s")
def export_k8s(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write: new, empty, or a "
                                                        "previous export (only its files are "
                                                        "replaced).")],
    json_: JsonOpt = False,
) -> None:
    """Deployment + Service + HPA, a KServe InferenceService, a CronJob for `mloop loop
    --once`, the dashboard (`mloop ui`: Deployment + Service), ServiceMonitor +
    PrometheusRule and a Dockerfile, from mloop.yaml's `kubernetes:` section."""
    from mloop.export.k8s import k8s_notes, write_k8s

    project = open_project()
    written = write_k8s(project, out_dir)
    notes = k8s_notes(project, out_dir)

    def render(_: dict[str, Any]) -> None:
        for p in written:
            out.print(f"wrote {p}")
        for w in notes["warnings"]:
            err.print(f"[yellow]warning:[/] {w}")
        for n in notes["notes"]:
            err.print(f"note: {n}")
        err.print(f"build the image: {notes['build']}")

    report({"out": str(out_dir), "files": [str(p) for p in written], **notes}, json_, render)


@export_app.command("airflow")
def export_airflow(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (e.g. a subfolder of "
                                                        "Airflow's DAGs folder): new, empty, or "
                                                        "a previous export.")],
    pipeline: Annotated[str | None, typer.Option(help="Pipeline name (default: the "
                                                      "project's).")] = None,
    json_: JsonOpt = False,
) -> None:
    """An Airflow 3 DAG: `runs create`, one task per step (`mloop step run`) in dependency
    order, then `runs gate`; from mloop.yaml's `airflow:` section."""
    from mloop.export.airflow import dag_spec, write_airflow

    project = open_project()
    path = write_airflow(project, out_dir, pipeline=pipeline)
    spec = dag_spec(project, pipeline)

    def render(_: dict[str, Any]) -> None:
        out.print(f"wrote {path}")
        err.print(f"DAG '{spec.dag_id}': {' -> '.join(spec.tasks)}")

    report({"out": str(out_dir), "file": str(path), "dag_id": spec.dag_id,
            "pipeline": spec.pipeline, "schedule": spec.schedule, "tasks": spec.tasks},
           json_, render)


@export_app.command("kubeflow")
def export_kubeflow(
    out_file: Annotated[Path, typer.Option("--out", help="The pipeline file to write (.yaml): "
                                                         "new, or a previous export.")],
    pipeline: Annotated[str | None, typer.Option(help="Pipeline name (default: the "
                                                      "project's).")] = None,
    json_: JsonOpt = False,
) -> None:
    """A Kubeflow Pipelines (KFP v2) pipeline compiled with the kfp SDK: `runs create`, one
    task per step (`mloop step run`) in dependency order, then `runs gate`; every task on
    `kubeflow.base_image`, which must hold mloop[kubeflow]. From mloop.yaml's `kubeflow:`."""
    from mloop.export.kubeflow import describe, kubeflow_warnings, pipeline_spec, write_kubeflow

    project = open_project()
    path = write_kubeflow(project, out_file, pipeline=pipeline)
    info = describe(pipeline_spec(project, pipeline))
    warnings = kubeflow_warnings(project)

    def render(_: dict[str, Any]) -> None:
        out.print(f"wrote {path}")
        err.print(f"pipeline '{info['pipeline_name']}' on {info['image']}: "
                  f"{' -> '.join(info['tasks'])}")
        for w in warnings:
            err.print(f"[yellow]warning:[/] {w}")

    report({"file": str(path), **info, "warnings": warnings}, json_, render)


BaseEnvOpt = Annotated[str, typer.Option(
    "--base-env", help="Environment whose champion pull requests are gated against and "
                       "merges promote to.")]
InstallOpt = Annotated[str | None, typer.Option(
    "--install", help="The shell command that installs mloop in CI (default: pip install "
                      "'mloop==<this version>').")]
BranchOpt = Annotated[str, typer.Option("--branch", help="The main branch.")]


def _workflow_project(install: str | None, branch: str,
                      base_env: str) -> tuple[Project, WorkflowOptions]:
    """The project and the options both CI exports (github-actions, gitlab-ci) write with."""
    from mloop.export.ci_workflows import workflow_options

    project = open_project()
    return project, workflow_options(project, install=install, branch=branch, base_env=base_env)


def _workflow_fields(opts: WorkflowOptions) -> dict[str, Any]:
    """What both CI exports report about their options (--json)."""
    return {"project_dir": opts.project_dir, "base_env": opts.base_env,
            "secrets": list(opts.secrets)}


@export_app.command("github-actions")
def export_github_actions(
    out_dir: Annotated[Path, typer.Option("--out", help="The workflows folder, e.g. "
                                                        ".github/workflows/ (other workflows "
                                                        "there are left alone).")],
    base_env: BaseEnvOpt = "staging",
    install: InstallOpt = None,
    branch: BranchOpt = "main",
    json_: JsonOpt = False,
) -> None:
    """Two GitHub Actions workflows: mloop-ci.yml (on a pull request: `mloop ci check`, the
    report posted as a comment) and mloop-promote.yml (on a push to main: promote to staging;
    then production behind the `production` environment's required reviewers)."""
    from mloop.export.ci_workflows import write_github_actions

    project, opts = _workflow_project(install, branch, base_env)
    written = write_github_actions(project, out_dir, opts)

    def render(_: dict[str, Any]) -> None:
        for p in written:
            out.print(f"wrote {p}")
        err.print("note: add required reviewers to the `production` environment (Settings > "
                  "Environments), or production is promoted without approval")
        if opts.secrets:
            err.print(f"note: add repository secrets {', '.join(opts.secrets)}")

    report({"out": str(out_dir), "files": [str(p) for p in written], **_workflow_fields(opts)},
           json_, render)


@export_app.command("gitlab-ci")
def export_gitlab_ci(
    out_file: Annotated[Path, typer.Option("--out", help="The pipeline file to write, e.g. "
                                                         ".gitlab-ci.yml: new, or a previous "
                                                         "export.")],
    base_env: BaseEnvOpt = "staging",
    install: InstallOpt = None,
    branch: BranchOpt = "main",
    json_: JsonOpt = False,
) -> None:
    """A GitLab CI pipeline: on a merge request `mloop ci check` (the report posted as a
    note); on the main branch promote to staging, then production as a manual job."""
    from mloop.export.ci_workflows import write_gitlab_ci

    project, opts = _workflow_project(install, branch, base_env)
    path = write_gitlab_ci(project, out_file, opts)

    def render(_: dict[str, Any]) -> None:
        out.print(f"wrote {path}")
        err.print("note: set the CI/CD variable MLOOP_GITLAB_TOKEN (project access token, api "
                  "scope) so the report can be posted on the merge request")

    report({"file": str(path), **_workflow_fields(opts)}, json_, render)


@export_app.command("terraform")
def export_terraform(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write (e.g. infra/): new, "
                                                        "empty, or a previous export.")],
    json_: JsonOpt = False,
) -> None:
    """A Terraform module for the scale-out topology on AWS: S3 bucket (versioned, SSE-KMS,
    private), RDS PostgreSQL (encrypted, private), least-privilege IAM roles for the server,
    the controller and CI, and the objects of `mloop export k8s` (kubernetes provider)."""
    from mloop.export.terraform import write_terraform

    project = open_project()
    written = write_terraform(project, out_dir)

    def render(_: dict[str, Any]) -> None:
        for p in written:
            out.print(f"wrote {p}")
        err.print(f"next: cd {out_dir} && terraform init && terraform validate && "
                  f"terraform plan -var-file=prod.tfvars (see variables.tf)")

    report({"out": str(out_dir), "files": [str(p) for p in written]}, json_, render)
