"""``mloop export k8s``: the project's Kubernetes objects and image, from mloop.yaml.

Written (one object per file, built as dicts and dumped with PyYAML):

- ``deployment.yaml``, ``service.yaml``, ``hpa.yaml``: the server (``mloop serve``), probed on
  ``/health`` (liveness) and ``/ready`` (readiness), scaled on CPU (autoscaling/v2);
- ``inferenceservice.yaml``: the same container as a KServe predictor, an *alternative* to the
  three above for clusters that run KServe;
- ``cronjob.yaml``: ``mloop loop --once --held-ok`` on a schedule, never two at once (``Forbid``);
- ``ui-deployment.yaml``, ``ui-service.yaml``: the dashboard (``mloop ui``), one replica on the
  same image and stores, probed on ``/health``; cluster-internal (``kubernetes.ui.enabled``);
- ``servicemonitor.yaml`` and ``prometheusrule.yaml``: prometheus-operator objects scraping
  ``/metrics`` and carrying the same alerting rules as ``mloop monitor rules``;
- ``Dockerfile`` (+ ``Dockerfile.dockerignore``): mloop from its lock file, the project on top.

Store URIs reach the pods as ``MLOOP_*_URI`` environment variables. A URI written with
``${VAR}`` in mloop.yaml keeps its shape with Kubernetes' ``$(VAR)`` expansion, ``VAR`` coming
from a Secret; a URI with a literal password in it comes from the Secret whole. The Secret is
never written (that would put the password in a file): the notes say how to create it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from mloop._version import __version__
from mloop.config import CONFIG_FILE, STORE_ENV_VARS, KubernetesConfig
from mloop.export.files import MARKER as MARKER  # re-exported: tests and callers use it
from mloop.export.files import write_export
from mloop.project import Project

CRD_FILES = ("inferenceservice.yaml", "servicemonitor.yaml", "prometheusrule.yaml")
PROJECT_IN_IMAGE = "/app/project"
UID = 10001
# What mloop serve and mloop ui bind to inside a pod: its Service reaches the container on the
# pod's address, not on loopback (and `mloop ui` then requires a token: auth beyond loopback)
POD_HOST = "0.0.0.0"  # nosec B104
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_QUERY_KEYS = ("password", "passwd", "secret", "token", "sig", "key")


# ---------------------------------------------------------------------------- naming

def app_name(project: Project) -> str:
    """``kubernetes.name``, else the project's name made a DNS label (at most 47 chars)."""
    k8s = project.config.kubernetes
    if k8s.name:
        return k8s.name
    name = re.sub(r"[^a-z0-9-]+", "-", project.config.project.lower()).strip("-")
    return name[:47].strip("-") or "mloop"


def image_name(project: Project) -> str:
    return project.config.kubernetes.image or f"{app_name(project)}:latest"


def secret_name(project: Project) -> str:
    return project.config.kubernetes.secret_name or f"{app_name(project)}-stores"


def _labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "mloop", "app.kubernetes.io/managed-by": "mloop"}


def _selector(name: str, component: str = "serving") -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component}


