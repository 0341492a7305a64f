"""A registered version made ready to answer: loaded once, warmed, with its input schema.

Prediction goes straight to the fitted scikit-learn estimator when the version is mloop's own
sklearn flavour (MLflow's pyfunc wrapper re-validates and copies the frame on every call, which
costs more than the model on small batches); any other flavour goes through pyfunc.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mloop.project import Project
from mloop.serving.schema import InputSchema


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

    def predict_columns(self, cols: dict[str, list]) -> list[Any]:
        """Score validated columns; one DataFrame per batch, never per request (and none at
        all on the compiled path)."""
        if self.compiled is not None:
            return self.compiled.predict_columns(cols).tolist()
        pred = np.asarray(self.predict_frame(self.schema.frame(cols)))
        if pred.ndim > 1:
            pred = pred.reshape(len(pred), -1)[:, 0]
        return pred.tolist()

    def warm_up(self) -> None:
        """Run the input example through the model: the first call pays for lazy imports and
        allocations, and a version that cannot predict is caught before it takes traffic."""
        if self.example is not None:
            out = self.predict_columns({k: list(v) for k, v in self.example.items()})
            if len(out) != len(next(iter(self.example.values()))):
                raise RuntimeError("warm-up returned the wrong number of predictions")
        self.warm = True

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "task": self.task, "signature": self.schema.describe(),
                "loaded_at": self.loaded_at, "load_seconds": round(self.load_seconds, 3),
                "engine": "onnx" if self.compiled is not None else "original",
                "compiled": self.compile_verdict}


def load_served(project: Project, version: int, *, warm: bool = True,
                compile: Any = None) -> ServedModel:
    """Load ``version`` of the project's model and (by default) warm it up. With ``compile``
    (a CompileConfig, enabled), a scikit-learn model is compiled and serves compiled if it
    verifies on the version's holdout."""
    from mloop.registry.candidates import get_version, load_pyfunc

    t0 = time.perf_counter()
    name = project.config.model_name
    mv = get_version(project, version)
    local, pyfunc = load_pyfunc(project, version)
    path = str(local)
    schema_in = pyfunc.metadata.get_input_schema()
    if schema_in is None:
        raise ValueError(f"version {version} of '{name}' has no input signature; mloop serves "
                         f"only versions with one (it validates every request against it)")
    schema = InputSchema.from_mlflow(schema_in)
    raw = None
    if "sklearn" in (pyfunc.metadata.flavors or {}):
        raw = pyfunc.get_raw_model()
    predict: Any = raw.predict if raw is not None else pyfunc.predict
    example = _example(pyfunc, path, schema)
    tags = dict(mv.tags or {})
    task = tags.get("mloop.task") or ("classification" if hasattr(raw, "predict_proba")
                                      else "regression")
    served = ServedModel(int(version), schema, task, predict, example)
    if compile is not None and compile.enabled and raw is not None:
        from mloop.serving.compiled import compile_and_verify

        served.compiled, verdict = compile_and_verify(project, int(version), raw, schema, task,
                                                      tags, compile)
        served.compile_verdict = verdict.to_dict()
    if warm:
        served.warm_up()
    served.load_seconds = time.perf_counter() - t0
    return served


def _example(pyfunc: Any, path: str, schema: InputSchema) -> dict[str, list] | None:
    try:
        frame = pyfunc.metadata.load_input_example(path)
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
