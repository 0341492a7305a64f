"""`mloop export terraform`: a module that parses as HCL and passes checkov with no failed check.

No Terraform binary can be installed here, so every .tf file is parsed with python-hcl2 and
the module is judged by checkov (Terraform and Kubernetes policies), from its own pinned venv
(scripts/checkov_env.sh: its pins clash with mloop's lock), made on first use. One checkov run
covers the export and a copy broken on purpose, so a checkov that passes anything would fail.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

from mloop.errors import MloopError
from mloop.export.k8s import k8s_manifests
from mloop.export.terraform import terraform_files, write_terraform
from mloop.project import open_project

from .helpers import BIKE, REPO, missing, run_cli

# one worker runs checkov once for the module (with --dist loadgroup, pyproject's addopts)
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("checkov")]

SKIP = re.compile(r"#checkov:skip=(CKV2?_[A-Z0-9]+_\d+):(.*)")


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tf")
    shutil.copytree(BIKE, root / "bike", ignore=shutil.ignore_patterns(".mloop"))
    write_terraform(open_project(root / "bike"), root / "infra")
    return root / "infra"


@pytest.fixture(scope="module")
def checkov(infra: Path) -> dict[str, list[dict[str, Any]]]:
    """checkov's failed and skipped checks, keyed "good" (the export) and "broken" (a copy
    with the database made public and the bucket's public access block removed)."""
    setup = subprocess.run(["bash", str(REPO / "scripts" / "checkov_env.sh")],
                           capture_output=True, text=True, timeout=600)
    if setup.returncode != 0:
        missing(f"scripts/checkov_env.sh could not make checkov's venv: {setup.stderr[-800:]}")
    exe = setup.stdout.strip().splitlines()[-1]
    exe = exe if Path(exe).is_absolute() else str(REPO / exe)
    both = infra.parent / "both"
    shutil.copytree(infra, both / "good")
    shutil.copytree(infra, both / "broken")
    rds = both / "broken" / "rds.tf"
    rds.write_text(rds.read_text().replace("publicly_accessible                 = false",
                                           "publicly_accessible                 = true"))
    (both / "broken" / "s3.tf").write_text(re.sub(
        r'resource "aws_s3_bucket_public_access_block".*?\n}\n', "",
        (both / "broken" / "s3.tf").read_text(), flags=re.S))
    proc = subprocess.run([exe, "-d", str(both), "-o", "json", "--skip-download",
                           "--framework", "terraform", "kubernetes"],
                          capture_output=True, text=True, timeout=600)
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    out: dict[str, list[dict[str, Any]]] = {"good": [], "broken": [], "skipped": []}
    for rep in reports:
        for check in rep["results"]["failed_checks"]:
            out["broken" if "/broken/" in check["file_abs_path"] else "good"].append(check)
        out["skipped"] += [c for c in rep["results"]["skipped_checks"]
                           if "/good/" in c["file_abs_path"]]
    return out


