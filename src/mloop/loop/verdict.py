"""The canary's verdict: challenger and champion re-scored on the same labelled rows, judged
by the paired bootstrap bound the non-inferiority gate uses.

A point comparison on a few hundred labelled rows promotes a canary that is better by noise
(0.747 vs 0.743 on 3 rows of 672). The verdict is the gate's question asked of live traffic:
how much worse is the challenger than the champion, at the one-sided upper ``confidence``
bound of a paired bootstrap over the labelled rows; it is promoted when that bound is within
the margin. The confidence, resamples and seed are ``gates.non_inferiority``'s (0.95, 2000, 0
without one). The margin, in the metric's units, is the larger of ``loop.canary.margin``
(relative: that share of the champion's value on these rows) and the gate's own margin when
the gate judges the same metric. With neither, the challenger must be shown no worse at all.

The metric is the version's primary one; ROC AUC and log loss use both versions'
probabilities. It falls back to accuracy, saying why, when a version has no probabilities, when
the metric is undefined on these rows (ROC AUC with one class labelled) or cannot be computed
on labels kept as text (binary f1 of integer classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mloop.project import Project


@dataclass
class Paired:
    """Both versions' outputs on the same labelled rows, and the metric they are judged on."""

    task: str
    primary: str  # the version's primary metric
    metric: str  # what the verdict is judged on (the primary, or its fallback)
    y: np.ndarray
    preds: dict[int, np.ndarray]
    probas: dict[int, np.ndarray | None]
    classes: list[str] | None
    values: dict[int, float] = field(default_factory=dict)
    fallback: str | None = None  # why the metric is not the primary one

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "rows": len(self.y),
                               "values": dict(self.values)}
        if self.fallback:
            out["fallback"] = self.fallback
        return out


def score_paired(project: Project, labelled: pa.Table, versions: list[int]) -> Paired:
    """Re-score the labelled rows' logged inputs with every version (the original models, in
    float64) and compute each one's metric."""
    from mloop.metrics import PROBA_METRICS, compute_metrics, label_metric, monitored_metric
    from mloop.registry.candidates import get_version
    from mloop.serving.model import load_served

    tags = dict(get_version(project, versions[0]).tags or {})
    task = tags.get("mloop.task", project.config.task or "regression")
    primary = monitored_metric(task, tags.get("mloop.primary_metric"))
    y = labelled.column("label").to_numpy(zero_copy_only=False) if labelled.num_rows \
        else np.array([])
    if task != "regression":
        y = y.astype(str)
    paired = Paired(task, primary, primary, y, {}, {}, None)
    if not labelled.num_rows:
        return paired
    raw: dict[int, tuple[np.ndarray, np.ndarray | None, list[str] | None]] = {}
    for v in versions:
        model = load_served(project, v, warm=False)
        cols = {name: (labelled.column(name).to_pylist() if name in labelled.column_names
                       else [None] * labelled.num_rows) for name in model.schema.names}
        pred, proba = model.score_arrays(cols)
        classes = [str(c) for c in model.classes] if model.classes is not None else None
        raw[v] = (pred.astype(str) if task != "regression" else pred, proba, classes)
        paired.preds[v] = raw[v][0]
    if primary in PROBA_METRICS:
        if all(p is not None for _, p, _ in raw.values()):
            paired.classes = list(dict.fromkeys(c for _, _, cs in raw.values() for c in cs or []))
            paired.probas = {v: _align(p, cs, paired.classes) for v, (_, p, cs) in raw.items()}
        else:
            paired.fallback = f"{primary} needs class probabilities and a version has none"
            paired.metric = label_metric(task, primary)

    def compute() -> dict[int, float]:
        return {v: compute_metrics(task, [paired.metric], y, paired.preds[v],
                                   paired.probas.get(v), classes=paired.classes)[paired.metric]
                for v in versions}

    try:
        paired.values = compute()
    except ValueError as exc:
        if task == "regression":
            raise
        # e.g. a probability metric given a label outside the model's classes: judge on
        # accuracy rather than not at all
        paired.fallback = f"{paired.metric} cannot be computed on these labels ({exc})"
        paired.metric, paired.probas, paired.classes = "accuracy", {}, None
        paired.values = compute()
    if not all(math.isfinite(x) for x in paired.values.values()):
        paired.fallback = f"{paired.metric} is not defined on these rows (one class labelled?)"
        paired.metric, paired.probas, paired.classes = "accuracy", {}, None
        paired.values = compute()
    return paired


def _align(proba: np.ndarray | None, classes: list[str] | None, union: list[str]
           ) -> np.ndarray | None:
    """Probability columns in ``union`` order; a class this version never saw gets 0."""
    if proba is None or classes is None or classes == union:
        return proba
    out = np.zeros((len(proba), len(union)))
    for j, c in enumerate(classes):
        out[:, union.index(c)] = proba[:, j]
    return out


def canary_bound(project: Project, paired: Paired, challenger: int, champion: int
                 ) -> dict[str, Any]:
    """How much worse the challenger is than the champion on these rows, at the gate's upper
    confidence bound, against the margin; ``passed`` when the bound is within it."""
    from mloop.config import NonInferiorityGate
    from mloop.registry.bootstrap import paired_bootstrap

    gate = project.config.gates.non_inferiority
    cfg = gate or NonInferiorityGate(margin=0.0)
    policy = project.config.loop.canary
    relative = policy.margin if policy is not None else 0.0
    base = paired.values[champion]
    margin = relative * abs(base)
    source = f"loop.canary.margin: {relative:g} of the champion's {base:.4g}"
    if gate is not None and (gate.metric or paired.primary) == paired.metric \
            and gate.margin > margin:
        margin, source = gate.margin, "gates.non_inferiority.margin"
    boot = paired_bootstrap(paired.metric, paired.task, paired.y, paired.preds[challenger],
                            paired.preds[champion],
                            candidate_proba=paired.probas.get(challenger),
                            baseline_proba=paired.probas.get(champion), classes=paired.classes,
                            resamples=cfg.resamples, confidence=cfg.confidence, seed=cfg.seed)
    upper = boot["upper"]
    return {"metric": paired.metric, "rows": len(paired.y), "difference": boot["observed"],
            "upper": upper, "lower": boot["lower"], "confidence": boot["confidence"],
            "resamples": boot["resamples"], "margin": margin, "margin_from": source,
            "passed": bool(math.isfinite(upper) and upper <= margin)}
