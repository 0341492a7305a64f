"""Shared fixtures: real projects in temp folders, real MLflow on SQLite, real files. The names
tests share besides fixtures live in helpers.py: test modules import from there, never from
here."""

from __future__ import annotations

import os
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from .cluster import Cluster, Databases, running_cluster
from .helpers import SMALL_CONFIG, build_serving_registry, copy_bike, rentals_frame

# pytest-xdist hands its workers the launching terminal's width as COLUMNS, and rich would then
# lay every table out for that terminal instead of for the pipe it writes to. Tests read
# mloop's output as a script does (stdout not a terminal): no COLUMNS, before mloop is imported.
os.environ.pop("COLUMNS", None)


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
    return copy_bike(tmp_path / "bike_sharing")


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained project of the serving, monitoring and loop tests (four versions, v1
    champion: helpers.build_serving_registry), built once per test process, not once per
    module: pytest-xdist spreads those three modules over its workers, and each worker trains
    it once. A test changes a copy of it (helpers.copy_project), never this one."""
    return build_serving_registry(tmp_path_factory.mktemp("serving") / "proj")


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


@pytest.fixture
def databases() -> Iterator[Databases]:
    """Fresh PostgreSQL databases on demand, dropped at the end (even when connected)."""
    dbs = Databases()
    try:
        yield dbs
    finally:
        dbs.close()


@pytest.fixture
def cluster(tmp_path: Path, databases: Databases) -> Iterator[Cluster]:
    """moto's S3 server and an MLflow server (PostgreSQL backend, artifacts proxied to S3),
    started on free loopback ports and stopped by their process groups (tests/cluster.py)."""
    with running_cluster(tmp_path, databases) as running:
        yield running
