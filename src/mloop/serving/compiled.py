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

Compiling and verifying is done once per version, when it is registered (the register step
calls ``compile_and_store``): the ONNX graph is logged as an artifact of the version's run,
content-addressed (``mloop-compiled/<sha256>.onnx``), and the verdict on the version's tag says
what it was verified against (holdout snapshot digest, tolerances, onnxruntime, skl2onnx and
scikit-learn versions) and where the graph is. A load (``load_compiled``) then builds an
onnxruntime session from the stored bytes, without skl2onnx and without the original model:
tens of milliseconds instead of seconds. It checks before trusting the verdict; anything that
no longer matches is redone at that load and recorded on the tag:

* other tolerances, onnxruntime or scikit-learn: the stored graph is verified again (no
  compile);
* another skl2onnx, a version registered before graphs were stored, a graph whose bytes are
  missing or do not hash to the recorded sha256: compiled and verified again, and stored.

A "mismatch" or "unsupported" verdict that still matches is final too: the original serves
without a compile at every load.

A pipeline ending in a LightGBM or XGBoost estimator compiles the same way, with onnxmltools'
converter registered with skl2onnx (:mod:`mloop.serving.engines`); its verdict also records the
onnxmltools and LightGBM (or XGBoost) versions, and another onnxmltools makes the graph again
like another skl2onnx.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mloop.errors import MissingExtraError, MloopError
from mloop.extras import require_extra
from mloop.registry.verdict import TAG, Verdict
from mloop.serving import engines
from mloop.serving.schema import InputSchema

log = logging.getLogger("mloop.serving")
ARTIFACT_DIR = "mloop-compiled"  # in the artifacts of the version's run
_NUMERIC = ("double", "float", "long", "integer", "boolean")
# what the compiled graph carries about itself (ONNX metadata_props)
_META_FILLS = "mloop.fills"
_META_CLASSES = "mloop.classes"
# the libraries a verdict depends on: skl2onnx made the graph, onnxruntime runs it,
# scikit-learn runs the original it is compared with
LIBRARIES = ("onnxruntime", "skl2onnx", "scikit-learn")


class CompileUnsupported(MloopError):
    """This model cannot be compiled (or the optional dependencies are missing)."""


class StoredGraphUnusable(MloopError):
    """The graph a verdict points to is missing, altered or cannot be loaded."""


@dataclass
class CompiledModel:
    session: Any
    names: list[str]
    numeric: list[bool]
    fills: dict[str, str]
    output: str
    proba_output: str | None = None  # a classifier's (rows, classes) probabilities
    classes: list[Any] | None = None  # the probability columns' classes, with proba_output

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


