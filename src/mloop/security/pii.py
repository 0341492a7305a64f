"""Personal data in the inference log: what ``security.pii`` keeps of each named input.

The policy is applied to a request's columns just before they are handed to the inference
log (``mloop.serving.scoring.log_rows``), so nothing downstream of that point (log
segments, quarantine files, purges, monitor reports) ever holds the raw value; the model
itself has already scored the raw value. Per column:

- ``drop``: the column is left out of the logged row entirely;
- ``hash``: each value becomes ``HMAC-SHA256(key, column NUL value)`` (hex, first 128 bits).
  Equal values stay equal, so monitoring still counts categories (the reference profile's
  categories are hashed the same way, :meth:`PiiPolicy.reference`), and an erasure by the
  raw value finds its rows; without the key nobody can test a guess against the log. The
  column name is part of the message, so one value hashed in two columns is not linkable.
- ``mask``: each value becomes ``***``. Nothing of the value is kept (not its length nor
  its last characters: the tail of an e-mail address or a phone number still identifies).

Missing values (null) stay null under ``hash`` and ``mask``: missingness is not personal,
and monitoring's missing-rate check stays true.

The key: ``MLOOP_PII_KEY`` (at least 16 characters) when set, which every process of a
scaled-out deployment must share, else ``.mloop/keys/pii.key`` under the project root,
created on first use (32 random bytes, mode 0600). :func:`load_pii_key` is the one place
that knows this. Losing the key makes new hashes differ from old ones (category counts
restart, erasure by value no longer finds old rows); it never exposes a value.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mloop.config import ProjectConfig
from mloop.errors import ConfigError, MloopError
from mloop.security.keys import env_key, read_key_file, write_key_file

PII_KEY_ENV = "MLOOP_PII_KEY"
KEY_FILE = Path(".mloop") / "keys" / "pii.key"
MASK = "***"
MIN_ENV_KEY = 16
RECENT_DIGESTS = 4096  # per column, kept in memory only


def load_pii_key(root: Path, *, create: bool = True) -> bytes:
    """The HMAC key: ``MLOOP_PII_KEY`` if set, else the project's key file (created 0600 on
    first use, by exactly one of the processes racing to create it; only by the server, the
    first to need it: ``create`` False elsewhere, since a new key finds no digest already
    logged). MloopError names the variable or the file when neither can give a key."""
    env = env_key(PII_KEY_ENV, MIN_ENV_KEY, lambda n: MloopError(
        f"{PII_KEY_ENV} is set but holds {n} characters; a key needs at least {MIN_ENV_KEY} "
        f"(e.g. `python -c \"import secrets; print(secrets.token_hex(32))\"`)"))
    if env is not None:
        return env
    path = root / KEY_FILE
    if not path.exists():
        if not create:
            raise MloopError(f"no PII key here: {PII_KEY_ENV} is not set and {path} does not "
                             f"exist; use the key the servers use (set {PII_KEY_ENV}, or "
                             f"copy their key file)")
        write_key_file(path, secrets.token_hex(32), exist_ok=True, private_dir=True)
    return read_key_file(
        path, MIN_ENV_KEY, decode=lambda raw: bytes.fromhex(raw.decode()),
        unreadable=lambda exc: MloopError(f"{path}: not a readable PII key ({exc}); restore "
                                          f"it, or set {PII_KEY_ENV}"),
        too_short=lambda n: MloopError(f"{path}: the PII key is {n} bytes; expected 32"))


def keyed_digest(key: bytes, column: str, value: str) -> str:
    """The hex HMAC of ``value`` in ``column`` (128 bits: collisions between real values are
    out of reach, and the log's columns stay short)."""
    return hmac.digest(key, column.encode() + b"\0" + value.encode(), "sha256")[:16].hex()


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _text(value: Any) -> str:
    """The text a value is hashed as: the profile's category keys are ``str(value)`` too."""
    return value if isinstance(value, str) else str(value)


class PiiPolicy:
    """``security.pii`` of one project, with its key (None when no column is hashed, or
    when a reader that may do without it found none: see :meth:`of`)."""

    def __init__(self, actions: Mapping[str, str], key: bytes | None) -> None:
        self.actions = dict(actions)
        self.key = key
        # recent digests per column: a categorical input repeats its few values, and one
        # HMAC (a few µs) per logged row would be the largest cost the policy adds to a request
        self._recent: dict[str, dict[str, str]] = {}

    @classmethod
    def of(cls, config: ProjectConfig, root: Path, *, create_key: bool = True,
           key_required: bool = True) -> PiiPolicy | None:
        """The project's policy; None when ``security.pii`` is empty (nothing to do).
        ``create_key``: see :func:`load_pii_key`. Without ``key_required``, a missing key
        gives a policy without one (its hashed columns cannot be digested: monitoring then
        leaves them out, saying why)."""
        actions = config.security.pii
        if not actions:
            return None
        if not any(a == "hash" for a in actions.values()):
            return cls(actions, None)
        try:
            return cls(actions, load_pii_key(root, create=create_key))
        except MloopError:
            if key_required:
                raise
            return cls(actions, None)

    def digest(self, column: str, value: Any) -> str:
        """What a ``hash`` column logs for ``value`` (also how an erasure finds it)."""
        if self.key is None:
            raise MloopError(f"column '{column}' is not hashed by security.pii")
        text = _text(value)
        recent = self._recent.setdefault(column, {})
        out = recent.get(text)
        if out is None:
            if len(recent) >= RECENT_DIGESTS:
                recent.clear()
            out = recent[text] = keyed_digest(self.key, column, text)
        return out

    def apply(self, cols: Mapping[str, list]) -> dict[str, list]:
        """A new column dict as the log may keep it; ``cols`` is left unchanged (the model
        and the response use it)."""
        out: dict[str, list] = {}
        for name, values in cols.items():
            action = self.actions.get(name)
            if action is None:
                out[name] = values
            elif action == "hash":
                out[name] = [None if v is None else self.digest(name, v) for v in values]
            elif action == "mask":
                out[name] = [None if v is None else MASK for v in values]
            # drop: left out
        return out

    def scrub_example(self, example: Any, seen: Any) -> Any:
        """The model's logged input example (a pandas frame of training rows) with each
        policy column replaced: a ``hash`` column by its digests, a ``mask`` or ``drop`` text
        column by ``***``, a numeric one by the training median (``seen``: every training
        row), so MLflow's ``input_example.json`` holds no raw value of a personal column. The
        model keeps every column (it needs them); nulls stay null."""
        out = example.copy()
        for column, action in self.actions.items():
            if column not in out.columns:
                continue
            values = out[column]
            if values.dtype.kind in "biuf":
                out[column] = values.where(values.isna(), float(seen[column].median()))
            elif action == "hash" and self.key is not None:
                out[column] = values.map(lambda v, c=column: v if _missing(v)
                                         else self.digest(c, v))
            else:
                out[column] = values.map(lambda v: v if _missing(v) else MASK)
        return out

    def check_inputs(self, inputs: Iterable[str], *, version: int, config: ProjectConfig
                     ) -> None:
        """ConfigError (file:line of ``security.pii.<column>``) when the policy names a column
        the version's signature does not have: a typo would otherwise log the real column
        unprotected."""
        names = list(inputs)
        for column in self.actions:
            if column not in names:
                raise config.locate(ConfigError(
                    f"'security.pii.{column}': v{version} has no input '{column}' (its "
                    f"inputs: {', '.join(names)})", key=f"security.pii.{column}"))

    def reference(self, profile: dict[str, Any], features: list[str]
                  ) -> tuple[dict[str, Any], list[str], dict[str, str]]:
        """The training profile as the log sees these columns: (profile, features,
        skipped columns with why). A hashed categorical column's categories are hashed with
        the same key (counts unchanged), so drift and unseen-category checks still work;
        dropped and masked columns, and hashed numeric ones, are not monitored (the log
        holds nothing comparable), and the reason is recorded in the report."""
        columns = dict(profile.get("columns", {}))
        kept: list[str] = []
        skipped: dict[str, str] = {}
        for name in features:
            action = self.actions.get(name)
            stats = columns.get(name, {})
            if action is None:
                kept.append(name)
            elif action == "hash" and self.key is None:
                skipped[name] = (f"security.pii: hash, and no PII key in this process "
                                 f"({PII_KEY_ENV} or {KEY_FILE}): its digests cannot be "
                                 f"compared")
            elif action == "hash" and stats.get("kind") == "categorical":
                top = stats.get("top") or {}
                columns[name] = {**stats, "top": {self.digest(name, v): n
                                                  for v, n in top.items()}}
                kept.append(name)
            elif action == "hash":
                skipped[name] = ("security.pii: hash on a numeric column; the log holds "
                                 "digests, which have no distribution to compare")
            else:
                skipped[name] = f"security.pii: {action}; the log holds no value to compare"
        return {**profile, "columns": columns}, kept, skipped
