"""``mloop tune``: an Optuna study over the estimator's parameters, on mloop's stores.

What runs where:

* The pipeline's data steps (everything upstream of ``train``: ingest → validate → snapshot →
  split) run once, as a pipeline run named ``tune`` whose MLflow run is the study's parent run.
  They hit the same step cache as ``mloop run``, so a later pipeline run reuses them.
* Trials never see the holdout. Each fits the project's model (``tabular/model.py``) on an
  inner split of the *training* snapshot and scores on the rest of it (``tune.validation``,
  by default the share ``split.holdout``; the last rows in time when the split is by time).
  Choosing on the holdout and then gating on that same holdout would make the chosen
  candidate look better than it is; here the holdout stays unseen until the chosen candidate
  is evaluated and gated. Preprocessing is not tuned: it is fitted once per worker and each
  trial fits only the estimator, with ``tune.threads`` BLAS/OpenMP threads (default 1:
  parallelism comes from workers; on a busy machine OpenMP threads slow small fits badly).
* A new study's trial 0 is the configured parameters (where they lie in the search space),
  so the study shows what tuning gained over the configuration.
* A trial that raises is recorded as failed and does not count; three in a row stop the
  worker with the last error.
* Pruning: an estimator that can train in stages (scikit-learn's HistGradientBoosting with
  ``warm_start`` and growing ``max_iter``; GradientBoosting, RandomForest and ExtraTrees with
  growing ``n_estimators``) reports the validation metric at 10, 20, 40, ... iterations and is
  stopped when the median pruner says so. Any other estimator is fitted once: no pruning.
* Every trial is a nested MLflow run under the study's parent run (params, the metric per
  stage, duration, ``mloop.tune.state`` complete/pruned/failed).
* The study lives in mloop's store database: on PostgreSQL in the same database, schema
  ``optuna`` (Optuna keeps its own Alembic version table, which must not meet mloop's); on
  SQLite in a file beside the store (``mloop-optuna.db``). Its name derives from the project,
  the configuration hash, the training snapshot, the metric and the search space, so running
  ``mloop tune`` again resumes the same study (``--trials`` is the study's total).
* ``--workers K`` starts K-1 more processes (``mloop tune --join STUDY``; on other machines
  with the same stores, start them by hand). Trials are created under a lock shared through
  the study's database (a PostgreSQL advisory lock, a file lock for SQLite), and only while
  the study has fewer than N trials complete, pruned, running or waiting: N trials in all,
  none numbered twice. Optuna's heartbeat fails the running trial of a worker that died, so
  another worker replaces it.
* The best trial's parameters then go through one ordinary pipeline run (``model.params``
  overridden, the effective mloop.yaml logged with it), so the candidate has full lineage, is
  tagged with the study and trial, and is gated like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import optuna
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
import yaml
from optuna.storages import RDBStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from mloop.config import CONFIG_FILE, ModelConfig, SearchParam
from mloop.errors import ConfigError, MloopError, PipelineDefinitionError
from mloop.memory import PeakMemory
from mloop.metrics import DEFAULTS, HIGHER_IS_BETTER, compute_metrics, metrics_for
from mloop.pipeline.artifacts import load_output
from mloop.pipeline.dsl import Graph
from mloop.pipeline.runner import (
    EventHook,
    build_graph,
    execute_step,
    finish_pipeline_run,
    start_pipeline_run,
)
from mloop.pipeline.usage import Usage, gb_hours
from mloop.project import Project
from mloop.registry.training import train_candidate
from mloop.tabular import steps as builtin_steps
from mloop.tabular.model import (
    DEFAULT_ESTIMATORS,
    build_model,
    features_frame,
    make_estimator,
    resolve_spec,
)
from mloop.tracking import log_params, redact

Progress = Callable[[str, dict[str, Any]], None]
Direction = Literal["minimize", "maximize"]

# Trials that count towards the study's total: done, or about to be.
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_SECONDS = 10  # a running trial's worker writes this often...
GRACE_SECONDS = 60  # ...and its trial fails after this long without it
_LOCK_CLASS = 0x6D6C6F70  # first key of the PostgreSQL advisory lock ("mlop")
_SCHEMA = "optuna"
_STAGES = (10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120)
_WARMUP_STEPS = 40  # no pruning before this many iterations: early curves mislead
_READY_TIMEOUT_SECONDS = 180.0
_MAX_FAILURES_IN_A_ROW = 3


class StudyFull(Exception):
    """The study has its N trials (done or running): this worker starts no more."""


# ---------------------------------------------------------------------------- study storage

def storage_target(project: Project) -> tuple[str, dict[str, Any]]:
    """The study storage URL and engine arguments for this project's store database."""
    url = sa.engine.make_url(project.uris["store_uri"])
    backend = url.get_backend_name()
    if backend == "sqlite":
        db = url.database
        if not db or db == ":memory:":
            raise MloopError("`mloop tune` keeps its study beside mloop's store, which is an "
                             "in-memory SQLite database here; use a file or PostgreSQL")
        path = Path(db)
        study_db = path.with_name(f"{path.stem}-optuna{path.suffix or '.db'}")
        study_db.parent.mkdir(parents=True, exist_ok=True)
        return (url.set(database=str(study_db)).render_as_string(hide_password=False),
                {"connect_args": {"timeout": 60}})
    if backend == "postgresql":
        _ensure_schema(project)
        return (url.render_as_string(hide_password=False),
                {"connect_args": {"options": f"-c search_path={_SCHEMA}"},
                 "pool_pre_ping": True})
    raise MloopError(f"`mloop tune` keeps its study in mloop's store database, which must be "
                     f"SQLite or PostgreSQL (store_uri is {backend})")


