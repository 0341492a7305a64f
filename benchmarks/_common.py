"""What every benchmark script shares: the git state a results file records.

Each script runs alone (``python benchmarks/X.py``, ``python benchmarks/serving/X.py``), so
Python puts the script's own folder first on ``sys.path``; scripts in a subfolder add this
folder too (``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``) before
``from _common import git_state``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any


def git_state(repo: Path, *, ignore: Path | None = None) -> dict[str, Any]:
    """The commit measured and whether the work tree matched it (any change, tracked or
    not, as ``git status --porcelain`` lists it), so a figure can be traced to its code.

    ``ignore``: a file whose change does not count, e.g. the results file this run is about to
    overwrite (call this before writing it otherwise: it is in the tree). Without git, or
    outside a checkout, ``commit`` and ``clean`` are ``None`` and ``error`` says why.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout

    mine = None
    if ignore is not None:
        resolved, top = ignore.resolve(), repo.resolve()
        mine = str(resolved.relative_to(top)) if resolved.is_relative_to(top) else None
    try:
        # no strip(): a porcelain line starts with a space when only the work tree changed
        dirty = [line for line in git("status", "--porcelain").splitlines()
                 if line[3:] != mine]
        return {"commit": git("rev-parse", "HEAD").strip(), "clean": not dirty,
                "dirty": dirty[:50], "branch": git("rev-parse", "--abbrev-ref", "HEAD").strip()}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "clean": None, "error": str(exc)}
