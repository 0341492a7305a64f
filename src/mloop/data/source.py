"""Reading the configured data source into an Arrow table.

``data.path`` is a local file or folder, or a URI pyarrow reads (``s3://bucket/key``, with the
endpoint from the environment as for every object store; see :mod:`mloop.storage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from mloop.config import DataConfig
from mloop.errors import DataSourceError
from mloop.storage import Codec, filesystem, is_local, is_sealed

_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".gz": "csv"}


def _infer_format(path: Path) -> str:
    if path.is_dir():
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.name.startswith((".", "_")):
                return _infer_format(child)
        raise DataSourceError(f"data.path '{path}' is an empty folder")
    return _format_of_name(path, str(path))


def _format_of_name(path: Path, shown: str) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes or ".pq" in suffixes:
        return "parquet"
    if ".csv" in suffixes:
        return "csv"
    raise DataSourceError(
        f"data.path '{shown}': cannot tell the format from the extension "
        f"(expected .csv, .csv.gz or .parquet); set data.format")


def _csv_convert() -> Any:
    import pyarrow.csv as pacsv

    # Empty fields are missing values (as in pandas), not empty strings.
    return pacsv.ConvertOptions(strings_can_be_null=True)


def _file_format(fmt: str) -> ds.FileFormat | str:
    return ds.CsvFileFormat(convert_options=_csv_convert()) if fmt == "csv" else fmt


def _read_uri_table(uri: str, fmt: str | None) -> pa.Table:
    """A file or a folder (prefix) of files on an object store or any pyarrow filesystem."""
    import pyarrow.fs as pafs

    try:
        fs, base = filesystem(uri)
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise DataSourceError(f"data.path '{uri}' does not exist")
        if info.type == pafs.FileType.Directory:
            files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base,
                                                                               recursive=True))
                           if i.type == pafs.FileType.File
                           and not i.base_name.startswith((".", "_")))
            if not files:
                raise DataSourceError(f"data.path '{uri}' is an empty folder")
            fmt = fmt or _format_of_name(Path(files[0]), uri)
        else:
            fmt = fmt or _format_of_name(Path(base), uri)
    except OSError as exc:
        raise DataSourceError(f"data.path '{uri}' could not be opened: {exc}") from None
    try:
        if fmt == "csv" and info.type == pafs.FileType.File:
            import pyarrow.csv as pacsv

            with fs.open_input_stream(base, compression="detect") as f:
                return pacsv.read_csv(f, convert_options=_csv_convert())
        return ds.dataset(base, filesystem=fs, format=_file_format(fmt),
                          exclude_invalid_files=False).to_table()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataSourceError(f"data.path '{uri}' could not be read as {fmt}: {exc}") from None


def _read_sealed(path: Path | str, codec: Codec) -> pa.Table | None:
    """The Parquet file at ``path`` if it is sealed at rest (a retraining table mloop wrote
    to its outputs store), opened by ``codec``; None if it is a plain file or a folder."""
    import pyarrow.parquet as pq

    if isinstance(path, str) and not is_local(path):
        import pyarrow.fs as pafs

        fs, base = filesystem(path)
        if fs.get_file_info(base).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(base) as f:
            raw = bytes(f.read())
    else:
        local = Path(str(path).removeprefix("file://"))
        if not local.is_file():
            return None
        raw = local.read_bytes()
    if not is_sealed(raw):
        return None
    return pq.read_table(pa.BufferReader(codec.open(raw, where=str(path))))


def read_file_table(path: Path | str, fmt: str | None = None, *,
                    codec: Codec | None = None) -> pa.Table:
    """Read a CSV/Parquet file or a folder of them (a local path, or a URI such as
    ``s3://bucket/prefix``). With ``codec`` (the project's, under ``security.encryption``)
    a sealed Parquet file is opened too."""
    if codec is not None:
        sealed = _read_sealed(path, codec)
        if sealed is not None:
            return sealed
    if isinstance(path, str):
        if not is_local(path):
            return _read_uri_table(path, fmt)
        path = Path(path.removeprefix("file://"))
    if not path.exists():
        raise DataSourceError(f"data.path '{path}' does not exist")
    fmt = fmt or _infer_format(path)
    try:
        if fmt == "csv" and path.is_file():
            import pyarrow.csv as pacsv

            return pacsv.read_csv(path, convert_options=_csv_convert())
        dataset = ds.dataset(str(path), format=_file_format(fmt), exclude_invalid_files=False)
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


def read_source(data: DataConfig, root: Path, time_column: str | None, *,
                codec: Codec | None = None) -> tuple[pa.Table, str]:
    """Read the configured source; return the table and a human-readable source string.
    ``codec``: opens a sealed file (a retraining table in the encrypted outputs store)."""
    if data.path is not None and not is_local(data.path):
        table = read_file_table(data.path, data.format, codec=codec)
        source = data.path
    elif data.path is not None:
        path = Path(data.path.removeprefix("file://"))
        path = path if path.is_absolute() else (root / path)
        table = read_file_table(path, data.format, codec=codec)
        source = str(path)
    else:
        table = read_sql_table(data.sql or "", data.url or "")
        source = f"sql:{data.sql}"
    return filter_time(table, time_column, data.since, data.until), source
