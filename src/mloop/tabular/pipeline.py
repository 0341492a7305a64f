"""The built-in tabular pipeline (``pipeline.entry`` unset). ``mloop init`` copies an editable
version of this wiring into the project's pipeline.py."""

from __future__ import annotations

from mloop.config import ProjectConfig
from mloop.errors import ConfigError
from mloop.metrics import CLASSIFICATION, DEFAULTS, REGRESSION
from mloop.pipeline.dsl import pipeline
from mloop.tabular import steps as s
from mloop.tabular.model import make_estimator


def metric_names(cfg: ProjectConfig) -> list[str] | None:
    """Configured metrics, checked against what the task offers (task unset: either).

    None means the task's defaults, chosen by evaluate once the task is known.
    """
    if cfg.metrics is None:
        return DEFAULTS[cfg.task] if cfg.task else None
    known = {**REGRESSION, **CLASSIFICATION} if cfg.task is None else (
        REGRESSION if cfg.task == "regression" else CLASSIFICATION)
    for name in cfg.metrics:
        if name not in known:
            raise ConfigError(f"'metrics': unknown metric '{name}' for task "
                              f"{cfg.task or 'any'}; known: {', '.join(sorted(known))}",
                              key="metrics")
    if not cfg.metrics:
        raise ConfigError("'metrics': list at least one metric, or remove the key", key="metrics")
    return list(cfg.metrics)


def source_name(cfg: ProjectConfig) -> str:
    return cfg.data.path if cfg.data.path is not None else f"sql:{cfg.data.sql}"


def split_options(cfg: ProjectConfig) -> dict[str, bool]:
    """``refit`` only when set, so a pipeline's cache keys stay what they were without it."""
    return {"refit": True} if cfg.split.refit else {}


def check_model(cfg: ProjectConfig) -> None:
    """Fail at graph-build time, naming the key, if the estimator cannot be made."""
    if cfg.model.estimator is not None or cfg.model.params:
        make_estimator(cfg.model, cfg.task)


@pipeline(name="tabular")
def tabular(cfg: ProjectConfig) -> None:
    check_model(cfg)
    features = cfg.features.model_dump(mode="json")
    raw = s.ingest(data=cfg.data.model_dump(mode="json"), time_column=cfg.features.time_column,
                   features=features if cfg.features.store else None)
    report = s.validate(raw, rules=cfg.validation.model_dump(mode="json"), target=cfg.target,
                        features=features)
    snap = s.snapshot(raw, report=report, source=source_name(cfg))
    train_snap, holdout_snap = s.split(snap, method=cfg.split.method, holdout=cfg.split.holdout,
                                       seed=cfg.split.seed,
                                       time_column=cfg.features.time_column,
                                       **split_options(cfg))
    model, spec = s.train(train_snap, target=cfg.target, task=cfg.task, features=features,
                          model=cfg.model.model_dump(mode="json"))
    evaluation = s.evaluate(model, spec, holdout_snap, metrics=metric_names(cfg))
    s.register(model, spec, evaluation, snap, train_snap, holdout_snap,
               model_name=cfg.model_name)
