"""A registered version's files read in place: MLflow's ``MLmodel`` (flavours, signature) and
a scikit-learn flavour's estimator, without importing MLflow.

A fresh ``mloop models gate`` paid about a second (2-4 s on a busy machine) to import MLflow
only to open a folder on this disk and deserialize an estimator that the sklearn flavour
saved with skops. ``MLmodel`` is MLflow's documented YAML; its sklearn flavour names the file
(``pickled_model``), the format (``serialization_format``) and the types skops is told to
trust (``skops_trusted_types``), which is all ``mlflow.sklearn`` itself reads to load it, with
the same trust (MLflow's default, ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` true). Anything
else (another flavour, files not on this disk, that variable set to false) goes through
MLflow, so its behaviour and errors stay MLflow's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from mloop.errors import MloopError

__all__ = ["ModelFiles", "SignatureColumn", "in_place_dir", "load_sklearn", "read_model_files"]


@dataclass(frozen=True)
class SignatureColumn:
    """One column of a signature, typed as MLflow's schema names it (``double``,
    ``string``...; a tensor by its dtype, ``float64``)."""

    name: str
    type: str
    required: bool = True


def _columns(text: str | None) -> list[SignatureColumn] | None:
    if not text:
        return None
    out = []
    for i, spec in enumerate(json.loads(text)):
        kind = spec.get("type")
        if kind == "tensor":
            kind = str(spec.get("tensor-spec", {}).get("dtype"))
        out.append(SignatureColumn(spec.get("name") or str(i), str(kind),
                                   bool(spec.get("required", True))))
    return out


@dataclass(frozen=True)
class ModelFiles:
    """A model folder and its parsed ``MLmodel``."""

    path: Path
    mlmodel: dict[str, Any]

    def flavour(self, name: str) -> dict[str, Any] | None:
        found = (self.mlmodel.get("flavors") or {}).get(name)
        return found if isinstance(found, dict) else None

    @property
    def inputs(self) -> list[SignatureColumn] | None:
        return _columns((self.mlmodel.get("signature") or {}).get("inputs"))

    @property
    def outputs(self) -> list[SignatureColumn] | None:
        return _columns((self.mlmodel.get("signature") or {}).get("outputs"))


def in_place_dir(storage_location: str | None) -> Path | None:
    """The version's folder when the registry stores it on this disk (``file:`` URI) and it
    is there; None otherwise (the caller downloads a copy through MLflow)."""
    if not storage_location or not storage_location.startswith("file:"):
        return None
    path = Path(unquote(urlparse(storage_location).path))
    return path if (path / "MLmodel").is_file() else None


def read_model_files(path: Path) -> ModelFiles:
    """``path``'s MLmodel; MloopError naming the file when it is missing or unreadable."""
    where = path / "MLmodel"
    try:
        mlmodel = yaml.safe_load(where.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MloopError(f"cannot read the model's {where}: {exc}") from None
    if not isinstance(mlmodel, dict):
        raise MloopError(f"{where} is not an MLflow MLmodel file (expected a mapping)")
    return ModelFiles(path, mlmodel)


def load_sklearn(files: ModelFiles) -> Any | None:
    """The fitted estimator of a sklearn-flavour model, deserialized as ``mlflow.sklearn``
    does; None when this is not one this module reads (the caller loads it with MLflow)."""
    conf = files.flavour("sklearn")
    if conf is None or not conf.get("pickled_model"):
        return None
    if os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true").strip().lower() in (
            "false", "0", "no"):
        return None  # MLflow refuses, with its own message
    target = files.path / conf["pickled_model"]
    fmt = conf.get("serialization_format", "pickle")
    if fmt == "skops":
        import skops.io

        return skops.io.load(target, trusted=conf.get("skops_trusted_types"))
    if fmt == "cloudpickle":
        import cloudpickle

        with target.open("rb") as f:
            return cloudpickle.load(f)
    if fmt == "pickle":
        import pickle

        with target.open("rb") as f:
            # a version logged in MLflow's pickle format: loading a registered model trusts
            # the project's registry, as MLflow's own loader does (mloop logs with skops)
            return pickle.load(f)  # nosec B301
    return None
