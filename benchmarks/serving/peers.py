"""The peers bench_serving.py runs beside mloop compiled, and the ratios that separate them.

* mloop with ``serving.compile.enabled: false``: the same registered version served by the same
  server, on the original scikit-learn pipeline (what MLflow and MLServer run). A second project
  folder holds only a changed ``mloop.yaml`` (everything else of the project is linked in) and
  reads the first project's stores through mloop's ``MLOOP_*_URI`` overrides, so nothing is
  retrained or copied; its inference log and outputs go to folders of its own.
* MLServer 1.7.1 with its MLflow runtime (``mlserver_mlflow.MLflowRuntime``) and adaptive
  batching, in a virtualenv of its own (``setup_mlserver.sh``), serving the registered
  version's MLflow model folder over its V2 (Open Inference) protocol.

``separated_ratios`` is the arithmetic the report prints: the server effect compares two servers
running the same scikit-learn engine (mloop with compile off vs MLServer), the compile effect the
same server with and without the verified ONNX path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

HERE = Path(__file__).resolve().parent
SETUP_MLSERVER = HERE / "setup_mlserver.sh"
MLSERVER_VERSION = "1.7.1"
# adaptive batching as the issue names it: up to 64 requests, waiting at most 2 ms for company
MLSERVER_MAX_BATCH_SIZE = 64
MLSERVER_MAX_BATCH_TIME_S = 0.002
# MLServer's default: the HTTP process hands each (batched) request to ONE inference worker
# process; 0 would run inference on the HTTP process's event loop
MLSERVER_PARALLEL_WORKERS = 1

# mloop signature types (MLflow ColSpec types) -> V2 tensor datatypes
V2_DATATYPES = {"double": "FP64", "float": "FP32", "long": "INT64", "integer": "INT32",
                "boolean": "BOOL", "string": "BYTES"}

# the stores the compile-off project shares with the trained one (read: the registry, the
# artifacts, the deployment state); its inference log and outputs stay its own
SHARED_STORES = {"tracking_uri": "MLOOP_TRACKING_URI", "registry_uri": "MLOOP_REGISTRY_URI",
                 "artifact_root": "MLOOP_ARTIFACT_ROOT", "store_uri": "MLOOP_STORE_URI",
                 "data_uri": "MLOOP_DATA_URI"}


class PeerSetupError(RuntimeError):
    """A peer could not be prepared; the benchmark reports it and measures the others."""


# ----------------------------------------------------------------------- V2 protocol

def v2_infer_request(row: dict[str, Any], signature: list[dict[str, Any]]) -> dict[str, Any]:
    """One row as a V2 inference request: one ``[1, 1]`` tensor per signature column, in
    signature order, typed as the column's MLflow type (strings as BYTES with the ``str``
    content type, which MLServer's pandas codec decodes to a string column)."""
    inputs = []
    for col in signature:
        name, kind = col["name"], col["type"]
        if kind not in V2_DATATYPES:
            raise ValueError(f"signature column '{name}' has type '{kind}', which has no V2 "
                             f"datatype here (known: {', '.join(sorted(V2_DATATYPES))})")
        if name not in row:
            raise ValueError(f"the request row has no value for signature column '{name}'")
        tensor: dict[str, Any] = {"name": name, "shape": [1, 1],
                                  "datatype": V2_DATATYPES[kind], "data": [row[name]]}
        if kind == "string":
            tensor["parameters"] = {"content_type": "str"}
        inputs.append(tensor)
    return {"inputs": inputs}


def v2_first_prediction(body: dict[str, Any]) -> Any:
    """The first value of the first output tensor of a V2 inference response."""
    outputs = body.get("outputs") or []
    if not outputs or not outputs[0].get("data"):
        raise ValueError(f"V2 response without output data: {json.dumps(body)[:300]}")
    return outputs[0]["data"][0]


# ------------------------------------------------------------------- ratios

