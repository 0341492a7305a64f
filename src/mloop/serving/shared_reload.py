"""POST /reload on a server of N workers reaches all N.

The request lands on one worker (the kernel picks it), but every worker holds its own loaded
models and routing. So that worker bumps a *generation* number in a folder the workers of one
server share (``mloop serve`` makes it and names it in ``MLOOP_RELOAD_DIR``), reloads itself,
and waits until every live worker has acknowledged that generation. Each worker reads the
number every 0.1 s between its regular polls (a read of a few bytes); a poll that sees a new
number first forgets failed loads (a reload retries them), and after each poll the worker
writes what it serves with the generation it read *before* reading the deployment, so an
acknowledgement never claims more than the worker saw.

Files, in the shared folder: ``generation`` (the number, replaced atomically under
``generation.lock``), and ``ack-<pid>.json`` per worker (``{"generation", "champion",
"challenger", "poll_error"}``). A worker removes its own at shutdown; the supervisor removes a
dead worker's, and acknowledgements of processes that no longer exist are ignored anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "MLOOP_RELOAD_DIR"
CHECK_SECONDS = 0.1  # how often a worker looks at the generation between polls
WAIT_SECONDS = 60.0  # how long POST /reload waits for the other workers (a load may be slow)
_GENERATION = "generation"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid now belongs to another user's process: not a worker
        return False
    return True


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SharedReload:
    """The generation and acknowledgements of one server's workers, in ``folder``."""

    def __init__(self, folder: Path | str, *, pid: int | None = None) -> None:
        self.folder = Path(folder)
        self.pid = pid if pid is not None else os.getpid()

    @classmethod
    def from_env(cls) -> SharedReload | None:
        """The shared folder ``mloop serve --workers N`` names, or None for one process."""
        folder = os.environ.get(ENV)
        return cls(folder) if folder else None

    def generation(self) -> int:
        try:
            return int((self.folder / _GENERATION).read_text() or 0)
        except FileNotFoundError:
            return 0

    def bump(self) -> int:
        """The next generation, written for every worker to see; returned."""
        import fcntl  # POSIX; only ``--workers N`` (Linux, macOS) shares a folder

        with (self.folder / f"{_GENERATION}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two reloads at once get two numbers
            new = self.generation() + 1
            _write_atomically(self.folder / _GENERATION, str(new))
        return new

    def ack(self, generation: int, served: dict[str, Any]) -> None:
        """Record that this worker serves ``served`` after reading ``generation``."""
        _write_atomically(self.folder / f"ack-{self.pid}.json",
                          json.dumps({"generation": generation, **served}))

    def forget(self, pid: int | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / f"ack-{pid or self.pid}.json").unlink()

    def acks(self) -> dict[int, dict[str, Any]]:
        """The latest acknowledgement of every live worker, by pid."""
        out: dict[int, dict[str, Any]] = {}
        for path in self.folder.glob("ack-*.json"):
            try:
                pid = int(path.stem[4:])
                body = json.loads(path.read_text())
            except (ValueError, OSError):  # replaced or removed while read: next look
                continue
            if _alive(pid):
                out[pid] = body
        return out

    async def wait_for(self, generation: int, timeout: float = WAIT_SECONDS
                       ) -> tuple[dict[int, dict[str, Any]], list[int]]:
        """Every live worker's acknowledgement once all reached ``generation`` (or the
        timeout passed), and the pids that had not."""
        deadline = time.monotonic() + timeout
        while True:
            acks = await asyncio.to_thread(self.acks)
            behind = sorted(p for p, a in acks.items() if a.get("generation", 0) < generation)
            if not behind or time.monotonic() >= deadline:
                return acks, behind
            await asyncio.sleep(CHECK_SECONDS / 2)
