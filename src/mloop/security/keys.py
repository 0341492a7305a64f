"""Master keys for encryption at rest: a local key file, an environment variable, AWS KMS.

A master key never touches data. It wraps (encrypts) the data key each sealed file carries in
its header, and unwraps it on reading (mloop.security.encryption). Each key has a ``kid``, the
identifier written in those headers: for a local key a fingerprint of the key itself (a
truncated keyed hash, so a header never leaks the key and two different keys never look
alike), for KMS the key id as configured (KMS finds the key a wrapped data key belongs to
by itself).

Keys load lazily, on the first file sealed or opened: commands that touch no data (``mloop
status``) never need the key. A key that cannot be loaded is an EncryptionKeyError naming the
config key and where it looked (the file path, the variable, the KMS key id), never a
traceback from the crypto library.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mloop.config import KeySourceConfig
from mloop.errors import EncryptionKeyError
from mloop.extras import require_extra

KEY_BYTES = 32  # AES-256
_WRAP_AAD = b"mloop-data-key-v1"


class MasterKey(Protocol):
    """Wraps and unwraps data keys. ``source`` says where the key lives, for messages."""

    kid: str
    source: str

    def new_data_key(self) -> tuple[bytes, bytes]:
        """A fresh data key: (plain, wrapped under this master)."""
        ...

    def wrap(self, data_key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes, *, where: str) -> bytes: ...


def _aesgcm() -> Any:
    return require_extra("encryption", "cryptography.hazmat.primitives.ciphers.aead").AESGCM


def local_kid(secret: bytes) -> str:
    """The header id of a local master key: 16 hex digits of a hash keyed by the key itself
    (reveals nothing of it; tells keys apart)."""
    return "local:" + hashlib.sha256(b"mloop-master-key-id\0" + secret).hexdigest()[:16]


class LocalMasterKey:
    """A 256-bit key held in this process (from a key file or an environment variable); data
    keys are wrapped with AES-256-GCM under it."""

    def __init__(self, secret: bytes, *, source: str) -> None:
        if len(secret) != KEY_BYTES:
            raise EncryptionKeyError(f"{source}: a master key is {KEY_BYTES} bytes (base64: 44 "
                                     f"characters), got {len(secret)} bytes", source=source)
        self._aead = _aesgcm()(secret)
        self.kid = local_kid(secret)
        self.source = source

    def new_data_key(self) -> tuple[bytes, bytes]:
        key = os.urandom(KEY_BYTES)
        return key, self.wrap(key)

    def wrap(self, data_key: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + bytes(self._aead.encrypt(nonce, data_key, _WRAP_AAD))

    def unwrap(self, wrapped: bytes, *, where: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        try:
            return bytes(self._aead.decrypt(wrapped[:12], wrapped[12:], _WRAP_AAD))
        except InvalidTag:
            raise EncryptionKeyError(f"{where}: its data key does not open with the master key "
                                     f"from {self.source} ({self.kid})",
                                     source=self.source) from None


class KmsMasterKey:
    """An AWS KMS key: data keys come from GenerateDataKey and open with Decrypt, so the
    master key never leaves KMS. The client is boto3's, built on first use; it reads the
    region, credentials and endpoint (``AWS_ENDPOINT_URL_KMS`` / ``AWS_ENDPOINT_URL``) from
    the environment as every AWS SDK does."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self.kid = f"kms:{key_id}"
        self.source = f"AWS KMS key '{key_id}'"
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            boto3 = require_extra("aws-kms")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            self._client = boto3.client("kms", region_name=region or "us-east-1")
        return self._client

    def _call(self, what: str, where: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(getattr(self.client, what)(**kwargs))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            msg = exc.response.get("Error", {}).get("Message", "")
            raise EncryptionKeyError(f"{where}: {self.source} refused {what} ({code}: {msg})",
                                     source=self.source) from None
        except BotoCoreError as exc:
            raise EncryptionKeyError(f"{where}: {self.source} could not be reached for {what} "
                                     f"({exc})", source=self.source) from None

    def new_data_key(self) -> tuple[bytes, bytes]:
        out = self._call("generate_data_key", "sealing a file", KeyId=self.key_id,
                         KeySpec="AES_256")
        return bytes(out["Plaintext"]), bytes(out["CiphertextBlob"])

    def wrap(self, data_key: bytes) -> bytes:
        out = self._call("encrypt", "re-wrapping a data key", KeyId=self.key_id,
                         Plaintext=data_key)
        return bytes(out["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, *, where: str) -> bytes:
        out = self._call("decrypt", where, CiphertextBlob=wrapped, KeyId=self.key_id)
        return bytes(out["Plaintext"])


def describe_source(ref: KeySourceConfig, root: Path) -> str:
    """Where ``ref`` looks for its key, as messages name it."""
    if ref.key_file is not None:
        return f"key file {key_file_path(ref.key_file, root)}"
    if ref.env is not None:
        return f"environment variable {ref.env}"
    return f"AWS KMS key '{ref.aws_kms}'"


def key_file_path(key_file: str, root: Path) -> Path:
    path = Path(key_file).expanduser()
    return path if path.is_absolute() else root / path


def load_master(ref: KeySourceConfig, root: Path, *, key: str = "security.encryption"
                ) -> MasterKey:
    """The master key ``ref`` names. ``key`` is the config key shown in messages
    (``security.encryption`` or ``security.encryption.previous[0]``)."""
    if ref.aws_kms is not None:
        return KmsMasterKey(ref.aws_kms)
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if not value:
            raise EncryptionKeyError(
                f"{key}.env: environment variable {ref.env} is not set; it must hold the "
                f"base64 master key the data was sealed under (`mloop keys init --source env` "
                f"makes a new one)", source=f"environment variable {ref.env}")
        return LocalMasterKey(_b64(value, f"{key}.env: environment variable {ref.env}"),
                              source=f"environment variable {ref.env}")
    path = key_file_path(ref.key_file or "", root)
    shown = f"key file {path}"
    if not path.is_file():
        raise EncryptionKeyError(
            f"{key}.key_file: {path} does not exist; restore the key the data was sealed "
            f"under, or create a new one with `mloop keys init --source file --key-file "
            f"{ref.key_file}`", source=shown)
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise EncryptionKeyError(f"{key}.key_file: {path} is readable by others (mode "
                                 f"{mode:04o}); a master key must be private: chmod 600 {path}",
                                 source=shown)
    return LocalMasterKey(_b64(path.read_text().strip(), f"{key}.key_file: {path}"),
                          source=shown)


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionKeyError(f"{where}: not a base64 master key ({KEY_BYTES} random bytes "
                                 f"in base64, 44 characters)", source=where) from None


def new_secret() -> str:
    """A fresh master key, base64 (what a key file or the variable holds)."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def create_key_file(path: Path) -> str:
    """Write a fresh master key to ``path``, created 0600 and never overwritten (an existing
    key may be the only way to read sealed data); returns the key's kid."""
    secret = new_secret()
    try:
        write_key_file(path, secret, exist_ok=False)
    except FileExistsError:
        raise EncryptionKeyError(f"{path} already exists: a master key is never overwritten "
                                 f"(data sealed under it would be lost); choose another "
                                 f"--key-file", source=f"key file {path}") from None
    return local_kid(base64.b64decode(secret))


# The mechanics shared by every key mloop keeps (this master key, the PII key, the audit key):
# an environment variable, else a private file, created on first use. What each key accepts,
# and what its messages say, stays with its module; these functions only take the callers'
# errors, so one fix to the mechanics (a permission, a race) reaches every key.


def env_key(var: str, min_chars: int, too_short: Callable[[int], Exception]) -> bytes | None:
    """The key ``var`` holds, or None when it is unset. Set but shorter than ``min_chars``
    raises ``too_short(length)``: a short secret is a mistake, never a fallback to the file."""
    value = os.environ.get(var)
    if value is None:
        return None
    if len(value) < min_chars:
        raise too_short(len(value))
    return value.encode()


def read_key_file(path: Path, min_len: int, *,
                  unreadable: Callable[[OSError | ValueError], Exception],
                  too_short: Callable[[int], Exception],
                  decode: Callable[[bytes], bytes] = bytes) -> bytes:
    """The key in ``path`` (surrounding whitespace stripped, then ``decode``d). A file that
    cannot be read or decoded raises ``unreadable(exc)``; a key shorter than ``min_len``
    (after decoding) raises ``too_short(length)``, since a truncated key file would
    otherwise be a weak key."""
    try:
        key = decode(path.read_bytes().strip())
    except (OSError, ValueError) as exc:
        raise unreadable(exc) from exc
    if len(key) < min_len:
        raise too_short(len(key))
    return key


def write_key_file(path: Path, content: str, *, exist_ok: bool,
                   private_dir: bool = False) -> None:
    """Create ``path`` holding ``content``, mode 0600 from the start, so no other user ever
    reads it. ``exist_ok``: processes may race to create the same key; each writes a private
    temp file and links it into place, so a reader finds no file or a whole key, and the
    first link wins (the others keep the winner's). Otherwise an exclusive create: an
    existing file raises FileExistsError (a key is never replaced). ``private_dir``: the
    folder is the keys' own, made 0700 (not for a folder the user chose)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if private_dir:
        os.chmod(path.parent, 0o700)
    if not exist_ok:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content + "\n")
        return
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content + "\n")
        with contextlib.suppress(FileExistsError):  # another process was first: use its key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
