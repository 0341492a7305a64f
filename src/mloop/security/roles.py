"""The one table of roles and what each may do: the server, the dashboard and the CLI all ask
:func:`role_allows`, so a role means the same thing everywhere.

Roles are ordered, each allowed what the ones before it are:

- ``viewer``   reads the dashboard;
- ``predict``  also scores (``/predict``, ``/invocations``, ``mloop predict``);
- ``operator`` also trains, gates, promotes, rolls back, deploys (starts and stops
  challengers), runs the loop, sends labels, reloads a server;
- ``admin``    also manages tokens, keys and mloop's store.
"""

from __future__ import annotations

from mloop.errors import MloopError

ROLES = ("viewer", "predict", "operator", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}

# action -> the least role that may take it
ACTIONS: dict[str, str] = {
    "read": "viewer",
    "predict": "predict",
    "train": "operator",      # mloop run, tune, step run, runs create/gate, models gate/reproduce
    "promote": "operator",    # models promote, the dashboard's promote
    "rollback": "operator",
    "deploy": "operator",     # deploy canary/shadow/stop-challenger, server /reload and /flush
    "loop": "operator",       # mloop loop, mloop monitor (records windows and alerts)
    "feedback": "operator",   # labels ingest, server /feedback
    "data": "operator",       # data snapshot, purge, restore
    "tokens": "admin",
    "keys": "admin",
    "store": "admin",         # mloop db upgrade
}


def check_role(role: str) -> str:
    """``role`` if it is one, else an error listing the roles."""
    if role not in RANK:
        raise MloopError(f"unknown role '{role}' (expected one of {', '.join(ROLES)})")
    return role


def required_role(action: str) -> str:
    """The least role that may take ``action``."""
    try:
        return ACTIONS[action]
    except KeyError:
        raise MloopError(f"unknown action '{action}' (expected one of "
                         f"{', '.join(sorted(ACTIONS))})") from None


def role_allows(role: str | None, action: str) -> bool:
    """May a token of ``role`` (None: no token) take ``action``? An unknown role (a row
    written by a newer mloop) may do nothing."""
    needed = required_role(action)
    return role is not None and RANK.get(role, -1) >= RANK[needed]
