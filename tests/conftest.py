"""Shared fixtures: real projects in temp folders, real MLflow on SQLite, real files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]

# pytest-xdist hands its workers the launching terminal's width as COLUMNS, and rich would then
# lay every table out for that terminal instead of for the pipe it writes to. Tests read
# mloop's output as a script does (stdout not a terminal): no COLUMNS, before mloop is imported.
os.environ.pop("COLUMNS", None)
BIKE = REPO / "examples" / "bike_sharing"


def rentals_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A small bike-like table: hourly rentals driven by hour, weather and temperature."""
    rng = np.random.default_rng(seed)
    hours = np.arange(n) % 24
    weather = rng.choice(["Clear", "Mist", "Rain"], size=n, p=[0.6, 0.3, 0.1])
    temp = rng.normal(15, 8, size=n).round(2)
    base = 20 + 15 * np.sin((hours - 6) / 24 * 2 * np.pi).clip(0) * 10
    effect = np.where(weather == "Rain", -30, np.where(weather == "Mist", -10, 0))
    cnt = np.maximum(0, base + 2.5 * temp + effect + rng.normal(0, 8, size=n)).round().astype(int)
    return pd.DataFrame({
        "ts": pd.date_range("2024-01-01", periods=n, freq="h"),
        "hour": hours.astype(int),
        "weather": weather,
        "temp": temp,
        "cnt": cnt,
    })


SMALL_CONFIG = """\
project: rentals
data:
  path: data/rentals.parquet
target: cnt
features:
  time_column: ts
split:
  holdout: 0.25
model:
  estimator: sklearn.ensemble.HistGradientBoostingRegressor
  params: {max_iter: 30, random_state: 0}
metrics: [mae, rmse]
validation:
  min_rows: 100
  columns:
    temp: {type: numeric, min: -40, max: 60}
    weather: {allowed: [Clear, Mist, Rain]}
"""


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Path]:
    """Write a project (mloop.yaml + data) into a temp folder and return its root."""

    def make(config: str = SMALL_CONFIG, frame: pd.DataFrame | None = None,
             name: str = "proj", files: dict[str, str] | None = None) -> Path:
        root = tmp_path / name
        (root / "data").mkdir(parents=True)
        (root / "mloop.yaml").write_text(textwrap.dedent(config))
        (frame if frame is not None else rentals_frame()).to_parquet(
            root / "data" / "rentals.parquet", index=False)
        for rel, text in (files or {}).items():
            (root / rel).write_text(textwrap.dedent(text))
        return root

    return make


@pytest.fixture
def bike_project(tmp_path: Path) -> Path:
    root = tmp_path / "bike_sharing"
    shutil.copytree(BIKE, root, ignore=shutil.ignore_patterns(".mloop"))
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real `mloop` console script in a fresh process."""
    exe = Path(sys.executable).parent / "mloop"
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mloop {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway database on the machine's PostgreSQL (trust auth). Fails, not skips, when
    the server is down: start it with
    `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`."""
    name = f"mloop_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
