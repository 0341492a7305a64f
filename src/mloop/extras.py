"""Optional dependencies: which extra installs what, and one way to ask for one.

``pip install mloop`` brings what the core needs; a feature that needs more (Optuna for
``mloop tune``, the kfp SDK for ``mloop export kubeflow``, ...) imports it through
:func:`require_extra`, so every missing one is reported with the same sentence (compare
pandas' ``import_optional_dependency``)::

    `mloop tune` needs Optuna: pip install 'mloop[tune]'

``mloop doctor`` reads the same table to say which extras are installed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from mloop.errors import MissingExtraError


@dataclass(frozen=True)
class Extra:
    """One of pyproject's ``[project.optional-dependencies]``, as users meet it."""

    name: str
    modules: tuple[str, ...]  # what it makes importable
    package: str  # how a message names it
    feature: str  # what needs it


EXTRAS: dict[str, Extra] = {e.name: e for e in (
    Extra("fast", ("onnxruntime", "skl2onnx", "onnx", "onnxmltools"),
          "skl2onnx, onnxmltools and onnxruntime",
          "the ONNX fast path (serving.compile)"),
    Extra("tune", ("optuna",), "Optuna", "`mloop tune`"),
    Extra("kubeflow", ("kfp",), "the kfp SDK", "`mloop export kubeflow`"),
    Extra("spark", ("pyspark",), "PySpark", "`mloop predict --engine spark`"),
    Extra("postgres", ("psycopg",), "psycopg", "a postgresql+psycopg:// store"),
    Extra("lightgbm", ("lightgbm",), "LightGBM", "a lightgbm model.estimator"),
    Extra("xgboost", ("xgboost",), "XGBoost", "an xgboost model.estimator"),
    Extra("encryption", ("cryptography",), "cryptography", "security.encryption"),
    Extra("aws-kms", ("boto3",), "boto3", "security.encryption.aws_kms"),
    Extra("feast", ("feast",), "Feast", "'features.store: feast'"),
)}


def extra_for_module(module: str) -> str | None:
    """The extra that installs ``module`` (or its top-level package), if one does: a model
    named by an import path (``lightgbm.LGBMRegressor``) is told which extra to install."""
    top = module.split(".")[0]
    return next((e.name for e in EXTRAS.values() if top in e.modules), None)


def install_hint(extra: str) -> str:
    return f"pip install 'mloop[{extra}]'"


def missing_extra_message(extra: str, *, feature: str | None = None,
                          package: str | None = None) -> str:
    """The one sentence for a missing extra: "`<feature>` needs <package>: pip install
    'mloop[<extra>]'" (``feature`` and ``package`` default to the extra's own)."""
    known = EXTRAS[extra]
    return (f"{feature or known.feature} needs {package or known.package}: "
            f"{install_hint(extra)}")


def require_extra(extra: str, module: str | None = None, *, feature: str | None = None
                  ) -> ModuleType:
    """Import ``module`` (default: the extra's first) or raise MissingExtraError saying which
    extra installs it. ``feature`` names what needs it when that is not the extra's usual
    feature. A module that is installed but fails to import (a broken or mismatched
    dependency) gets the same sentence, with the import error after it."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra '{extra}' (known: {', '.join(EXTRAS)})")
    name = module or EXTRAS[extra].modules[0]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        message = missing_extra_message(extra, feature=feature)
        top = name.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            message += f" (importing {name} failed: {exc})"
        raise MissingExtraError(message, extra=extra, module=name) from None
