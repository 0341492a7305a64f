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

Encryption at rest is one seam here: an ObjectStore given a :class:`Codec` (the project builds
one from ``security.encryption``; this module does not know how it works) seals every file it
writes and opens every file it reads, Parquet and bytes alike, so each reader of the inference
log, labels, snapshots and step outputs decrypts without knowing it. A store without a codec
that meets a sealed file says so instead of calling it damaged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from mloop.errors import EncryptionKeyError

if TYPE_CHECKING:  # imported where used: resolving a URI must not cost pyarrow's import
    import pyarrow as pa
    import pyarrow.fs as pafs

# Most specific first, as boto3 does (a service-specific endpoint beats the global one).
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")

# The first bytes of every file sealed at rest (mloop.security.encryption writes them): a
# store tells a sealed file from a plain one (Parquet starts with b"PAR1", JSON with "{")
SEALED_MAGIC = b"MLOOPENC"


class Codec(Protocol):
    """Seals bytes for storage and opens them again (encryption at rest). ``where`` names the
    file in error messages. ``open`` returns plain bytes (not sealed) unchanged, so data
    written before encryption was turned on stays readable."""

    def seal(self, data: bytes, *, where: str) -> bytes: ...

    def open(self, data: bytes, *, where: str) -> bytes: ...

    def check(self) -> None:
        """Raise now (EncryptionKeyError naming the key source) if sealing would fail: a
        server checks at start-up instead of failing at its first commit."""


def is_sealed(data: bytes) -> bool:
    return data[:len(SEALED_MAGIC)] == SEALED_MAGIC


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


def as_store(where: str | ObjectStore) -> ObjectStore:
    """``where`` itself if it is a store (the project's, with its codec), else a plain store
    over the URI."""
    return where if isinstance(where, ObjectStore) else ObjectStore(where)


class ObjectStore:
    """Bytes and Parquet files under one base URI, sealed at rest when given a ``codec``."""

    def __init__(self, uri: str, *, codec: Codec | None = None) -> None:
        self.uri = uri
        self.codec = codec
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

    def read_raw_at(self, path: str) -> bytes:
        """The bytes stored at the full path ``path``, as stored (sealed or not)."""
        if self.local:
            return Path(path).read_bytes()
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    def decode(self, raw: bytes, where: str) -> bytes:
        """Stored bytes -> plain bytes: opened by the codec; without one, a sealed file is an
        EncryptionKeyError (not a damaged file: the key is what is missing)."""
        if self.codec is not None:
            return self.codec.open(raw, where=where)
        if is_sealed(raw):
            raise EncryptionKeyError(
                f"{where} is encrypted at rest, but this project has no security.encryption "
                f"key configured: add the key source it was sealed under to mloop.yaml")
        return raw

    def read_bytes(self, rel: str) -> bytes:
        return self.decode(self.read_raw_at(self.path(rel)), self.uri_for(rel))

    def _tmp(self, rel: str) -> str:
        head, _, tail = self.path(rel).rpartition("/")
        return f"{head}/.tmp-{uuid.uuid4().hex}-{tail}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` atomically (sealed if the store has a codec)."""
        if self.codec is not None:
            data = self.codec.seal(data, where=self.uri_for(rel))
        self.write_raw(rel, data)

    def write_raw(self, rel: str, data: bytes) -> None:
        """Write ``data`` atomically as it is (key rotation rewrites a sealed file's header)."""
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
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.codec is not None:  # the whole file in memory, sealed as one piece
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            self.write_bytes(rel, sink.getvalue().to_pybytes())
            return
        target = self.path(rel)
        if self._folders:
            self.fs.create_dir(target.rpartition("/")[0], recursive=True)
        if not self.local:
            pq.write_table(table, target, filesystem=self.fs, compression="zstd")
            return
        tmp = self._tmp(rel)
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, target)

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return self.read_parquet_at(self.path(rel), columns=columns)

    def read_parquet_at(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """The Parquet file at the full path ``path`` (from a listing), opened if sealed.
        Without a codec pyarrow reads the file itself (only the columns asked for)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.codec is None:
            try:
                return pq.read_table(path, filesystem=self.fs, columns=columns)
            except (pa.ArrowInvalid, OSError):
                self._refuse_sealed(path)
                raise
        raw = self.decode(self.read_raw_at(path), self._shown(path))
        return pq.read_table(pa.BufferReader(raw), columns=columns)

    def read_parquet_schema(self, rel: str) -> pa.Schema:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.path(rel)
        if self.codec is None:
            try:
                return pq.read_schema(path, filesystem=self.fs)
            except (pa.ArrowInvalid, OSError):
                self._refuse_sealed(path)
                raise
        raw = self.decode(self.read_raw_at(path), self._shown(path))
        return pq.read_schema(pa.BufferReader(raw))

    def _shown(self, path: str) -> str:
        return path if self.local else f"{self._scheme}://{path}"

    def _refuse_sealed(self, path: str) -> None:
        """After a failed plain read: an EncryptionKeyError if the file is sealed (the first
        bytes only), so a reader never takes a sealed file for a damaged one."""
        try:
            with self.fs.open_input_file(path) as f:
                head = f.read(len(SEALED_MAGIC))
        except OSError:
            return
        self.decode(bytes(head), self._shown(path))

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
