"""This project's pipeline. It starts as mloop's built-in tabular wiring; edit freely.

Each call to a step adds a node; passing one step's output to another is the dependency.
Steps are cached by (source, input digests, params): change one param and only the steps
downstream of it run again.
"""

from mloop import pipeline
from mloop.tabular import steps as s
from mloop.tabular.pipeline import check_model, metric_names, source_name, split_options


@pipeline(name="tabular")
def tabular(cfg):
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