def _ensure_schema(project: Project) -> None:
    engine = project.store.engine
    with engine.connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM information_schema.schemata WHERE "
                                "schema_name = :s"), {"s": _SCHEMA}).first():
            return
    with contextlib.suppress(sa.exc.IntegrityError, sa.exc.ProgrammingError), \
            engine.begin() as conn:  # two workers may race to create it: either wins
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {_SCHEMA}"))


class BudgetStorage(RDBStorage):
    """Optuna's RDB storage that creates a trial only while the study has fewer than
    ``budget`` trials complete, pruned, running or waiting, deciding under a lock that every
    worker of the study shares. So K processes run N trials in all, never N + K - 1, and
    Optuna's trial numbers (a count taken at insert time) stay unique under concurrency."""

    def __init__(self, url: str, engine_kwargs: dict[str, Any]) -> None:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna
            warnings.simplefilter("ignore")
            super().__init__(url, engine_kwargs=engine_kwargs,
                             heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)
        self.budget: int | None = None

    # Optuna's storage cache (_CachedStorage, which Optuna wraps around every RDB storage)
    # creates trials through this method, as does RDBStorage.create_new_trial: the one place
    # every new trial passes (tests/test_tune.py checks that it still is).
    def _create_new_trial(self, study_id: int,
                          template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if self.budget is None or (template_trial is not None
                                   and template_trial.state == TrialState.WAITING):
            return super()._create_new_trial(study_id, template_trial)
        with self.locked(study_id):
            counted = len(self.get_all_trials(study_id, deepcopy=False, states=_COUNTED))
            if counted >= self.budget:
                raise StudyFull(counted)
            return super()._create_new_trial(study_id, template_trial)

    @contextlib.contextmanager
    def locked(self, study_id: int) -> Iterator[None]:
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:a, :b)"),
                             {"a": _LOCK_CLASS, "b": study_id})
                try:
                    yield
                finally:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:a, :b)"),
                                 {"a": _LOCK_CLASS, "b": study_id})
                    conn.commit()
            return
        try:
            import fcntl
        except ImportError:  # no POSIX file locks: one worker per study on this system
            yield
            return
        db = sa.engine.make_url(self.url).database or "optuna.db"
        with open(f"{db}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def open_storage(project: Project) -> BudgetStorage:
    url, kwargs = storage_target(project)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return BudgetStorage(url, kwargs)


# ---------------------------------------------------------------------------- the setup

@dataclass
class Setup:
    """What every worker of a study needs: kept in the study's user attributes, so a worker
    started elsewhere (``mloop tune --join``) needs only the stores."""

    project: str
    train_digest: str
    spec: dict[str, Any]
    model: dict[str, Any]  # the ModelConfig the trials vary (its params are the defaults)
    search_space: dict[str, dict[str, Any]]
    metric: str
    direction: str  # minimize | maximize
    validation: float
    split_method: str
    split_seed: int
    sampler: str
    seed: int | None
    pruner: str
    estimator: str

    def attrs(self) -> dict[str, Any]:
        return {f"mloop.{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> Setup:
        names = cls.__dataclass_fields__
        missing = [k for k in names if f"mloop.{k}" not in attrs]
        if missing:
            raise MloopError(f"this study was not created by `mloop tune` (no {missing[0]})")
        return cls(**{k: attrs[f"mloop.{k}"] for k in names})


def check_search_space(project: Project, model: dict[str, Any], task: str | None,
                       space: dict[str, SearchParam]) -> str:
    """Every searched name must be a parameter of the estimator; returns its import path."""
    cfg = ModelConfig(**model)
    try:
        estimator = make_estimator(cfg, task)
    except ConfigError as exc:
        raise project.config.locate(exc) from None
    accepted = estimator.get_params(deep=False)
    path = cfg.estimator or DEFAULT_ESTIMATORS[task or "regression"]
    for name in space:
        if name not in accepted:
            import difflib

            close = difflib.get_close_matches(name, list(accepted), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else (
                f"; it has {', '.join(sorted(accepted))}")
            raise project.config.locate(ConfigError(
                f"'tune.search_space.{name}': {path} has no parameter '{name}'{hint}",
                key=f"tune.search_space.{name}"))
    return path


def _metric(project: Project, task: str) -> str:
    tune = project.config.tune
    assert tune is not None
    configured = project.config.metrics or DEFAULTS[task]
    metric = tune.metric or configured[0]
    if metric not in metrics_for(task):
        raise project.config.locate(ConfigError(
            f"'tune.metric': '{metric}' is not a {task} metric; choose from "
            f"{', '.join(metrics_for(task))}", key="tune.metric" if tune.metric else "metrics"))
    return metric


def study_name(project: Project, setup: Setup) -> str:
    """Same configuration, same data, same question: same study (so a re-run resumes it)."""
    body = json.dumps({"config": project.config.config_hash(), "train": setup.train_digest,
                       "space": setup.search_space, "metric": setup.metric,
                       "validation": setup.validation, "split": [setup.split_method,
                                                                 setup.split_seed]},
                      sort_keys=True)
    return f"{project.name}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"


# ---------------------------------------------------------------------------- trial data

@dataclass
class TrialData:
    X_fit: Any
    y_fit: np.ndarray
    X_val: Any
    y_val: np.ndarray


def inner_split(table: pa.Table, fraction: float, method: str, time_column: str | None,
                seed: int) -> tuple[pa.Table, pa.Table]:
    """The training snapshot split like the split step splits the data: the last
    ``fraction`` in time, or a seeded random ``fraction``, scores the trials."""
    n = table.num_rows
    n_val = round(n * fraction)
    if n_val < 1 or n - n_val < 1:
        raise ConfigError(f"'tune.validation': {fraction} of {n} training rows leaves nothing "
                          f"to fit or to score", key="tune.validation")
    if method == "time" and time_column:
        order = pc.sort_indices(table, sort_keys=[(time_column, "ascending")]).to_numpy()
        return table.take(order[: n - n_val]), table.take(order[n - n_val:])
    order = np.random.default_rng(seed).permutation(n)
    return (table.take(np.sort(order[: n - n_val])), table.take(np.sort(order[n - n_val:])))


def trial_data(project: Project, setup: Setup) -> TrialData:
    """Inner split + the project's preprocessing fitted once on its fitting part."""
    table = project.snapshots.read_table(setup.train_digest)
    fit_t, val_t = inner_split(table, setup.validation, setup.split_method,
                               setup.spec.get("time_column"), setup.split_seed)
    pre = build_model(setup.spec, ModelConfig(**setup.model)).steps[0][1]
    fit_f, val_f = fit_t.to_pandas(), val_t.to_pandas()
    target = setup.spec["target"]
    return TrialData(pre.fit_transform(features_frame(fit_f, setup.spec)),
                     fit_f[target].to_numpy(),
                     pre.transform(features_frame(val_f, setup.spec)),
                     val_f[target].to_numpy())


def _staged_param(estimator: Any) -> str | None:
    """The parameter that grows an estimator in stages with ``warm_start``, if any."""
    params = estimator.get_params(deep=False)
    cls = type(estimator)
    if "warm_start" not in params or not cls.__module__.startswith("sklearn.ensemble"):
        return None
    if cls.__name__.startswith("HistGradientBoosting") and "max_iter" in params:
        return "max_iter"
    if "n_estimators" in params and cls.__name__.startswith(
            ("GradientBoosting", "RandomForest", "ExtraTrees")):
        return "n_estimators"
    return None


def stages(total: int) -> list[int]:
    """10, 20, 40, ... below ``total``, then ``total``: the same steps in every trial, so the
    pruner compares like with like."""
    return [s for s in _STAGES if s < total] + [total]


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p["type"] == "float":
            out[name] = trial.suggest_float(name, p["low"], p["high"], log=p["log"],
                                            step=p["step"])
        elif p["type"] == "int":
            out[name] = trial.suggest_int(name, int(p["low"]), int(p["high"]), log=p["log"],
                                          step=int(p["step"] or 1))
        else:
            out[name] = trial.suggest_categorical(name, p["choices"])
    return out


def baseline_params(setup: Setup) -> dict[str, Any]:
    """The configured (or the estimator's default) value of each searched parameter, where it
    lies inside the search space: trial 0, so the study shows what tuning gained."""
    estimator = make_estimator(ModelConfig(**setup.model), setup.spec["task"])
    current = estimator.get_params(deep=False)
    out: dict[str, Any] = {}
    for name, p in setup.search_space.items():
        value = current.get(name)
        if p["type"] == "categorical":
            if value in p["choices"]:
                out[name] = value
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not p["low"] <= value <= p["high"]:
            continue
        if p["type"] == "int" and value != int(value):
            continue
        if p["step"] and not math.isclose((value - p["low"]) / p["step"],
                                          round((value - p["low"]) / p["step"])):
            continue
        out[name] = int(value) if p["type"] == "int" else float(value)
    return out


@dataclass
class Worker:
    label: str
    index: int | None
    trials: list[int] = field(default_factory=list)
    last_error: str | None = None
    failures_in_a_row: int = 0


class Objective:
    """One trial: the suggested parameters, fitted on the inner split, scored, logged."""

    def __init__(self, project: Project, setup: Setup, data: TrialData, study: str,
                 parent_run_id: str, worker: Worker) -> None:
        self.project, self.setup, self.data, self.study = project, setup, data, study
        self.parent_run_id, self.worker = parent_run_id, worker
        self.task = setup.spec["task"]
        self.proba = self.task == "classification" and setup.metric in ("roc_auc", "log_loss")

    def score(self, estimator: Any) -> float:
        pred = estimator.predict(self.data.X_val)
        proba = estimator.predict_proba(self.data.X_val) if self.proba else None
        classes = getattr(estimator, "classes_", None) if proba is not None else None
        value = compute_metrics(self.task, [self.setup.metric], self.data.y_val, pred, proba,
                                classes=None if classes is None else list(classes)
                                )[self.setup.metric]
        if not math.isfinite(value):
            raise ValueError(f"{self.setup.metric} on the validation rows is {value}")
        return value

    def __call__(self, trial: optuna.Trial) -> float:
        from mlflow.entities import Metric, RunTag

        client = self.project.mlflow
        params = suggest(trial, self.setup.search_space)
        trial.set_user_attr("mloop.worker", self.worker.label)
        trial.set_user_attr("mloop.pid", os.getpid())
        self.worker.trials.append(trial.number)
        run = client.create_run(self.project.experiment_id, run_name=f"trial-{trial.number}",
                                tags={"mlflow.parentRunId": self.parent_run_id,
                                      "mloop.tune.study": self.study,
                                      "mloop.tune.trial": str(trial.number),
                                      "mloop.tune.worker": self.worker.label})
        run_id = run.info.run_id
        trial.set_user_attr("mloop.mlflow_run_id", run_id)
        log_params(client, run_id, params, secrets=self.project.config.secrets)
        history: list[tuple[int, float]] = []
        state, started, cpu_started = "failed", time.perf_counter(), time.process_time()
        peak = PeakMemory()
        try:
            with peak:
                value = self._fit(trial, params, history)
            state = "complete"
            self.worker.failures_in_a_row = 0
            return value
        except optuna.TrialPruned:
            state = "pruned"
            self.worker.failures_in_a_row = 0
            raise
        except Exception as exc:
            self.worker.last_error = f"trial {trial.number}: {type(exc).__name__}: {exc}"
            self.worker.failures_in_a_row += 1
            raise
        finally:
            duration = time.perf_counter() - started
            usage = Usage(time.process_time() - cpu_started, peak.peak_mb,
                          gb_hours(peak.peak_mb, duration), duration)
            now = int(time.time() * 1000)
            name = f"val_{self.setup.metric}"
            metrics = [Metric(name, v, now, step) for step, v in history]
            metrics.append(Metric("duration_s", duration, now, 0))
            metrics += [Metric(k, v, now, 0) for k, v in usage.metrics().items()]
            with contextlib.suppress(Exception):  # the trial's result matters more
                client.log_batch(run_id, metrics=metrics,
                                 tags=[RunTag("mloop.tune.state", state)])
                client.set_terminated(run_id, "FAILED" if state == "failed" else "FINISHED")

    def _fit(self, trial: optuna.Trial, params: dict[str, Any],
             history: list[tuple[int, float]]) -> float:
        model = {**self.setup.model, "params": {**self.setup.model["params"], **params}}
        estimator = make_estimator(ModelConfig(**model), self.task)
        staged = _staged_param(estimator) if self.setup.pruner != "none" else None
        X, y = self.data.X_fit, self.data.y_fit
        if staged is None:
            estimator.fit(X, y)
            value = self.score(estimator)
            history.append((0, value))
            return value
        total = int(estimator.get_params()[staged])
        estimator.set_params(warm_start=True)
        value = math.nan
        for step in stages(total):
            estimator.set_params(**{staged: step})
            estimator.fit(X, y)
            value = self.score(estimator)
            history.append((step, value))
            trial.report(value, step)
            if step < total and trial.should_prune():
                raise optuna.TrialPruned(f"{self.setup.metric} {value:.4g} after {step} "
                                         f"{staged}")
        return value


# ---------------------------------------------------------------------------- optimizing

def _sampler(setup: Setup, trials: int, index: int | None) -> optuna.samplers.BaseSampler:
    seed = None if setup.seed is None or index is None else setup.seed + index
    if setup.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial of another worker counts as a bad result, so workers
    # do not all sample the same promising point
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(10, trials // 3)),
                                      constant_liar=True)


def _pruner(setup: Setup, trials: int) -> optuna.pruners.BasePruner:
    if setup.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 5)),
                                       n_warmup_steps=_WARMUP_STEPS)