@functools.cache
def _installed(library: str) -> str | None:
    """The installed version of ``library``, from the first of its distributions that is
    installed (``engines.DISTRIBUTIONS``: xgboost comes as xgboost or xgboost-cpu)."""
    for dist in engines.DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Installed versions of the libraries a verdict depends on (``LIBRARIES``, then an
    engine's ``extra`` ones), read from their metadata (importing skl2onnx or scikit-learn
    to ask would cost seconds on the load path)."""
    return {dist: _installed(dist) for dist in (*LIBRARIES, *extra)}


def verified_against(holdout: str | None, cfg: Any, extra: tuple[str, ...] = ()
                     ) -> dict[str, Any]:
    """What a verdict made now would be checked with: the holdout snapshot, the tolerances,
    the library versions (with an engine's ``extra`` libraries,
    ``mloop.serving.engines.engine_libraries``)."""
    return {"holdout": holdout, "atol": cfg.atol, "rtol": cfg.rtol,
            "max_label_mismatch": cfg.max_label_mismatch, **library_versions(extra)}


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
    return session_from_bytes(convert_sklearn(model, schema), schema)


def convert_sklearn(model: Any, schema: InputSchema) -> bytes:
    """The serialized ONNX graph of a fitted scikit-learn model, carrying in its metadata what
    a session needs besides the graph (the string fill values, a classifier's classes), so
    the stored bytes alone serve. CompileUnsupported if it cannot be converted."""
    _require("skl2onnx")
    engines.prepare(model, _require)
    from skl2onnx import convert_sklearn as skl2onnx_convert
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    stripped, fills = _strip_string_imputers(model)
    numeric = [c.type in _NUMERIC for c in schema.columns]
    types = [(c.name, FloatTensorType([None, 1]) if num else StringTensorType([None, 1]))
             for c, num in zip(schema.columns, numeric, strict=True)]
    final = stripped.steps[-1][1] if hasattr(stripped, "steps") else stripped
    options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
    try:
        onx = skl2onnx_convert(stripped, initial_types=types, options=options,
                               target_opset={"": 17, "ai.onnx.ml": 3})
        if _log_link(final):
            _append_exp(onx)
    except Exception as exc:
        raise CompileUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    meta = {_META_FILLS: json.dumps(fills, sort_keys=True)}
    classes = getattr(model, "classes_", None)
    if options is not None and classes is not None:
        meta[_META_CLASSES] = json.dumps(np.asarray(classes).tolist())
    for key, value in meta.items():
        entry = onx.metadata_props.add()
        entry.key, entry.value = key, value
    return bytes(onx.SerializeToString())


def _require(module: str) -> Any:
    """``module`` of the ``fast`` extra, or CompileUnsupported saying how to install it."""
    try:
        return require_extra("fast", module)
    except MissingExtraError as exc:
        raise CompileUnsupported(str(exc)) from None


def session_from_bytes(data: bytes, schema: InputSchema) -> CompiledModel:
    """An onnxruntime session (one thread) over a graph ``convert_sklearn`` made. Needs
    onnxruntime only; CompileUnsupported if it is missing or the graph does not fit
    ``schema``."""
    ort = _require("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CompileUnsupported(f"{type(exc).__name__}: {str(exc)[:300]}") from None
    inputs = sorted(i.name for i in session.get_inputs())
    if inputs != sorted(schema.names):
        raise CompileUnsupported(f"the graph's inputs {inputs} are not the signature's "
                                 f"{sorted(schema.names)}")
    meta = session.get_modelmeta().custom_metadata_map
    fills = json.loads(meta.get(_META_FILLS, "{}"))
    classes = json.loads(meta[_META_CLASSES]) if _META_CLASSES in meta else None
    outputs = session.get_outputs()
    proba = outputs[1].name if classes is not None and len(outputs) > 1 else None
    numeric = [c.type in _NUMERIC for c in schema.columns]
    return CompiledModel(session, schema.names, numeric, fills, outputs[0].name, proba,
                         classes if proba is not None else None)


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


HOLDOUT_TAG = "mloop.snapshot.holdout"


def compile_and_store(project: Any, *, model: Any, schema: InputSchema, task: str,
                      holdout: str | None, cfg: Any, run_id: str | None, compiled_at: str,
                      note: str | None = None) -> tuple[CompiledModel | None, Verdict]:
    """Compile ``model``, verify it on the ``holdout`` snapshot, and log the graph as an
    artifact of ``run_id`` (None: not stored). Returns the compiled model if it verified, and
    the verdict to record on the version's tag (the caller records it: the register step
    creates the version with it). Never raises for a model that cannot be compiled or
    checked: the verdict says why."""
    t0 = time.perf_counter()
    against = verified_against(holdout, cfg, engines.engine_libraries(model))
    try:
        data = convert_sklearn(model, schema)
        compiled = session_from_bytes(data, schema)
    except CompileUnsupported as exc:
        return None, Verdict("unsupported", str(exc), against=against, compiled_at=compiled_at,
                             note=note, seconds=time.perf_counter() - t0)
    verdict = _check(project, compiled, model, schema, task, holdout, cfg)
    verdict.against, verdict.compiled_at, verdict.note = against, compiled_at, note
    if run_id is not None:
        try:
            verdict.artifact = _store(project, run_id, data)
        except Exception as exc:  # serving goes on; the next load compiles again
            why = f"the graph could not be stored in run {run_id}: {type(exc).__name__}: {exc}"
            log.warning("%s", why)
            verdict.note = f"{note}; {why}" if note else why
    verdict.seconds = time.perf_counter() - t0
    return (compiled if verdict.status == "verified" else None), verdict


def load_compiled(project: Any, version: int, *, tags: dict[str, str], schema: InputSchema,
                  task: str, cfg: Any, original: Callable[[], Any],
                  run_id: str | None) -> tuple[CompiledModel | None, Verdict]:
    """The compiled model of ``version`` if it serves (None: the original does) and the
    verdict, from what is stored with the version whenever that still holds (see the module
    docstring); whatever had to be redone is recorded on the version's tag. ``original()``
    loads the version's scikit-learn model and is called only when something must be
    compiled or verified. With ``cfg.stored`` false, compiles and verifies at every load and
    neither reads nor records anything (mloop's behaviour before graphs were stored)."""
    holdout = tags.get(HOLDOUT_TAG)
    if not getattr(cfg, "stored", True):
        return compile_and_store(project, model=original(), schema=schema, task=task,
                                 holdout=holdout, cfg=cfg, run_id=None, compiled_at="load")
    stored = Verdict.from_tag(tags.get(TAG))
    # an engine's libraries (LightGBM's, XGBoost's) are known from the stored verdict: the original,
    # which would say which engine it is, is not loaded unless something must be redone
    extra = tuple(k for k in engines.ENGINE_LIBRARIES
                  if stored is not None and k in (stored.against or {}))
    want = verified_against(holdout, cfg, extra)
    if stored is None:
        note = "no compiled graph stored with the version"
        changed: list[str] = list(want)
    elif stored.against is None:
        note = "the verdict on the version predates stored graphs"
        changed = list(want)
    else:
        changed = [k for k in want if stored.against.get(k) != want[k]]
        if changed:
            note = "changed since it was verified: " + ", ".join(
                f"{k} {stored.against.get(k)!r} -> {want[k]!r}" for k in changed)
        elif stored.status == "verified":
            note = "no compiled graph stored with the verdict"
        else:  # unverified: the holdout check did not finish last time
            note = f"the last check left it {stored.status}: {stored.detail}"
    # a verdict that still holds and says "the original serves" is final
    if stored is not None and not changed and (
            stored.status in ("mismatch", "unsupported")
            or (stored.status == "unverified" and not holdout)):
        return None, stored  # the original serves, nothing to redo
    if stored is not None and stored.artifact is not None and not any(
            k in changed for k in engines.GRAPH_MAKERS):
        try:
            compiled = session_from_bytes(_fetch(project, stored.artifact), schema)
        except (StoredGraphUnusable, CompileUnsupported) as exc:
            note = str(exc)
            log.warning("v%s: %s; compiling it again", version, note)
        else:
            if not changed and stored.status == "verified":
                return compiled, stored  # the fast path: no compile, no check
            t0 = time.perf_counter()
            verdict = _check(project, compiled, original(), schema, task, holdout, cfg)
            verdict.against, verdict.artifact = want, stored.artifact
            verdict.compiled_at = stored.compiled_at
            verdict.note = f"verified again at load ({note})"
            verdict.seconds = time.perf_counter() - t0
            _record(project, version, tags, verdict)
            return (compiled if verdict.status == "verified" else None), verdict
    compiled_, verdict = compile_and_store(
        project, model=original(), schema=schema, task=task, holdout=holdout, cfg=cfg,
        run_id=run_id, compiled_at="load", note=f"compiled at load: {note}")
    _record(project, version, tags, verdict)
    return compiled_, verdict


def _check(project: Any, compiled: CompiledModel, original: Any, schema: InputSchema,
           task: str, holdout: str | None, cfg: Any) -> Verdict:
    """``verify`` on the holdout snapshot, or an "unverified" verdict saying why not."""
    if not holdout:
        return Verdict("unverified", "no holdout snapshot recorded on the version")
    try:
        frame = project.snapshots.read_table(holdout).to_pandas()
        return verify(compiled, original, frame, schema, task, atol=cfg.atol, rtol=cfg.rtol,
                      max_label_mismatch=cfg.max_label_mismatch)
    except Exception as exc:
        return Verdict("unverified", f"holdout check failed: {type(exc).__name__}: {exc}")


def _store(project: Any, run_id: str, data: bytes) -> dict[str, Any]:
    """Log the graph in the run's artifacts under its own sha256 (the same graph is the same
    file; a file that no longer hashes to its name was altered)."""
    sha = hashlib.sha256(data).hexdigest()
    with tempfile.TemporaryDirectory(prefix="mloop-compiled-") as tmp:
        path = Path(tmp) / f"{sha}.onnx"
        path.write_bytes(data)
        project.mlflow.log_artifact(run_id, str(path), ARTIFACT_DIR)
    return {"run_id": run_id, "path": f"{ARTIFACT_DIR}/{sha}.onnx", "sha256": sha,
            "bytes": len(data)}


def _fetch(project: Any, artifact: dict[str, Any]) -> bytes:
    """The stored graph's bytes; StoredGraphUnusable if missing or altered."""
    where = f"the stored graph {artifact.get('path')} (run {artifact.get('run_id')})"
    with tempfile.TemporaryDirectory(prefix="mloop-compiled-") as tmp:
        try:
            local = project.mlflow.download_artifacts(str(artifact["run_id"]),
                                                      str(artifact["path"]), tmp)
            data = Path(local).read_bytes()
        except Exception as exc:
            raise StoredGraphUnusable(f"{where} cannot be read ({type(exc).__name__}: "
                                      f"{str(exc)[:200]})") from None
    if hashlib.sha256(data).hexdigest() != artifact.get("sha256"):
        raise StoredGraphUnusable(f"{where} does not match its recorded sha256 (altered)")
    return data


def _record(project: Any, version: int, tags: dict[str, str], verdict: Verdict) -> None:
    value = verdict.to_tag()
    if tags.get(TAG) == value:
        return
    try:
        project.mlflow.set_model_version_tag(project.config.model_name, str(version), TAG,
                                             value)
    except Exception as exc:  # recording is best effort; serving goes on
        log.warning("could not record the compile verdict on v%s: %s", version, exc)
