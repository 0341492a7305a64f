"""Reading the configured data source into an Arrow table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mloop.config import DataConfig
from mloop.errors import DataSourceError

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".gz": "csv"}


def _infer_format(path: Path) -> str:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.name.startswith((".", "_")):
                return _infer_format(child)
        raise DataSourceError(f"data.path '{path}' is an empty folder")
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".csv" in suffixes:
        return "csv"
    raise DataSourceError(
        f"data.path '{path}': cannot tell the format from the extension "
        f"(expected .csv, .csv.gz or .parquet); set data.format")


def read_file_table(path: Path, fmt: str | None = None) -> pa.Table:
    """Read a CSV/Parquet file or a folder of them."""
    if not path.exists():
        raise DataSourceError(f"data.path '{path}' does not exist")
    fmt = fmt or _infer_format(path)
    try:
        if fmt == "csv" and path.is_file():
            import pyarrow.csv as pacsv

            # Empty fields are missing values (as in pandas), not empty strings.
            return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True))
        file_format: ds.FileFormat | str = fmt
        if fmt == "csv":
            import pyarrow.csv as pacsv

            file_format = ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True))
        dataset = ds.dataset(str(path), format=file_format, exclude_invalid_files=False)
        return dataset.to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataSourceError(f"data.path '{path}' could not be read as {fmt}: {exc}") from None


def read_sql_table(sql: str, url: str) -> pa.Table:
    import pandas as pd
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            frame = pd.read_sql_query(sa.text(sql), conn)
    except Exception as exc:  # SQLAlchemy raises many driver-specific types
        raise DataSourceError(f"data.sql failed on data.url: {exc}") from None
    return pa.Table.from_pandas(frame, preserve_index=False)


def filter_time(table: pa.Table, column: str | None, since: str | None,
                until: str | None) -> pa.Table:
    if since is None and until is None:
        return table
    if column is None:
        raise DataSourceError("data.since/data.until need features.time_column")
    if column not in table.column_names:
        raise DataSourceError(f"features.time_column '{column}' is not a column of the data "
                              f"(columns: {', '.join(table.column_names)})")
    col = table[column]
    if not pa.types.is_timestamp(col.type):
        try:
            col = col.cast(pa.timestamp("us"))
        except pa.ArrowInvalid as exc:
            raise DataSourceError(f"time column '{column}' is not a timestamp: {exc}") from None
    mask = None
    for bound, op in ((since, pc.greater_equal), (until, pc.less)):
        if bound is None:
            continue
        try:
            import pandas as pd

            ts = pd.Timestamp(bound)
            tz = col.type.tz
            if tz is not None and ts.tzinfo is None:
                ts = ts.tz_localize(tz)  # a bare date means midnight in the column's zone
            elif tz is None and ts.tzinfo is not None:
                ts = ts.tz_convert("UTC").tz_localize(None)
            scalar = pa.scalar(ts, type=col.type)
        except (ValueError, TypeError, pa.ArrowInvalid):
            raise DataSourceError(f"data.since/until value '{bound}' is not a timestamp") from None
        m = op(col, scalar)
        mask = m if mask is None else pc.and_(mask, m)
    return table.filter(mask)


def read_source(data: DataConfig, root: Path, time_column: str | None) -> tuple[pa.Table, str]:
    """Read the configured source; return the table and a human-readable source string."""
    if data.path is not None:
        path = Path(data.path)
        path = path if path.is_absolute() else (root / path)
        table = read_file_table(path, data.format)
        source = str(path)
    else:
        table = read_sql_table(data.sql or "", data.url or "")
        source = f"sql:{data.sql}"
    return filter_time(table, time_column, data.since, data.until), source
