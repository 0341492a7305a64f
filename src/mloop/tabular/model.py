"""The model a tabular project trains: built-in preprocessing + any sklearn-style estimator.

Preprocessing is part of the logged model, so serving requests carry raw columns (strings for
categoricals, numbers for numerics) exactly as the training table had them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from mloop.config import ModelConfig
from mloop.data.profile import column_kind
from mloop.data.validation import did_you_mean
from mloop.errors import ConfigError
from mloop.pipeline.loader import import_object

DEFAULT_ESTIMATORS = {
    "regression": "sklearn.ensemble.HistGradientBoostingRegressor",
    "classification": "sklearn.ensemble.HistGradientBoostingClassifier",
}


def infer_task(target: pa.ChunkedArray) -> str:
    """Floats are regression; strings and booleans classification; integers by cardinality."""
    kind = column_kind(target.type)
    if pa.types.is_floating(target.type):
        return "regression"
    if kind == "categorical":
        return "classification"
    if pa.types.is_integer(target.type):
        n_unique = len(target.unique())
        return "classification" if n_unique <= 20 else "regression"
    raise ConfigError(f"cannot infer 'task' from target type {target.type}; set task: "
                      f"regression or classification", key="task")


def resolve_spec(schema: pa.Schema, sample_target: pa.ChunkedArray, *, target: str,
                 task: str | None, features: dict[str, Any]) -> dict[str, Any]:
    """Decide task and the numeric/categorical feature lists from config and dtypes."""
    names = schema.names
    if target not in names:
        raise ConfigError(f"'target': column '{target}' is not in the data"
                          f"{did_you_mean(target, names)} (columns: {', '.join(names)})",
                          key="target")
    excluded = {target, *features.get("exclude", [])}
    if features.get("time_column"):
        excluded.add(features["time_column"])
    numeric = features.get("numeric")
    categorical = features.get("categorical")
    for key, listed in (("features.numeric", numeric), ("features.categorical", categorical),
                        ("features.exclude", features.get("exclude"))):
        for col in listed or []:
            if col not in names:
                raise ConfigError(f"'{key}': column '{col}' is not in the data"
                                  f"{did_you_mean(col, names)} (columns: "
                                  f"{', '.join(names)})", key=key)
    explicit = set(numeric or []) | set(categorical or [])
    inferred_num, inferred_cat = [], []
    for field in schema:
        if field.name in excluded or field.name in explicit:
            continue
        kind = column_kind(field.type)
        if kind == "numeric":
            inferred_num.append(field.name)
        elif kind == "categorical":
            inferred_cat.append(field.name)
    numeric = list(numeric) if numeric is not None else inferred_num
    categorical = list(categorical) if categorical is not None else inferred_cat
    if numeric is not None and features.get("numeric") is not None:
        categorical = [c for c in categorical if c not in numeric]
    if not numeric and not categorical:
        raise ConfigError("no feature columns left after excluding the target, the time column "
                          "and features.exclude", key="features")
    task = task or infer_task(sample_target)
    return {"task": task, "target": target, "numeric": numeric, "categorical": categorical,
            "time_column": features.get("time_column")}


def make_estimator(cfg: ModelConfig, task: str | None) -> Any:
    """The configured estimator, unfitted. Called when the graph is built too, so a typo in
    ``model.estimator`` or ``model.params`` fails before any data is read."""
    path = cfg.estimator or DEFAULT_ESTIMATORS[task or "regression"]
    cls = import_object(path, key="model.estimator")
    if not callable(cls):
        raise ConfigError(f"'model.estimator': '{path}' is not a class", key="model.estimator")
    try:
        estimator = cls(**cfg.params)
    except TypeError as exc:
        raise ConfigError(f"'model.params': {path} does not accept these params ({exc})",
                          key="model.params") from None
    if not (hasattr(estimator, "fit") and hasattr(estimator, "predict")):
        raise ConfigError(f"'model.estimator': {path} has no fit/predict; expected a "
                          f"scikit-learn-compatible estimator", key="model.estimator")
    return estimator


def check_classes(model: Any, y: np.ndarray, *, target: str) -> None:
    """Refuse, in mloop's words and before fitting, a target XGBoost's classifiers cannot
    learn: they take only classes coded 0 to n-1 (XGBoost dropped its label encoder in 2.0),
    and their own error names neither the config key nor a way out."""
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    library = type(final).__module__.split(".")[0]
    if library != "xgboost" or not hasattr(final, "predict_proba"):
        return
    try:
        classes = np.unique(y)
    except TypeError:  # labels of mixed types: not codes 0 to n-1 either
        classes = np.unique(y.astype(str))
    if np.array_equal(classes, np.arange(len(classes))):
        return
    shown = ", ".join(repr(c) for c in classes[:5].tolist()) + (", ..." if len(classes) > 5
                                                               else "")
    raise ConfigError(
        f"'model.estimator': {library}.{type(final).__name__} learns only classes coded 0 to "
        f"{len(classes) - 1}; target '{target}' has {shown}. Code the classes as integers in "
        f"the data, or choose an estimator that takes them as they are (lightgbm."
        f"LGBMClassifier, sklearn.ensemble.HistGradientBoostingClassifier)",
        key="model.estimator")


def build_model(spec: dict[str, Any], cfg: ModelConfig) -> Pipeline:
    estimator = make_estimator(cfg, spec["task"])
    num_steps: list[tuple[str, Any]] = []
    if cfg.numeric_imputation != "none":
        num_steps.append(("impute", SimpleImputer(strategy=cfg.numeric_imputation)))
    # Missing categoricals arrive as NaN from pandas and as None from JSON requests: both
    # become one "__missing__" category, inside the model, so serving needs no mloop code.
    cat_steps: list[tuple[str, Any]] = [
        ("impute", SimpleImputer(strategy="constant", fill_value="__missing__",
                                 missing_values=np.nan)),
        ("impute_none", SimpleImputer(strategy="constant", fill_value="__missing__",
                                      missing_values=None)),
    ]
    if cfg.categorical_encoding == "onehot":
        cat_steps.append(("encode", OneHotEncoder(handle_unknown="ignore", sparse_output=False)))
    else:
        cat_steps.append(("encode", OrdinalEncoder(handle_unknown="use_encoded_value",
                                                   unknown_value=-1)))
    transformers: list[tuple[str, Any, list[str]]] = []
    if spec["numeric"]:
        transformers.append(("numeric", Pipeline(num_steps) if num_steps else "passthrough",
                             spec["numeric"]))
    if spec["categorical"]:
        transformers.append(("categorical", Pipeline(cat_steps), spec["categorical"]))
    pre = ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)
    return Pipeline([("preprocess", pre), ("estimator", estimator)])


def features_frame(frame: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """The raw feature columns in model order, categoricals as object (NaN for missing)."""
    cols = [*spec["numeric"], *spec["categorical"]]
    out = frame[cols].copy()
    for c in spec["categorical"]:
        out[c] = out[c].astype(object).where(out[c].notna(), np.nan)
    for c in spec["numeric"]:
        out[c] = pd.to_numeric(out[c]).astype("float64")
    return out
