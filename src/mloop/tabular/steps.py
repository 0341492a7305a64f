"""The built-in tabular steps: ingest -> validate -> snapshot -> split -> train -> evaluate ->
register. Each can be replaced from mloop.yaml (``pipeline.steps.NAME: module:function``); a
replacement takes the same arguments and returns the same outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from threadpoolctl import threadpool_limits

from mloop.config import DataConfig, FeaturesConfig, ModelConfig, ValidationConfig
from mloop.data.snapshot import Snapshot
from mloop.data.source import read_source
from mloop.data.validation import format_report, validate_table
from mloop.errors import ConfigError, ValidationFailedError
from mloop.metrics import DEFAULTS, compute_metrics, metrics_for
from mloop.pipeline.context import StepContext
from mloop.pipeline.dsl import step
from mloop.tabular.model import build_model, check_classes, features_frame, resolve_spec


@step(cache=False)  # the source may have changed: always read; its digest drives the cache
def ingest(ctx: StepContext, data: dict[str, Any], time_column: str | None,
           features: dict[str, Any] | None = None) -> pa.Table:
    """The configured data; with ``features.store: feast`` it is the entity table, and the
    feature views' values as of each row's time are joined onto it (point in time)."""
    table, source = read_source(DataConfig(**data), Path(ctx.project.root), time_column,
                                 codec=ctx.project.codec)
    if features and features.get("store") == "feast":
        table = _join_features(ctx, table, source, FeaturesConfig(**features))
    ctx.log_metric("rows", table.num_rows)
    ctx.log_metric("columns", table.num_columns)
    return table


def _join_features(ctx: StepContext, entities: pa.Table, source: str,
                   cfg: FeaturesConfig) -> pa.Table:
    """The point-in-time join; the entity table is kept as a snapshot of its own and the
    feature views, their definitions' hash and that snapshot's digest are the step's params
    (``mloop models lineage`` shows them)."""
    from mloop.features import open_repo, training_table

    repo = open_repo(Path(ctx.project.root), cfg)
    try:
        refs = repo.resolve_refs(cfg)
    except ConfigError as exc:
        raise ctx.project.config.locate(exc) from None
    snap = store_snapshot(ctx, entities, source)
    _log_snapshot(ctx, snap, "entities")
    table, lineage = training_table(repo, entities, time_column=cfg.time_column or "",
                                    refs=refs)
    for key, value in {**lineage.as_params(), "feast.entities_digest": snap.digest}.items():
        ctx.project.mlflow.log_param(ctx.mlflow_run_id, key, value[:6000])
    return table


@step(retries=0)
def validate(ctx: StepContext, table: pa.Table, rules: dict[str, Any], target: str,
             features: dict[str, Any]) -> dict[str, Any]:
    """Expectations from mloop.yaml plus the ones the config implies (target and features)."""
    cfg = ValidationConfig(**rules)
    implied = [target, *(features.get("numeric") or []), *(features.get("categorical") or [])]
    if features.get("time_column"):
        implied.append(features["time_column"])
    cfg.required_columns = list(dict.fromkeys([*cfg.required_columns, *implied]))
    report = validate_table(table, cfg)
    if report["passed"] and table[target].null_count:
        report["passed"] = False
        report["violations"].append({"column": target, "check": "target_not_null",
                                     "expected": 0, "actual": table[target].null_count})
    ctx.log_metric("violations", len(report["violations"]))
    if not report["passed"]:
        ctx.project.mlflow.log_dict(ctx.mlflow_run_id, report, "validation_report.json")
        raise ValidationFailedError(format_report(report), report=report)
    return report


def _log_snapshot(ctx: StepContext, snap: Snapshot, role: str, *, on_parent: bool = True) -> None:
    ctx.log_input(name=f"{ctx.project.name}-{role}", digest=snap.digest, source=snap.uri,
                  schema=snap.schema, rows=snap.rows, context=role, on_parent=on_parent)


def store_snapshot(ctx: StepContext, table: pa.Table, source: str) -> Snapshot:
    snap, _new = ctx.project.snapshots.put(table, source=source)
    ctx.project.store.record_snapshot(digest=snap.digest, rows=snap.rows,
                                      columns=len(snap.schema), source=source, uri=snap.uri)
    return snap


@step
def snapshot(ctx: StepContext, table: pa.Table, report: dict[str, Any], source: str) -> Snapshot:
    snap = store_snapshot(ctx, table, source)
    _log_snapshot(ctx, snap, "source")
    return snap


@step(outputs=("train", "holdout"))
def split(ctx: StepContext, data: Snapshot, method: str | None, holdout: float, seed: int,
          time_column: str | None, refit: bool = False) -> tuple[Snapshot, Snapshot]:
    """Time-ordered (the last fraction is the holdout) or seeded random. With ``refit`` the
    training set is every row (``data`` itself) and the holdout is cut as usual: the fit
    that follows has seen its holdout, which ``register`` tags (``mloop.refit``)."""
    table = ctx.project.snapshots.read_table(data.digest)
    n = table.num_rows
    n_holdout = round(n * holdout)
    if n_holdout < 1 or n - n_holdout < 1:
        raise ConfigError(f"'split.holdout': {holdout} of {n} rows leaves an empty train or "
                          f"holdout set", key="split.holdout")
    method = method or ("time" if time_column else "random")
    if method == "time":
        if not time_column:
            raise ConfigError("'split.method': 'time' needs features.time_column",
                              key="split.method")
        order = pc.sort_indices(table, sort_keys=[(time_column, "ascending")]).to_numpy()
    else:
        order = np.random.default_rng(seed).permutation(n)
    train_idx, hold_idx = np.sort(order[: n - n_holdout]), np.sort(order[n - n_holdout :])
    if method == "time":
        train_idx, hold_idx = order[: n - n_holdout], order[n - n_holdout :]
    train_snap = data if refit else store_snapshot(ctx, table.take(train_idx),
                                                   f"split:{data.digest}:train")
    hold_snap = store_snapshot(ctx, table.take(hold_idx), f"split:{data.digest}:holdout")
    _log_snapshot(ctx, train_snap, "training")
    _log_snapshot(ctx, hold_snap, "holdout")
    ctx.log_metric("train_rows", train_snap.rows)
    ctx.log_metric("holdout_rows", hold_snap.rows)
    return train_snap, hold_snap


@step(outputs=("model", "spec"))
def train(ctx: StepContext, data: Snapshot, target: str, task: str | None,
          features: dict[str, Any], model: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    table = ctx.project.snapshots.read_table(data.digest)
    spec = resolve_spec(table.schema, table[target], target=target, task=task,
                        features=features)
    frame = table.to_pandas()
    X, y = features_frame(frame, spec), frame[target].to_numpy()
    if spec["task"] == "classification":
        spec["classes"] = sorted(map(str, set(y.tolist()))) if y.dtype == object else sorted(
            set(y.tolist()))
    cfg = ModelConfig(**model)
    estimator = build_model(spec, cfg)
    if spec["task"] == "classification":
        check_classes(estimator, y, target=target)
    with threadpool_limits(cfg.threads):  # None: no limit
        estimator.fit(X, y)
    _log_snapshot(ctx, data, "training", on_parent=False)  # split put it on the parent
    train_pred = estimator.predict(X)
    proba = estimator.predict_proba(X) if hasattr(estimator, "predict_proba") else None
    names = list(metrics_for(spec["task"]))[:3]
    for k, v in compute_metrics(spec["task"], names, y, train_pred, proba,
                                classes=_classes(estimator, proba)).items():
        ctx.log_metric(f"train_{k}", v)
    inner = estimator.steps[-1][1]
    for i, loss in enumerate(np.asarray(getattr(inner, "train_score_", []))):
        ctx.log_metric("train_score", float(loss), step=i)
    ctx.set_tags({"mloop.task": spec["task"], "mloop.estimator": type(inner).__module__ + "."
                  + type(inner).__name__})
    return estimator, spec


def _classes(model: Any, proba: Any) -> list[Any] | None:
    """The columns of ``predict_proba`` in order, so probability metrics hold on a holdout
    that lacks one of the classes the model learned (a rare class, a time split)."""
    classes = getattr(model, "classes_", None)
    return None if proba is None or classes is None else list(classes)


@step
def evaluate(ctx: StepContext, model: Any, spec: dict[str, Any], holdout: Snapshot,
             metrics: list[str] | None) -> dict[str, Any]:
    """Task metrics on the holdout snapshot; also logged on the pipeline's parent run."""
    known = metrics_for(spec["task"])
    metrics = metrics or DEFAULTS[spec["task"]]
    for name in metrics:
        if name not in known:
            raise ConfigError(f"'metrics': '{name}' is not a {spec['task']} metric; choose from "
                              f"{', '.join(known)}", key="metrics")
    frame = ctx.project.snapshots.read_table(holdout.digest).to_pandas()
    X, y = features_frame(frame, spec), frame[spec["target"]].to_numpy()
    pred = model.predict(X)
    proba = model.predict_proba(X) if (spec["task"] == "classification"
                                       and hasattr(model, "predict_proba")) else None
    values = compute_metrics(spec["task"], metrics, y, pred, proba,
                             classes=_classes(model, proba))
    for k, v in values.items():
        ctx.log_metric(f"holdout_{k}", v)
    ctx.log_parent_metrics({f"holdout_{k}": v for k, v in values.items()})
    return {"task": spec["task"], "primary": metrics[0], "metrics": values,
            "holdout_rows": len(frame), "holdout_digest": holdout.digest}


