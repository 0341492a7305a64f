"""Joint shifts, the window's side: the share of a window's rows outside the reference's
support (nearest-neighbour distance to the stored reference sample beyond the reference's own
99th percentile; :mod:`mloop.data.joint_profile` explains the choices), reported beside the
per-column verdicts as ``report["multivariate"]``.

A window is flagged when its share is beyond both nulls, at ``monitoring.false_alarm_rate``:

- **iid**: the share a random draw of the window's size from the reference would reach, a
  binomial quantile at the sample's own out-of-support rate (about 1%);
- **temporal**: the reference period's own chunk-to-chunk variation (the ``1 - rate``
  quantile of its chunks' shares, extrapolated like the per-column temporal thresholds), when
  the snapshot has a time column and its chunks match the window's size.

Old profiles (stored before the check existed), windows lacking an encoded column, and
references too small to sample are skipped with the reason in the report, never an error.
The nearest-neighbour index is built once per reference and reused for every window.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mloop.data.joint_profile import METHOD, encode_rows
from mloop.data.temporal_profile import same_window
from mloop.monitoring.temporal import TemporalNull


@dataclass
class JointReference:
    """A reference's stored joint section and encoded sample, with its index (built once)."""

    spec: dict[str, Any]
    sample: np.ndarray
    _index: Any = field(default=None, repr=False)

    @property
    def columns(self) -> list[str]:
        return list(self.spec["columns"])

    def distances(self, encoded: np.ndarray) -> np.ndarray:
        """Each row's distance to its nearest sample row."""
        if self._index is None:
            from scipy.spatial import cKDTree

            self._index = cKDTree(self.sample)
        return np.asarray(self._index.query(encoded, k=1)[0], dtype=float)


def joint_reference(profile: dict[str, Any], sample: np.ndarray | None
                    ) -> JointReference | str:
    """The check's reference, or why a window cannot have one."""
    spec = profile.get("joint")
    if not spec:
        return ("the reference profile was stored before the multivariate check existed "
                "(profile the training data again: a new training run)")
    if spec.get("reason"):
        return str(spec["reason"])
    if sample is None:
        return "the reference's encoded sample (joint_sample.npy) is missing"
    dims = sum(1 if e["kind"] == "numeric" else len(e["categories"])
               for e in spec["encoding"])
    if sample.ndim != 2 or sample.shape[1] != dims:
        return (f"the reference's encoded sample has shape {sample.shape}, its encoding "
                f"{dims} columns: stored by another version of the check")
    return JointReference(spec, sample)


def iid_threshold(rows: int, base_rate: float, false_alarm_rate: float) -> float:
    """The out-of-support share a random draw of ``rows`` reference rows exceeds with
    probability at most ``false_alarm_rate``: the binomial's ``1 - rate`` quantile, summed
    term by term (it sits a few standard deviations above ``rows * base_rate``), which spares
    `mloop monitor` the second it takes to import scipy.stats."""
    if base_rate <= 0:
        return 0.0
    if base_rate >= 1:
        return 1.0
    log_p, log_q, log_n = math.log(base_rate), math.log1p(-base_rate), math.lgamma(rows + 1)
    cdf = 0.0
    for k in range(rows + 1):
        cdf += math.exp(log_n - math.lgamma(k + 1) - math.lgamma(rows - k + 1) + k * log_p
                        + (rows - k) * log_q)
        if cdf >= 1 - false_alarm_rate - 1e-12:
            return k / rows
    return 1.0


def _temporal_threshold(spec: dict[str, Any], size: str | None, rate: float
                        ) -> tuple[float | None, dict[str, Any]]:
    stored = spec.get("temporal")
    if not stored:
        return None, {"applied": False, "reason": "the reference has no time column: iid "
                                                  "bound only"}
    chunk, chunks = stored.get("window"), int(stored.get("chunks") or 0)
    info: dict[str, Any] = {"applied": False, "window": chunk, "chunks": chunks}
    if stored.get("reason"):
        return None, {**info, "reason": f"{stored['reason']}: iid bound only"}
    if size is None or not same_window(chunk, size):
        return None, {**info, "reason": f"the reference was chunked for {chunk} windows, this "
                                        f"window is {size or 'not a monitoring window'}: iid "
                                        f"bound only"}
    null = TemporalNull(np.asarray(stored["values"], dtype=float), chunks)
    return null.threshold(rate), {**info, "applied": True, "reason": None}


def check_joint(reference: JointReference | str, window: pa.Table, *,
                false_alarm_rate: float, size: str | None = None,
                features: list[str] | None = None) -> dict[str, Any]:
    """The window's multivariate verdict: ``{method, value, threshold_temporal,
    threshold_iid, drifted}`` and what they rest on; ``drifted`` is None (with ``skipped``)
    when the check cannot run. ``features``: the model's monitored inputs; an encoded column
    outside them (masked by a PII policy, not a model input) skips the check."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"method": METHOD, "value": None, "threshold_temporal": None,
                           "threshold_iid": None, "drifted": None}
    if isinstance(reference, str):
        return {**out, "skipped": reference}
    missing = [c for c in reference.columns if c not in window.column_names
               or (features is not None and c not in features)]
    if missing:
        return {**out, "skipped": f"column(s) {missing} of the reference's joint encoding are "
                                  f"not monitored inputs of this window"}
    rows = window.num_rows
    if rows == 0:
        return {**out, "skipped": "the window is empty"}
    encoded = encode_rows(reference.spec["encoding"], window.column, rows)
    share = float(np.mean(reference.distances(encoded) > reference.spec["radius"]))
    iid = iid_threshold(rows, float(reference.spec["base_rate"]), false_alarm_rate)
    temporal, info = _temporal_threshold(reference.spec, size, false_alarm_rate)
    drifted = share > iid and (temporal is None or share > temporal)
    return {**out, "value": share, "threshold_temporal": temporal, "threshold_iid": iid,
            "drifted": bool(drifted), "rows": rows, "radius": reference.spec["radius"],
            "temporal": info, "seconds": time.perf_counter() - t0}
