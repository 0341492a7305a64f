"""Batch scoring of files larger than memory: read a chunk, predict, append, repeat.

Input is Parquet (read row group by row group) or CSV (pyarrow's streaming reader); output is
one Parquet file with the input columns plus ``prediction`` (and, for a classifier, one
``proba_<class>`` column per class, in the order of the model's classes), written under a
temporary name and renamed at the end, so a failure leaves no half-written output. Memory is
bounded by the chunk size, not the file size.

The model gets only the signature's columns. Other columns (an id to join on, say) are not
scored and kept in the output as read, and listed as ``ignored_columns`` in the result; with
``serving.strict_columns: true`` they are an error, as they are on the server.

With ``features.store: feast`` the file carries entity keys, not the looked-up columns: each
chunk is completed from the feature store first (point in time with ``features.time_column``,
else online; see :mod:`mloop.serving.batch_lookup`), the looked-up columns are kept in the
output, and the result names the mode under ``features``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mloop.errors import DataSourceError
from mloop.project import Project
from mloop.serving.batch_lookup import BatchLookup
from mloop.serving.model import ServedModel, load_served

_ARROW = {"double": pa.float64(), "float": pa.float32(), "long": pa.int64(),
          "integer": pa.int32(), "string": pa.string(), "boolean": pa.bool_()}


def _reader(path: Path, chunk_rows: int) -> tuple[Iterator[pa.RecordBatch], int | None, str]:
    """Batches, the total (rows for Parquet, bytes for CSV) and the unit."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise DataSourceError(f"{path}: not a readable Parquet file ({exc})") from exc
        # a frame written by pandas with its index (``to_parquet()`` keeps any index but a
        # plain range) stores it as a column such as ``__index_level_0__``: pandas reads it
        # back as the index, so it is not one of the file's columns and is not copied out
        index = {c for c in (pf.schema_arrow.pandas_metadata or {}).get("index_columns", [])
                 if isinstance(c, str)}
        columns = [n for n in pf.schema_arrow.names if n not in index] if index else None
        return (pf.iter_batches(batch_size=chunk_rows, columns=columns), pf.metadata.num_rows,
                "rows")
    if suffix in (".csv", ".txt", ".gz"):
        import pyarrow.csv as pacsv

        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(
                block_size=max(1 << 20, chunk_rows * 200)))
        except Exception as exc:
            raise DataSourceError(f"{path}: not a readable CSV file ({exc})") from exc
        return iter(reader), None, "rows"
    raise DataSourceError(f"{path}: unsupported input type '{suffix}' (use .parquet or .csv)")


def _frame(model: ServedModel, batch: pa.RecordBatch, path: Path, offset: int) -> Any:
    names = batch.schema.names
    missing = [c.name for c in model.schema.columns if c.name not in names]
    if missing:
        raise DataSourceError(f"{path}: missing column(s) {missing} that v{model.version}'s "
                              f"signature requires (found {names})")
    cols = {}
    for c in model.schema.columns:
        col = batch.column(names.index(c.name))
        if c.required and col.null_count:
            first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataSourceError(f"{path}: column '{c.name}' is null at row {offset + first} but "
                                  f"the signature requires a value")
        target = _ARROW.get(c.type)
        if target is not None and col.type != target:
            if c.type == "string":
                col = col.cast(pa.string())
            else:
                try:
                    col = col.cast(target)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise DataSourceError(f"{path}: column '{c.name}' is {col.type}, the signature "
                                          f"expects {c.type} ({exc})") from None
        cols[c.name] = col
    frame = pa.table(cols).to_pandas()
    for c in model.schema.columns:
        if c.type == "string":
            frame[c.name] = frame[c.name].astype(object).where(frame[c.name].notna(), None)
    return frame


OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def _output_format(path: Path) -> str:
    """The output's format, from its extension: a scored file named ``.csv`` that held
    Parquet bytes would be unreadable to whoever opens it as CSV."""
    found = OUTPUT_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataSourceError(f"--output {path}: name a .parquet or .csv file (the format "
                              f"follows the extension)")
    return found


def predict_file(project: Project, input_path: Path, output_path: Path, *,
                 version: int | None = None, chunk_rows: int = 50_000,
                 progress: bool = True) -> dict[str, Any]:
    """Score ``input_path`` into ``output_path``; returns rows, version, seconds, peak RSS."""
    import psutil
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    from mloop.registry.aliases import require_champion

    if not input_path.exists():
        raise DataSourceError(f"{input_path}: no such file")
    as_csv = _output_format(output_path) == "csv"
    if version is None:
        version = require_champion(project, needed_for="`mloop predict` scores with it "
                                                       "unless --version names a version")
    batches, total, unit = _reader(input_path, chunk_rows)
    model = load_served(project, version)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".tmp-{os.getpid()}-{output_path.name}")
    proc = psutil.Process()
    peak = proc.memory_info().rss
    t0 = time.perf_counter()
    rows = 0
    writer: pq.ParquetWriter | pa_csv.CSVWriter | None = None
    schema: pa.Schema | None = None
    ignored: list[str] | None = None
    lookup: BatchLookup | None = None
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn(f"scoring {input_path.name} with v{version}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn(),
                   disable=not progress, transient=True)
    try:
        with bar:
            task = bar.add_task("score", total=total)
            for batch in batches:
                if ignored is None:
                    names = batch.schema.names
                    if project.config.features.store == "feast":
                        lookup = BatchLookup(project, model.schema, names, str(input_path))
                        names = [n for n in names if n not in lookup.passed_through]
                    ignored = model.schema.extra_columns(
                        names, source=str(input_path),
                        strict=project.config.serving.strict_columns)
                if batch.num_rows == 0:
                    continue
                if lookup is not None:
                    batch = lookup.complete(batch, rows)
                frame = _frame(model, batch, input_path, rows)
                pred, proba = model.score_frame(frame)
                out = pa.Table.from_batches([batch]).append_column("prediction", pa.array(pred))
                if proba is not None and model.classes is not None:
                    for j, c in enumerate(model.classes):
                        out = out.append_column(f"proba_{c}", pa.array(proba[:, j]))
                if writer is None:
                    schema = out.schema
                    writer = (pa_csv.CSVWriter(tmp, schema) if as_csv else
                              pq.ParquetWriter(tmp, schema, compression="zstd"))
                writer.write_table(out.cast(schema))
                rows += batch.num_rows
                bar.advance(task, batch.num_rows)
                peak = max(peak, proc.memory_info().rss)
        if writer is None:
            raise DataSourceError(f"{input_path}: no rows to score")
        writer.close()
        writer = None
        os.replace(tmp, output_path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    return {"input": str(input_path), "output": str(output_path), "version": version,
            "rows": rows, "seconds": round(seconds, 3),
            "rows_per_s": round(rows / seconds, 1) if seconds else None,
            "peak_rss_mb": round(peak / 2**20, 1), "ignored_columns": ignored or [],
            "features": None if lookup is None else
            {"store": "feast", "mode": lookup.mode, "looked_up": lookup.names,
             "join_keys": lookup.keys, "time_column": lookup.time_column}}
