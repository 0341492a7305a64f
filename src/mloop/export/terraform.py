"""``mloop export terraform``: the scale-out topology on AWS as a Terraform module.

Written into ``--out`` (flat, so the export's marker can list every file):

- ``versions.tf``: Terraform and provider versions, the ``aws`` and ``kubernetes`` providers;
- ``kms.tf``, ``s3.tf``, ``rds.tf``, ``iam.tf``: a customer-managed key; the stores' bucket
  (versioned, SSE-KMS, public access blocked, TLS only); PostgreSQL on RDS (encrypted, private,
  TLS required); least-privilege roles for the server, the controller and CI;
- ``kubernetes.tf`` + ``k8s-*.json``: the objects of ``mloop export k8s`` (the same objects,
  parsed back from that export's text), applied with ``kubernetes_manifest`` into
  ``var.namespace``, each pod on the service account that carries its IAM role;
- ``variables.tf`` (defaults from mloop.yaml) and ``outputs.tf`` (the stores' URIs for this
  topology, the role ARNs).

The KServe InferenceService is left out: it is an alternative to the Deployment, not an
addition. Nothing here runs Terraform; the tests parse every file and run checkov.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mloop._version import __version__
from mloop.export import terraform_hcl as hcl
from mloop.export.files import write_export
from mloop.export.k8s import app_name, k8s_manifests
from mloop.project import Project

__all__ = ["GENERATOR", "terraform_files", "write_terraform"]

GENERATOR = "mloop export terraform"
# the k8s export's files that become kubernetes_manifest resources (KServe's is an alternative)
_K8S = ("deployment.yaml", "service.yaml", "hpa.yaml", "cronjob.yaml", "ui-deployment.yaml",
        "ui-service.yaml", "servicemonitor.yaml", "prometheusrule.yaml")
# which pods act as which role (the names kubernetes.tf gives the service accounts)
_ROLE_OF = {"deployment.yaml": "server", "ui-deployment.yaml": "server",
            "cronjob.yaml": "controller"}


def _variable(name: str, type_: str, description: str, default: Any = None, *,
              sensitive: bool = False, validation: tuple[str, str] | None = None) -> str:
    lines = [f'variable "{name}" {{', f"  description = {json.dumps(description)}",
             f"  type        = {type_}"]
    if default is not None:
        lines.append(f"  default     = {json.dumps(default)}")
    if sensitive:
        lines.append("  sensitive   = true")
    if validation is not None:
        lines += ["  validation {", f"    condition     = {validation[0]}",
                  f"    error_message = {json.dumps(validation[1])}", "  }"]
    return "\n".join([*lines, "}"])


def variables_tf(project: Project) -> str:
    """The module's inputs; names and sizes default to what mloop.yaml says."""
    name = app_name(project)
    blocks = [
        _variable("name", "string", "Prefix of every AWS name; the project's Kubernetes name",
                  name, validation=("can(regex(\"^[a-z0-9][a-z0-9-]{0,30}$\", var.name))",
                                    "name: lowercase letters, digits and -, at most 31")),
        _variable("region", "string", "AWS region", "eu-west-1"),
        _variable("tags", "map(string)", "Extra tags on every AWS resource", {}),
        _variable("bucket_name", "string", "The stores' bucket (empty: mloop-<name>-<account>)",
                  ""),
        _variable("noncurrent_days", "number",
                  "Days an overwritten object's old version is kept", 90),
        _variable("vpc_id", "string", "The VPC of the cluster and the database"),
        _variable("private_subnet_ids", "list(string)",
                  "Private subnets (two or more zones) for the database"),
        _variable("client_security_group_ids", "list(string)",
                  "Security groups (the cluster's nodes) allowed to reach PostgreSQL"),
        _variable("db_instance_class", "string", "RDS instance class", "db.t4g.medium"),
        _variable("db_allocated_storage", "number", "Storage in GiB (grows up to 4x)", 50),
        _variable("db_engine_version", "string", "PostgreSQL version (family postgres16)", "16"),
        _variable("db_username", "string", "Master user; its password is kept by Secrets "
                                            "Manager", "mloop"),
        _variable("eks_oidc_provider_arn", "string",
                  "The cluster's IAM OIDC provider (IRSA) for the pods' roles"),
        _variable("eks_oidc_issuer_url", "string", "The cluster's OIDC issuer URL"),
        _variable("ci_oidc_provider_arn", "string",
                  "The IAM OIDC provider of token.actions.githubusercontent.com"),
        _variable("ci_repository", "string", "owner/name of the repository whose workflows "
                                             "may assume the CI role",
                  validation=("can(regex(\"^[^/*]+/[^/*]+$\", var.ci_repository))",
                              "ci_repository: owner/name, no wildcards")),
        _variable("kubeconfig_path", "string", "kubectl's config file", "~/.kube/config"),
        _variable("kube_context", "string", "Its context for the cluster (null: current)",
                  None),
        _variable("namespace", "string", "Namespace of mloop's Kubernetes objects",
                  _namespace(project)),
        _variable("create_namespace", "bool", "Create the namespace", True),
        _variable("prometheus_operator", "bool", "Apply ServiceMonitor and PrometheusRule "
                                                 "(needs prometheus-operator's CRDs)", True),
    ]
    head = _header(project)
    return "\n".join(head) + "\n" + "\n\n".join(blocks) + "\n"


