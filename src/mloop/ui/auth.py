"""Who is looking and who may act: login with an mloop token, the session, CSRF.

The session is Starlette's signed cookie (itsdangerous; HttpOnly, SameSite=Strict, Secure
when the UI is served over TLS). It holds the token's id, name and role, never the token.
Every POST carries the session's CSRF token in a form field; a POST without it, or with
another, is refused before anything else happens.

Roles (the one table of :mod:`mloop.security.roles`, as the server and CLI): ``viewer`` and
``predict`` tokens read; ``operator`` and ``admin`` tokens also act. Reading needs no login
when the UI runs without auth (loopback, by default); acting always needs an operator's
login, so the audit chain names a person, not "whoever had the page open".
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from mloop.errors import MloopError
from mloop.security.roles import required_role, role_allows

ACT = "promote"  # what every dashboard action needs (promote, roll back, deploy: one role)


class Forbidden(MloopError):
    """Answered as 403 (or 401: not logged in) with ``message`` on a page."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class User:
    token_id: int | None
    name: str | None
    role: str | None  # None: not logged in
    person: str | None = None

    @property
    def can_act(self) -> bool:
        return role_allows(self.role, ACT)

    @property
    def actor(self) -> str:
        """The actor recorded in the audit chain for an action taken through the UI."""
        return f"{self.person or self.name} (token #{self.token_id}, ui)"


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(24)
    return str(token)


def check_csrf(request: Request, form: dict[str, str]) -> None:
    expected = request.session.get("csrf")
    given = form.get("csrf", "")
    if not expected or not given or not hmac.compare_digest(str(expected), given):
        raise Forbidden("the form's CSRF token is missing or does not match this session; "
                        "reload the page and submit again")


def current_user(request: Request) -> User:
    """The logged-in user, re-checked against the store: a revoked token logs out."""
    from mloop.security.tokens import active_token

    token_id = request.session.get("token_id")
    if token_id is None:
        return User(None, None, None)
    ident = active_token(request.app.state.project.store, int(token_id))
    if ident is None:
        for key in ("token_id", "name", "role"):
            request.session.pop(key, None)
        return User(None, None, None)
    return User(ident.id, ident.name, ident.role, ident.person)


def require_reader(request: Request) -> User:
    user = current_user(request)
    if request.app.state.auth and user.role is None:
        raise Forbidden("log in with an mloop token to read this dashboard", status=401)
    return user


def require_operator(request: Request) -> User:
    user = current_user(request)
    if user.role is None:
        raise Forbidden(f"log in with an {required_role(ACT)} (or admin) token to act: "
                        f"`mloop tokens create --person YOU --role {required_role(ACT)}`",
                        status=401)
    if not user.can_act:
        raise Forbidden(f"token '{user.name}' has role '{user.role}': it may read, not act "
                        f"(acting needs role '{required_role(ACT)}' or admin)")
    return user


def log_in(request: Request, token: str) -> User:
    from mloop.security.tokens import token_identity

    ident = token_identity(request.app.state.project.store, token.strip())
    if ident is None:
        raise Forbidden("unknown or revoked token", status=401)
    request.session.update(token_id=ident.id, name=ident.name, role=ident.role,
                           csrf=secrets.token_urlsafe(24))  # a new session, a new token
    return User(ident.id, ident.name, ident.role, ident.person)


def log_out(request: Request) -> None:
    request.session.clear()


def flash(request: Request, message: str, kind: str = "ok") -> None:
    """A message shown once on the next page (after the redirect of a POST)."""
    request.session["flash"] = {"message": message, "kind": kind}


def pop_flash(request: Request) -> dict[str, Any] | None:
    return request.session.pop("flash", None)
