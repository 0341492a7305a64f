"""One window against one reference profile: quality findings, then calibrated drift.

The same function serves ``mloop monitor`` (windows of the inference log against the
champion's training profile) and ``mloop monitor compare`` (any two tables). Its cost is one
pass over the window; the reference is only its stored profile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mloop.config import MonitoringConfig
from mloop.errors import DataSourceError, MloopError
from mloop.monitoring.drift import ColumnReference, NullModel, detect
from mloop.monitoring.quality import QualityThresholds, check_column
from mloop.monitoring.temporal import temporal_reference


def evaluate_window(profile: dict[str, Any], window: pa.Table, cfg: MonitoringConfig, *,
                    columns: list[str] | None = None,
                    null_cache: dict[tuple, NullModel] | None = None,
                    seed: int = 0, size: str | None = None) -> dict[str, Any]:
    """Quality and drift of ``window`` against ``profile`` for ``columns`` (default: every
    numeric or categorical column of the profile). ``size``: the monitoring window's spec
    (``7d``, ``5000rows``), which picks the profile's matching chunk statistics for temporal
    calibration; None (an ad-hoc table) is judged iid-only."""
    present = set(window.column_names)
    return _evaluate(profile, lambda name: window.column(name) if name in present else None,
                     window.num_rows, cfg, columns=columns, null_cache=null_cache, seed=seed,
                     size=size)


def evaluate_file(profile: dict[str, Any], path: Path, cfg: MonitoringConfig, *,
                  columns: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """The same for a Parquet file, read one column at a time: memory holds one column, not
    the table."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataSourceError(f"{path}: not a readable Parquet file ({exc})") from exc
    present = set(pf.schema_arrow.names)

    def column(name: str) -> pa.ChunkedArray | None:
        return pf.read(columns=[name]).column(0) if name in present else None

    return _evaluate(profile, column, pf.metadata.num_rows, cfg, columns=columns, seed=seed)


def _evaluate(profile: dict[str, Any], get_column: Any, rows: int, cfg: MonitoringConfig, *,
              columns: list[str] | None, null_cache: dict[tuple, NullModel] | None = None,
              seed: int = 0, size: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    ref_cols = profile["columns"]
    names = columns if columns is not None else [
        c for c, st in ref_cols.items() if st.get("kind") in ("numeric", "categorical")]
    unknown = [c for c in names if c not in ref_cols]
    if unknown:
        raise MloopError(f"column(s) {unknown} are not in the reference profile")
    report: dict[str, Any] = {"rows": rows, "empty": rows == 0, "columns": names,
                              "quality": [], "drift": None}
    if rows == 0:
        report["seconds"] = time.perf_counter() - t0
        return report
    th = QualityThresholds(**cfg.quality.model_dump())
    references: list[ColumnReference] = []
    binned: dict[str, np.ndarray] = {}
    for name in names:
        findings, values = check_column(name, ref_cols[name], get_column(name), rows, th)
        report["quality"].extend(f.to_dict() for f in findings)
        ref = ColumnReference.from_profile(name, ref_cols[name])
        if values is None or ref is None:
            continue
        counts, _ = ref.bin(values)
        del values  # one column at a time
        references.append(ref)
        binned[name] = counts
    drift = detect(references, binned, false_alarm_rate=cfg.false_alarm_rate,
                   methods=dict(cfg.methods), min_effect=dict(cfg.min_effect),
                   simulations=cfg.simulations, seed=seed, null_cache=null_cache,
                   temporal=temporal_reference(profile, size))
    report["drift"] = drift.to_dict()
    report["seconds"] = time.perf_counter() - t0
    return report


def read_table(path: Path) -> pa.Table:
    """A Parquet or CSV file, or a folder of Parquet files; DataSourceError naming it otherwise."""
    from mloop.data.source import read_file_table

    if not path.exists():
        raise DataSourceError(f"{path}: no such file or folder")
    return read_file_table(path)


def compare_files(reference: Path, current: Path, cfg: MonitoringConfig, *,
                  columns: list[str] | None = None, bins: int = 20,
                  top_k: int = 50) -> dict[str, Any]:
    """Ad-hoc drift of ``current`` against ``reference`` (profiled here, once)."""
    from mloop.data.profile import compute_profile

    t0 = time.perf_counter()
    ref_table = read_table(reference)
    profile = compute_profile(ref_table, bins=bins, top_k=top_k)
    ref_rows = ref_table.num_rows
    del ref_table
    if columns is None:
        columns = [c for c, st in profile["columns"].items()
                   if st.get("kind") in ("numeric", "categorical")]
    if current.is_file() and current.suffix.lower() == ".parquet":
        report = evaluate_file(profile, current, cfg, columns=columns)
    else:
        report = evaluate_window(profile, read_table(current), cfg, columns=columns)
    report["reference"] = {"path": str(reference), "rows": ref_rows}
    report["current"] = {"path": str(current), "rows": report["rows"]}
    report["profile"] = profile
    report["total_seconds"] = time.perf_counter() - t0
    return report
