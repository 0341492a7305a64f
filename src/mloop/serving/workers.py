"""``mloop serve --workers N``: N uvicorn processes on one port, each listening on a socket of
its own (``SO_REUSEPORT``), so the kernel spreads new connections evenly over them.

Why not uvicorn's own ``workers=N``: its supervisor binds ONE socket in the parent and every
worker accepts from it. When a burst of connections arrives (a client's connection pool, a load
balancer, wrk's 32), the worker whose event loop wakes first drains the whole accept queue:
measured on 2 cores, 32 keep-alive connections split 32/0, 28/4 and 25/7 over two workers, so
two workers served barely more than one (libuv's ``UV_TCP_SINGLE_ACCEPT`` did not even it out:
32/0, 31/1, 20/12). With a listening socket per worker the kernel hashes each connection's
address onto one of the sockets.

This module only starts and watches processes; it knows nothing of models or metrics. The
caller passes ``on_exit(pid)`` to clean up after a worker that ended (its live metric gauges,
its reload acknowledgement). A worker that dies while serving is replaced; one that fails to
start (bad app, port taken) stops the server with an error, as uvicorn's supervisor does.
Where ``SO_REUSEPORT`` does not balance (it is Linux that hashes connections over the group),
:func:`run_workers` falls back to uvicorn's supervisor.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from mloop.errors import MloopError

log = logging.getLogger("mloop.serving")

STARTUP_FAILURE = 3  # uvicorn's exit code for a worker whose app or socket failed at start
_WATCH_SECONDS = 0.5
_STOP_GRACE_SECONDS = 5.0  # beyond uvicorn's own graceful shutdown timeout


def balances_connections() -> bool:
    """Whether listening sockets sharing a port through ``SO_REUSEPORT`` get an even share of
    new connections (Linux >= 3.9); elsewhere the option only lets them bind."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_port(host: str, port: int) -> None:
    """Fail with one clear error if ``host:port`` cannot be bound, before any worker starts.

    The probe does not set ``SO_REUSEPORT``, so it also fails when another server (an earlier
    ``mloop serve --workers N`` among them) already listens there with it: the workers would
    otherwise join that server's group silently and take half of its traffic."""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as exc:
        raise MloopError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another "
                         f"server on that port? pick one with --port)") from None
    finally:
        probe.close()


def _listening_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock  # uvicorn (asyncio's create_server) calls listen()


def _worker_main(config: Any) -> None:
    """One worker (a spawned process): its own socket, then uvicorn's server on it."""
    import uvicorn

    config.configure_logging()
    try:
        sock = _listening_socket(config.host, config.port)
    except OSError as exc:
        log.error("worker cannot listen on %s:%s: %s", config.host, config.port, exc)
        sys.exit(STARTUP_FAILURE)
    uvicorn.Server(config).run(sockets=[sock])


class _Supervisor:
    """Starts N workers, replaces any that dies, stops them all on SIGINT/SIGTERM."""

    def __init__(self, config: Any, workers: int, on_exit: Callable[[int], None]) -> None:
        self.config, self.n, self.on_exit = config, workers, on_exit
        self.ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as uvicorn's
        self.procs: list[Any] = []
        self.stop = threading.Event()
        self.failed: str | None = None

    def _start_one(self) -> Any:
        proc = self.ctx.Process(target=_worker_main, args=(self.config,), daemon=False)
        proc.start()
        return proc

    def run(self) -> None:
        previous = {sig: signal.signal(sig, lambda *_: self.stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.procs = [self._start_one() for _ in range(self.n)]
            while not self.stop.wait(_WATCH_SECONDS):
                self._replace_dead()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.failed:
            raise MloopError(self.failed)

    def _replace_dead(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                continue
            proc.join()
            self.on_exit(proc.pid)
            if proc.exitcode == STARTUP_FAILURE:
                # the app, TLS or socket is broken: every replacement would fail the same way
                self.failed = (f"worker {proc.pid} failed to start (exit code "
                               f"{STARTUP_FAILURE}; its error is above); server stopped")
                self.stop.set()
                return
            log.warning("worker %s ended (exit code %s); starting another", proc.pid,
                        proc.exitcode)
            self.procs[i] = self._start_one()

    def _stop_all(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or 0) \
            + _STOP_GRACE_SECONDS
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.error("worker %s did not stop in time: killed", proc.pid)
                proc.kill()
                proc.join()
            self.on_exit(proc.pid)


def run_workers(app: str, workers: int, *, on_exit: Callable[[int], None] = lambda pid: None,
                **uvicorn_options: Any) -> None:
    """Serve the uvicorn factory ``app`` ("module:function", imported by each worker) from
    ``workers`` processes until SIGINT/SIGTERM; ``uvicorn_options`` go to ``uvicorn.Config``
    (host and port among them). Raises :class:`MloopError` if the port is taken or a worker
    fails to start."""
    import uvicorn

    host, port = uvicorn_options["host"], uvicorn_options["port"]
    check_port(host, port)
    if not balances_connections():
        uvicorn.run(app, factory=True, workers=workers, **uvicorn_options)
        return
    config = uvicorn.Config(app, factory=True, workers=1, **uvicorn_options)
    _Supervisor(config, workers, on_exit).run()
