"""``mloop serve --workers 2`` over real HTTP on 127.0.0.1: the workers share the connections
(a listening socket each), both write the inference log and the monitor reads all of it back,
/metrics sums both, POST /reload reaches both (and a worker started in place of a killed one);
a taken port is one clear error. The reload generation's files, tested alone."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from mloop.monitoring.windows import read_rows
from mloop.project import open_project
from mloop.registry.promotion import change_alias
from mloop.serving.shared_reload import SharedReload
from mloop.storage import ObjectStore
from mloop.traffic.inference_log import read_log, segment_files

from .helpers import MLOOP_BIN, copy_project, stop_process_group
from .serving_util import free_port, metric, request_rows

pytestmark = pytest.mark.slow


@pytest.fixture
def proj(serving_registry: Path, tmp_path: Path) -> Path:
    root = copy_project(serving_registry, tmp_path)
    # no regular poll during a test: only POST /reload can change what a worker serves
    with (root / "mloop.yaml").open("a") as fh:
        fh.write("serving:\n  poll_seconds: 3600\n"
                 "  inference_log: {commit_interval_seconds: 0.2}\n")
    return root


class Workers:
    """``mloop serve --workers 2`` in a process group of its own."""

    def __init__(self, root: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [MLOOP_BIN, "-C", str(root), "serve", "--port", str(self.port), "--workers",
                 "2"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def predict(self, row: dict, session: requests.Session | None = None
                ) -> requests.Response:
        """One request; without a session on a new connection (the kernel picks a worker)."""
        post = session.post if session else requests.post
        r = post(self.url + "/predict", json={"records": [row]}, timeout=30,
                 headers={} if session else {"Connection": "close"})
        assert r.status_code == 200, r.text
        return r

    def both_up(self, timeout: float = 120) -> set[str]:
        """Requests on new connections until two workers have answered: their pids."""
        pids: set[str] = set()
        deadline = time.time() + timeout
        row = request_rows(1)[0]
        while len(pids) < 2:
            if self.proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"two workers did not come up:\n"
                                     f"{self.log.read_text()[-3000:]}")
            try:
                pids.add(self.predict(row).headers["x-mloop-worker"])
            except requests.RequestException:
                time.sleep(0.3)
        return pids

    def stop(self) -> None:
        stop_process_group(self.proc, grace=60)


@pytest.fixture
def workers(proj: Path, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(proj, tmp_path / "serve.log")
    try:
        yield w
    finally:
        w.stop()


def _burst(w: Workers, connections: int, row: dict) -> tuple[list[str], list[str]]:
    """``connections`` connections opened at once (as a client's pool or wrk opens them, all
    queued before a worker accepts any), then two requests on each: the worker that answered
    each connection, and every request id."""
    body = json.dumps({"records": [row]})
    conns = [http.client.HTTPConnection("127.0.0.1", w.port, timeout=30)
             for _ in range(connections)]
    for c in conns:
        c.connect()
    pids: list[str] = []
    ids: list[str] = []
    try:
        for c in conns:
            answered = set()
            for _ in range(2):
                c.request("POST", "/predict", body, {"Content-Type": "application/json"})
                r = c.getresponse()
                assert r.status == 200, r.read()
                answered.add(r.getheader("x-mloop-worker"))
                ids += json.loads(r.read())["request_ids"]
            assert len(answered) == 1  # one connection, one worker
            pids += answered
    finally:
        for c in conns:
            c.close()
    return pids, ids


def _listening_sockets(port: int) -> int:
    """How many TCP sockets listen on 127.0.0.1:``port`` (Linux's /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1] == local and r.split()[3] == "0A")


def test_two_workers_share_connections_log_every_row_and_sum_their_metrics(
        proj: Path, workers: Workers) -> None:
    up = workers.both_up()
    assert _listening_sockets(workers.port) == 2  # one of its own per worker
    row = request_rows(1)[0]
    ids: list[str] = []
    for _ in range(4):
        pids, burst_ids = _burst(workers, 32, row)
        ids += burst_ids
        # the kernel hashes each connection onto one worker's socket (16 each expected; 5
        # or fewer: p = 1e-4). One socket shared by both let whichever worker woke first
        # take most of a burst (32/0, 28/4, 23/9 measured).
        assert set(pids) == up and min(Counter(pids).values()) >= 6, Counter(pids)
    sent = len(ids)
    # whichever worker answers /metrics reports the requests of both (the warm-up ones too)
    warmup = None
    for _ in range(6):
        text = requests.get(workers.url + "/metrics", headers={"Connection": "close"},
                            timeout=30).text
        total = metric(text, "mloop_requests_total", endpoint="predict", status="200")
        warmup = total - sent if warmup is None else warmup
        assert total == sent + warmup
        assert metric(text, "mloop_in_flight_requests") == 0
    assert warmup is not None and warmup >= 2
    workers.stop()
    assert workers.proc.returncode == 0, workers.log.read_text()[-3000:]

    uri = open_project(proj).uris["inference_log_uri"]
    logged = read_log(uri)
    assert logged.num_rows == sent + warmup  # nothing lost, nothing twice
    assert set(ids) <= set(logged.column("_request_id").to_pylist())
    writers = {Path(f).name.split("-")[2] for f in segment_files(ObjectStore(uri))}
    assert writers == up  # part-<ts>-<pid>-<seq>.parquet: each worker wrote its own segments
    assert read_rows(uri).num_rows == sent + warmup  # what the monitor windows


def test_reload_on_one_worker_reaches_both_and_a_replaced_worker(
        proj: Path, workers: Workers) -> None:
    up = workers.both_up()
    change_alias(open_project(proj), "champion", 2, expected=1, action="promote",
                 reason="test")
    r = requests.post(workers.url + "/reload", timeout=120)
    assert r.status_code == 200, r.text
    acks = r.json()["workers"]
    assert set(acks) == up
    assert {a["champion"] for a in acks.values()} == {2}
    # every worker answers v2 at once (their own polls are an hour apart)
    answered: dict[str, set[str]] = {}
    row = request_rows(1)[0]
    deadline = time.time() + 60
    while set(answered) != up and time.time() < deadline:
        for _ in range(10):
            h = workers.predict(row).headers
            answered.setdefault(h["x-mloop-worker"], set()).add(h["x-mloop-version"])
    assert answered == {pid: {"2"} for pid in up}

    # a worker killed outright is replaced; the next reload reaches the new one too
    victim = sorted(up)[0]
    os.kill(int(victim), signal.SIGKILL)
    survivor = (up - {victim}).pop()
    deadline = time.time() + 120
    while True:
        now = workers.both_up(timeout=120)
        if victim not in now:
            break
        assert time.time() < deadline, "the killed worker was not replaced"
    assert survivor in now
    change_alias(open_project(proj), "champion", 1, expected=2, action="rollback",
                 reason="test")
    r = requests.post(workers.url + "/reload", timeout=120)
    assert r.status_code == 200, r.text
    acks = r.json()["workers"]
    assert set(acks) == now  # the killed worker's acknowledgement is gone
    assert {a["champion"] for a in acks.values()} == {1}
    answered = {}
    deadline = time.time() + 60
    while set(answered) != now and time.time() < deadline:
        h = workers.predict(row).headers
        answered.setdefault(h["x-mloop-worker"], set()).add(h["x-mloop-version"])
    assert answered == {pid: {"1"} for pid in now}


def test_workers_on_a_taken_port_stop_with_one_error_naming_it(proj: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([MLOOP_BIN, "-C", str(proj), "serve", "--port", str(port),
                               "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------- the reload generation

def test_reload_generation_counts_up_and_ignores_workers_that_are_gone(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    mine, dead = SharedReload(tmp_path), SharedReload(tmp_path, pid=gone.pid)
    assert mine.generation() == 0
    assert [mine.bump(), dead.bump()] == [1, 2]
    mine.ack(2, {"champion": 3})
    dead.ack(1, {"champion": 2})
    assert mine.acks() == {os.getpid(): {"generation": 2, "champion": 3}}
    mine.forget()
    assert mine.acks() == {}


def test_reload_wait_names_the_workers_behind(tmp_path: Path) -> None:
    import asyncio

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        behind, ahead = SharedReload(tmp_path, pid=sleeper.pid), SharedReload(tmp_path)
        behind.ack(0, {"champion": 1})
        generation = ahead.bump()
        ahead.ack(generation, {"champion": 2})
        acks, late = asyncio.run(ahead.wait_for(generation, timeout=0.3))
        assert late == [sleeper.pid]
        assert acks[os.getpid()]["champion"] == 2
        behind.ack(generation, {"champion": 2})
        assert asyncio.run(ahead.wait_for(generation, timeout=5))[1] == []
    finally:
        sleeper.kill()
        sleeper.wait()
