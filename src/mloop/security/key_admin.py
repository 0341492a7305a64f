"""What ``mloop keys`` does: create a master key, report which key each sealed file is under,
and rotate (re-wrap every file's data key under the current master key).

Rotation, step by step: create the new key (``mloop keys init``), make it the
``security.encryption`` key in mloop.yaml and move the old one under ``previous`` (readers
accept both from then on), run ``mloop keys rotate``, and drop the old key from ``previous``
once ``mloop keys status`` counts no file under it. Rotation reads each file under an old key
and writes it back atomically with a new header: the data is neither decrypted nor
re-encrypted (its ciphertext is copied as is). Sealed files are otherwise immutable, with one
exception: a purge rewriting a segment while a rotation runs could be undone by the
rotation's copy, so do not run the two at once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mloop.errors import EncryptionKeyError, MloopError
from mloop.security.encryption import EnvelopeCodec, header_bytes_needed, read_header
from mloop.security.keys import (
    KmsMasterKey,
    create_key_file,
    key_file_path,
    local_kid,
    new_secret,
)
from mloop.storage import Codec, ObjectStore, is_sealed

if TYPE_CHECKING:
    from mloop.store.db import Store

SOURCES = ("file", "env", "aws-kms")


def sealed_files(store: ObjectStore) -> list[str]:
    """Full paths of every file under the store (temporary names of writes skipped)."""
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(store.path(""), recursive=True, allow_not_found=True)
    return sorted(i.path for i in store.fs.get_file_info(sel)
                  if i.type == pafs.FileType.File and not i.base_name.startswith(".tmp-"))


def _head(store: ObjectStore, path: str) -> bytes:
    """The leading bytes of a file that hold its encryption header (one or two small reads,
    never the whole file)."""
    with store.fs.open_input_file(path) as f:
        head = bytes(f.read(11))
        need = header_bytes_needed(head)
        if need is not None and need > len(head):
            head += bytes(f.read(need - len(head)))
    return head


@dataclass
class StoreKeys:
    """Which key each file of one store is sealed under."""

    uri: str
    files: int = 0
    plain: int = 0
    by_kid: Counter[str] = field(default_factory=Counter)

    def to_dict(self, current: str | None) -> dict[str, Any]:
        return {"uri": self.uri, "files": self.files, "plain": self.plain,
                "sealed_current": self.by_kid.get(current or "", 0),
                "sealed_other": sum(n for k, n in self.by_kid.items() if k != current),
                "by_kid": dict(sorted(self.by_kid.items()))}


def scan_store(store: ObjectStore) -> StoreKeys:
    out = StoreKeys(store.uri)
    for path in sealed_files(store):
        head = _head(store, path)
        out.files += 1
        if is_sealed(head):
            out.by_kid[read_header(head, store.relative(path)).kid] += 1
        else:
            out.plain += 1
    return out


def _envelope(codec: Codec | None) -> EnvelopeCodec | None:
    return codec if isinstance(codec, EnvelopeCodec) else None


def key_status(stores: dict[str, ObjectStore], codec: Codec | None) -> dict[str, Any]:
    """``mloop keys status``: the configured key (and whether it loads), and per store how
    many files are plain, sealed under the current key, or under another one."""
    codec = _envelope(codec)
    current: str | None = None
    error: str | None = None
    sources: list[str] = []
    if codec is not None:
        sources = codec.keyring.sources()
        try:
            current = codec.keyring.current.kid
        except EncryptionKeyError as exc:
            error = str(exc)
    scans = {name: scan_store(s) for name, s in stores.items()}
    return {"enabled": codec is not None, "kid": current, "sources": sources,
            "key_error": error,
            "stores": {name: scan.to_dict(current) for name, scan in scans.items()},
            "sealed_other": sum(s.to_dict(current)["sealed_other"] for s in scans.values()),
            "plain": sum(s.plain for s in scans.values())}


def rotate_keys(stores: dict[str, ObjectStore], codec: Codec | None, *,
                audit: Store, actor: str | None = None) -> dict[str, Any]:
    """Re-wrap the data key of every file sealed under another key than the current one;
    record a ``keys.rotated`` event with the counts. Files under a key the keyring does not
    know stop the rotation with an EncryptionKeyError before any is rewritten (the whole set
    is checked first)."""
    from mloop.security.audit import append_event

    codec = _envelope(codec)
    if codec is None:
        raise MloopError("`mloop keys rotate`: this project has no security.encryption key "
                         "in mloop.yaml; nothing is sealed")
    current = codec.keyring.current
    todo: list[tuple[str, ObjectStore, str, str]] = []
    for name, store in stores.items():
        for path in sealed_files(store):
            head = _head(store, path)
            if not is_sealed(head):
                continue
            kid = read_header(head, store.relative(path)).kid
            if kid != current.kid:
                codec.keyring.for_kid(kid, store.uri_for(store.relative(path)))
                todo.append((name, store, path, kid))
    moved: Counter[str] = Counter()
    per_store: Counter[str] = Counter()
    for name, store, path, kid in todo:
        rel = store.relative(path)
        new = codec.rewrap(store.read_raw_at(path), where=store.uri_for(rel))
        if new is not None:
            store.write_raw(rel, new)
            moved[kid] += 1
            per_store[name] += 1
    result = {"kid": current.kid, "source": current.source, "rewrapped": sum(moved.values()),
              "from_kids": dict(sorted(moved.items())), "stores": dict(sorted(per_store.items()))}
    append_event(audit, "keys.rotated", result, actor=actor)
    return result


def init_key(source: str, *, root: Path, audit: Store | None, key_file: str | None = None,
             env: str | None = None, kms_key_id: str | None = None,
             actor: str | None = None) -> dict[str, Any]:
    """``mloop keys init``: a new master key in the given source, and the mloop.yaml lines
    that use it. ``file``: a new key file, created 0600, never overwriting one. ``env``: a
    new key printed once for the caller to put in the variable. ``aws-kms``: checks the KMS
    key answers GenerateDataKey and Decrypt (the key itself stays in KMS). Recorded as a
    ``keys.init`` event naming the source and key id, never the key."""
    from mloop.security.audit import append_event

    if source not in SOURCES:
        raise MloopError(f"--source must be one of {', '.join(SOURCES)}, got '{source}'")
    secret: str | None = None
    if source == "file":
        rel = key_file or ".mloop/keys/master.key"
        path = key_file_path(rel, root)
        kid = create_key_file(path)
        config: dict[str, Any] = {"key_file": rel}
        where = f"key file {path}"
    elif source == "env":
        import base64

        var = env or "MLOOP_MASTER_KEY"
        secret = new_secret()
        kid = local_kid(base64.b64decode(secret))
        config = {"env": var}
        where = f"environment variable {var}"
    else:
        if not kms_key_id:
            raise MloopError("--source aws-kms needs --kms-key-id (a KMS key id, ARN or alias)")
        kms = KmsMasterKey(kms_key_id)
        plain, wrapped = kms.new_data_key()
        if kms.unwrap(wrapped, where="checking the key") != plain:
            raise EncryptionKeyError(f"{kms.source}: a data key did not round-trip",
                                     source=kms.source)
        kid, config, where = kms.kid, {"aws_kms": kms_key_id}, kms.source
    out = {"source": source, "kid": kid, "where": where,
           "config": {"security": {"encryption": config}}}
    if audit is not None:
        append_event(audit, "keys.init", {"source": source, "kid": kid, "where": where},
                     actor=actor)
    if secret is not None:
        out["secret"] = secret
    return out
