"""A registered version made ready to answer: loaded once, warmed, with its input schema.

Prediction goes straight to the fitted scikit-learn estimator when the version is mloop's own
sklearn flavour (MLflow's pyfunc wrapper re-validates and copies the frame on every call, which
costs more than the model on small batches); any other flavour goes to its pyfunc flavour's
own predict, past the schema enforcement mloop's validation makes redundant, where that is
proven to hand the model the same frame (``mloop.serving.pyfunc_direct``).

A classifier reached that way also answers with class probabilities, columns in the order of
the estimator's ``classes_`` (``ServedModel.classes``). A pipeline's transforms run once for
both outputs: labels come from the final estimator's own ``predict``, never from an argmax
that could disagree with it.

With the compiled fast path (``compile``), a version whose graph stored at registration still
verifies is served from that graph alone: its original (MLflow's pyfunc load and skops, 0.2 s
on a quiet machine and 0.3-0.4 s on a busy one for the bike model, more than the rest of the
swap) loads on first use instead, which a server never makes: a failing canary's rows are
answered by the champion, not by the canary's original.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mloop.project import Project
from mloop.serving.pyfunc_direct import DirectPredict
from mloop.serving.schema import FieldError, InputError, InputSchema

PREDICT_METHODS = ("predict", "predict_proba")


@dataclass
class ServedModel:
    version: int
    schema: InputSchema
    task: str
    predict_frame: Any  # (DataFrame) -> ndarray
    example: dict[str, list] | None
    loaded_at: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    warm: bool = False
    compiled: Any = None  # a verified CompiledModel, used instead of predict_frame
    compile_verdict: dict[str, Any] | None = None
    # a classifier with probabilities: its classes, in the order of the probability columns
    classes: list[Any] | None = None
    proba_frame: Any = None  # (DataFrame) -> (labels, probabilities), when classes is set
    original: Original | None = None  # the version's own model, loaded now or on first use

    def predict_columns(self, cols: dict[str, list]) -> list[Any]:
        """Score validated columns; one DataFrame per batch, never per request (and none at
        all on the compiled path)."""
        if self.compiled is not None:
            return self.compiled.predict_columns(cols).tolist()
        return _labels(self.predict_frame(self.schema.frame(cols))).tolist()

    def score_frame(self, frame: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (or values) and, for a classifier with probabilities, the (rows, classes)
        probabilities of a frame already cast to the signature (the original model)."""
        if self.proba_frame is not None:
            pred, proba = self.proba_frame(frame)
            return _labels(pred), np.asarray(proba, dtype=np.float64)
        return _labels(self.predict_frame(frame)), None

    def score_arrays(self, cols: dict[str, list]) -> tuple[np.ndarray, np.ndarray | None]:
        """``score_frame`` for validated columns, on the compiled model when it verified."""
        if self.compiled is not None:
            pred, proba = self.compiled.score_columns(cols)
            return pred, (proba if self.classes is not None else None)
        return self.score_frame(self.schema.frame(cols))

    def score_columns(self, cols: dict[str, list]) -> list[Any]:
        """What the micro-batcher runs: one entry per row, so a batch splits back into its
        requests by slicing. A regression row is its value; a classifier row with
        probabilities is ``(label, [p_class0, p_class1, ...])``, turned back into response
        fields by ``unpack``."""
        pred, proba = self.score_arrays(cols)
        if proba is None:
            if self.classes is not None:
                raise RuntimeError(f"v{self.version} answered without its class probabilities")
            return pred.tolist()
        return list(zip(pred.tolist(), proba.tolist(), strict=True))

    def unpack(self, rows: list[Any]) -> tuple[list[Any], list[list[float]] | None]:
        """``score_columns`` rows (of one request) → predictions and probabilities (None for a
        model without them)."""
        if self.classes is None:
            return rows, None
        return [r[0] for r in rows], [r[1] for r in rows]

    def response_fields(self, predictions: list[Any], probabilities: list[list[float]] | None,
                        *, method: str | None = None) -> dict[str, Any]:
        """The scoring fields of an answer. Without ``method`` (``/predict``):
        ``predictions`` (labels or values), plus ``probabilities`` (one list per row, in
        ``classes`` order) and ``classes`` for a classifier that has them. With an MLflow
        ``predict_method`` (``/invocations``): ``predict``, the labels alone (what MLflow's
        scoring server answers for a scikit-learn model logged with the default
        ``pyfunc_predict_fn``); ``predict_proba``, ``predictions`` are the per-row
        probability lists (its answer for ``pyfunc_predict_fn="predict_proba"``), with
        ``classes`` naming them."""
        if method == "predict_proba":
            if probabilities is None:
                raise InputError([FieldError(
                    "params.predict_method", f"v{self.version} is a {self.task} model without "
                    f"class probabilities; use 'predict'", value=method)])
            return {"predictions": probabilities, "classes": self.classes}
        if probabilities is None or method == "predict":
            return {"predictions": predictions}
        return {"predictions": predictions, "probabilities": probabilities,
                "classes": self.classes}

    def warm_up(self) -> None:
        """Run the input example through the model: the first call pays for lazy imports and
        allocations, and a version that cannot predict is caught before it takes traffic."""
        if self.example is not None:
            out = self.score_columns({k: list(v) for k, v in self.example.items()})
            if len(out) != len(next(iter(self.example.values()))):
                raise RuntimeError("warm-up returned the wrong number of predictions")
        self.warm = True

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "task": self.task, "signature": self.schema.describe(),
                "loaded_at": self.loaded_at, "load_seconds": round(self.load_seconds, 3),
                "engine": "onnx" if self.compiled is not None else "original",
                "compiled": self.compile_verdict, "classes": self.classes,
                "original_loaded": self.original is None or self.original.loaded}