def _tf(infra: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(infra.glob("*.tf")):
        with path.open() as fh:
            out[path.name] = hcl2.load(fh, serialization_options=hcl2.SerializationOptions(
                strip_string_quotes=True))
    return out


def _resources(parsed: dict[str, dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    out = {}
    for doc in parsed.values():
        for block in doc.get("resource", []):
            for name, body in block.get(kind, {}).items():
                out[name] = body
    return out


def test_every_file_parses_as_hcl(infra: Path) -> None:
    parsed = _tf(infra)
    assert set(parsed) == {"versions.tf", "kms.tf", "s3.tf", "rds.tf", "iam.tf",
                           "kubernetes.tf", "variables.tf", "outputs.tf"}
    assert {"bucket", "stores", "role_arns"} <= {k for b in parsed["outputs.tf"]["output"]
                                                 for k in b}


def test_every_variable_used_is_declared(infra: Path) -> None:
    parsed = _tf(infra)
    declared = {k for b in parsed["variables.tf"]["variable"] for k in b}
    text = "\n".join(p.read_text() for p in infra.glob("*.tf"))
    used = set(re.findall(r"\bvar\.([a-z_]+)", text))
    assert used and used <= declared, used - declared
    name = next(b["name"] for b in parsed["variables.tf"]["variable"] if "name" in b)
    assert name["default"] == "bike-sharing"  # from mloop.yaml


def test_bucket_is_versioned_kms_encrypted_and_private(infra: Path) -> None:
    parsed = _tf(infra)
    versioning = _resources(parsed, "aws_s3_bucket_versioning")["mloop"]
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    sse = _resources(parsed, "aws_s3_bucket_server_side_encryption_configuration")["mloop"]
    default = sse["rule"][0]["apply_server_side_encryption_by_default"][0]
    assert default["sse_algorithm"] == "aws:kms"
    assert "aws_kms_key.mloop.arn" in default["kms_master_key_id"]
    block = _resources(parsed, "aws_s3_bucket_public_access_block")["mloop"]
    assert all(block[k] is True for k in ("block_public_acls", "block_public_policy",
                                          "ignore_public_acls", "restrict_public_buckets"))


def test_database_is_encrypted_and_private(infra: Path) -> None:
    db = _resources(_tf(infra), "aws_db_instance")["mloop"]
    assert db["engine"] == "postgres"
    assert db["storage_encrypted"] is True and db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True  # no password in Terraform's state
    assert "password" not in db


def test_roles_grant_only_this_bucket_and_key(infra: Path) -> None:
    parsed = _tf(infra)
    roles = _resources(parsed, "aws_iam_role")
    assert {"server", "controller", "ci"} <= set(roles)
    docs = {k: v for b in parsed["iam.tf"]["data"] for k, v in
            b.get("aws_iam_policy_document", {}).items()}
    for name in ("server", "writer"):
        for st in docs[name]["statement"]:
            assert all(a != "*" and not a.endswith(":*") for a in st["actions"]), st
            assert all(r != "*" for r in st["resources"]), st
    server_actions = {a for st in docs["server"]["statement"] for a in st["actions"]}
    assert "s3:DeleteObject" not in server_actions  # the server never deletes
    put = next(st for st in docs["server"]["statement"] if "s3:PutObject" in st["actions"])
    assert put["resources"] == ["${local.bucket_arn}/inference/*"]
    ci_sub = next(c for c in docs["ci_trust"]["statement"][0]["condition"]
                  if c["variable"].endswith(":sub"))
    assert ci_sub["values"] == ["repo:${var.ci_repository}:*"]


def test_kubernetes_objects_are_those_of_the_k8s_export(infra: Path) -> None:
    project = open_project(infra.parent / "bike")
    import yaml

    exported = {n: yaml.safe_load(t) for n, t in k8s_manifests(project).items()
                if n.endswith(".yaml") and n != "inferenceservice.yaml"}
    files = terraform_files(project)
    for name, doc in exported.items():
        ours = json.loads(files[f"k8s-{name.removesuffix('.yaml')}.json"])
        assert ours["kind"] == doc["kind"] and ours["metadata"]["name"] == doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "CronJob"):
            pod = (ours["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                   if doc["kind"] == "CronJob" else ours["spec"]["template"]["spec"])
            theirs = (doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
                      if doc["kind"] == "CronJob" else doc["spec"]["template"]["spec"])
            assert pod["containers"] == theirs["containers"]
            role = "controller" if doc["kind"] == "CronJob" else "server"
            assert pod["serviceAccountName"] == f"bike-sharing-{role}"
        else:
            assert ours["spec"] == doc["spec"]
    assert "inferenceservice" not in " ".join(files)  # KServe is an alternative, left out
    assert "k8s-networkpolicy.json" in files
    kube = _tf(infra)["kubernetes.tf"]
    assert "mloop" in _resources({"k": kube}, "kubernetes_manifest")


def test_checkov_finds_no_failed_check(checkov: dict[str, list[dict[str, Any]]]) -> None:
    assert not checkov["good"], [(c["check_id"], c["resource"]) for c in checkov["good"]]


def test_checkov_fails_a_public_database_and_bucket(
        checkov: dict[str, list[dict[str, Any]]]) -> None:
    failed = {c["check_id"] for c in checkov["broken"]}
    assert "CKV_AWS_17" in failed  # RDS publicly accessible
    assert "CKV2_AWS_6" in failed  # bucket without a public access block


def test_every_skip_is_justified_in_the_file(infra: Path,
                                             checkov: dict[str, list[dict[str, Any]]]) -> None:
    reasons = {}
    for path in infra.glob("*.tf"):
        for check, why in SKIP.findall(path.read_text()):
            reasons[check] = why.strip()
    for path in infra.glob("k8s-*.json"):
        for key, value in json.loads(path.read_text())["metadata"].get(
                "annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, why = value.partition("=")
                reasons[check] = why.strip()
    assert reasons and all(len(why) >= 20 for why in reasons.values()), reasons
    assert {c["check_id"] for c in checkov["skipped"]} <= set(reasons)


def test_an_occupied_out_folder_is_refused_and_a_reexport_replaces(tmp_path: Path) -> None:
    shutil.copytree(BIKE, tmp_path / "bike", ignore=shutil.ignore_patterns(".mloop"))
    project = open_project(tmp_path / "bike")
    out = tmp_path / "infra"
    out.mkdir()
    (out / "main.tf").write_text("# ours\n")
    with pytest.raises(MloopError, match="not empty and was not written by `mloop export "
                                         "terraform`"):
        write_terraform(project, out)
    assert [p.name for p in out.iterdir()] == ["main.tf"]
    fresh = tmp_path / "fresh"
    write_terraform(project, fresh)
    written = write_terraform(project, fresh)
    assert {p.name for p in written} <= {p.name for p in fresh.iterdir()}


def test_cli_writes_the_module_and_reports_json(tmp_path: Path) -> None:
    shutil.copytree(BIKE, tmp_path / "bike", ignore=shutil.ignore_patterns(".mloop"))
    proc = run_cli("export", "terraform", "--out", str(tmp_path / "infra"), "--json",
                   cwd=tmp_path / "bike")
    files = {Path(f).name for f in json.loads(proc.stdout)["files"]}
    assert {"variables.tf", "outputs.tf", "s3.tf", "rds.tf", "iam.tf"} <= files
