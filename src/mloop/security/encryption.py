"""Encryption at rest: envelope AES-256-GCM over whole files, one data key per file.

With ``security.encryption`` set, every file mloop writes to the inference log (segments,
labels, quarantine), the snapshot store and the step outputs is sealed by an
:class:`EnvelopeCodec` that the project hands its ObjectStores (mloop.storage's one seam),
and opened again by every reader through the same stores.

Why envelope AES-GCM over the whole file, and not Parquet modular encryption (pyarrow's
``parquet.encryption`` with a KMS client): the seam is the bytes of a file, so one codec
serves Parquet segments, JSON profiles, pickled step outputs and quarantined JSON lines
alike, and every reader (pyarrow, pandas, DuckDB given the Arrow table, the UI) needs no
encryption support of its own; PME protects Parquet only and needs each reader to be
PME-aware with the same KMS client configuration. The cost is that a sealed file is read
whole into memory before parsing (no column pruning or range reads on sealed files); the
inference log's segments are small (one per commit interval) and snapshots are read whole
anyway. Measured: ``benchmarks/security/bench_encryption.py``.

A sealed file::

    b"MLOOPENC" | version (1 byte) | header length (2 bytes, big-endian) | header (JSON:
    {"kid": master key id, "dek": wrapped data key, base64}) | nonce (12) | AES-GCM(data)

Each file gets its own 256-bit data key, wrapped by the master key (a local key's AES-GCM,
or KMS GenerateDataKey/Decrypt). The data is authenticated with the magic and version as
associated data; the header is not, so :meth:`EnvelopeCodec.rewrap` can give a file a data
key wrapped under a new master without decrypting or re-encrypting the data (key rotation,
``mloop keys rotate``): the ciphertext is copied byte for byte behind the new header.

Readers accept files sealed under the current key or any ``security.encryption.previous``
key (during a rotation), and plain files (written before encryption was turned on). A file
whose key is none of these is an EncryptionKeyError naming the key sources tried; a file
whose data key opens but whose data does not verify is a SealedDataError (damaged).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mloop.config import EncryptionConfig
from mloop.errors import EncryptionKeyError, SealedDataError
from mloop.security.keys import MasterKey, _aesgcm, describe_source, load_master
from mloop.storage import SEALED_MAGIC, is_sealed

VERSION = 1
_PREFIX = SEALED_MAGIC + bytes([VERSION])
_DATA_AAD = _PREFIX
_NONCE = 12
_UNWRAPPED_MAX = 4096  # data keys kept unwrapped per process (a KMS Decrypt saved each)


@dataclass(frozen=True)
class SealedHeader:
    kid: str
    wrapped: bytes
    body_offset: int  # where the nonce starts


def read_header(raw: bytes, where: str) -> SealedHeader:
    """The header of a sealed file (SealedDataError if it is cut or malformed)."""
    if not raw.startswith(_PREFIX):
        version = raw[len(SEALED_MAGIC)] if len(raw) > len(SEALED_MAGIC) else None
        raise SealedDataError(f"{where}: sealed in format version {version}, this mloop reads "
                              f"version {VERSION}")
    try:
        (size,) = struct.unpack(">H", raw[len(_PREFIX):len(_PREFIX) + 2])
        start = len(_PREFIX) + 2
        head = json.loads(raw[start:start + size])
        return SealedHeader(str(head["kid"]), base64.b64decode(head["dek"]), start + size)
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise SealedDataError(f"{where}: the encryption header is damaged ({exc})") from None


def header_bytes_needed(raw_prefix: bytes) -> int | None:
    """How many leading bytes hold the whole header, from the first 11 (None: not sealed)."""
    if not raw_prefix.startswith(_PREFIX) or len(raw_prefix) < len(_PREFIX) + 2:
        return None
    (size,) = struct.unpack(">H", raw_prefix[len(_PREFIX):len(_PREFIX) + 2])
    return len(_PREFIX) + 2 + size


def _header(kid: str, wrapped: bytes) -> bytes:
    head = json.dumps({"kid": kid, "dek": base64.b64encode(wrapped).decode()},
                      separators=(",", ":")).encode()
    return _PREFIX + struct.pack(">H", len(head)) + head


class Keyring:
    """The current master key and the previous ones, loaded on first use (thread-safe)."""

    def __init__(self, config: EncryptionConfig, root: Path) -> None:
        self.config = config
        self.root = root
        self._lock = threading.Lock()
        self._current: MasterKey | None = None
        self._previous: list[MasterKey] | None = None

    @property
    def current(self) -> MasterKey:
        with self._lock:
            if self._current is None:
                self._current = load_master(self.config, self.root)
            return self._current

    def previous(self) -> list[MasterKey]:
        with self._lock:
            if self._previous is None:
                self._previous = [
                    load_master(ref, self.root, key=f"security.encryption.previous[{i}]")
                    for i, ref in enumerate(self.config.previous)]
            return self._previous

    def sources(self) -> list[str]:
        refs = [self.config, *self.config.previous]
        return [describe_source(r, self.root) for r in refs]

    def for_kid(self, kid: str, where: str) -> MasterKey:
        """The master key a file sealed under ``kid`` opens with; EncryptionKeyError naming
        every source tried when none is it."""
        current = self.current
        if current.kid == kid:
            return current
        if self.config.previous:
            for key in self.previous():
                if key.kid == kid:
                    return key
        raise EncryptionKeyError(
            f"{where} was sealed under master key {kid}, which is not the configured "
            f"security.encryption key ({current.kid}, from {current.source}) nor any of "
            f"security.encryption.previous; add the key it was sealed under (tried: "
            f"{'; '.join(self.sources())})", source=current.source)


class EnvelopeCodec:
    """mloop.storage.Codec: seals with a fresh data key per file, opens any file the keyring
    knows. Safe from any thread (the server's writer thread and request threads share it)."""

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()  # wrapped -> plain data key
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EncryptionConfig, root: Path) -> EnvelopeCodec:
        return cls(Keyring(config, root))

    def check(self) -> None:
        """Load the current key and round-trip a data key through it (for KMS: one
        GenerateDataKey and one Decrypt, so missing permissions show at start-up)."""
        master = self.keyring.current
        key, wrapped = master.new_data_key()
        if master.unwrap(wrapped, where="checking the key at start-up") != key:
            raise EncryptionKeyError(f"{master.source}: a data key did not round-trip",
                                     source=master.source)

    def seal(self, data: bytes, *, where: str) -> bytes:
        master = self.keyring.current
        key, wrapped = master.new_data_key()
        nonce = os.urandom(_NONCE)
        body = _aesgcm()(key).encrypt(nonce, data, _DATA_AAD)
        return b"".join((_header(master.kid, wrapped), nonce, body))

    def open(self, data: bytes, *, where: str) -> bytes:
        if not is_sealed(data):
            return data  # written before encryption was turned on
        head = read_header(data, where)
        key = self._data_key(head, where)
        from cryptography.exceptions import InvalidTag

        start = head.body_offset
        try:
            return bytes(_aesgcm()(key).decrypt(data[start:start + _NONCE],
                                                data[start + _NONCE:], _DATA_AAD))
        except InvalidTag:
            raise SealedDataError(f"{where}: damaged: its contents do not verify under its "
                                  f"data key (changed or cut after sealing)") from None

    def _data_key(self, head: SealedHeader, where: str) -> bytes:
        with self._lock:
            key = self._keys.get(head.wrapped)
            if key is not None:
                self._keys.move_to_end(head.wrapped)
                return key
        key = self.keyring.for_kid(head.kid, where).unwrap(head.wrapped, where=where)
        with self._lock:
            self._keys[head.wrapped] = key
            while len(self._keys) > _UNWRAPPED_MAX:
                self._keys.popitem(last=False)
        return key

    def kid_of(self, raw_head: bytes, where: str) -> str | None:
        """The master key id a file is sealed under (None: a plain file)."""
        return read_header(raw_head, where).kid if is_sealed(raw_head) else None

    def rewrap(self, data: bytes, *, where: str) -> bytes | None:
        """``data`` with its data key wrapped under the current master key, the ciphertext
        unchanged; None if it is plain or already under the current key."""
        if not is_sealed(data):
            return None
        head = read_header(data, where)
        current = self.keyring.current
        if head.kid == current.kid:
            return None
        key = self.keyring.for_kid(head.kid, where).unwrap(head.wrapped, where=where)
        return _header(current.kid, current.wrap(key)) + data[head.body_offset:]
