"""Gates: the checks a candidate version must pass before it may serve.

Every gate is evaluated on the candidate's own holdout snapshot (recorded at registration), so
gating needs no data beyond what the version's lineage names. Results go to mloop's store, to
tags on the MLflow version (``mloop.gates``, ``mloop.gate.<name>``) and to the audit chain.
A gate that cannot apply (non-inferiority with no champion yet) is skipped and says why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mloop.config import GatesConfig, SliceGate
from mloop.errors import ConfigError, MloopError
from mloop.metrics import DEFAULTS, HIGHER_IS_BETTER, compute_metrics, metrics_for
from mloop.project import Project
from mloop.registry.aliases import champion_version
from mloop.registry.bootstrap import paired_bootstrap
from mloop.registry.candidates import get_version
from mloop.registry.gate_report import GateReport, GateResult, record_gate_report
from mloop.registry.gate_report import fmt_value as _fmt
from mloop.registry.model_files import SignatureColumn


@dataclass
class LoadedVersion:
    """A registered version with what gating needs, all from its recorded lineage."""

    version: int
    tags: dict[str, str]
    path: Path
    sklearn_model: Any
    # the call the server makes on a validated frame (timed by the latency gate)
    serve: Any
    input_schema: list[SignatureColumn]
    output_schema: list[SignatureColumn]

    @property
    def inputs(self) -> list[str]:
        return [c.name for c in self.input_schema]

    def prepare(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The input columns cast to the signature's types, as a server would after
        validating a request (the holdout keeps integers where the model takes doubles)."""
        X = frame[self.inputs].copy()
        for col in self.input_schema:
            if col.type in ("double", "float"):
                X[col.name] = X[col.name].astype("float64")
            elif col.type == "string":
                X[col.name] = X[col.name].astype(object).where(X[col.name].notna(), None)
        return X

    def predict(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
        X = self.prepare(frame)
        pred = np.asarray(self.sklearn_model.predict(X))
        proba = (np.asarray(self.sklearn_model.predict_proba(X))
                 if hasattr(self.sklearn_model, "predict_proba") else None)
        return pred, proba


def load_version(project: Project, version: int) -> LoadedVersion:
    from mloop.registry.candidates import load_scorer

    mv = get_version(project, version)
    scorer = load_scorer(project, version)
    inputs, outputs = scorer.files.inputs, scorer.files.outputs
    if inputs is None or outputs is None:
        raise MloopError(f"version {version} of '{project.config.model_name}' was logged "
                         f"without a signature ({scorer.files.path / 'MLmodel'}): gating "
                         f"needs its input columns and types")
    return LoadedVersion(int(version), dict(mv.tags or {}), scorer.files.path, scorer.model,
                         scorer.predict, inputs, outputs)


def _worse_by(metric: str, value: float, reference: float) -> float:
    """How much worse ``value`` is than ``reference`` (positive = worse), in metric units."""
    return (reference - value) if HIGHER_IS_BETTER.get(metric, False) else (value - reference)


# ------------------------------------------------------------------------ individual gates

def gate_absolute(metrics: dict[str, float], gates: GatesConfig) -> list[GateResult]:
    out = []
    for g in gates.absolute:
        value = metrics[g.metric]
        for bound, label, ok in ((g.min, "min", lambda v, b: v >= b),
                                 (g.max, "max", lambda v, b: v <= b)):
            if bound is None:
                continue
            passed = bool(np.isfinite(value) and ok(value, bound))
            op = ">=" if label == "min" else "<="
            out.append(GateResult(f"absolute.{g.metric}.{label}", "pass" if passed else "fail",
                                  value, bound, f"{g.metric} {_fmt(value)} {op} {_fmt(bound)}"
                                  f" required"))
    return out


def gate_sanity(pred: np.ndarray, task: str, train_labels: set[Any] | None,
                gates: GatesConfig) -> GateResult:
    problems: list[str] = []
    if task == "regression":
        values = pred.astype(float)
        bad = int((~np.isfinite(values)).sum())
        if bad:
            problems.append(f"{bad} NaN/inf prediction(s)")
        lo, hi = gates.sanity.prediction_min, gates.sanity.prediction_max
        if lo is not None and np.nanmin(values) < lo:
            problems.append(f"prediction {np.nanmin(values):.4g} below {lo:.4g}")
        if hi is not None and np.nanmax(values) > hi:
            problems.append(f"prediction {np.nanmax(values):.4g} above {hi:.4g}")
    else:
        unseen = sorted({str(v) for v in pred} - {str(v) for v in (train_labels or set())})
        if train_labels is not None and unseen:
            problems.append(f"classes never seen in training: {', '.join(unseen[:5])}")
    return GateResult("sanity", "fail" if problems else "pass", float(len(problems)), 0.0,
                      "; ".join(problems) or f"{len(pred)} predictions finite and in range")


def gate_size(path: Path, max_mb: float) -> GateResult:
    size_mb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20
    return GateResult("size", "pass" if size_mb <= max_mb else "fail", round(size_mb, 3), max_mb,
                      f"logged model {size_mb:.2f} MB (budget {max_mb:g} MB)")


def gate_latency(loaded: LoadedVersion, frame: pd.DataFrame, gates: GatesConfig,
                 threads: int = 1) -> list[GateResult]:
    """Single-row p95 and batch throughput with the OpenMP/BLAS threads the server gives a
    model (``serving.model_threads``), timed in CPU time of the calling thread (of the
    process when a model has more than one thread): the cost of the model itself. Wall time
    on a busy machine (a retrain beside a server and other jobs) measured the machine's queue
    instead: one-row p95 of 100-170 ms for a model that takes 7 ms, failing candidates the
    server would serve fast. Wall-clock figures are kept in the result's detail."""
    from threadpoolctl import threadpool_limits

    if gates.latency is None:
        return []
    clock = time.thread_time if threads == 1 else time.process_time
    with threadpool_limits(threads):
        return _measure_latency(loaded, frame, gates.latency, clock)


def _measure_latency(loaded: LoadedVersion, frame: pd.DataFrame, cfg: Any,
                     clock: Any) -> list[GateResult]:
    X = loaded.prepare(frame).reset_index(drop=True)
    for i in range(min(5, len(X))):  # warm-up: first calls pay lazy imports and caches
        loaded.serve(X.iloc[[i]])
    rows = np.arange(cfg.samples) % len(X)
    times, walls = [], []
    for row in rows.tolist():
        one = X.iloc[[row]]
        c0, t0 = clock(), time.perf_counter()
        loaded.serve(one)
        times.append((clock() - c0) * 1000)
        walls.append((time.perf_counter() - t0) * 1000)
    p95 = float(np.percentile(times, 95))
    batch = X.iloc[np.arange(cfg.batch_rows) % len(X)]
    c0, t0 = clock(), time.perf_counter()
    loaded.serve(batch)
    rows_per_s = cfg.batch_rows / max(clock() - c0, 1e-9)
    wall = {"wall_p95_ms": float(np.percentile(walls, 95)),
            "wall_rows_per_s": cfg.batch_rows / (time.perf_counter() - t0)}
    out = []
    if cfg.p95_ms is not None:
        out.append(GateResult("latency.p95_ms", "pass" if p95 <= cfg.p95_ms else "fail",
                              round(p95, 3), cfg.p95_ms,
                              f"single-row p95 {p95:.2f} ms of CPU over {cfg.samples} calls "
                              f"(budget {cfg.p95_ms:g} ms)",
                              {"p50_ms": float(np.median(times)), **wall}))
    if cfg.min_rows_per_s is not None:
        out.append(GateResult("latency.rows_per_s",
                              "pass" if rows_per_s >= cfg.min_rows_per_s else "fail",
                              round(rows_per_s, 1), cfg.min_rows_per_s,
                              f"batch of {cfg.batch_rows}: {rows_per_s:,.0f} rows per "
                              f"CPU-second (needs {cfg.min_rows_per_s:,.0f})", wall))
    return out


def _schema_types(schema: list[SignatureColumn]) -> dict[str, str]:
    return {c.name: c.type for c in schema}


def gate_signature(candidate: LoadedVersion, champion: LoadedVersion | None) -> GateResult:
    if champion is None:
        return GateResult("signature", "skip", None, None, "no champion to compare with")
    cand_in = _schema_types(candidate.input_schema)
    champ_in = _schema_types(champion.input_schema)
    problems = [f"input '{n}' removed" for n in champ_in if n not in cand_in]
    problems += [f"input '{n}' changed type {champ_in[n]} -> {cand_in[n]}"
                 for n in champ_in if n in cand_in and cand_in[n] != champ_in[n]]
    cand_out = sorted(_schema_types(candidate.output_schema).values())
    champ_out = sorted(_schema_types(champion.output_schema).values())
    if cand_out != champ_out:
        problems.append(f"output kind changed {champ_out} -> {cand_out}")
    return GateResult("signature", "fail" if problems else "pass", float(len(problems)), 0.0,
                      "; ".join(problems) or f"compatible with champion v{champion.version}",
                      {"added_inputs": [n for n in cand_in if n not in champ_in]})


def gate_non_inferiority(task: str, metric: str, y: np.ndarray, cand: tuple, champ: tuple,
                         champion: int, gates: GatesConfig, classes: list[Any] | None,
                         ) -> GateResult:
    cfg = gates.non_inferiority
    if cfg is None:
        raise ConfigError("gates.non_inferiority is not configured",
                          key="gates.non_inferiority")
    boot = paired_bootstrap(metric, task, y, cand[0], champ[0], candidate_proba=cand[1],
                            baseline_proba=champ[1], classes=classes,
                            resamples=cfg.resamples, confidence=cfg.confidence, seed=cfg.seed)
    passed = boot["upper"] <= cfg.margin
    return GateResult(
        f"non_inferiority.{metric}", "pass" if passed else "fail", round(boot["upper"], 6),
        cfg.margin,
        f"{metric} vs champion v{champion}: worse by {boot['observed']:+.4g} observed, "
        f"{boot['upper']:+.4g} at the {cfg.confidence:.0%} upper bound (margin {cfg.margin:g})",
        boot)


def gate_slice(task: str, spec: SliceGate, metric: str, frame: pd.DataFrame, y: np.ndarray,
               pred: np.ndarray, proba: np.ndarray | None, overall: float, *,
               classes: list[Any] | None = None) -> GateResult:
    name = f"slice.{spec.column}"
    if spec.column not in frame.columns:
        return GateResult(name, "fail", None, spec.margin,
                          f"column '{spec.column}' is not in the holdout snapshot")
    col = frame[spec.column]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        keys = pd.qcut(col, q=spec.buckets, duplicates="drop").astype(str)
    else:
        keys = col.astype(object).where(col.notna(), "<missing>").astype(str)
    slices, worst = [], None
    for key, idx in keys.groupby(keys, sort=True).groups.items():
        pos = frame.index.get_indexer(idx)
        if len(pos) < spec.min_size:
            slices.append({"slice": key, "rows": len(pos), "status": "skip"})
            continue
        value = compute_metrics(task, [metric], y[pos], pred[pos],
                                proba[pos] if proba is not None else None,
                                classes=classes)[metric]
        worse = _worse_by(metric, value, overall)
        if not np.isfinite(worse):  # a slice whose metric cannot be computed counts as worst
            worse = float("inf")
        slices.append({"slice": key, "rows": len(pos), "value": value, "worse_by": worse,
                       "status": "pass" if worse <= spec.margin else "fail"})
        if worst is None or worse > worst[1]:
            worst = (key, worse)
    if worst is None:
        return GateResult(name, "skip", None, spec.margin,
                          f"no slice of '{spec.column}' has {spec.min_size}+ rows",
                          {"slices": slices})
    passed = worst[1] <= spec.margin
    return GateResult(name, "pass" if passed else "fail", round(worst[1], 6), spec.margin,
                      f"worst slice {spec.column}={worst[0]}: {metric} worse than overall by "
                      f"{worst[1]:.4g} (margin {spec.margin:g})", {"slices": slices})


# ------------------------------------------------------------------------ orchestration

def evaluate_gates(project: Project, version: int, *, record: bool = True,
                   base: Project | None = None) -> GateReport:
    """Run every configured gate on ``version``; store and tag the results when ``record``.
    ``base``: judge against that project's champion (another environment's registry, as
    ``mloop ci check --base-env`` does) instead of this one's."""
    gates = project.config.gates
    cand = load_version(project, version)
    tags = cand.tags
    holdout = tags.get("mloop.snapshot.holdout")
    if not holdout:
        raise MloopError(f"version {version} has no 'mloop.snapshot.holdout' tag: it was not "
                         f"registered by an mloop pipeline, so it has no holdout to gate on")
    frame = project.snapshots.read_table(holdout).to_pandas()
    task = tags.get("mloop.task") or project.config.task or "regression"
    target = tags.get("mloop.target") or project.config.target
    y = frame[target].to_numpy()
    primary = tags.get("mloop.primary_metric") or (project.config.metrics or DEFAULTS[task])[0]
    known = metrics_for(task)
    pred, proba = cand.predict(frame)
    # the columns of predict_proba, so probability metrics hold on rows lacking a class
    classes = list(getattr(cand.sklearn_model, "classes_", [])) or None
    needed = {primary, *(g.metric for g in gates.absolute),
              *(s.metric or primary for s in gates.slices)}
    if gates.non_inferiority is not None:
        needed.add(gates.non_inferiority.metric or primary)
    unknown = sorted(m for m in needed if m not in known)
    if unknown:
        raise ConfigError(f"gates name metric(s) {', '.join(unknown)} that a {task} model "
                          f"does not have; choose from {', '.join(known)}", key="gates")
    metrics = compute_metrics(task, sorted(needed), y, pred, proba, classes=classes)

    train_labels = None
    if task == "classification" and tags.get("mloop.snapshot.train"):
        train_y = project.snapshots.read_table(tags["mloop.snapshot.train"])[target]
        train_labels = set(train_y.drop_null().unique().to_pylist())

    if base is None:
        champ_v = champion_version(project)
        champion = load_version(project, champ_v) if champ_v not in (None, version) else None
    else:
        champ_v = champion_version(base)
        champion = load_version(base, champ_v) if champ_v is not None else None

    results = gate_absolute(metrics, gates)
    if gates.non_inferiority is not None:
        metric = gates.non_inferiority.metric or primary
        if champion is None:
            results.append(GateResult(f"non_inferiority.{metric}", "skip", None,
                                      gates.non_inferiority.margin,
                                      "no champion yet: nothing to be non-inferior to"
                                      if champ_v is None else "this version is the champion"))
        else:
            missing = [c for c in champion.inputs if c not in frame.columns]
            if missing:
                results.append(GateResult(f"non_inferiority.{metric}", "fail", None,
                                          gates.non_inferiority.margin,
                                          f"champion v{champ_v} needs columns the candidate's "
                                          f"holdout lacks: {', '.join(missing)}"))
            else:
                results.append(gate_non_inferiority(task, metric, y, (pred, proba),
                                                    champion.predict(frame), champion.version,
                                                    gates,
                                                    classes))
    results += gate_latency(cand, frame, gates, project.config.serving.model_threads)
    if gates.size is not None:
        results.append(gate_size(cand.path, gates.size.max_mb))
    if gates.signature:
        results.append(gate_signature(cand, champion))
    results.append(gate_sanity(pred, task, train_labels, gates))
    for spec in gates.slices:
        metric = spec.metric or primary
        results.append(gate_slice(task, spec, metric, frame, y, pred, proba, metrics[metric],
                                  classes=classes))

    report = GateReport(project.config.model_name, version, champ_v,
                        all(r.status != "fail" for r in results),
                        datetime.now(UTC).isoformat(timespec="seconds"), results)
    if record:
        record_gate_report(project, report)
    return report