def predict_method(body: Any, model: ServedModel | None) -> str:
    """The method an MLflow scoring request asks for through its ``params`` object
    (``{"params": {"predict_method": "predict_proba"}}``, an mloop convention on MLflow's
    channel for inference parameters); ``predict`` without one. InputError (422) naming an
    unknown parameter or value, or ``predict_proba`` for a ``model`` without probabilities,
    before anything is scored."""
    params = body.get("params") if isinstance(body, dict) else None
    if params is None:
        return "predict"
    message = "unsupported params"
    if not isinstance(params, dict):
        raise InputError([FieldError("params", "must be an object", value=params)], message)
    errors = [FieldError(f"params.{k}", "unknown parameter (mloop knows 'predict_method')")
              for k in sorted(params) if k != "predict_method"]
    method = params.get("predict_method", "predict")
    if method not in PREDICT_METHODS:
        errors.append(FieldError("params.predict_method",
                                 f"must be one of {', '.join(PREDICT_METHODS)}", value=method))
    elif method == "predict_proba" and model is not None and model.classes is None:
        errors.append(FieldError("params.predict_method", f"v{model.version} is a {model.task} "
                                 f"model without class probabilities", value=method))
    if errors:
        raise InputError(errors, message)
    return str(method)


class Original:
    """A version's own model: the MLflow pyfunc and, for the scikit-learn flavour, the fitted
    estimator. Loaded once, on the first call that needs it (thread-safe)."""

    def __init__(self, project: Project, version: int, *, sklearn: bool) -> None:
        self._project, self._version, self._sklearn = project, version, sklearn
        self._lock = threading.Lock()
        self._pyfunc: Any = None
        self._raw: Any = None
        self._both: Any = None
        self._direct: DirectPredict | None = None

    @property
    def loaded(self) -> bool:
        return self._pyfunc is not None

    def pyfunc(self) -> Any:
        if self._pyfunc is None:
            from mloop.registry.candidates import load_pyfunc

            with self._lock:
                if self._pyfunc is None:
                    _, pyfunc = load_pyfunc(self._project, self._version)
                    self._raw = pyfunc.get_raw_model() if self._sklearn else None
                    self._pyfunc = pyfunc
        return self._pyfunc

    def raw(self) -> Any:
        """The scikit-learn estimator (None for another flavour)."""
        self.pyfunc()
        return self._raw

    def direct(self) -> DirectPredict:
        """The pyfunc's predict without MLflow's re-check of mloop-validated frames."""
        if self._direct is None:
            self._direct = DirectPredict(self.pyfunc())
        return self._direct

    def predict(self, frame: Any) -> Any:
        model = self.raw()
        return model.predict(frame) if model is not None else self.direct()(frame)

    def predict_both(self, frame: Any) -> tuple[Any, Any]:
        if self._both is None:
            self._both = _with_probabilities(self.raw())[1]
        return self._both(frame)  # type: ignore[no-any-return]


