"""``mloop init``: scaffold a project folder from a template shipped in the package."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from mloop.errors import MloopError

TEMPLATES = ("tabular",)


def init_project(target: Path, *, template: str = "tabular", name: str | None = None) -> list[Path]:
    """Write mloop.yaml, pipeline.py and data/ into ``target``; never overwrite a file."""
    if template not in TEMPLATES:
        raise MloopError(f"unknown template '{template}'; available: {', '.join(TEMPLATES)}")
    name = name or target.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MloopError(f"project name '{name}' must start with a letter or digit and contain "
                         f"only letters, digits, '_', '.', '-'")
    if (target / "mloop.yaml").exists():
        raise MloopError(f"{target / 'mloop.yaml'} already exists; refusing to overwrite it")
    root = resources.files("mloop") / "templates" / template
    files = {
        "mloop.yaml": Template((root / "mloop.yaml.tmpl").read_text()).substitute(project=name),
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
