"""NannyML's side of benchmarks/monitoring_quality.py, run in NannyML's own venv.

    NML_DISABLE_USAGE_LOGGING=1 .venv-nannyml/bin/python benchmarks/monitoring/nannyml_side.py \
        --data-dir DIR --calculator univariate|pca|domain_classifier --out OUT.json

It reads the Parquet files the driver wrote in DIR (``meta.json`` lists them) and never
imports mloop: NannyML 0.13.1 wants pandas 2, mloop's venv has pandas 3.

The windows are the driver's: contiguous, epoch-aligned stretches of ``meta["window_days"]``
days (the alignment ``mloop monitor`` gives time windows, ``mloop.monitoring.windows.align``).
:class:`EpochWindowChunker` cuts NannyML's chunks on the same boundaries, for the reference
(whose chunks set NannyML's thresholds) and for every analysis file, so the two sides judge
the same rows. Each calculator runs with NannyML's defaults otherwise: univariate drift with
Jensen-Shannon distance on every column, threshold = mean + 3 standard deviations of the
reference chunks' values; PCA data reconstruction with its default thresholds (reference mean
+- 3 sd); the domain classifier with its default LightGBM, 5-fold CV, alert above AUROC 0.65.

Output: for the reference period, NannyML's own reference-period results (each chunk against
the reference, as ``fit`` computes them to set the thresholds); for the later period and for
every shifted copy of the reference windows, ``calculate`` on that file. Per chunk, which
columns (univariate) or whether the calculator (multivariate) alerted. Timings and the
process's peak RSS are recorded for the whole calculator: fit plus every calculate, reading
the Parquet files included.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")  # no analytics calls, offline anyway


def _peak_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, which exec resets (``ru_maxrss``
    keeps the forking parent's peak across exec, so every child would report the
    driver's)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def make_chunker(time_column: str, days: int) -> Any:
    """A NannyML chunker cutting at epoch-aligned windows of ``days`` days (keyed by the
    window's start date, as the driver keys its windows)."""
    import pandas as pd
    from nannyml.chunk import Chunk, Chunker

    length = pd.Timedelta(days=days)
    epoch = pd.Timestamp(0)

    class EpochWindowChunker(Chunker):
        def _split(self, data: pd.DataFrame) -> list[Chunk]:
            ids = (pd.to_datetime(data[self.timestamp_column_name]) - epoch) // length
            out = []
            for k, part in data.groupby(ids.to_numpy(), sort=True):
                start = epoch + int(k) * length
                out.append(Chunk(key=start.strftime("%Y-%m-%d"), data=part,
                                 start_datetime=start, end_datetime=start + length))
            return out

    return EpochWindowChunker(time_column)


def _alerts(result: Any, period: str) -> list[dict[str, Any]]:
    """Per chunk of ``period``: its key and the columns (univariate) or calculator that
    alerted."""
    df = result.to_df()
    key = next(c for c in df.columns if c[0] == "chunk" and c[-1] == "key")
    per = next(c for c in df.columns if c[0] == "chunk" and c[-1] == "period")
    alert_cols = [c for c in df.columns if c[-1] == "alert"]
    df = df[df[per] == period]
    out = []
    for _, row in df.iterrows():
        raised = sorted({str(c[0]) for c in alert_cols if bool(row[c])})
        out.append({"key": str(row[key]), "alerted": raised})
    return out


def run(data_dir: Path, calculator: str) -> dict[str, Any]:
    t_imp = time.perf_counter()
    import nannyml as nml
    import pandas as pd
    imports = time.perf_counter() - t_imp
    warnings.filterwarnings("ignore")  # "too few chunks", lightgbm's categorical notes
    meta = json.loads((data_dir / "meta.json").read_text())
    features, tcol, days = meta["features"], meta["time_column"], meta["window_days"]
    c0, t0 = _cpu_s(), time.perf_counter()
    reference = pd.read_parquet(data_dir / meta["reference"])
    chunker = make_chunker(tcol, days)
    if calculator == "univariate":
        calc = nml.UnivariateDriftCalculator(column_names=features, timestamp_column_name=tcol,
                                             chunker=chunker)
    elif calculator == "pca":
        calc = nml.DataReconstructionDriftCalculator(column_names=features,
                                                     timestamp_column_name=tcol,
                                                     chunker=chunker)
    elif calculator == "domain_classifier":
        calc = nml.DomainClassifierCalculator(feature_column_names=features,
                                              timestamp_column_name=tcol, chunker=chunker)
    else:
        raise SystemExit(f"--calculator must be univariate, pca or domain_classifier, got "
                         f"{calculator!r}")
    calc.fit(reference)
    fitted = time.perf_counter()
    out: dict[str, Any] = {"calculator": calculator,
                           "reference": _alerts(calc.result, "reference")}
    later = pd.read_parquet(data_dir / meta["later"])
    out["later"] = _alerts(calc.calculate(later), "analysis")
    shifts: dict[str, list[dict[str, Any]]] = {}
    if calculator == "univariate":  # the injected shifts: univariate only (see the driver)
        for shift in meta["shifts"]:
            data = pd.read_parquet(data_dir / shift["file"])
            shifts[shift["file"]] = _alerts(calc.calculate(data), "analysis")
    out["shifts"] = shifts
    done = time.perf_counter()
    out.update(wall_s=done - t0, fit_s=fitted - t0, calculate_s=done - fitted,
               cpu_s=_cpu_s() - c0, import_s=imports, peak_rss_mb=_peak_mb(),
               versions={name: __import__(name).__version__
                         for name in ("nannyml", "pandas", "numpy", "sklearn", "lightgbm")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--calculator", required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    result = run(args.data_dir, args.calculator)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
