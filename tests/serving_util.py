"""Helpers for serving tests: a real uvicorn server on 127.0.0.1 in a thread, or `mloop serve`
in a process of its own; free ports, a project's server with its serving settings changed,
request rows, Prometheus samples."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import requests
import uvicorn

from .helpers import MLOOP_BIN, rentals_frame, stop_process_group

# serving.poll_seconds for tests: an alias change reaches a running server in 0.2 s, not 5 s
FAST = {"poll_seconds": 0.2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Client:
    """Requests to a server at ``self.url``."""

    url: str

    def post(self, path: str, body: Any = None, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30, **kw)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while not predicate():
            if time.time() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.05)


class ServerThread(_Client):
    """``create_app(...)`` served by a real uvicorn on a free loopback port."""

    def __init__(self, app: Any, **ssl: Any) -> None:
        self.port = free_port()
        self.app = app
        scheme = "https" if ssl else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", access_log=False,
                                                    **ssl))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    @property
    def state(self) -> Any:
        return self.app.state.mloop


class ServeProcess(_Client):
    """``mloop -C root serve`` on a free loopback port, in a process group of its own (the
    project's serving settings, as a deployment runs it), its output in ``log``; ready when
    /ready answers, stopped by SIGTERM (SIGKILL after 30 s) on exit."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeProcess:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [MLOOP_BIN, "-C", str(self.root), "serve", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={k: v for k, v in os.environ.items() if k != "MLOOP_PROJECT"})
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mloop serve exited {self.proc.returncode} at start:\n"
                                     f"{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/ready", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"mloop serve not ready in 120 s:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=30)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample across series matching ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def project_server(root: Path, *, auth: Any = None, **serving: Any) -> ServerThread:
    """The project's app (its serving settings, FAST polling, ``serving`` overrides: ``commit``
    the log's commit interval, ``compile`` and ``inference_log`` their sections' keys) on a
    ServerThread, not started: use it as a context manager."""
    from mloop.project import open_project
    from mloop.server import default_collectors
    from mloop.serving.app import create_app

    project = open_project(root)
    commit = serving.pop("commit", None)
    compile_ = serving.pop("compile", None)
    ilog = serving.pop("inference_log", None)
    cfg = project.config.serving.model_copy(update={**FAST, **serving}, deep=True)
    if compile_ is not None:
        cfg.compile = cfg.compile.model_copy(update=compile_)
    if ilog is not None:
        cfg.inference_log = cfg.inference_log.model_copy(update=ilog)
    if commit is not None:
        cfg.inference_log.commit_interval_seconds = commit
    return ServerThread(create_app(project, cfg, auth=auth,
                                   collectors=default_collectors(project)))


def request_rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` records of rentals_frame's inputs (hour, weather, temp), as a client sends them."""
    frame = rentals_frame(n, seed=seed)
    return [{"hour": int(h), "weather": w, "temp": float(t)}
            for h, w, t in zip(frame["hour"], frame["weather"], frame["temp"], strict=True)]


def check_verdict_redone_at_load(project: Any, library: str, redone: str,
                                 compiled_at: str, *, installed: str | None = None) -> None:
    """Record version 1's compile verdict as made with ``library`` 0.0.1, load the version
    to serve, and check the verdict was redone (``redone`` starts its note, ``compiled_at``
    says how) and recorded again with the installed ``library`` (``installed``: its version,
    when its distribution is named otherwise, as xgboost-cpu)."""
    import json
    from importlib import metadata

    from mloop.serving.compiled import TAG
    from mloop.serving.model import load_served

    def tag() -> dict[str, Any]:
        return json.loads(project.mlflow.get_model_version("rentals", "1").tags[TAG])

    stored = tag()
    stored["against"][library] = "0.0.1"
    project.mlflow.set_model_version_tag("rentals", "1", TAG, json.dumps(stored))
    model = load_served(project, 1, compile=project.config.serving.compile)
    verdict = model.compile_verdict
    assert verdict is not None and model.compiled is not None
    assert verdict["status"] == "verified" and verdict["compiled_at"] == compiled_at
    assert verdict["note"].startswith(redone)
    version = installed or metadata.version(library)
    assert f"{library} '0.0.1' -> '{version}'" in verdict["note"]
    assert tag()["against"][library] == version

