"""Opening a project is cheap: every command does it, most read only a few rows."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def test_opening_a_project_and_its_stores_loads_no_ml_columnar_or_migration_library(
        make_project: Callable[..., Path]) -> None:
    root = make_project()
    heavy = ["mlflow", "pandas", "pyarrow", "numpy", "sklearn", "alembic"]
    code = ("import json, sys\n"
            "from mloop.project import open_project\n"
            f"p = open_project({str(root)!r})\n"
            "p.uris, p.store.current_revision(), p.tracking\n"
            f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    first, again = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True) for _ in range(2))
    assert json.loads(first.stdout) == ["alembic"]  # creating the metadata store: once
    assert json.loads(again.stdout) == []
