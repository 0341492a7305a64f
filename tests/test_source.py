"""Data sources: files, folders and SQL queries on real databases (SQLite, PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy as sa

from mloop.config import DataConfig
from mloop.data.canonical import table_digest
from mloop.data.source import read_source
from mloop.errors import DataSourceError

from .helpers import rentals_frame


def _load(url: str) -> None:
    frame = rentals_frame(200)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        frame.to_sql("rentals", conn, index=False)
    engine.dispose()


def test_sql_query_on_sqlite_reads_the_selected_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'src.db'}"
    _load(url)
    table, source = read_source(DataConfig(sql="select * from rentals where hour < 12", url=url),
                                tmp_path, None)
    assert source == "sql:select * from rentals where hour < 12"
    assert table.num_rows == 104  # 8 full days of 12 morning hours + 8 hours of day 9
    assert set(table.column_names) == {"ts", "hour", "weather", "temp", "cnt"}


@pytest.mark.postgres
def test_sql_query_on_postgres_matches_the_same_rows_from_a_file(tmp_path: Path,
                                                                 pg_url: str) -> None:
    _load(pg_url)
    table, _ = read_source(DataConfig(sql="select hour, weather, temp, cnt from rentals "
                                          "order by ts", url=pg_url), tmp_path, None)
    frame = rentals_frame(200)[["hour", "weather", "temp", "cnt"]]
    assert table_digest(table) == table_digest(pa.Table.from_pandas(frame,
                                                                     preserve_index=False))


def test_failing_sql_names_the_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'src.db'}"
    with pytest.raises(DataSourceError, match=r"data.sql failed on data.url: .*no such table"):
        read_source(DataConfig(sql="select * from missing", url=url), tmp_path, None)


def test_since_until_filters_on_the_time_column(tmp_path: Path) -> None:
    rentals_frame(48).to_parquet(tmp_path / "r.parquet", index=False)
    table, _ = read_source(DataConfig(path="r.parquet", since="2024-01-01 12:00",
                                      until="2024-01-02 00:00"), tmp_path, "ts")
    assert table.num_rows == 12


def test_since_without_a_time_column_is_an_error(tmp_path: Path) -> None:
    rentals_frame(48).to_parquet(tmp_path / "r.parquet", index=False)
    with pytest.raises(DataSourceError, match=r"need features.time_column"):
        read_source(DataConfig(path="r.parquet", since="2024-01-01"), tmp_path, None)


def test_bad_since_value_is_named(tmp_path: Path) -> None:
    rentals_frame(48).to_parquet(tmp_path / "r.parquet", index=False)
    with pytest.raises(DataSourceError, match=r"'yesterday' is not a timestamp"):
        read_source(DataConfig(path="r.parquet", since="yesterday"), tmp_path, "ts")


def test_since_until_work_on_a_time_zone_aware_column(tmp_path: Path) -> None:
    frame = rentals_frame(48)
    frame["ts"] = frame["ts"].dt.tz_localize("Europe/Lisbon")
    frame.to_parquet(tmp_path / "r.parquet", index=False)
    table, _ = read_source(DataConfig(path="r.parquet", since="2024-01-01 12:00",
                                      until="2024-01-02"), tmp_path, "ts")
    assert table.num_rows == 12
