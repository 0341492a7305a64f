"""Bearer-token checks for the server; the token hashes are re-read from mloop's store at
most every ``refresh_seconds``, so a new or revoked token takes effect without a restart."""

from __future__ import annotations

import hmac
import logging
import threading
import time

from mloop.security.roles import required_role, role_allows
from mloop.security.tokens import active_hashes, token_hash
from mloop.serving.edge import HTTPError
from mloop.store.db import Store

log = logging.getLogger("mloop.serving")


class TokenAuth:
    def __init__(self, store: Store, refresh_seconds: float = 5.0) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self._hashes: dict[str, str] = {}
        self._loaded = 0.0
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the hashes; if the store is unreachable keep the last good set (and try
        again after ``refresh_seconds``) rather than failing every request."""
        try:
            hashes = active_hashes(self.store)
        except Exception as exc:
            if not self._loaded:
                raise  # at start-up: no tokens known yet, refuse to start
            log.warning("could not refresh API tokens (keeping the last set): %s", exc)
            with self._lock:
                self._loaded = time.monotonic()
            return
        with self._lock:
            self._hashes, self._loaded = hashes, time.monotonic()

    def role_of(self, token: str) -> str | None:
        if time.monotonic() - self._loaded > self.refresh_seconds:
            self.refresh()
        digest = token_hash(token)
        with self._lock:
            for h, role in self._hashes.items():
                if hmac.compare_digest(h, digest):
                    return role
        return None

    def check(self, header: str | None, action: str) -> None:
        """Raise 401 (no or unknown token) or 403 (the token's role may not take ``action``:
        the roles table of :mod:`mloop.security.roles`, the one the dashboard and CLI use)."""
        challenge = {"WWW-Authenticate": 'Bearer realm="mloop"'}
        if not header or not header.lower().startswith("bearer "):
            raise HTTPError(401, {"error": "missing bearer token (Authorization: Bearer ...)"},
                            challenge)
        have = self.role_of(header[7:].strip())
        if have is None:
            raise HTTPError(401, {"error": "unknown or revoked token"}, challenge)
        if not role_allows(have, action):
            raise HTTPError(403, {"error": f"this token's role '{have}' may not {action} "
                                           f"(needs '{required_role(action)}')"})