def load_served(project: Project, version: int, *, warm: bool = True,
                compile: Any = None) -> ServedModel:
    """Load ``version`` of the project's model and (by default) warm it up. With ``compile``
    (a CompileConfig, enabled), a scikit-learn model serves compiled if its graph verifies on
    the version's holdout (the graph and verdict stored at registration, see
    ``mloop.serving.compiled.load_compiled``); the original then loads only when first used."""
    from mloop.registry.candidates import get_version, load_metadata

    t0 = time.perf_counter()
    name = project.config.model_name
    mv = get_version(project, version)
    local, meta = load_metadata(project, version)
    schema_in = meta.get_input_schema()
    if schema_in is None:
        raise ValueError(f"version {version} of '{name}' has no input signature; mloop serves "
                         f"only versions with one (it validates every request against it)")
    schema = InputSchema.from_mlflow(schema_in)
    sklearn = "sklearn" in (meta.flavors or {})
    original = Original(project, int(version), sklearn=sklearn)
    example = _example(meta, str(local), schema)
    tags = dict(mv.tags or {})
    task = tags.get("mloop.task") or ("classification" if hasattr(original.raw(),
                                                                  "predict_proba")
                                      else "regression")
    compiled, verdict = None, None
    if compile is not None and compile.enabled and sklearn:
        from mloop.serving.compiled import load_compiled

        compiled, verdict = load_compiled(project, int(version), tags=tags, schema=schema,
                                          task=task, cfg=compile, original=original.raw,
                                          run_id=mv.run_id)
    if compiled is None:
        original.pyfunc()  # serving the original: loaded and warmed before it takes traffic
    served = ServedModel(int(version), schema, task, _predict(original), example,
                         compiled=compiled, original=original,
                         compile_verdict=verdict.to_dict() if verdict is not None else None)
    if task == "classification" and sklearn:
        if original.loaded:
            served.classes, served.proba_frame = _with_probabilities(original.raw())
        elif compiled is not None and compiled.classes is not None:
            served.classes, served.proba_frame = compiled.classes, original.predict_both
    if warm:
        served.warm_up()
    served.load_seconds = time.perf_counter() - t0
    return served


def _predict(original: Original) -> Callable[[Any], Any]:
    """(frame) -> predictions of the original: its own bound method once loaded (no extra
    call per batch), a loader that binds on first use otherwise."""
    if original.loaded:
        raw = original.raw()
        return raw.predict if raw is not None else original.direct()
    return original.predict


def _with_probabilities(raw: Any) -> tuple[list[Any] | None, Any]:
    """The classes and a (frame) -> (labels, probabilities) function of a scikit-learn
    classifier; (None, None) if it has no probabilities. A pipeline transforms once and asks
    its final estimator for both (the transforms cost more than the estimator on a small
    batch); any other estimator is asked twice."""
    classes = getattr(raw, "classes_", None)
    if classes is None or not hasattr(raw, "predict_proba"):
        return None, None
    steps = getattr(raw, "steps", None)
    if steps and len(steps) > 1 and hasattr(steps[-1][1], "predict_proba"):
        transform, final = raw[:-1].transform, steps[-1][1]

        def both(frame: Any) -> tuple[Any, Any]:
            x = transform(frame)
            return final.predict(x), final.predict_proba(x)
    else:
        def both(frame: Any) -> tuple[Any, Any]:
            return raw.predict(frame), raw.predict_proba(frame)
    return np.asarray(classes).tolist(), both


def _labels(pred: Any) -> np.ndarray:
    pred = np.asarray(pred)
    return pred.reshape(len(pred), -1)[:, 0] if pred.ndim > 1 else pred


def _example(meta: Any, path: str, schema: InputSchema) -> dict[str, list] | None:
    try:
        frame = meta.load_input_example(path)
    except Exception:
        return None
    if frame is None or not hasattr(frame, "columns"):
        return None
    cols = {}
    for name in schema.names:
        if name not in frame.columns:
            return None
        cols[name] = [None if _isnull(v) else v for v in frame[name].tolist()]
    return cols


def _isnull(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)
