"""``mloop init``: scaffold a project folder from a template shipped in the package."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from mloop.errors import MloopError

TEMPLATES = ("tabular",)
TASKS = ("regression", "classification")

_TASK_LINE = {
    None: "# task: regression              # or classification; inferred from the target "
          "when absent",
    "regression": "task: regression                # or classification",
    "classification": "task: classification            # or regression",
}
# Every gate a fresh project starts with: a candidate that passes them all serves at once
# (auto_promote), so the Quick start ends at a served model. The quality gates are
# scale-free (R², ROC AUC), so they hold whatever the target's units or class count.
_GATES_HEAD = """\
gates:                          # what a candidate passes before it serves (mloop run gates it)
  auto_promote: true            # every gate passed: the candidate becomes the champion
  size: {max_mb: 200}           # the logged model, preprocessing included
  # latency: {p95_ms: 100}      # one-row predict, CPU time
"""
_QUALITY = {
    "regression": """\
  absolute:
    - {metric: r2, min: 0.0}    # better than always predicting the mean
  non_inferiority: {metric: r2, margin: 0.02}   # at most 0.02 R² worse than the champion
                                # (paired bootstrap on the same holdout)
""",
    "classification": """\
  absolute:
    - {metric: roc_auc, min: 0.55}              # ranks better than chance
  non_inferiority: {metric: roc_auc, margin: 0.01}   # at most 0.01 AUC worse than the
                                # champion (paired bootstrap on the same holdout)
""",
}
_QUALITY_HINT = """\
  # Quality gates name metrics of the task (`mloop init NAME --task regression|classification`
  # writes them). Regression:
  #   absolute: [{metric: r2, min: 0.0}]              # better than predicting the mean
  #   non_inferiority: {metric: r2, margin: 0.02}     # vs the champion, same holdout
  # Classification:
  #   absolute: [{metric: roc_auc, min: 0.55}]        # ranks better than chance
  #   non_inferiority: {metric: roc_auc, margin: 0.01}
"""


def init_project(target: Path, *, template: str = "tabular", name: str | None = None,
                 task: str | None = None) -> list[Path]:
    """Write mloop.yaml, pipeline.py and data/ into ``target``; never overwrite a file.

    With ``task``, mloop.yaml names it and carries quality gates for it; without, the task is
    inferred from the target and the quality gates are examples in comments."""
    if template not in TEMPLATES:
        raise MloopError(f"unknown template '{template}'; available: {', '.join(TEMPLATES)}")
    if task is not None and task not in TASKS:
        raise MloopError(f"unknown task '{task}'; expected {' or '.join(TASKS)}")
    name = name or target.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MloopError(f"project name '{name}' must start with a letter or digit and contain "
                         f"only letters, digits, '_', '.', '-'")
    if (target / "mloop.yaml").exists():
        raise MloopError(f"{target / 'mloop.yaml'} already exists; refusing to overwrite it")
    root = resources.files("mloop") / "templates" / template
    files = {
        "mloop.yaml": Template((root / "mloop.yaml.tmpl").read_text()).substitute(
            project=name, task_line=_TASK_LINE[task],
            gates=_GATES_HEAD + (_QUALITY[task] if task else _QUALITY_HINT)),
        "pipeline.py": (root / "pipeline.py").read_text(),
        "data/README.md": (root / "data" / "README.md").read_text(),
        ".gitignore": (root / "gitignore").read_text(),
    }
    written = []
    for rel, text in files.items():
        path = target / rel
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