def _metadata(k8s: KubernetesConfig, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if k8s.namespace:
        meta["namespace"] = k8s.namespace
    meta["labels"] = labels
    return meta


# ---------------------------------------------------------------------------- environment

def _config_text(project: Project) -> str:
    path = project.root / CONFIG_FILE
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _referenced_vars(text: str) -> list[str]:
    """``${VAR}`` names mloop.yaml refers to: the pods need them to load it at all."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return list(dict.fromkeys(_ENV_REF.findall("\n".join(lines))))


def config_vars(project: Project) -> list[str]:
    """The ``${VAR}`` names mloop.yaml refers to: whatever runs mloop away from this machine
    (a pod, a CI job) must be given them, or it cannot load the config at all."""
    return _referenced_vars(_config_text(project))


def _raw_stores(text: str) -> dict[str, Any]:
    """The ``stores:`` mapping as written (before ``${VAR}`` substitution)."""
    try:
        raw = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    stores = raw.get("stores") if isinstance(raw, dict) else None
    return stores if isinstance(stores, dict) else {}


def has_credentials(uri: str, secret_values: frozenset[str] = frozenset()) -> bool:
    """A password in the URI's user part or query, or a value substituted from ``${VAR}``."""
    if any(s and s in uri for s in secret_values):
        return True
    try:
        parts = urlsplit(uri)
        if parts.password:
            return True
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return False
    return any(any(word in k.lower() for word in _SECRET_QUERY_KEYS) for k, _ in query)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith(("sqlite:", "file:"))


def _store_env(project: Project) -> tuple[list[dict[str, Any]], list[str]]:
    """The containers' env entries, and the keys the Secret must hold."""
    text = _config_text(project)
    raw = _raw_stores(text)
    secret = secret_name(project)
    env: list[dict[str, Any]] = []
    keys: list[str] = []

    def from_secret(var: str) -> dict[str, Any]:
        keys.append(var)
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": var}}}

    for var in _referenced_vars(text):  # first: $(VAR) below expands only earlier entries
        env.append(from_secret(var))
    stores = project.config.stores.model_dump()
    for key, var in STORE_ENV_VARS.items():
        value = stores.get(key)
        if value is None:
            continue
        written = raw.get(key)
        if isinstance(written, str) and _ENV_REF.search(written):
            env.append({"name": var, "value": _ENV_REF.sub(r"$(\1)", written)})
        elif has_credentials(value, project.config.secrets):
            env.append(from_secret(var))
        else:
            env.append({"name": var, "value": value})
    env.append({"name": "MLOOP_PROJECT", "value": PROJECT_IN_IMAGE})
    return env, keys


# ---------------------------------------------------------------------------- objects

def _resources(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in ("requests", "limits"):
        amounts = {k: v for k, v in getattr(cfg, part).model_dump().items() if v is not None}
        if amounts:
            out[part] = amounts
    return out


def _security() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _serve_command(port: int) -> list[str]:
    return ["mloop", "serve", "--host", POD_HOST, "--port", str(port)]


def _probe(path: str, port: int | str, scheme: str, *, period: int, failures: int,
           delay: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {"httpGet": {"path": path, "port": port, "scheme": scheme},
                             "periodSeconds": period, "timeoutSeconds": 3,
                             "failureThreshold": failures}
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def _serving_container(project: Project, env: list[dict[str, Any]], *, name: str,
                       port_name: str, probe_port: int | str,
                       security: dict[str, Any]) -> dict[str, Any]:
    k8s = project.config.kubernetes
    scheme = "HTTPS" if project.config.serving.tls_cert else "HTTP"
    return {
        "name": name,
        "image": image_name(project),
        "command": _serve_command(k8s.port),
        "ports": [{"name": port_name, "containerPort": k8s.port, "protocol": "TCP"}],
        "env": env,
        # /health: the process is alive; /ready: a champion is loaded and warmed
        "livenessProbe": _probe("/health", probe_port, scheme, period=10, failures=3, delay=10),
        "readinessProbe": _probe("/ready", probe_port, scheme, period=5, failures=3),
        "resources": _resources(k8s.resources),
        "securityContext": security,
    }


def _pod_extras(k8s: KubernetesConfig) -> dict[str, Any]:
    return {"serviceAccountName": k8s.service_account} if k8s.service_account else {}


def deployment(project: Project, env: list[dict[str, Any]]) -> dict[str, Any]:
    k8s = project.config.kubernetes
    name = app_name(project)
    labels = _labels(name, "serving")
    pod_security, container_security = _security()
    spec: dict[str, Any] = {}
    if not k8s.hpa.enabled:  # with an HPA, it owns the count (a re-apply must not reset it)
        spec["replicas"] = k8s.replicas
    spec |= {
        "selector": {"matchLabels": _selector(name)},
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": labels, "annotations": {
                "prometheus.io/scrape": "true", "prometheus.io/port": str(k8s.port),
                "prometheus.io/path": "/metrics"}},
            "spec": {**_pod_extras(k8s), "securityContext": pod_security,
                     "terminationGracePeriodSeconds": 30,
                     "containers": [_serving_container(project, env, name="server",
                                                       port_name="http", probe_port="http",
                                                       security=container_security)]},
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(k8s, name, labels), "spec": spec}


def service(project: Project) -> dict[str, Any]:
    k8s = project.config.kubernetes
    name = app_name(project)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(k8s, name, _labels(name, "serving")),
            "spec": {"type": "ClusterIP", "selector": _selector(name),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http",
                                "protocol": "TCP"}]}}


def hpa(project: Project) -> dict[str, Any]:
    k8s = project.config.kubernetes
    name = app_name(project)
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _metadata(k8s, name, _labels(name, "serving")),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": name},
                     "minReplicas": k8s.hpa.min_replicas, "maxReplicas": k8s.hpa.max_replicas,
                     "metrics": [{"type": "Resource", "resource": {
                         "name": "cpu", "target": {"type": "Utilization",
                                                   "averageUtilization":
                                                       k8s.hpa.cpu_utilization}}}]}}


