"""Registering a trained model as a candidate version, tagged with its full lineage."""

from __future__ import annotations

import contextlib
import importlib.metadata
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloop._version import __version__

if TYPE_CHECKING:
    from mloop.registry.model_files import ModelFiles
    from mloop.tracking_read import ModelVersionRecord


def get_version(project: Any, version: int) -> ModelVersionRecord:
    """The registered version (tags, run, source), or ModelNotFoundError naming it. Read
    through :mod:`mloop.tracking_read`: on an MLflow SQL store no ``MlflowClient`` is opened
    (its first use runs MLflow's schema check, seconds per process)."""
    return version_record(project, version)


def version_record(project: Any, version: int) -> ModelVersionRecord:
    """The version as recorded in MLflow, read without loading MLflow when the store allows
    (:mod:`mloop.tracking_read`); ModelNotFoundError naming it when there is none."""
    from mloop.errors import ModelNotFoundError

    record = project.tracking.model_version(project.config.model_name, version)
    if record is None:
        raise ModelNotFoundError(f"model '{project.config.model_name}' has no version "
                                 f"{version} (see `mloop models list`)",
                                 model=project.config.model_name, version=version)
    return record


def _requirements(model: Any) -> list[str]:
    """Exact pins for what the logged model needs to load; the estimator's package included."""
    pkgs = {"scikit-learn", "pandas", "numpy", "skops", "scipy"}
    est = getattr(model, "steps", [[None, model]])[-1][1]
    top = type(est).__module__.split(".")[0]
    if top not in {"sklearn", "mloop", "builtins"}:
        pkgs.add(top)
    out = []
    for name in sorted(pkgs):
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            # a module installed under another distribution's name (xgboost by xgboost-cpu,
            # mloop's xgboost extra): pin that one (scanning every distribution costs ~0.3 s,
            # paid only here)
            for dist in importlib.metadata.packages_distributions().get(name, [])[:1]:
                out.append(f"{dist}=={importlib.metadata.version(dist)}")
    return out


def _trusted_types(model: Any) -> list[str]:
    """Types skops must be told to trust: we trained this model ourselves, a moment ago."""
    import skops.io

    return sorted(skops.io.get_untrusted_types(data=skops.io.dumps(model)))


def candidate_signature(input_example: Any, predictions: Any, signature_input: Any = None
                        ) -> Any:
    """The MLflow signature a candidate is logged with: inferred from ``signature_input``
    (the training features) when given, so columns that had missing values are optional;
    else from the example."""
    from mlflow.models import infer_signature

    return infer_signature(input_example if signature_input is None else signature_input,
                           predictions)


def register_candidate(client: Any, *, run_id: str, model: Any, name: str, input_example: Any,
                       predictions: Any, tags: dict[str, str],
                       description: str | None = None,
                       signature_input: Any = None, signature: Any = None) -> dict[str, Any]:
    """Log ``model`` (sklearn flavour, skops format) under ``run_id`` and register a version.

    ``signature`` is the one to log (``candidate_signature`` makes it; the register step
    needs it before the version exists, to compile the model against it); without it, it is
    inferred here the same way.

    Returns ``{"name", "version", "model_uri", "run_id"}``. The version is created last, so a
    failure before it leaves the registry untouched.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.exceptions import MlflowException

    if signature is None:
        signature = candidate_signature(input_example, predictions, signature_input)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.sklearn.log_model(
            model, name="model", signature=signature, input_example=input_example,
            serialization_format="skops", skops_trusted_types=_trusted_types(model),
            pip_requirements=_requirements(model),
        )
    try:
        client.get_registered_model(name)
    except MlflowException:
        # Another process may create it between the two calls; that is fine.
        with contextlib.suppress(MlflowException):
            client.create_registered_model(name, tags={"mloop.managed": "true"})
    all_tags = {**tags, "mloop.version": __version__, "mloop.role": "candidate"}
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id,
                                     tags=all_tags, description=description,
                                     model_id=info.model_id)
    return {"name": name, "version": int(mv.version), "model_uri": f"models:/{name}/{mv.version}",
            "logged_model_uri": info.model_uri, "run_id": run_id}


_PYFUNCS: OrderedDict[tuple[str, str, int], tuple[Path, Any]] = OrderedDict()
_COPIES: OrderedDict[tuple[str, str, int], Path] = OrderedDict()
_PYFUNCS_LOCK = threading.Lock()
PYFUNC_CACHE_SIZE = 4


def _cached(cache: OrderedDict[Any, Any], key: Any) -> Any:
    with _PYFUNCS_LOCK:
        hit = cache.get(key)
        if hit is not None:
            cache.move_to_end(key)
        return hit


def _keep(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    with _PYFUNCS_LOCK:
        cache[key] = value
        while len(cache) > PYFUNC_CACHE_SIZE:
            cache.popitem(last=False)


def _local_copy(project: Any, version: int) -> Path:
    """The version's model folder on local disk (downloaded once per process)."""
    import mlflow.artifacts

    name = project.config.model_name
    key = (project.uris["tracking_uri"], name, int(version))
    hit = _cached(_COPIES, key)
    if hit is not None and hit.exists():
        return Path(hit)
    # where the files are, when the registry says so and they are on this disk: the same
    # copy without resolving ``models:/`` through MLflow's registry client
    where = version_record(project, version).storage_location or ""
    project.aim_mlflow()  # MLflow's fluent API (used below) at this project's stores
    uri = where if where.startswith("file:") else f"models:/{name}/{version}"
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    _keep(_COPIES, key, path)
    return path


