"""Temporal calibration, the window's side: the reference period's own chunk-to-chunk
variation (stored in the training snapshot's profile by :mod:`mloop.data.temporal_profile`,
which explains the choices) as a threshold a window's statistic must also exceed. Nothing is
scanned at window time: a threshold is a quantile of a few stored numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mloop.data.temporal_profile import TAIL, same_window


@dataclass(frozen=True)
class TemporalNull:
    """A column's stored chunk statistics for one method: the temporal null."""

    values: np.ndarray  # sorted; evenly spaced quantiles when there were many chunks
    chunks: int

    def threshold(self, rate: float) -> float:
        """The ``1 - rate`` quantile; extrapolated (exponential tail above the 90th
        percentile) when ``chunks * rate < 1``."""
        probs = np.linspace(0.0, 1.0, self.values.size)
        if self.chunks * rate >= 1:
            return float(np.interp(1 - rate, probs, self.values))
        u = float(np.interp(TAIL, probs, self.values))
        excess = self.values[self.values > u] - u
        beta = float(excess.mean()) if excess.size else 0.0
        return u + beta * math.log((1 - TAIL) / rate)


@dataclass(frozen=True)
class TemporalReference:
    """What a window's verdict can use: the nulls per column, or why there are none."""

    columns: dict[str, dict[str, list[float]]]
    chunks: int
    window: str | None
    reason: str | None

    @property
    def applied(self) -> bool:
        return self.reason is None

    def null(self, column: str, method: str) -> TemporalNull | None:
        values = (self.columns.get(column) or {}).get(method) if self.applied else None
        if not values:
            return None
        return TemporalNull(np.asarray(values, dtype=float), self.chunks)

    def describe(self) -> dict[str, Any]:
        return {"applied": self.applied, "window": self.window, "chunks": self.chunks,
                "reason": self.reason}


def temporal_reference(profile: dict[str, Any], window: str | None) -> TemporalReference:
    """The profile's temporal null for windows of size ``window``, or the reason a window is
    judged iid-only (no time column, too few chunks, chunks of another size)."""
    stored = profile.get("temporal")
    if not stored:
        return TemporalReference({}, 0, None, "the reference has no time column: iid "
                                              "calibration only")
    chunk = stored.get("window")
    chunks = int(stored.get("chunks") or 0)
    if stored.get("reason"):
        return TemporalReference({}, chunks, chunk, f"{stored['reason']}: iid calibration "
                                                    f"only")
    if window is None or not same_window(chunk, window):
        return TemporalReference({}, chunks, chunk, (
            f"the reference was chunked for {chunk} windows, this window is "
            f"{window or 'not a monitoring window'}: iid calibration only (chunks follow "
            f"monitoring.window when the next training snapshot is profiled)"))
    return TemporalReference(dict(stored.get("columns") or {}), chunks, chunk, None)