def inference_service(project: Project, env: list[dict[str, Any]]) -> dict[str, Any]:
    """KServe custom predictor: the same image and probes.

    Knative (KServe's default, serverless mode) admits fewer fields than a Deployment: the
    port is named ``http1``, probes name the container port by number, and the non-root
    settings sit on the container (a pod securityContext, allowPrivilegeEscalation and
    seccompProfile need Knative feature flags).
    """
    k8s = project.config.kubernetes
    name = app_name(project)
    security = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                "capabilities": {"drop": ["ALL"]}}
    scale = ({"minReplicas": k8s.hpa.min_replicas, "maxReplicas": k8s.hpa.max_replicas,
              "scaleMetric": "cpu", "scaleTarget": k8s.hpa.cpu_utilization}
             if k8s.hpa.enabled else {"minReplicas": k8s.replicas, "maxReplicas": k8s.replicas})
    predictor = {**scale, **_pod_extras(k8s),
                 "containers": [_serving_container(project, env, name="kserve-container",
                                                   port_name="http1", probe_port=k8s.port,
                                                   security=security)]}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": _metadata(k8s, name, _labels(name, "serving")),
            "spec": {"predictor": predictor}}


def cronjob(project: Project, env: list[dict[str, Any]]) -> dict[str, Any]:
    k8s = project.config.kubernetes
    name = app_name(project)
    labels = _labels(name, "loop")
    pod_security, container_security = _security()
    job: dict[str, Any] = {"backoffLimit": 0}  # a failed pass waits for the next schedule
    if k8s.loop.deadline_seconds:
        job["activeDeadlineSeconds"] = k8s.loop.deadline_seconds
    job["template"] = {
        "metadata": {"labels": labels},
        "spec": {**_pod_extras(k8s), "restartPolicy": "Never", "securityContext": pod_security,
                 "containers": [{"name": "loop", "image": image_name(project),
                                 "command": ["mloop", "loop", "--once", "--held-ok"], "env": env,
                                 "resources": _resources(k8s.loop.resources),
                                 "securityContext": container_security}]},
    }
    spec: dict[str, Any] = {"schedule": k8s.loop.schedule}
    if k8s.loop.time_zone:
        spec["timeZone"] = k8s.loop.time_zone
    spec |= {"concurrencyPolicy": "Forbid",  # the controller must never run twice at once
             "startingDeadlineSeconds": 300, "successfulJobsHistoryLimit": 3,
             "failedJobsHistoryLimit": 3,
             "jobTemplate": {"metadata": {"labels": labels}, "spec": job}}
    return {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": _metadata(k8s, f"{name}-loop", labels), "spec": spec}


def _ui_command(port: int) -> list[str]:
    return ["mloop", "ui", "--host", POD_HOST, "--port", str(port)]


def ui_deployment(project: Project, env: list[dict[str, Any]]) -> dict[str, Any]:
    """The dashboard: ``mloop ui`` on the serving image, reading the same stores (so the same
    token store: a login needs a token made with ``mloop tokens create``).

    Bound beyond loopback, it requires a login unless ``serving.auth`` is false, exactly as
    ``mloop ui --host 0.0.0.0`` does, and serves HTTPS when ``serving.tls_cert`` is set. One
    replica: each process signs sessions with a key it draws at start, so a second replica
    would not know the first one's logins.
    """
    k8s = project.config.kubernetes
    name = app_name(project)
    labels = _labels(name, "ui")
    pod_security, container_security = _security()
    scheme = "HTTPS" if project.config.serving.tls_cert else "HTTP"
    container = {
        "name": "ui",
        "image": image_name(project),
        "command": _ui_command(k8s.ui.port),
        "ports": [{"name": "http", "containerPort": k8s.ui.port, "protocol": "TCP"}],
        "env": env,
        # /health answers without a login: the process is up and serving pages
        "livenessProbe": _probe("/health", "http", scheme, period=10, failures=3, delay=10),
        "readinessProbe": _probe("/health", "http", scheme, period=5, failures=3),
        "resources": _resources(k8s.ui.resources),
        "securityContext": container_security,
    }
    spec = {
        "replicas": 1,
        "selector": {"matchLabels": _selector(name, "ui")},
        "strategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {"metadata": {"labels": labels},
                     "spec": {**_pod_extras(k8s), "securityContext": pod_security,
                              "terminationGracePeriodSeconds": 30,
                              "containers": [container]}},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(k8s, f"{name}-ui", labels), "spec": spec}