def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def separated_ratios(cell: dict[str, dict[str, Any] | None], *,
                     batched_floor_served: float | None = None,
                     batched_floor_original: float | None = None) -> dict[str, float | None]:
    """The ratios of one concurrency level. ``cell`` maps a server name (``mloop``,
    ``mloop_nocompile``, ``mlserver``, ``mlflow``, ``bare``) to its aggregated run
    (``rps``, ``p50_ms``, ``p99_ms``) or None when it did not run; a ratio whose sides did not
    both run is None.

    server effect  = mloop (compile off) / MLServer: two servers, one scikit-learn engine
    compile effect = mloop compiled / mloop (compile off): one server, two engines
    workers scaling = mloop compiled with ``--workers 2`` (``mloop_w2``) / with one; the bare
                      floor's (``bare_w2`` / ``bare``) beside it: the machine's ceiling
    For latencies (``*_p99``) below 1 is better; for req/s above 1.
    """
    def g(name: str, key: str) -> float | None:
        r = cell.get(name)
        return None if r is None else r.get(key)

    return {
        "server_effect_rps": _ratio(g("mloop_nocompile", "rps"), g("mlserver", "rps")),
        "server_effect_p99": _ratio(g("mloop_nocompile", "p99_ms"), g("mlserver", "p99_ms")),
        "compile_effect_rps": _ratio(g("mloop", "rps"), g("mloop_nocompile", "rps")),
        "compile_effect_p99": _ratio(g("mloop", "p99_ms"), g("mloop_nocompile", "p99_ms")),
        "mloop_vs_mlserver_rps": _ratio(g("mloop", "rps"), g("mlserver", "rps")),
        "mloop_vs_mlflow_rps": _ratio(g("mloop", "rps"), g("mlflow", "rps")),
        "mloop_vs_mlflow_p99": _ratio(g("mloop", "p99_ms"), g("mlflow", "p99_ms")),
        "mloop_vs_mlflow_p50": _ratio(g("mloop", "p50_ms"), g("mlflow", "p50_ms")),
        "mloop_vs_bare": _ratio(g("mloop", "rps"), g("bare", "rps")),
        "workers_scaling_rps": _ratio(g("mloop_w2", "rps"), g("mloop", "rps")),
        # the same for the bare floor: what two uvicorn processes allow on this machine at all
        "bare_workers_scaling_rps": _ratio(g("bare_w2", "rps"), g("bare", "rps")),
        "mloop_vs_batched_floor": _ratio(g("mloop", "rps"), batched_floor_served),
        "nocompile_vs_batched_floor": _ratio(g("mloop_nocompile", "rps"),
                                             batched_floor_original),
    }


# ------------------------------------------------- mloop with serving.compile off

def nocompile_project(project_root: Path, uris: dict[str, str], dest: Path
                      ) -> tuple[Path, dict[str, str]]:
    """A project folder ``dest`` whose ``mloop.yaml`` is the trained project's with
    ``serving.compile.enabled: false``, and the environment that points it at the trained
    project's registry, artifacts and mloop store (so it serves the same champion without
    retraining). The project's other files (data, code a pipeline imports) are symlinked."""
    config_path = project_root / "mloop.yaml"
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PeerSetupError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise PeerSetupError(f"{config_path} is not a mapping")
    serving = config.setdefault("serving", {}) or {}
    config["serving"] = serving
    compile_cfg = serving.get("compile") or {}
    compile_cfg["enabled"] = False
    serving["compile"] = compile_cfg
    dest.mkdir(parents=True)
    (dest / "mloop.yaml").write_text(
        "# bench_serving.py: the trained project's config with serving.compile.enabled: false\n"
        + yaml.safe_dump(config, sort_keys=False))
    for entry in project_root.iterdir():
        if entry.name not in ("mloop.yaml", ".mloop"):
            (dest / entry.name).symlink_to(entry)
    env = {var: uris[key] for key, var in SHARED_STORES.items() if key in uris}
    env["MLOOP_INFERENCE_LOG_URI"] = str(dest / ".mloop" / "inference")
    env["MLOOP_OUTPUTS_URI"] = str(dest / ".mloop" / "outputs")
    return dest, env


# ------------------------------------------------------------------ MLServer