def count(study: optuna.Study, states: tuple[TrialState, ...] = _DONE) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def optimize(study: optuna.Study, storage: BudgetStorage, objective: Objective, *,
             trials: int, timeout_seconds: float | None, finisher: bool,
             on_trial: Progress | None = None) -> None:
    """Run trials until the study has ``trials`` complete or pruned ones.

    Every worker stops asking once the study is full. The finisher (the process that started
    the study) then waits for the others' running trials, and replaces any that fails or
    whose worker died (its heartbeat goes stale): at the end, exactly ``trials`` are done.
    """
    storage.budget = trials
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    worker = objective.worker

    def after_trial(st: optuna.Study, trial: FrozenTrial) -> None:
        if worker.failures_in_a_row >= _MAX_FAILURES_IN_A_ROW:
            st.stop()
        if on_trial is not None:
            best = _best(st)
            on_trial("trial", {"number": trial.number, "state": trial.state.name.lower(),
                               "value": trial.value, "done": count(st), "total": trials,
                               "best": None if best is None else best.value,
                               "best_trial": None if best is None else best.number})

    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        MaxTrialsCallback(trials, states=_DONE), after_trial]
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return
        with contextlib.suppress(StudyFull):
            study.optimize(objective, timeout=remaining, catch=(Exception,),
                           callbacks=callbacks)
        if worker.failures_in_a_row >= _MAX_FAILURES_IN_A_ROW:
            raise MloopError(f"{worker.failures_in_a_row} trials in a row failed in worker "
                             f"{worker.label}; the last: {worker.last_error}")
        if not finisher or count(study) >= trials:
            return
        time.sleep(0.5)  # others' trials are running: wait, and replace any that dies