def ui_service(project: Project) -> dict[str, Any]:
    """ClusterIP only: reach it with ``kubectl port-forward`` or put an Ingress in front."""
    k8s = project.config.kubernetes
    name = app_name(project)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(k8s, f"{name}-ui", _labels(name, "ui")),
            "spec": {"type": "ClusterIP", "selector": _selector(name, "ui"),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http",
                                "protocol": "TCP"}]}}


def service_monitor(project: Project) -> dict[str, Any]:
    k8s = project.config.kubernetes
    name = app_name(project)
    endpoint: dict[str, Any] = {"port": "http", "path": "/metrics",
                                "interval": str(k8s.scrape_interval)}
    if project.config.serving.tls_cert:
        endpoint["scheme"] = "https"
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _metadata(k8s, name, {**_labels(name, "serving"),
                                              **k8s.monitor_labels}),
            "spec": {"selector": {"matchLabels": _selector(name)}, "endpoints": [endpoint]}}


def prometheus_rule(project: Project) -> dict[str, Any]:
    from mloop.monitoring.alerts import alert_rules

    k8s = project.config.kubernetes
    name = app_name(project)
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": _metadata(k8s, f"{name}-alerts", {**_labels(name, "monitoring"),
                                                          **k8s.monitor_labels}),
            "spec": {"groups": alert_rules(project)["groups"]}}


# ---------------------------------------------------------------------------- the image

def source_checkout(root: Path) -> Path | None:
    """The mloop source checkout holding the project (its lock file is the image's)."""
    for folder in (root, *root.parents):
        pyproject = folder / "pyproject.toml"
        if (folder / "requirements.lock").is_file() and pyproject.is_file():
            try:
                if re.search(r'(?m)^name\s*=\s*"mloop"', pyproject.read_text("utf-8")):
                    return folder
            except OSError:
                return None
    return None


def project_dir(project: Project) -> str:
    """Where the project sits in the build context (the mloop checkout), for PROJECT_DIR."""
    checkout = source_checkout(project.root)
    if checkout is None:
        return "project"
    return project.root.relative_to(checkout).as_posix() or "."


def dockerfile(project: Project) -> str:
    k8s = project.config.kubernetes
    port = k8s.port
    lines = [
        "# syntax=docker/dockerfile:1",
        *_header(project),
        "# Build context: an mloop source checkout (requirements.lock, pyproject.toml, src/) "
        "with",
        "# the project at PROJECT_DIR inside it; from the checkout's root:",
        f"#   docker build -f path/to/Dockerfile --build-arg PROJECT_DIR={project_dir(project)} "
        f"-t {image_name(project)} .",
        f"ARG BASE_IMAGE={k8s.base_image}",
        "FROM ${BASE_IMAGE}",
        "",
        f"ARG PROJECT_DIR={project_dir(project)}",
        "ENV PYTHONDONTWRITEBYTECODE=1 \\",
        "    PYTHONUNBUFFERED=1 \\",
        "    PIP_DISABLE_PIP_VERSION_CHECK=1 \\",
        f"    MLOOP_PROJECT={PROJECT_IN_IMAGE}",
        "",
        "WORKDIR /opt/mloop",
        "# the pinned dependencies first: this layer survives changes to mloop and the project",
        "COPY requirements.lock ./",
        "RUN pip install --no-cache-dir -r requirements.lock",
        "COPY pyproject.toml README.md ./",
        "COPY src ./src",
        "RUN pip install --no-cache-dir --no-deps . \\",
        f"    && useradd --no-log-init --create-home --uid {UID} --user-group mloop",
        "",
        f"COPY --chown={UID}:{UID} ${{PROJECT_DIR}} {PROJECT_IN_IMAGE}",
        f"WORKDIR {PROJECT_IN_IMAGE}",
        f"USER {UID}",
        f"EXPOSE {port}",
    ]
    if not project.config.serving.tls_cert:
        lines += ["HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \\",
                  "  CMD [\"python\", \"-c\", \"import urllib.request; urllib.request.urlopen("
                  f"'http://127.0.0.1:{port}/health', timeout=2)\"]"]
    lines.append("CMD " + json.dumps(_serve_command(port)))
    return "\n".join(lines) + "\n"


DOCKERIGNORE = """\
# Used by BuildKit for `docker build -f <this folder>/Dockerfile` (next to the Dockerfile).
.git
**/.venv
**/.mloop
**/__pycache__
**/*.pyc
**/.pytest_cache
**/.ruff_cache
**/.mypy_cache
**/mloop-demo
"""


def build_command(project: Project, out: Path) -> str:
    checkout = source_checkout(project.root)
    context = str(checkout) if checkout is not None else "<mloop source checkout>"
    return (f"docker build -f {out / 'Dockerfile'} --build-arg PROJECT_DIR={project_dir(project)}"
            f" -t {image_name(project)} {context}")