def version_files(project: Any, version: int) -> ModelFiles:
    """The version's MLmodel (flavours, signature), read in place when the files are on this
    disk (no MLflow import), else from the downloaded copy."""
    from mloop.registry.model_files import in_place_dir, read_model_files

    here = in_place_dir(version_record(project, version).storage_location)
    return read_model_files(here if here is not None else _local_copy(project, version))


_SCORERS: OrderedDict[tuple[str, str, int], Scorer] = OrderedDict()


@dataclass(frozen=True)
class Scorer:
    """A version as gating scores it: its files, the fitted model, and the call the server
    makes (the estimator's own ``predict`` for the sklearn flavour, as the server calls it;
    MLflow's pyfunc for any other flavour)."""

    files: ModelFiles
    model: Any
    predict: Any


def load_scorer(project: Any, version: int) -> Scorer:
    """``version`` ready to score, from the same small in-process cache as the pyfunc. A
    sklearn-flavour model is deserialized from its files (:func:`version_files`: in place
    when on this disk, without importing MLflow); any other flavour loads through MLflow's
    pyfunc."""
    from mloop.registry.model_files import load_sklearn

    key = (project.uris["tracking_uri"], project.config.model_name, int(version))
    hit = _cached(_SCORERS, key)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    files = version_files(project, version)
    model = load_sklearn(files)
    if model is not None:
        scorer = Scorer(files, model, model.predict)
    else:
        _, pyfunc = load_pyfunc(project, version)
        scorer = Scorer(files, pyfunc.get_raw_model(), pyfunc.predict)
    _keep(_SCORERS, key, scorer)
    return scorer


def load_metadata(project: Any, version: int) -> tuple[Path, Any]:
    """The local copy and the MLmodel (``mlflow.models.Model``: flavours, signature, input
    example) of ``version``, without loading the model itself: a server that serves the
    version's stored compiled graph never needs the original, and deserializing it costs
    more than everything else a hot swap does."""
    from mlflow.models import Model

    name = project.config.model_name
    hit = _cached(_PYFUNCS, (project.uris["tracking_uri"], name, int(version)))
    if hit is not None:
        return hit[0], hit[1].metadata
    path = _local_copy(project, version)
    return path, Model.load(str(path))


def load_pyfunc(project: Any, version: int) -> tuple[Path, Any]:
    """The local copy and the loaded pyfunc of ``version``, from a small in-process cache: a
    registered version never changes, and one controller pass may load the same two versions
    three times (gates, probation verdict, promotion), at 0.4 s and a fresh artifact copy
    each."""
    import mlflow.pyfunc

    name = project.config.model_name
    key = (project.uris["tracking_uri"], name, int(version))
    hit = _cached(_PYFUNCS, key)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    path = _local_copy(project, version)
    loaded = (path, mlflow.pyfunc.load_model(str(path)))
    _keep(_PYFUNCS, key, loaded)
    return loaded
