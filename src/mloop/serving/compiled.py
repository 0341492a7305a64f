"""The verified fast path: a scikit-learn pipeline compiled to ONNX, used only if it agrees.

scikit-learn spends milliseconds per predict call on input validation and column plumbing;
the same pipeline compiled with skl2onnx runs in tens of microseconds under onnxruntime (which
also releases the GIL). Compilation is not exact (trees compare in float32), so a compiled
model serves only after it has been checked against the original on the version's holdout
snapshot: every prediction within ``atol + rtol * |original|`` (regression), or, for a
classifier, the same label and every class probability within ``atol + rtol * p`` on all but
``max_label_mismatch`` of the rows (the probabilities are served and logged, so they are held
to the same standard as a regression's values). The verdict is recorded on the
MLflow version (tag ``mloop.compiled``); a mismatch, a failed conversion or a missing optional
dependency (``pip install mloop[fast]``) means the original serves, as before.

mloop's pipelines fill missing categories with a constant string imputer, which skl2onnx cannot
convert; the imputer is removed from the compiled graph and its fill value applied while the
input tensors are built, which is the same computation.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mloop.serving.schema import InputSchema

log = logging.getLogger("mloop.serving")
TAG = "mloop.compiled"
_NUMERIC = ("double", "float", "long", "integer", "boolean")


class CompileUnsupported(Exception):
    """This model cannot be compiled (or the optional dependencies are missing)."""


@dataclass
class CompiledModel:
    session: Any
    names: list[str]
    numeric: list[bool]
    fills: dict[str, str]
    output: str
    proba_output: str | None = None  # a classifier's (rows, classes) probabilities

    def _feeds(self, cols: dict[str, list]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, is_num in zip(self.names, self.numeric, strict=True):
            values = cols[name]
            if is_num:
                arr = np.array([np.nan if v is None else v for v in values], dtype=np.float32)
            else:
                fill = self.fills.get(name, "")
                arr = np.array([fill if v is None else v for v in values], dtype=object)
            feeds[name] = arr.reshape(-1, 1)
        return feeds

    def predict_columns(self, cols: dict[str, list]) -> np.ndarray:
        return _flat(self.session.run([self.output], self._feeds(cols))[0])

    def score_columns(self, cols: dict[str, list]) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (or values) and, for a classifier, its probabilities: one run for both."""
        if self.proba_output is None:
            return self.predict_columns(cols), None
        label, proba = self.session.run([self.output, self.proba_output], self._feeds(cols))
        return _flat(label), np.asarray(proba, dtype=np.float64)


def _flat(out: Any) -> np.ndarray:
    arr = np.asarray(out)
    return arr.reshape(len(arr), -1)[:, 0] if arr.ndim > 1 else arr


@dataclass
class Verdict:
    status: str  # verified | mismatch | unsupported | unverified
    detail: str
    rows: int = 0
    max_abs_diff: float | None = None
    mismatches: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _strip_string_imputers(model: Any) -> tuple[Any, dict[str, str]]:
    """A shallow copy of ``model`` without constant string imputers, and column -> fill."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline

    fills: dict[str, str] = {}
    if not isinstance(model, Pipeline) or not isinstance(model.steps[0][1], ColumnTransformer):
        return model, fills
    ct = model.steps[0][1]
    new = []
    for name, trans, columns in ct.transformers_:
        def is_fill(step: Any) -> bool:
            return isinstance(step, SimpleImputer) and step.strategy == "constant" \
                and isinstance(step.fill_value, str)

        if isinstance(trans, Pipeline):
            kept = [(n, s) for n, s in trans.steps if not is_fill(s)]
            for _, s in trans.steps:
                if is_fill(s):
                    fills.update({str(c): s.fill_value for c in columns})
            if len(kept) != len(trans.steps):
                trans = copy.copy(trans)
                trans.steps = kept
        elif is_fill(trans):
            fills.update({str(c): trans.fill_value for c in columns})
            trans = "passthrough"
        new.append((name, trans, columns))
    ct2 = copy.copy(ct)
    ct2.transformers_ = new
    out = copy.copy(model)
    out.steps = [(model.steps[0][0], ct2), *model.steps[1:]]
    return out, fills


def _log_link(estimator: Any) -> bool:
    """A gradient-boosting regressor with a log link (Poisson, gamma, Tweedie losses): the
    trees predict in log space, and skl2onnx emits that raw score."""
    loss = getattr(estimator, "loss", None)
    return type(estimator).__name__ == "HistGradientBoostingRegressor" and loss in (
        "poisson", "gamma")


def _append_exp(onx: Any) -> None:
    """Apply exp to the graph's (only) output, in place."""
    from onnx import helper

    graph = onx.graph
    name = graph.output[0].name
    raw = f"{name}_log"
    for node in graph.node:
        node.output[:] = [raw if o == name else o for o in node.output]
    graph.node.append(helper.make_node("Exp", [raw], [name], name="mloop_log_link"))