# ---------------------------------------------------------------------------- render

def _header(project: Project) -> list[str]:
    return [f"# Generated by `mloop export k8s` (mloop {__version__}) from the project "
            f"'{project.config.project}'.",
            "# Re-running the export overwrites this file: change the `kubernetes:` section "
            "of mloop.yaml instead."]


def _yaml(project: Project, doc: dict[str, Any], note: str | None = None) -> str:
    head = _header(project) + ([f"# {note}"] if note else [])
    doc = json.loads(json.dumps(doc))  # no shared sub-dicts: PyYAML would write &anchors
    body = yaml.safe_dump_all([doc], sort_keys=False, width=100, default_flow_style=False)
    return "\n".join(head) + "\n" + body


def k8s_manifests(project: Project) -> dict[str, str]:
    """File name -> text of everything `mloop export k8s` writes (no file is touched)."""
    env, _ = _store_env(project)
    files = {"deployment.yaml": _yaml(project, deployment(project, env)),
             "service.yaml": _yaml(project, service(project))}
    if project.config.kubernetes.hpa.enabled:
        files["hpa.yaml"] = _yaml(project, hpa(project))
    files |= {
        "inferenceservice.yaml": _yaml(project, inference_service(project, env),
                                       "KServe: apply this OR deployment/service/hpa.yaml, "
                                       "not both."),
        "cronjob.yaml": _yaml(project, cronjob(project, env)),
    }
    if project.config.kubernetes.ui.enabled:
        files |= {"ui-deployment.yaml": _yaml(project, ui_deployment(project, env)),
                  "ui-service.yaml": _yaml(project, ui_service(project))}
    files |= {
        "servicemonitor.yaml": _yaml(project, service_monitor(project),
                                     "Needs the prometheus-operator CRDs."),
        "prometheusrule.yaml": _yaml(project, prometheus_rule(project),
                                     "Same rules as `mloop monitor rules`."),
        "Dockerfile": dockerfile(project),
        "Dockerfile.dockerignore": DOCKERIGNORE,
    }
    return files


def k8s_notes(project: Project, out: Path) -> dict[str, Any]:
    """What to do before applying: the Secret to create, shared stores, tokens, the build."""
    _, keys = _store_env(project)
    warnings: list[str] = []
    stores = project.config.stores.model_dump()
    local = [k for k in STORE_ENV_VARS if stores.get(k) is not None and _is_local(stores[k])]
    if local:
        warnings.append(f"local to each pod, so not shared by the servers and the loop CronJob: "
                        f"{', '.join('stores.' + k for k in local)}; point them at shared "
                        f"stores (postgresql://, s3://, gs://...) before applying")
    if source_checkout(project.root) is None:
        warnings.append("the project is not inside an mloop source checkout: build the image "
                        "from one, with the project copied to PROJECT_DIR")
    notes: list[str] = []
    if keys:
        literals = " ".join(f"--from-literal={k}=..." for k in keys)
        ns = f" -n {project.config.kubernetes.namespace}" if project.config.kubernetes.namespace \
            else ""
        notes.append(f"create the Secret first: kubectl create secret generic "
                     f"{secret_name(project)}{ns} {literals}")
    if project.config.serving.auth is not False:
        notes.append("the server requires bearer tokens off loopback: run `mloop tokens create "
                     "--role predict` against the shared store before the pods start "
                     "(or set serving.auth: false)")
    if project.config.kubernetes.ui.enabled:
        ui = f"{app_name(project)}-ui"
        login = ("it needs a login and does not start until a token exists in the shared "
                 "store: `mloop tokens create --role viewer` (admin to act); "
                 if project.config.serving.auth is not False else "")
        notes.append(f"the dashboard ({ui}) is cluster-internal: {login}open it with "
                     f"`kubectl port-forward svc/{ui} 8050:80`, or set kubernetes.ui.enabled: "
                     f"false to leave it out")
    return {"warnings": warnings, "notes": notes, "secret": secret_name(project) if keys else None,
            "secret_keys": keys, "image": image_name(project),
            "build": build_command(project, out)}


# ---------------------------------------------------------------------------- write

def write_k8s(project: Project, out: Path) -> list[Path]:
    """Write the export into ``out`` (new, empty, or a previous k8s export: only its files are
    replaced, see :mod:`mloop.export.files`); return the files written."""
    files = k8s_manifests(project)  # rendered whole before anything is touched
    return write_export(out, files, generator="mloop export k8s",
                        project=project.config.project)