def _version_still_registered(project: Any, outputs: dict[str, Any]) -> bool:
    """A cached registration counts only while its model version still exists in MLflow."""
    from mlflow.exceptions import MlflowException

    out = outputs["output"]
    try:
        project.mlflow.get_model_version(out["name"], str(out["version"]))
    except MlflowException:
        return False
    return True


@step(cache_valid=_version_still_registered)
def register(ctx: StepContext, model: Any, spec: dict[str, Any], evaluation: dict[str, Any],
             source: Snapshot, train_data: Snapshot, holdout: Snapshot,
             model_name: str) -> dict[str, Any]:
    """Log the model with signature and example; create a version tagged with its lineage
    and, with the compiled fast path on, its verified ONNX graph (``_compile``)."""
    from mloop.registry.candidates import candidate_signature, register_candidate
    from mloop.security.pii import PiiPolicy
    from mloop.tracking import git_info

    frame = ctx.project.snapshots.read_table(holdout.digest).slice(0, 5).to_pandas()
    example = features_frame(frame, spec)
    # The signature comes from all the training rows, not the 5-row example: a column with
    # missing values there is optional (the model imputes it), and servers accept nulls in it.
    seen = features_frame(ctx.project.snapshots.read_table(train_data.digest).to_pandas(), spec)
    run = ctx.project.store.get_pipeline_run(ctx.pipeline_run_id)
    tags = {
        "mloop.pipeline_run_id": ctx.pipeline_run_id,
        "mloop.mlflow_parent_run_id": ctx.parent_mlflow_run_id,
        "mloop.snapshot.source": source.digest,
        "mloop.snapshot.train": train_data.digest,
        "mloop.snapshot.holdout": holdout.digest,
        "mloop.config_hash": run.config_hash,
        "mloop.task": spec["task"],
        "mloop.target": spec["target"],
        "mloop.primary_metric": evaluation["primary"],
        **{f"mloop.metric.{k}": f"{v:.6g}" for k, v in evaluation["metrics"].items()},
        **{f"mloop.{k}": v for k, v in git_info(ctx.project.root).items()},
    }
    if train_data.digest == source.digest:  # split(refit=True): the holdout was trained on
        tags["mloop.refit"] = "true"
        tags = {(f"mloop.in_sample.{k.removeprefix('mloop.metric.')}"
                 if k.startswith("mloop.metric.") else k): v for k, v in tags.items()}
    for snap, role in ((source, "source"), (train_data, "training"), (holdout, "holdout")):
        _log_snapshot(ctx, snap, role, on_parent=False)  # on the run that holds the model
    pii = PiiPolicy.of(ctx.project.config, ctx.project.root)
    if pii is not None:  # MLflow stores the example in the clear: no raw personal value in it
        example = pii.scrub_example(example, seen)
    # on the example as logged: servers warm every version up with it
    predictions = model.predict(example)
    signature = candidate_signature(example, predictions, seen)
    tags.update(_compile(ctx, model, signature, spec["task"], holdout.digest))
    out = register_candidate(ctx.project.mlflow, run_id=ctx.mlflow_run_id, model=model,
                             name=model_name, input_example=example, predictions=predictions,
                             tags=tags, signature=signature)
    ctx.set_tags({"mloop.registered_version": str(out["version"])})
    return out


def _compile(ctx: StepContext, model: Any, signature: Any, task: str, holdout: str
             ) -> dict[str, str]:
    """Compile and verify the model once, here, for every server that will load it: the
    graph goes in this run's artifacts, the verdict (``mloop.compiled``) on the version. A
    model that cannot be compiled gets the verdict that says so; any other failure leaves
    the version without one, and the first load compiles it (the fast path is an
    optimisation: it never fails a registration)."""
    import logging

    from mloop.serving.compiled import TAG, compile_and_store
    from mloop.serving.schema import InputSchema

    cfg = ctx.project.config.serving.compile
    if not cfg.enabled:
        return {}
    try:
        _, verdict = compile_and_store(
            ctx.project, model=model, schema=InputSchema.from_mlflow(signature.inputs),
            task=task, holdout=holdout, cfg=cfg, run_id=ctx.mlflow_run_id,
            compiled_at="registration")
    except Exception as exc:
        logging.getLogger("mloop.pipeline").warning(
            "the model was not compiled at registration (%s: %s); servers will compile it "
            "when they load it", type(exc).__name__, exc)
        return {}
    ctx.log_metric("compile_seconds", verdict.seconds)
    return {TAG: verdict.to_tag()}
