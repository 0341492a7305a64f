"""Names several test modules share, imported as ``from .helpers import ...`` (as scikit-learn's
tests import theirs from one common module): the repository's paths, the real ``mloop``
command, a small rentals table and its config, trained projects built once per module (or
session) and copied for a test that changes them, traffic written to the inference log, and
what the orchestrator exports compare.

conftest.py holds the fixtures and imports from here; no test module imports conftest.py or
another test module (tests/test_architecture.py checks it). Nothing of mloop is imported at
module level: conftest.py imports this module, and mloop must not be imported before it has
cleared ``COLUMNS``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
BIKE = REPO / "examples" / "bike_sharing"


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `mloop` console script in a fresh process."""
    exe = Path(sys.executable).parent / "mloop"
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mloop {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# ------------------------------------------------------------ optional parts: skip or fail

def in_ci() -> bool:
    """CI sets ``CI=true`` (.ci/run exports it, as GitHub Actions and GitLab CI do)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> NoReturn:
    """An optional part a test needs is absent: skip on a developer's machine, fail under CI,
    which installs every extra and tool (requirements.lock, scripts/test_setup.sh), so a
    skipped test there would hide a broken install behind a green run. ``message`` says how to
    install it. Call it in a test or a fixture (an autouse one for a whole module), not at
    module level: there a failure is a collection error, which stops the whole run."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing optional part fails the run)",
                    pytrace=False)
    pytest.skip(message)


def require(module: str, *, install: str) -> ModuleType:
    """``module`` imported, or :func:`missing` with ``install`` (the command that installs
    it): ``pytest.importorskip`` that fails under CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = str(exc)
    missing(f"{module} is not installed ({why}): {install}")  # outside `except`: no chained trace


# ------------------------------------------------------------------- a small rentals table

def rentals_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A small bike-like table: hourly rentals driven by hour, weather and temperature."""
    rng = np.random.default_rng(seed)
    hours = np.arange(n) % 24
    weather = rng.choice(["Clear", "Mist", "Rain"], size=n, p=[0.6, 0.3, 0.1])
    temp = rng.normal(15, 8, size=n).round(2)
    base = 20 + 15 * np.sin((hours - 6) / 24 * 2 * np.pi).clip(0) * 10
    effect = np.where(weather == "Rain", -30, np.where(weather == "Mist", -10, 0))
    cnt = np.maximum(0, base + 2.5 * temp + effect + rng.normal(0, 8, size=n)).round().astype(int)
    return pd.DataFrame({
        "ts": pd.date_range("2024-01-01", periods=n, freq="h"),
        "hour": hours.astype(int),
        "weather": weather,
        "temp": temp,
        "cnt": cnt,
    })


SMALL_CONFIG = """\
project: rentals
data:
  path: data/rentals.parquet
target: cnt
features:
  time_column: ts
split:
  holdout: 0.25
model:
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
  params: {max_iter: 30, random_state: 0}
metrics: [mae, rmse]
validation:
  min_rows: 100
  columns:
    temp: {type: numeric, min: -40, max: 60}
    weather: {allowed: [Clear, Mist, Rain]}
"""


# ---------------------------------------------------------------------- trained projects

def train_champion(root: Path, config: str, frame: pd.DataFrame) -> Path:
    """A project at ``root`` (mloop.yaml + data/rentals.parquet), its pipeline run once and
    version 1 made champion; returns ``root``."""
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project
    from mloop.registry.promotion import change_alias

    (root / "data").mkdir(parents=True)
    (root / "mloop.yaml").write_text(config)
    frame.to_parquet(root / "data" / "rentals.parquet", index=False)
    if run_pipeline(open_project(root)).status != "succeeded":
        raise AssertionError(f"the pipeline of {root} did not succeed")
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


def copy_project(trained: Path, tmp_path: Path) -> Path:
    """A private copy of a module's trained project, under the same folder name (its own
    stores; MLflow's artifact paths are absolute, so artifacts stay the trained one's)."""
    root = tmp_path / trained.name
    shutil.copytree(trained, root)
    return root


# A random forest on rentals_frame: PARAMS, GATES and EXCLUDE are filled by
# write_forest_config.
FOREST_CONFIG = """\
project: rentals
data: {path: data/rentals.parquet}
target: cnt
features:
  time_column: ts
  exclude: EXCLUDE
split: {holdout: 0.3}
model:
  estimator: sklearn.ensemble.RandomForestRegressor
  params: PARAMS
metrics: [mae, rmse]
GATES
"""

