"""Performance before labels for regression: direct loss estimation (DLE), as NannyML does it.

A second model, the *loss model*, learns from the version's gating holdout how large the
version's error is given the row: its inputs and its prediction → the absolute error (for MAE)
or the squared error (for RMSE). A window's estimated MAE is then the mean loss the loss model
predicts for the window's served rows (its RMSE the root of the mean predicted squared error):
no label needed. It sees a shift of the inputs towards rows where the model errs more (busier
hours, hotter days); it cannot see the same inputs meeting a changed world (more riders for
the same weather), since nothing in a row says so.

Trained once per version, the first time a window of it needs an estimate, and kept in the
outputs store beside CBPE's calibration record (``monitoring/loss-estimate-v<N>.json``, the
fitted loss model in ``monitoring/loss-model-v<N>.skops``), so a window costs one
``predict`` of the loss model, not a fit. Before that, the loss model is cross-fitted on the
holdout's two halves (fit on one, estimate the other, and back): each half's estimated vs
realized metric is recorded, and an error beyond :data:`TOLERANCE` of the realized value
(or, on a holdout too small to tell that from chance, :data:`Z` standard errors) marks every
estimate of that version ``uncalibrated``, with both numbers. The halves follow the split:
the earlier and the later half of a time-split holdout (does the error of one stretch of time
predict the next?), random halves of a randomly drawn one. The loss model kept is then fitted
on the whole holdout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mloop.errors import MloopError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from mloop.project import Project

__all__ = ["ESTIMABLE", "TOLERANCE", "LossModel", "Z", "estimated_metric", "load_loss_model"]

# |estimated - realized| on a held half beyond which the estimate is not trusted: 10% of the
# realized value, or Z standard errors of that difference when the halves are too small to
# tell 10% from chance (both halves' sampling noise: one fits, the other is judged)
TOLERANCE = 0.10
Z = 2.0
ESTIMABLE = ("mae", "rmse")
MIN_ROWS = 60  # a holdout smaller than this gives no loss model (halves of 30 rows)
MAX_CATEGORIES = 250  # a text input with more distinct values is left out (an id, not a kind)
PREDICTION = "_prediction"
# what a loss model saved by this module may contain: skops is told to trust these and
# nothing else (anything outside them in a file means someone else wrote it); the estimator
# keeps a functools.partial of sklearn's check_array (skops checks the function it wraps)
_TRUSTED_PREFIXES = ("sklearn.", "numpy.")
_TRUSTED_TYPES = frozenset({"functools.partial"})


def estimated_metric(primary: str | None) -> str:
    """The metric a regression window's estimate is of: the primary one when DLE can
    estimate it (MAE, RMSE), else MAE."""
    return primary if primary in ESTIMABLE else "mae"


@dataclass(frozen=True)
class LossFeatures:
    """How rows become the loss model's matrix: numeric inputs as floats, text inputs as
    category codes learned on the holdout (a value it never had is missing), then the
    prediction."""

    numeric: list[str]
    categorical: dict[str, list[str]]

    @property
    def names(self) -> list[str]:
        return [*self.numeric, *self.categorical, PREDICTION]

    @property
    def categorical_mask(self) -> list[bool]:
        return [False] * len(self.numeric) + [True] * len(self.categorical) + [False]

    def matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """(rows, features) float matrix of ``frame`` (holdout rows or a window's logged rows,
        with ``_prediction``); a missing column is all missing, a value that is not a number
        in a numeric column is missing (the window's quality report says so)."""
        import pandas as pd

        n = len(frame)
        out = np.full((n, len(self.names)), np.nan)
        for j, name in enumerate(self.numeric):
            if name in frame.columns:
                out[:, j] = pd.to_numeric(frame[name], errors="coerce").to_numpy(
                    dtype=np.float64, na_value=np.nan)
        for k, (name, cats) in enumerate(self.categorical.items()):
            if name in frame.columns:
                codes = {c: float(i) for i, c in enumerate(cats)}
                out[:, len(self.numeric) + k] = [
                    np.nan if _missing(v) else codes.get(str(v), np.nan)
                    for v in frame[name].tolist()]
        out[:, -1] = pd.to_numeric(frame[PREDICTION], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical}


@dataclass
class LossModel:
    """A version's fitted loss model, its holdout check and the version's holdout value of
    the metric (what the estimate is compared with)."""

    version: int
    metric: str
    features: LossFeatures
    estimator: Any
    check: dict[str, Any]
    reference: float
    _threads: Any = field(default=None, repr=False, compare=False)

    def estimate(self, window: pa.Table) -> dict[str, Any] | None:
        """The window's estimated metric from its logged inputs and predictions (rows the
        version answered); None without such rows."""
        import pyarrow.compute as pc

        if PREDICTION not in window.column_names or "_version" not in window.column_names:
            return None
        mine = window.filter(pc.equal(window.column("_version"), self.version))
        if not mine.num_rows:
            return None
        present = [c for c in self.features.names if c in mine.column_names]
        frame = mine.select(present).to_pandas()
        if self._threads is None:  # finding the thread pools costs ~12 ms: once per model
            from threadpoolctl import ThreadpoolController

            self._threads = ThreadpoolController()
        with self._threads.limit(limits=1):  # see _one_thread
            loss = np.clip(self.estimator.predict(self.features.matrix(frame)), 0.0, None)
        value = _metric_of(self.metric, float(np.mean(loss)))
        return {"metric": self.metric, "value": value, "values": {self.metric: value},
                "rows": mine.num_rows, "method": "dle",
                "status": "calibrated" if self.check["calibrated"] else "uncalibrated",
                "calibration": self.check, "reference": self.reference}


def load_loss_model(project: Project, version: int, primary: str | None) -> LossModel | None:
    """``version``'s loss model for its primary metric's estimate: read from the outputs
    store, or trained on its holdout (once) and stored. None for a version without a holdout
    snapshot, a regression task or enough holdout rows."""
    metric = estimated_metric(primary)
    store = project.outputs
    key = f"monitoring/loss-estimate-v{version}.json"
    if store.exists(key):
        record: dict[str, Any] = json.loads(store.read_bytes(key))
        if record.get("metric") == metric:
            return _from_record(project, version, record) if record.get("model") else None
    with _one_thread():
        record, estimator = _train(project, version, metric)
    if estimator is not None:  # the model first: a record is only ever written beside it
        import skops.io

        store.write_bytes(record["model"], skops.io.dumps(estimator))
    store.write_bytes(key, json.dumps(record).encode())
    return _from_record(project, version, record, estimator) if estimator is not None else None


def _from_record(project: Project, version: int, record: dict[str, Any],
                 estimator: Any = None) -> LossModel:
    if estimator is None:
        import skops.io

        data = project.outputs.read_bytes(record["model"])
        types = skops.io.get_untrusted_types(data=data)
        foreign = [t for t in types
                   if not t.startswith(_TRUSTED_PREFIXES) and t not in _TRUSTED_TYPES]
        if foreign:
            raise MloopError(f"{record['model']} in the outputs store holds types a loss model "
                             f"never has ({', '.join(foreign)}): not loaded; delete it and "
                             f"monitoring/loss-estimate-v{version}.json to train it again")
        estimator = skops.io.loads(data, trusted=types)
    spec = record["features"]
    return LossModel(version, record["metric"],
                     LossFeatures(list(spec["numeric"]), dict(spec["categorical"])),
                     estimator, record["check"], float(record["holdout"]["value"]))


def _one_thread() -> Any:
    """OpenMP and BLAS on one thread: a loss model fits a few hundred rows and scores a
    window, where more threads only wait on each other; on a busy 2-core machine the default
    made a 6,000-row ``predict`` take 2.4 s instead of 0.08 s, and the monitor shares its host
    with the server."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def _metric_of(metric: str, mean_loss: float) -> float:
    return math.sqrt(mean_loss) if metric == "rmse" else mean_loss


def _fit(x: np.ndarray, loss: np.ndarray, mask: list[bool]) -> Any:
    """A small gradient-boosted regressor of the loss: a few hundred holdout rows, so shallow
    trees, big leaves and no early stopping (its validation split would halve them again)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(
        max_iter=100, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
        categorical_features=mask, early_stopping=False, random_state=0).fit(x, loss)


def _train(project: Project, version: int, metric: str) -> tuple[dict[str, Any], Any]:
    """The record (holdout check, features, holdout value) and the loss model fitted on the
    whole holdout; the record alone, with why, when there is no loss model to make."""
    from mloop.registry.candidates import get_version
    from mloop.registry.refit import held_out_version
    from mloop.serving.model import load_served

    tags = dict(get_version(project, version).tags or {})
    # a refit has seen its holdout: learn from the held-out fit's rows and model instead
    scored = held_out_version(project, version, tags)
    if scored != version:
        tags = dict(get_version(project, scored).tags or {})
    holdout = tags.get("mloop.snapshot.holdout")
    base: dict[str, Any] = {"version": version, "metric": metric}
    if not holdout or tags.get("mloop.task", project.config.task) != "regression":
        return {**base, "reason": "no holdout snapshot or not a regression model"}, None
    frame = project.snapshots.read_table(holdout).to_pandas()
    target = project.config.target
    if target not in frame.columns or len(frame) < MIN_ROWS:
        return {**base, "reason": f"the holdout has {len(frame)} rows (a loss model needs "
                                  f"{MIN_ROWS}) or no '{target}' column"}, None
    time_column = project.config.features.time_column
    by_time = time_column is not None and time_column in frame.columns and \
        project.config.split.method in (None, "time")
    if by_time:
        frame = frame.sort_values(time_column, kind="stable").reset_index(drop=True)
    model = load_served(project, scored, warm=False)
    cols = {c: [None if (v is None or (isinstance(v, float) and v != v)) else v
                for v in frame[c].tolist()] for c in model.schema.names}
    frame[PREDICTION] = np.asarray(model.predict_frame(model.schema.frame(cols)),
                                   dtype=np.float64)
    error = np.asarray(frame[target], dtype=np.float64) - frame[PREDICTION].to_numpy()
    loss = np.abs(error) if metric == "mae" else error ** 2
    # security.pii inputs: the log holds digests, masks or nothing where the holdout has raw
    # values, so a loss model must not lean on them
    pii = project.config.security.pii
    features = _features(frame, [c for c in model.schema.columns if c.name not in pii])
    x, mask = features.matrix(frame), features.categorical_mask
    n = len(frame)
    order = np.arange(n) if by_time else np.random.default_rng(
        project.config.split.seed).permutation(n)
    halves = [order[: n // 2], order[n // 2:]]
    names = ["earlier half", "later half"] if by_time else ["half A", "half B"]
    folds: list[dict[str, Any]] = []
    for (fit_on, judge), (fit_name, judge_name) in (
            ((halves[0], halves[1]), (names[0], names[1])),
            ((halves[1], halves[0]), (names[1], names[0]))):
        fitted = _fit(x[fit_on], loss[fit_on], mask)
        expected = _metric_of(metric, float(np.mean(np.clip(fitted.predict(x[judge]), 0, None))))
        realized = _metric_of(metric, float(np.mean(loss[judge])))
        tolerance = max(TOLERANCE * realized, Z * _standard_error(metric, loss[fit_on],
                                                                  loss[judge]))
        folds.append({"fit_on": fit_name, "judged": judge_name, "rows": len(judge),
                      "expected": expected, "realized": realized, "tolerance": tolerance,
                      "calibrated": abs(expected - realized) <= tolerance})
    worst = max(folds, key=lambda f: abs(f["expected"] - f["realized"])
                / max(f["tolerance"], 1e-12))
    check = {"expected": worst["expected"], "realized": worst["realized"],
             "tolerance": worst["tolerance"], "judged": worst["judged"],
             "calibrated": all(f["calibrated"] for f in folds),
             "halves": "time" if by_time else "random", "folds": folds}
    record = {**base, "rows": n, "check": check, "features": features.to_dict(),
              "holdout": {"value": _metric_of(metric, float(np.mean(loss))),
                          "tag": tags.get(f"mloop.metric.{metric}")},
              "model": f"monitoring/loss-model-v{version}.skops"}
    return record, _fit(x, loss, mask)


def _standard_error(metric: str, fitted: np.ndarray, judged: np.ndarray) -> float:
    """Standard error of (estimate on the judged half - its realized metric) from sampling
    alone: the estimate is near the fitted half's mean loss and the realized value is the
    judged half's, so both halves' variances add; the root for RMSE (delta method)."""
    var = float(np.var(fitted, ddof=1) / len(fitted) + np.var(judged, ddof=1) / len(judged))
    se = math.sqrt(max(var, 0.0))
    if metric == "rmse":
        mean = float(np.mean(judged))
        return se / (2 * math.sqrt(mean)) if mean > 0 else se
    return se


def _features(frame: pd.DataFrame, columns: list[Any]) -> LossFeatures:
    """The version's inputs as loss-model features: numbers (and booleans) as they are, text
    as categories seen on the holdout (up to MAX_CATEGORIES); other types are left out."""
    numeric, categorical = [], {}
    for col in columns:
        if col.name not in frame.columns:
            continue
        if col.type in ("double", "float", "long", "integer", "boolean"):
            numeric.append(col.name)
        elif col.type == "string":
            seen = sorted({str(v) for v in frame[col.name].tolist() if not _missing(v)})
            if len(seen) <= MAX_CATEGORIES:
                categorical[col.name] = seen
    return LossFeatures(numeric, categorical)


def _missing(value: Any) -> bool:
    """None, NaN or pandas' NA (which no comparison turns into a bool)."""
    import pandas as pd

    return value is None or bool(pd.isna(value))