def ensure_mlserver_venv(venv: Path, log: Path) -> Path:
    """``venv``'s ``mlserver``, created or checked by setup_mlserver.sh (a no-op when the
    venv already holds its pins). Raises PeerSetupError with the script's output tail."""
    with open(log, "w") as out:
        try:
            done = subprocess.run(["bash", str(SETUP_MLSERVER), str(venv)], stdout=subprocess.PIPE,
                                  stderr=out, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerSetupError(f"{SETUP_MLSERVER.name} {venv}: {exc}") from exc
    if done.returncode != 0:
        tail = "\n".join(line for line in log.read_text(errors="replace").splitlines()
                         if not line.startswith("WARNING: Location"))[-3000:]
        raise PeerSetupError(f"{SETUP_MLSERVER.name} {venv} exited {done.returncode}:\n{tail}")
    return Path(done.stdout.strip().splitlines()[-1])


def venv_versions(python: Path, dists: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``dists`` in another interpreter's environment."""
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor d in sys.argv[1:]:\n"
            "    try:\n        out[d] = m.version(d)\n    except m.PackageNotFoundError:\n"
            "        pass\nout['python'] = sys.version.split()[0]\nprint(json.dumps(out))")
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        done = subprocess.run([str(python), "-c", code, *dists], capture_output=True, text=True,
                              timeout=60)
        if done.returncode == 0:
            return dict(json.loads(done.stdout))
    return {}


def model_version_row(registry_uri: str, model: str, version: int) -> dict[str, Any] | None:
    """The registered version's storage location and tags, read from MLflow's SQLite registry
    without importing mlflow; None for another kind of registry."""
    if not registry_uri.startswith("sqlite:///"):
        return None
    path = registry_uri[len("sqlite:///"):]
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT source, storage_location, run_id FROM model_versions "
                         "WHERE name = ? AND version = ?", (model, version)).fetchone()
        if row is None:
            return None
        tags = dict(db.execute("SELECT key, value FROM model_version_tags "
                               "WHERE name = ? AND version = ?", (model, version)).fetchall())
    return {"source": row[0], "storage_location": row[1], "run_id": row[2], "tags": tags}


def mlflow_model_dir(mv: dict[str, Any] | None, *, model: str, version: int, dest: Path,
                     mlflow_bin: str, env: dict[str, str]) -> tuple[Path, str]:
    """A local folder holding the version's MLflow model (its ``MLmodel`` file): the artifact
    folder on disk when the store is local, else a download through ``mlflow artifacts
    download``. Returns the folder and how it was found."""
    location = (mv or {}).get("storage_location") or ""
    parsed = urlparse(location)
    if parsed.scheme in ("", "file") and location:
        local = Path(unquote(parsed.path))
        if (local / "MLmodel").is_file():
            return local, f"artifact folder on disk ({location})"
    dest.mkdir(parents=True, exist_ok=True)
    uri = f"models:/{model}/{version}"
    done = subprocess.run([mlflow_bin, "artifacts", "download", "-u", uri, "-d", str(dest)],
                          capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise PeerSetupError(f"`mlflow artifacts download -u {uri}` failed: "
                             f"{(done.stderr or done.stdout)[-2000:]}")
    found = [p.parent for p in dest.rglob("MLmodel")]
    if not found:
        raise PeerSetupError(f"downloaded {uri} to {dest} but found no MLmodel file in it")
    return found[0], f"downloaded from {uri}"


def write_mlserver_repo(root: Path, *, model: str, model_dir: Path, http_port: int,
                        grpc_port: int, metrics_port: int) -> dict[str, Any]:
    """MLServer's model repository: ``settings.json`` (ports on 127.0.0.1, debug off, one
    inference worker) and ``MODEL/model-settings.json`` (the MLflow runtime, adaptive
    batching). Returns both documents, for the results file."""
    settings = {"host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
                "metrics_port": metrics_port, "debug": False,
                "parallel_workers": MLSERVER_PARALLEL_WORKERS,
                "metrics_dir": str(root / ".metrics"), "environments_dir": str(root / ".envs")}
    model_settings = {"name": model, "implementation": "mlserver_mlflow.MLflowRuntime",
                      "max_batch_size": MLSERVER_MAX_BATCH_SIZE,
                      "max_batch_time": MLSERVER_MAX_BATCH_TIME_S,
                      "parameters": {"uri": str(model_dir)}}
    (root / model).mkdir(parents=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    (root / model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return {"settings.json": settings, "model-settings.json": model_settings}


# ------------------------------------------------------------------- data version

def file_digests(path: Path, root: Path) -> dict[str, str]:
    """sha256 of the data file, or of each Parquet/CSV file under a data folder, keyed by the
    path relative to ``root`` (the project folder) when it lies inside it."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in (".parquet", ".csv") and p.is_file())
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[str(f.relative_to(root)) if f.is_relative_to(root) else str(f)] = h.hexdigest()
    return out