@contextlib.contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        yield


def _load_study(storage: BudgetStorage, name: str, setup: Setup, trials: int,
                index: int | None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage,
                             sampler=_sampler(setup, trials, index),
                             pruner=_pruner(setup, trials))


def _label(index: int | None) -> str:
    return f"{socket.gethostname()}:{os.getpid()}" + ("" if index is None else f"#{index}")


# ---------------------------------------------------------------------------- worker entry

def join_study(project: Project, name: str, *, worker_index: int | None = None,
               on_event: Progress | None = None) -> dict[str, Any]:
    """``mloop tune --join STUDY``: one more worker on an existing study, until it is full."""
    storage = open_storage(project)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage,
                                                                      include_best_trial=False)]
        raise MloopError(f"no study '{name}' in {_where(project)}; studies: "
                         f"{', '.join(names) or 'none'}") from None
    attrs = storage.get_study_user_attrs(study_id)
    setup = Setup.from_attrs(attrs)
    session = attrs.get("mloop.session")
    if not session:
        raise MloopError(f"study '{name}' has no running `mloop tune` session to join")
    study = _load_study(storage, name, setup, session["trials"], worker_index)
    worker = Worker(_label(worker_index), worker_index)
    data = trial_data(project, setup)
    objective = Objective(project, setup, data, name, session["parent_run_id"], worker)
    _ = project.experiment_id  # MLflow's client set up before the first trial, not in it
    me = worker_index if worker_index is not None else worker.label
    ready = f"mloop.ready.{session['id']}.{me}"
    study.set_user_attr(ready, {"pid": os.getpid(), "host": socket.gethostname()})
    with _thread_limit(session.get("threads")):
        optimize(study, storage, objective, trials=session["trials"],
                 timeout_seconds=session.get("timeout_seconds"), finisher=False,
                 on_trial=on_event)
    return {"study": name, "worker": worker.label, "trials": worker.trials}


