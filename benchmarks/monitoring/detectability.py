"""How detectable each injected shift of ``benchmarks/monitoring_quality.py`` is at all.

A drift detector judges a week against what ordinary weeks look like. When the injected shift
is about as large as the ordinary change from one week to the next, no detector with a low
false-alarm rate can catch it reliably, however it is built. Two measures, per shifted column,
on the reference period's own weeks (the same files both sides read):

* **signal / noise**: the shift (0.5 reference sd for a numeric column, 20 points of share
  for a level) over the standard deviation of the ordinary week-to-week change of that
  column's weekly mean (or the level's weekly share). A one-sided test on the change at a 5%
  false-alarm rate, with the noise known exactly and Gaussian, catches a single week with
  probability Phi(ratio - 1.645): 50% at a ratio of 1.6, 95% only from 3.3. The shift persists
  into week k+1, which adds no new change to test, so a second week does not help much.

* **rolling probe**: an empirical detector built for this shift, outside mloop: week k
  against the 4 weeks before it (KS for numeric columns, total variation distance for
  categorical ones), its threshold the 95th percentile of the same statistic over the
  reference period's own unshifted weeks (a 5% per-column false-alarm rate: five times what
  mloop's ``false_alarm_rate`` 0.01 allows); detected when week k or k+1 (judged against
  k-3..k-1 plus the shifted week k) is beyond it. It follows the seasons, which a
  whole-reference comparison cannot, and is the most generous comparison here.

Neither is mloop's verdict: they bound what the trials in (b) can show on this data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PROBE_WEEKS = 4
PROBE_QUANTILE = 0.95


def _weeks(path: Path, time_column: str, window_days: int) -> list[Any]:
    """The file's rows as one pandas frame per epoch-aligned window, oldest first."""
    import pandas as pd

    frame = pd.read_parquet(path)
    ts = pd.to_datetime(frame[time_column], utc=True)
    ids = (ts - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(days=window_days)
    return [part for _, part in frame.groupby(ids.to_numpy(), sort=True)]


def _statistic(week: Any, reference: Any, column: str, numeric: bool) -> float:
    from scipy.stats import ks_2samp

    if numeric:
        return float(ks_2samp(week[column], reference[column]).statistic)
    a = week[column].astype(str).value_counts(normalize=True)
    b = reference[column].astype(str).value_counts(normalize=True)
    idx = a.index.union(b.index)
    return float(0.5 * (a.reindex(idx, fill_value=0) - b.reindex(idx, fill_value=0))
                 .abs().sum())


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def detectability(folder: Path) -> dict[str, Any]:
    """Per shifted column of one dataset's folder (written by ``prepare``): signal/noise, the
    single-week power at 5% of a test on the weekly mean's change, and the rolling probe's
    detection within 2 weeks."""
    import numpy as np
    import pandas as pd

    meta = json.loads((folder / "meta.json").read_text())
    tcol, days = meta["time_column"], meta["window_days"]
    ref = _weeks(folder / meta["reference"], tcol, days)
    out: dict[str, Any] = {}
    for s in meta["shifts"]:
        column, numeric = s["column"], s["kind"].startswith("mean")
        if numeric:
            weekly = np.array([w[column].astype(float).mean() for w in ref])
            shift = float(s["detail"].split()[0])
        else:
            level = s["detail"].split("'")[1]
            weekly = np.array([(w[column].astype(str) == level).mean() for w in ref])
            shift = 0.2
        noise = float(np.std(np.diff(weekly), ddof=1))
        ratio = shift / noise if noise > 0 else math.inf
        shifted = _weeks(folder / s["file"], tcol, days)
        null = [_statistic(ref[k], pd.concat(ref[k - PROBE_WEEKS:k]), column, numeric)
                for k in range(PROBE_WEEKS, len(ref))]
        bar = float(np.quantile(null, PROBE_QUANTILE))
        hits = trials = 0
        for k in range(PROBE_WEEKS, len(ref) - 1):
            first = _statistic(shifted[k], pd.concat(ref[k - PROBE_WEEKS:k]), column, numeric)
            second = _statistic(shifted[k + 1],
                                pd.concat([*ref[k - PROBE_WEEKS + 1:k], shifted[k]]),
                                column, numeric)
            trials += 1
            hits += int(first > bar or second > bar)
        out[column] = {"kind": s["kind"], "shift": shift, "week_to_week_sd": noise,
                       "ratio": ratio, "mean_test_power_5pct": _phi(ratio - 1.645),
                       "probe": {"detected": hits, "trials": trials,
                                 "share": hits / trials if trials else None,
                                 "threshold": bar}}
    return out
