"""A tiny object store over pyarrow's filesystems: local folders and ``s3://`` alike.

Writes are atomic: a reader never sees half a file. Locally that is temp file + rename; on
object stores a single PUT (or, for large files, a multipart upload, which appears whole when
completed) is already atomic.

S3 endpoints come from the same environment variables that boto3 and MLflow read, so one
setting serves both: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (or MLflow's
``MLFLOW_S3_ENDPOINT_URL``), ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the credentials
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, instance roles), which the AWS
SDK inside pyarrow finds by itself. Options in the URI's query string
(``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``) win over the environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported where used: resolving a URI must not cost pyarrow's import
    import pyarrow as pa
    import pyarrow.fs as pafs

# Most specific first, as boto3 does (a service-specific endpoint beats the global one).
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


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


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def s3_settings() -> dict[str, str | None]:
    """The S3 endpoint and region the environment asks for (what boto3 and MLflow use):
    ``{"endpoint": "http://127.0.0.1:9000" or None, "from": "AWS_ENDPOINT_URL" or None,
    "region": ...}``."""
    name = next((n for n in S3_ENDPOINT_ENV if os.environ.get(n)), None)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    return {"endpoint": os.environ[name] if name else None, "from": name, "region": region}


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """One S3 filesystem per endpoint and region, shared by every ObjectStore of the process
    (the AWS SDK's client and connection pool are thread-safe and costly to build)."""
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {"region": region or "us-east-1"}
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme or "https"
    # allow_delayed_open: a small object is one PutObject instead of create + part + complete
    # multipart requests (an inference-log segment every commit interval). Buckets are
    # infrastructure: never created or deleted here, so a typo fails loudly.
    return pafs.S3FileSystem(allow_delayed_open=True, **kwargs)


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    import pyarrow.fs as pafs

    return str(pafs.resolve_s3_region(bucket))


def _local_base(uri: str) -> str:
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and base path for a URI or local path."""
    import pyarrow.fs as pafs

    if is_local(uri):
        return pafs.LocalFileSystem(), _local_base(uri)
    parts = urlsplit(uri)
    if parts.scheme == "s3" and not parts.query:
        cfg = s3_settings()
        # Plain AWS with no region set: the bucket's own region (one request, then cached).
        region = cfg["region"] or (None if cfg["endpoint"] else _bucket_region(parts.netloc))
        return (_s3_filesystem(cfg["endpoint"], region),
                f"{parts.netloc}{parts.path}".rstrip("/"))
    fs, base = pafs.FileSystem.from_uri(uri)
    return fs, base.rstrip("/") or base


class ObjectStore:
    """Bytes and Parquet files under one base URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.local = is_local(uri)
        self._fs: pafs.FileSystem | None = None
        if self.local:  # pyarrow's filesystem only when a local store needs more than bytes
            self.base = _local_base(uri)
        else:
            self._fs, self.base = filesystem(uri)
        self._scheme = "" if self.local else urlsplit(uri).scheme
        # Object stores have no folders: a key is created by its PUT (no marker objects, no
        # existence checks up the prefix). Other filesystems (HDFS...) need their parents.
        self._folders = self.local or self.fs.type_name not in ("s3", "gcs")

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            import pyarrow.fs as pafs

            self._fs = pafs.LocalFileSystem()
        return self._fs

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (for ``self.fs``; no scheme on object stores)."""
        return f"{self.base.rstrip('/')}/{rel}" if rel else self.base

    def relative(self, path: str) -> str:
        """The inverse of :meth:`path`: ``rel`` of a full filesystem path under the base."""
        return path.removeprefix(self.base.rstrip("/") + "/")

    def uri_for(self, rel: str) -> str:
        """What to show or record for ``rel``: a local path, or ``s3://bucket/key``."""
        return self.path(rel) if self.local else f"{self._scheme}://{self.path(rel)}"

    def exists(self, rel: str) -> bool:
        # a local read command (``mloop models lineage``) need not import pyarrow (0.3 s)
        if self.local:
            return os.path.exists(self.path(rel))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            return Path(self.path(rel)).read_bytes()
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def _tmp(self, rel: str) -> str:
        head, _, tail = self.path(rel).rpartition("/")
        return f"{head}/.tmp-{uuid.uuid4().hex}-{tail}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self._folders:
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
        import pyarrow.parquet as pq

        target = self.path(rel)
        if self._folders:
            self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if not self.local:
            pq.write_table(table, target, filesystem=self.fs, compression="zstd")
            return
        tmp = self._tmp(rel)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, target)

    def read_parquet(self, rel: str) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self.path(rel), filesystem=self.fs)

    def move(self, src: str, dst: str) -> None:
        """Move one file within the store (FileNotFoundError if ``src`` is gone, e.g. another
        process moved it first). Locally a rename: atomic, so the file is in exactly one place
        at any instant; on object stores a server-side copy then a delete."""
        target = self.path(dst)
        if self._folders:
            self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if self.local:
            os.replace(self.path(src), target)
            return
        self.fs.move(self.path(src), target)

    def delete(self, rel: str) -> None:
        """Remove one file (missing is fine)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(sel))

    def size(self, rel: str) -> int:
        return int(self.fs.get_file_info(self.path(rel)).size or 0)
