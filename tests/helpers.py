"""Helpers several test modules share (imported as ``from .helpers import ...``): building a
trained project with a champion once per module, and copying it for a test that changes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd


def train_champion(root: Path, config: str, frame: pd.DataFrame) -> Path:
    """A project at ``root`` (mloop.yaml + data/rentals.parquet), its pipeline run once and
    version 1 made champion; returns ``root``."""
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project
    from mloop.registry.promotion import change_alias

    (root / "data").mkdir(parents=True)
    (root / "mloop.yaml").write_text(config)
    frame.to_parquet(root / "data" / "rentals.parquet", index=False)
    if run_pipeline(open_project(root)).status != "succeeded":
        raise AssertionError(f"the pipeline of {root} did not succeed")
    change_alias(open_project(root), "champion", 1, expected=None, action="promote",
                 reason="test setup")
    return root


def copy_project(trained: Path, tmp_path: Path) -> Path:
    """A private copy of a module's trained project, under the same folder name (its own
    stores; MLflow's artifact paths are absolute, so artifacts stay the trained one's)."""
    root = tmp_path / trained.name
    shutil.copytree(trained, root)
    return root