GOOD = "{n_estimators: 40, min_samples_leaf: 3, random_state: 0}"
RESEED = "{n_estimators: 40, min_samples_leaf: 3, random_state: 1}"
WORSE = "{n_estimators: 5, max_depth: 1, random_state: 0}"


def write_forest_config(root: Path, *, params: str, gates: str = "",
                        exclude: str = "[]") -> None:
    (root / "mloop.yaml").write_text(FOREST_CONFIG.replace("PARAMS", params)
                                     .replace("GATES", gates).replace("EXCLUDE", exclude))


def train_forest(root: Path, params: str, exclude: str = "[]") -> int:
    """Run the pipeline of ``root`` with these forest parameters; returns the registered
    version."""
    from mloop.pipeline.artifacts import load_output
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project

    write_forest_config(root, params=params, exclude=exclude)
    result = run_pipeline(open_project(root))
    reg = next(s for s in result.steps if s.step == "register")
    project = open_project(root)
    return load_output(reg.outputs["output"], project.outputs, project.snapshots)["version"]


def register_pyfunc(root: Path, model: Any) -> int:
    """Register ``model`` (an mlflow.pyfunc.PythonModel) as the next version of the project's
    model, with version 1's signature; returns its version."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import get_model_info

    from mloop.project import open_project

    project = open_project(root)
    client = project.mlflow
    name = project.config.model_name
    sig = get_model_info(f"models:/{name}/1").signature
    example = rentals_frame(5)[["hour", "weather", "temp"]].astype({"hour": "float64"})
    with mlflow.start_run(experiment_id=project.experiment_id) as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=model, signature=sig,
                                       input_example=example, pip_requirements=["mlflow"])
    mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id,
                                     model_id=info.model_id, tags={"mloop.task": "regression"})
    return int(mv.version)


def build_serving_registry(root: Path) -> Path:
    """The project the serving, monitoring and loop tests start from, at ``root``: v1
    champion (random forest), v2 reseeded, v3 crashes on traffic, v4 fails to load."""
    from mloop.project import open_project
    from mloop.registry.promotion import change_alias

    from .serving_models import CrashOnTraffic, FailsToLoad

    (root / "data").mkdir(parents=True)
    rentals_frame(800).to_parquet(root / "data" / "rentals.parquet", index=False)
    assert [train_forest(root, GOOD), train_forest(root, RESEED)] == [1, 2]
    assert register_pyfunc(root, CrashOnTraffic()) == 3
    assert register_pyfunc(root, FailsToLoad()) == 4
    write_forest_config(root, params=GOOD)
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


# ------------------------------------------------------------------------------- traffic

def log_traffic(project: Any, frame: pd.DataFrame, day: str, version: int = 1,
                role: str = "champion", *, probabilities: bool = False) -> list[str]:
    """Rows answered by ``version`` on ``day`` (spread over the day), through the same writer
    the server uses; returns their request ids. ``probabilities``: a classifier's rows keep
    the class probabilities its client got, as the server logs them."""
    from mloop.serving.model import load_served
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    model = load_served(project, version)
    cols = {c: frame[c].tolist() for c in ("hour", "weather", "temp")}
    preds = model.predict_columns(cols)
    proba = None
    if probabilities:
        labels, scores = model.score_arrays(cols)
        preds, proba = labels.tolist(), scores
    start = pd.Timestamp(day, tz="UTC").timestamp()
    log = InferenceLog(project.uris["inference_log_uri"], commit_interval=3600)
    ids = []
    for i in range(len(frame)):
        ts = start + i * 86_000 / len(frame)
        rid = new_request_id(ts)
        ids.append(rid)
        log.append(LogEntry([rid], ts, version, role, 1.0, [preds[i]],
                            {c: [v[i]] for c, v in cols.items()}, None,
                            None if proba is None else [proba[i].tolist()],
                            None if proba is None else model.classes))
    log.close()
    return ids


def heat_wave(n: int, seed: int) -> pd.DataFrame:
    """A heat wave: temperatures up 15 degrees, and rentals with them (the same relation the
    training data follows: 2.5 rentals per degree)."""
    frame = rentals_frame(n, seed=seed)
    frame["temp"] = frame["temp"] + 15
    frame["cnt"] = frame["cnt"] + 37
    return frame


def label_rows(project: Any, ids: list[str], frame: pd.DataFrame) -> None:
    """The true ``cnt`` of ``frame`` as the labels of requests ``ids``."""
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    store_labels(ObjectStore(project.uris["inference_log_uri"]),
                 dict(zip(ids, frame["cnt"].astype(float), strict=True)), task="regression",
                 source="test")


# ------------------------------------------------------------------ orchestrator exports

MLOOP_BIN = str(Path(sys.executable).parent / "mloop")
STEPS = ["ingest", "validate", "snapshot", "split", "train", "evaluate", "register"]


def copy_bike(root: Path, extra: str = "") -> Path:
    """The bike-sharing example copied to ``root`` (without its .mloop stores), ``extra``
    appended to its mloop.yaml."""
    shutil.copytree(BIKE, root, ignore=shutil.ignore_patterns(".mloop"))
    if extra:
        cfg = root / "mloop.yaml"
        cfg.write_text(cfg.read_text() + textwrap.dedent(extra))
    return root


FLIGHTS = REPO / "examples" / "flights" / "data" / "flights.parquet"


def copy_flights_feast(root: Path) -> Path:
    """examples/flights_feast copied to ``root`` (without its stores), its entity table read
    from the flights example where it lies: a project with ``features.store: feast``."""
    shutil.copytree(REPO / "examples" / "flights_feast", root,
                    ignore=shutil.ignore_patterns(".mloop", "__pycache__"))
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace("../flights/data/flights.parquet", str(FLIGHTS)))
    return root


def require_feast() -> None:
    """Feast (the ``feast`` extra): failing in CI when it is missing, skipping elsewhere."""
    from mloop.errors import MissingExtraError
    from mloop.features.repo import import_feast

    try:
        import_feast()
    except MissingExtraError as exc:
        missing(f"{exc}: pip install 'mloop[feast]'")


def train_flights_feast(root: Path, *, exclude: str = "[flight, tailnum, month, day]") -> Path:
    """The flights_feast example at ``root`` trained on Jan 2-4 (Feast's file offline store is
    slow on more), its version 1 made champion."""
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project
    from mloop.registry.promotion import change_alias

    require_feast()
    copy_flights_feast(root)
    config = (root / "mloop.yaml").read_text()
    config = config.replace('until: "2013-01-16"', 'until: "2013-01-05"') \
        .replace("exclude: [flight, tailnum, month, day]", f"exclude: {exclude}")
    (root / "mloop.yaml").write_text(config)
    project = open_project(root)
    assert run_pipeline(project).status == "succeeded"
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


def append_config(root: Path, extra: str) -> Path:
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text() + textwrap.dedent(extra))
    return root


def stop_process_group(proc: subprocess.Popen[Any], grace: float = 20) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``), then
    SIGKILL it if it has not exited within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_process_group(args: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
    """Run a command in its own process group, output to ``log``; stop the group by its PID
    on a timeout (Airflow's task processes included)."""
    with log.open("w") as fh:
        proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            raise AssertionError(f"{' '.join(args)}: no result in {timeout} s; "
                                 f"see {log}") from None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def lineage_of(root: Path) -> dict[str, Any]:
    """`mloop models lineage 1 --json`, computed in this process (a CLI start costs ~8 s)."""
    from mloop.project import open_project
    from mloop.registry.lineage import lineage

    return json.loads(json.dumps(lineage(open_project(root), 1), default=str))


def comparable_lineage(lin: dict[str, Any], *, code_stable: bool) -> dict[str, Any]:
    """What must match between two runs of one pipeline on one data set and configuration:
    everything but ids, timestamps and where things were stored. The register step's output
    is the registry's record (run and model ids); its name and version are compared."""
    data = {role: {k: v for k, v in (snap or {}).items() if k != "created_at"}
            for role, snap in lin["data"].items()}
    run = lin["pipeline_run"]
    keys = ("step", "cache_hit", "outputs", "params", *(("cache_key",) if code_stable else ()))
    steps = [{k: s[k] for k in keys} for s in run["steps"]]
    for s in steps:
        if s["step"] == "register":
            del s["outputs"]
    return {"model": lin["model"], "version": lin["version"], "metrics": lin["metrics"],
            "code": lin["code"], "config_hash": lin["config_hash"], "data": data,
            "pipeline": run["pipeline"], "status": run["status"],
            "run_config_hash": run["config_hash"], "steps": steps}


@contextlib.contextmanager
def mloop_run_meanwhile(root: Path, log: Path) -> Iterator[subprocess.Popen[Any]]:
    """`mloop run --json` on ``root`` in a process group of its own while the block runs (an
    orchestrator runs a copy meanwhile), its output to ``log``; killed if it is still running
    when the block ends."""
    with log.open("w") as fh:
        proc = subprocess.Popen([MLOOP_BIN, "-C", str(root), "run", "--json"], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def check_one_run_each_step_once(root: Path) -> str:
    """mloop's record of an orchestrated run of ``root``: one pipeline run, succeeded, every
    step run once (no cache hit), each in an MLflow run of its own. Returns its id."""
    from mloop.project import open_project
    from mloop.status import list_runs, show_run

    project = open_project(root)
    runs = list_runs(project)
    assert [(r["status"], r["steps_total"], r["cache_hits"]) for r in runs] == [
        ("succeeded", 7, 0)]
    shown = show_run(project, runs[0]["run_id"])
    assert [(s["step"], s["status"], s["attempts"]) for s in shown["steps"]] == [
        (s, "succeeded", 1) for s in STEPS]
    assert len({s["mlflow_run_id"] for s in shown["steps"]}) == len(STEPS)
    return str(runs[0]["run_id"])


def check_same_lineage_as_mloop_run(orchestrated: Path, local: Path, run_id: str, *,
                                    code_stable: bool) -> None:
    """The version the orchestrated run ``run_id`` registered has the lineage of the one
    `mloop run` registered in ``local``, and was gated and promoted as it was."""
    mine, theirs = lineage_of(orchestrated), lineage_of(local)
    assert mine["pipeline_run"]["run_id"] == run_id
    assert comparable_lineage(mine, code_stable=code_stable) == comparable_lineage(theirs,
                                                                     code_stable=code_stable)
    assert [s["step"] for s in mine["pipeline_run"]["steps"]] == STEPS
    # the bike model passes every gate (latency is CPU time per call, so a busy machine does
    # not fail it), and auto_promote makes the gate task promote it, as `mloop run` does
    assert mine["gates"] == theirs["gates"] == "passed"
    assert mine["aliases"] == theirs["aliases"] == ["champion"]


def clashing_pipeline(left: str) -> str:
    """pipeline.py of a custom pipeline ``custom`` whose steps take the names an export gives
    its own tasks (create_run; gate, with retries=3), one branch's step named ``left``,
    joined with the other."""
    return f"""\
        from mloop import pipeline, step

        @step
        def create_run():
            return 1

        @step(retries=3)
        def gate(x):
            return x + 1

        @step
        def {left}(x):
            return x

        @step
        def join(a, b):
            return a + b

        @pipeline(name="custom")
        def custom(cfg):
            first = create_run()
            join(gate(first), {left}(first))
        """


# a custom train step whose first attempt fails as a flaky dependency would (the pipeline's
# retries, or an orchestrator's, recover it); it counts its attempts in attempts.txt
FLAKY_TRAIN = """\
from pathlib import Path
from mloop.tabular.steps import train as builtin_train

COUNTER = Path(__file__).with_name("attempts.txt")

def train(ctx, data, target, task, features, model):
    n = int(COUNTER.read_text()) if COUNTER.exists() else 0
    COUNTER.write_text(str(n + 1))
    if n == 0:
        raise ConnectionError("feature store timed out")
    return builtin_train.fn(ctx, data, target, task, features, model)
"""


def self_signed_cert(folder: Path, name: str = "tls") -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 and its unencrypted key, written as PEM
    files ``NAME.crt`` and ``NAME.key`` in ``folder``: real HTTPS on loopback, the certificate
    the client's CA bundle (``requests.get(..., verify=cert)``)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def busy_config(*, params: str, metrics: str, extra: str = "") -> str:
    """mloop.yaml of a binary classifier of rentals_frame: is an hour "busy" (the frame's
    ``busy`` column, which the caller derives from ``cnt``, excluded as a feature)."""
    return ("project: busy\ndata: {path: data/rentals.parquet}\ntarget: busy\n"
            "task: classification\nfeatures:\n  time_column: ts\n  exclude: [cnt]\n"
            "split: {method: time, holdout: 0.25}\nmodel:\n"
            "  estimator: sklearn.linear_model.LogisticRegression\n"
            f"  params: {params}\nmetrics: {metrics}\n{extra}")


def model_on(root: Path, frame: pd.DataFrame, version: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """A version's own labels and probabilities on ``frame`` (already complete), from its
    raw model: what a feature-store path must reproduce."""
    from mloop.project import open_project
    from mloop.registry.candidates import load_pyfunc

    _, pyfunc = load_pyfunc(open_project(root), version)
    schema = pyfunc.metadata.get_input_schema()
    x = frame[schema.input_names()].copy()
    for col in schema.inputs:
        if col.type.name == "double":
            x[col.name] = x[col.name].astype("float64")
    raw = pyfunc.get_raw_model()
    return raw.predict(x), raw.predict_proba(x)