def _header(project: Project) -> list[str]:
    return [f"# Generated by `{GENERATOR}` (mloop {__version__}) from the project "
            f"'{project.config.project}'.",
            "# Re-running the export overwrites this file: set variables in a .tfvars file "
            "instead."]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        return dict(spec["jobTemplate"]["spec"]["template"]["spec"])
    return dict(spec["template"]["spec"])


# checkov's Kubernetes checks the workloads skip, and why (annotations: JSON has no comments)
_WORKLOAD_SKIPS = {
    "CKV_K8S_14": "the image is the one the k8s export's Dockerfile builds; pin "
                  "kubernetes.image in mloop.yaml to a release tag",
    "CKV_K8S_43": "a digest exists only after the image is built and pushed; pin "
                  "kubernetes.image to image@sha256:... then",
    "CKV_K8S_22": "MLflow downloads model artifacts to a temporary folder in the container",
}


def _namespace(project: Project) -> str:
    return project.config.kubernetes.namespace or app_name(project)


def network_policy(project: Project) -> dict[str, Any]:
    """Ingress to mloop's pods on their HTTP ports only (the server's and the dashboard's);
    the loop's pods take none. Egress is left open: the stores may be anywhere."""
    name = app_name(project)
    k8s = project.config.kubernetes
    ports = sorted({k8s.port, k8s.ui.port})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": _namespace(project),
                         "labels": {"app.kubernetes.io/name": name,
                                    "app.kubernetes.io/part-of": "mloop",
                                    "app.kubernetes.io/managed-by": "mloop"}},
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"protocol": "TCP", "port": p} for p in ports]}]}}


def k8s_objects(project: Project) -> dict[str, dict[str, Any]]:
    """``k8s-<name>.json`` -> object: what ``mloop export k8s`` writes, parsed back from its
    text, in the module's namespace, each pod on the service account of its role
    (kubernetes.tf creates them, and EKS mounts the role's token itself, so the Kubernetes API
    token is not mounted), plus a NetworkPolicy."""
    name = app_name(project)
    out: dict[str, dict[str, Any]] = {}
    for file, text in k8s_manifests(project).items():
        if file not in _K8S:
            continue
        doc = yaml.safe_load(text)
        doc["metadata"]["namespace"] = _namespace(project)
        role = _ROLE_OF.get(file)
        if role is not None:
            pod = _pod_spec(doc)
            pod["serviceAccountName"] = f"{name}-{role}"
            pod["automountServiceAccountToken"] = False
            if doc["kind"] == "CronJob":
                doc["spec"]["jobTemplate"]["spec"]["template"]["spec"] = pod
            else:
                doc["spec"]["template"]["spec"] = pod
            doc["metadata"]["annotations"] = {
                **doc["metadata"].get("annotations", {}),
                **{f"checkov.io/skip{i}": f"{check}={why}"
                   for i, (check, why) in enumerate(_WORKLOAD_SKIPS.items(), start=1)}}
        out[f"k8s-{file.removesuffix('.yaml')}.json"] = doc
    out["k8s-networkpolicy.json"] = network_policy(project)
    return out


def terraform_files(project: Project) -> dict[str, str]:
    """File name -> text of the whole module (nothing written)."""
    head = "\n".join(_header(project)) + "\n"
    files = {"versions.tf": hcl.VERSIONS, "kms.tf": hcl.KMS, "s3.tf": hcl.S3, "rds.tf": hcl.RDS,
             "iam.tf": hcl.IAM, "kubernetes.tf": hcl.KUBERNETES, "outputs.tf": hcl.OUTPUTS}
    out = {n: head + t for n, t in files.items()}
    out["variables.tf"] = variables_tf(project)
    for file, doc in k8s_objects(project).items():
        out[file] = json.dumps(doc, indent=2) + "\n"
    return out


def write_terraform(project: Project, out: Path) -> list[Path]:
    """Write the module into ``out`` (new, empty, or a previous terraform export: only its
    files are replaced, :mod:`mloop.export.files`); return the files written."""
    files = terraform_files(project)  # rendered whole before anything is touched
    return write_export(out, files, generator=GENERATOR, project=project.config.project)
