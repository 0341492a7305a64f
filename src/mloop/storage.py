"""A tiny object store over pyarrow's filesystems: local folders today, ``s3://`` the same way.

Writes are atomic: a reader never sees half a file. Locally that is temp file + rename; on
object stores a single PUT is already atomic.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def resolve_uri(uri: str, root: Path) -> str:
    """Make a relative path or ``sqlite:///relative.db`` absolute against the project root."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        if rel and rel != ":memory:":
            return "sqlite:///" + str((root / rel).resolve())
        return uri
    if uri.startswith("file://"):
        return uri
    if "://" in uri:
        return uri
    return str((root / uri).resolve())


class ObjectStore:
    """Bytes and Parquet files under one base URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" in uri and not uri.startswith("file://"):
            self.fs, self.base = pafs.FileSystem.from_uri(uri)
            self.local = False
        else:
            path = uri[len("file://") :] if uri.startswith("file://") else uri
            self.fs, self.base = pafs.LocalFileSystem(), os.path.abspath(path)
            self.local = True

    def path(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}" if rel else self.base

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def _tmp(self, rel: str) -> str:
        head, _, tail = self.path(rel).rpartition("/")
        return f"{head}/.tmp-{uuid.uuid4().hex}-{tail}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if not self.local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = self._tmp(rel)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        target = self.path(rel)
        self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if not self.local:
            pq.write_table(table, target, filesystem=self.fs, compression="zstd")
            return
        tmp = self._tmp(rel)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, target)

    def read_parquet(self, rel: str) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs)

    def listdir(self, rel: str = "") -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(sel))

    def size(self, rel: str) -> int:
        return int(self.fs.get_file_info(self.path(rel)).size or 0)