def compile_sklearn(model: Any, schema: InputSchema) -> CompiledModel:
    """Convert a fitted scikit-learn model; CompileUnsupported if it cannot be."""
    from mloop.errors import MissingExtraError
    from mloop.extras import require_extra

    try:
        ort = require_extra("fast", "onnxruntime")
        require_extra("fast", "skl2onnx")
    except MissingExtraError as exc:
        raise CompileUnsupported(str(exc)) from None
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    stripped, fills = _strip_string_imputers(model)
    numeric = [c.type in _NUMERIC for c in schema.columns]
    types = [(c.name, FloatTensorType([None, 1]) if num else StringTensorType([None, 1]))
             for c, num in zip(schema.columns, numeric, strict=True)]
    final = stripped.steps[-1][1] if hasattr(stripped, "steps") else stripped
    options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
    try:
        onx = convert_sklearn(stripped, initial_types=types, options=options,
                              target_opset={"": 17, "ai.onnx.ml": 3})
        if _log_link(final):
            _append_exp(onx)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(onx.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompileUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    outputs = session.get_outputs()
    proba = outputs[1].name if options is not None and len(outputs) > 1 else None
    return CompiledModel(session, schema.names, numeric, fills, outputs[0].name, proba)


def verify(compiled: CompiledModel, original: Any, frame: Any, schema: InputSchema, task: str,
           *, atol: float, rtol: float, max_label_mismatch: float) -> Verdict:
    """Compare compiled and original predictions row by row on ``frame``."""
    t0 = time.perf_counter()
    cols = {}
    for c in schema.columns:
        values = frame[c.name].tolist()
        cols[c.name] = [None if (v is None or (isinstance(v, float) and v != v)) else v
                        for v in values]
    frame_in = schema.frame(cols)
    ref = np.asarray(original.predict(frame_in))
    got, got_proba = compiled.score_columns(cols)
    n = len(ref)
    if task == "regression":
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        bad = int((diff > atol + rtol * np.abs(ref)).sum())
        worst = float(diff.max()) if n else 0.0
        ok = bad == 0
        detail = (f"{n} holdout rows, max |difference| {worst:.3g} (allowed "
                  f"{atol:g} + {rtol:g}·|prediction|), {bad} outside")
        return Verdict("verified" if ok else "mismatch", detail, n, worst, bad,
                       time.perf_counter() - t0)
    label_off = got.astype(str) != ref.astype(str)
    proba_off: np.ndarray = np.zeros(n, dtype=bool)
    proba_worst: float | None = None
    if hasattr(original, "predict_proba"):
        ref_proba = np.asarray(original.predict_proba(frame_in), dtype=np.float64)
        if got_proba is None or got_proba.shape != ref_proba.shape:
            shape = None if got_proba is None else got_proba.shape
            return Verdict("mismatch", f"the compiled model's probabilities have shape {shape}, "
                           f"the original's {ref_proba.shape}", n, None, n,
                           time.perf_counter() - t0)
        diff = np.abs(got_proba - ref_proba)
        proba_off = np.asarray((diff > atol + rtol * np.abs(ref_proba)).any(axis=1))
        proba_worst = float(diff.max()) if n else 0.0
    bad = int((label_off | proba_off).sum())
    ok = bad <= max_label_mismatch * n
    detail = f"{n} holdout rows, {int(label_off.sum())} labels differ"
    if proba_worst is not None:
        detail += (f", {int(proba_off.sum())} with a probability off by more than {atol:g} + "
                   f"{rtol:g}·p (max |difference| {proba_worst:.3g})")
    detail += f" (allowed {max_label_mismatch:.2%} of rows)"
    return Verdict("verified" if ok else "mismatch", detail, n, proba_worst, bad,
                   time.perf_counter() - t0)


def compile_and_verify(project: Any, version: int, raw: Any, schema: InputSchema, task: str,
                       tags: dict[str, str], cfg: Any) -> tuple[CompiledModel | None, Verdict]:
    """The compiled model if it verified on the holdout, and the verdict (recorded on the
    version when it changed)."""
    try:
        compiled = compile_sklearn(raw, schema)
    except CompileUnsupported as exc:
        verdict = Verdict("unsupported", str(exc))
        _record(project, version, tags, verdict)
        return None, verdict
    holdout = tags.get("mloop.snapshot.holdout")
    if not holdout:
        verdict = Verdict("unverified", "no holdout snapshot recorded on the version")
        _record(project, version, tags, verdict)
        return None, verdict
    try:
        frame = project.snapshots.read_table(holdout).to_pandas()
        verdict = verify(compiled, raw, frame, schema, task, atol=cfg.atol, rtol=cfg.rtol,
                         max_label_mismatch=cfg.max_label_mismatch)
    except Exception as exc:
        verdict = Verdict("unverified", f"holdout check failed: {type(exc).__name__}: {exc}")
    _record(project, version, tags, verdict)
    return (compiled if verdict.status == "verified" else None), verdict


def _record(project: Any, version: int, tags: dict[str, str], verdict: Verdict) -> None:
    body = verdict.to_dict()
    body.pop("seconds", None)
    value = json.dumps(body, sort_keys=True)
    if tags.get(TAG) == value:
        return
    try:
        project.mlflow.set_model_version_tag(project.config.model_name, str(version), TAG,
                                             value)
    except Exception as exc:  # recording is best effort; serving goes on
        log.warning("could not record the compile verdict on v%s: %s", version, exc)