def _where(project: Project) -> str:
    return redact(storage_target(project)[0])


# ---------------------------------------------------------------------------- the study

def _ancestors(graph: Graph, name: str) -> list[str]:
    need: set[str] = set()
    todo = [name]
    while todo:
        for up in graph.node(todo.pop()).upstream:
            if up not in need:
                need.add(up)
                todo.append(up)
    return [n for n in graph.nodes if n in need]


def _train_node(graph: Graph) -> Any:
    if "train" not in graph.nodes:
        raise PipelineDefinitionError(f"`mloop tune` tunes the model of the pipeline's "
                                      f"'train' step, and pipeline '{graph.pipeline}' has "
                                      f"none (steps: {', '.join(graph.nodes)})")
    node = graph.nodes["train"]
    if node.step.fn is not builtin_steps.train.fn or "data" not in node.inputs:
        fn = node.step.fn
        raise PipelineDefinitionError(f"`mloop tune` fits the model the built-in train step "
                                      f"builds (mloop.tabular.model); this pipeline's 'train' "
                                      f"step is {fn.__module__}.{fn.__qualname__}")
    return node


def _spawn(project: Project, name: str, index: int) -> tuple[subprocess.Popen[bytes], Path]:
    log = Path(tempfile.mkstemp(prefix=f"mloop-tune-worker{index}-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "mloop", "-C", str(project.root), "tune", "--join", name,
           "--worker-index", str(index)]
    env = {**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
    return proc, log


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _await_workers(storage: BudgetStorage, study: optuna.Study, session: str,
                   procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    """Every started worker has its data ready before the first trial: they start together."""
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    want = {f"mloop.ready.{session}.{i + 1}" for i in range(len(procs))}
    while True:
        attrs = storage.get_study_user_attrs(study._study_id)
        if want <= set(attrs):
            return
        for proc, log in procs:
            if proc.poll() is not None:
                raise MloopError(f"tune worker (pid {proc.pid}) exited with {proc.returncode} "
                                 f"before its first trial:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise MloopError(f"tune workers not ready after {_READY_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.2)


def _stop(procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, _log in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc, _log in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


def run_study(project: Project, *, trials: int | None = None, workers: int = 1,
              on_event: Progress | None = None) -> dict[str, Any]:
    """Tune, then train, register and gate the best trial. See the module docstring."""
    cfg = project.config
    if cfg.tune is None:
        raise ConfigError("no 'tune' section: add one with a search_space, e.g. tune: "
                          "{search_space: {learning_rate: {type: float, low: 0.01, high: 0.3, "
                          "log: true}}}", file=str(project.root / CONFIG_FILE), key="tune")
    if workers < 1:
        raise MloopError("--workers must be at least 1")
    tune = cfg.tune
    n_trials = trials or tune.trials
    notify = on_event or (lambda *_: None)
    graph = build_graph(project)
    train = _train_node(graph)
    model = dict(train.params["model"])
    space = {k: v.model_dump(mode="json") for k, v in tune.search_space.items()}
    if cfg.task or cfg.model.estimator:  # fail before any data is read
        check_search_space(project, model, cfg.task, tune.search_space)
    storage = open_storage(project)

    data_graph = Graph("tune", {n: graph.nodes[n] for n in _ancestors(graph, "train")})
    run = start_pipeline_run(project, data_graph)
    parent = run.mlflow_run_id or ""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def step_event(event: str, name: str, info: dict[str, Any]) -> None:
        notify("step", {"event": event, "step": name, **info})

    try:
        notify("phase", {"text": "data steps", "steps": list(data_graph.nodes)})
        outcomes = {n: execute_step(project, run, data_graph, n, on_event=step_event)
                    for n in data_graph.nodes}
        ref = train.inputs["data"]
        snap = load_output(outcomes[ref.node].outputs[ref.output], project.outputs,
                           project.snapshots)
        table = project.snapshots.read_table(snap.digest)
        p = train.params
        spec = resolve_spec(table.schema, table[p["target"]], target=p["target"],
                            task=p["task"], features=p["features"])
        estimator = check_search_space(project, model, spec["task"], tune.search_space)
        metric = _metric(project, spec["task"])
        setup = Setup(project=project.name, train_digest=snap.digest, spec=spec, model=model,
                      search_space=space, metric=metric,
                      direction="maximize" if HIGHER_IS_BETTER[metric] else "minimize",
                      validation=tune.validation or cfg.split.holdout,
                      split_method=cfg.split.method or (
                          "time" if cfg.features.time_column else "random"),
                      split_seed=cfg.split.seed, sampler=tune.sampler, seed=tune.seed,
                      pruner=tune.pruner, estimator=estimator)
        name = study_name(project, setup)
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    direction=cast(Direction, setup.direction),
                                    sampler=_sampler(setup, n_trials, 0),
                                    pruner=_pruner(setup, n_trials))
        resumed = len(study.get_trials(deepcopy=False))
        for k, v in setup.attrs().items():
            study.set_user_attr(k, v)
        study.set_user_attr("mloop.session", {
            "id": run.id, "trials": n_trials, "timeout_seconds": tune.timeout_seconds,
            "parent_run_id": parent, "threads": tune.threads, "workers": workers})
        baseline = baseline_params(setup)
        if resumed == 0 and set(baseline) == set(space):
            study.enqueue_trial(baseline, user_attrs={"mloop.baseline": True})
        client = project.mlflow
        for k, v in {"mloop.tune.study": name, "mloop.tune.storage": _where(project),
                     "mloop.tune.metric": metric}.items():
            client.set_tag(parent, k, v)
        log_params(client, parent, {"tune": {**tune.model_dump(mode="json", exclude={
            "search_space"}), "trials": n_trials, "workers": workers, "metric": metric},
            "search_space": space})
        data = trial_data(project, setup)
        notify("study", {"study": name, "total": n_trials, "done": count(study),
                         "resumed": resumed, "metric": metric, "direction": setup.direction,
                         "workers": workers, "fit_rows": len(data.y_fit),
                         "validation_rows": len(data.y_val)})
        procs = [_spawn(project, name, i) for i in range(1, workers)]
        if procs:
            notify("phase", {"text": f"starting {len(procs)} more worker(s)"})
            _await_workers(storage, study, run.id, procs)
        worker = Worker(_label(0 if procs else None), 0)
        objective = Objective(project, setup, data, name, parent, worker)
        with _thread_limit(tune.threads):
            optimize(study, storage, objective, trials=n_trials,
                     timeout_seconds=tune.timeout_seconds, finisher=True, on_trial=notify)
        for proc, log in procs:
            if proc.wait() != 0:
                raise MloopError(f"tune worker (pid {proc.pid}) exited with "
                                 f"{proc.returncode}:\n{_tail(log)}")
        summary = _summarize(study, setup, name, n_trials, resumed)
        summary.update({"tune_run_id": run.id, "mlflow_run_id": parent,
                        "storage": _where(project), "fit_rows": len(data.y_fit),
                        "validation_rows": len(data.y_val), "workers": workers})
        best = _best(study)
        if best is None:
            raise MloopError(f"study '{name}' has no complete trial to register "
                             f"({summary['trials']})")
        for k, v in {"best_" + metric: best.value, "trials_complete":
                     summary["trials"]["complete"], "trials_pruned": summary["trials"]["pruned"],
                     "trials_failed": summary["trials"]["failed"]}.items():
            client.log_metric(parent, k, float(v or 0.0))
        client.set_tag(parent, "mloop.tune.best_trial", str(best.number))
        finish_pipeline_run(project, run, status="succeeded")
    except BaseException as exc:
        _stop(procs)
        with contextlib.suppress(Exception):
            finish_pipeline_run(project, run, status="failed", error=str(exc) or type(
                exc).__name__)
        raise
    finally:
        for _proc, log in procs:
            with contextlib.suppress(OSError):
                log.unlink()

    notify("phase", {"text": f"training trial {best.number} through the pipeline"})
    summary.update(train_best(project, setup, name, best, parent, on_event=step_event))
    from mloop.registry.training import gate_candidate

    notify("phase", {"text": "gating the candidate against the champion"})
    summary.update(gate_candidate(project, summary["registered"]["version"]).to_dict())
    return summary


def _summarize(study: optuna.Study, setup: Setup, name: str, total: int,
               resumed: int) -> dict[str, Any]:
    all_trials = study.get_trials(deepcopy=False)
    states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
              "failed": TrialState.FAIL}
    by_worker: dict[str, int] = {}
    for t in all_trials:
        if t.state in _DONE:
            w = str(t.user_attrs.get("mloop.worker", "?"))
            by_worker[w] = by_worker.get(w, 0) + 1
    base = next((t for t in all_trials if t.user_attrs.get("mloop.baseline")), None)
    best = _best(study)
    return {
        "study": name, "metric": setup.metric, "direction": setup.direction,
        "trials": {**{k: sum(t.state == s for t in all_trials) for k, s in states.items()},
                   "total": total, "before_this_run": resumed},
        "by_worker": by_worker,
        "baseline": None if base is None else {
            "trial": base.number, "value": base.value, "params": base.params,
            "state": base.state.name.lower()},
        "best": None if best is None else {"trial": best.number, "value": best.value,
                                           "params": best.params},
    }


def effective_config_text(project: Project, params: dict[str, Any], study: str,
                          trial: int) -> str:
    """mloop.yaml as the tuned run runs it: the file with ``model.params`` replaced (``${VAR}``
    references stay references). Logged with the run, so ``mloop models reproduce`` works."""
    raw = yaml.safe_load((project.root / CONFIG_FILE).read_text(encoding="utf-8"))
    raw["model"] = {**(raw.get("model") or {}), "params": params}
    return (f"# mloop.yaml as `mloop tune` ran it: model.params from study {study}, "
            f"trial {trial}\n" + yaml.safe_dump(raw, sort_keys=False))


def train_best(project: Project, setup: Setup, name: str, best: FrozenTrial,
               tune_run_id: str, *, on_event: EventHook | None = None) -> dict[str, Any]:
    """One ordinary pipeline run with the best trial's parameters: a registered candidate
    with full lineage, tagged with its study and trial."""
    params = {**setup.model["params"], **best.params}
    model = project.config.model.model_copy(update={"params": params})
    tuned = Project(project.root, project.config.model_copy(update={"model": model}))
    trained = train_candidate(tuned, on_event=on_event, gate=False, config_text=(
        effective_config_text(project, params, name, best.number)))
    version, registered, evaluation = trained.version, trained.registered, trained.evaluation
    if registered is None or evaluation is None:
        raise PipelineDefinitionError(f"pipeline run {trained.pipeline_run_id} registered "
                                      f"v{version} but has no 'evaluate' step output: nothing "
                                      f"to compare the trial with")
    tags = {"mloop.tune.study": name, "mloop.tune.trial": str(best.number),
            "mloop.tune.metric": setup.metric, "mloop.tune.value": f"{best.value:.6g}",
            "mloop.tune.mlflow_run_id": tune_run_id}
    client = project.mlflow
    for k, v in tags.items():
        client.set_model_version_tag(registered["name"], str(version), k, v)
        client.set_tag(trained.run.mlflow_run_id, k, v)
    return {"pipeline_run_id": trained.pipeline_run_id, "params": params,
            "registered": registered, "evaluation": evaluation}
