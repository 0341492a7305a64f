"""The static security scan CI runs: bandit with the project's ``[tool.bandit]`` finds nothing
of medium or high severity in src/, and the same configuration still catches a real flaw (a
skip list or a ``nosec`` that silenced everything would pass the first test alone)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

from .helpers import REPO, require

BANDIT = [sys.executable, "-m", "bandit", "-c", str(REPO / "pyproject.toml"), "-ll", "-q"]


@pytest.fixture(autouse=True)
def _bandit() -> None:
    require("bandit", install="pip install -r requirements.lock (bandit is in the dev extra)")


def _scan(target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BANDIT, "-r", str(target)], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def test_bandit_finds_no_medium_or_high_issue_in_src() -> None:
    proc = _scan(REPO / "src")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bandit_with_the_project_config_still_fails_on_a_real_flaw(tmp_path: Path) -> None:
    (tmp_path / "flawed.py").write_text(textwrap.dedent("""\
        import subprocess

        import yaml


        def run(command: str, text: str) -> object:
            subprocess.call(command, shell=True)
            return yaml.load(text, Loader=yaml.Loader)
        """))
    proc = _scan(tmp_path)
    assert proc.returncode == 1
    assert "B602" in proc.stdout and "B506" in proc.stdout  # shell=True, unsafe yaml load


def test_every_skipped_bandit_check_is_explained() -> None:
    """Each skip in ``[tool.bandit]`` has its reason beside it in pyproject.toml."""
    text = (REPO / "pyproject.toml").read_text()
    skips = tomllib.loads(text)["tool"]["bandit"]["skips"]
    assert skips
    lines = text.split("[tool.bandit]", 1)[1].splitlines()
    for check in skips:
        [line] = [x for x in lines if f'"{check}"' in x]
        assert "#" in line and len(line.split("#", 1)[1].strip()) > 10, line


def test_doctor_probes_a_tls_server_without_sending_mlflow_credentials(
        make_project: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving check reads /health of a server it cannot verify (a self-signed
    certificate): it must not hand that server the MLflow token (bandit B323's finding)."""
    import json
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mloop.doctor import _check_serving
    from mloop.project import open_project

    from .helpers import SMALL_CONFIG, self_signed_cert

    cert, key = self_signed_cert(tmp_path / "tls")
    seen: list[str | None] = []

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"status": "alive"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        root = make_project(SMALL_CONFIG + f"serving: {{port: {port}, tls_cert: {cert}, "
                                           f"tls_key: {key}}}\n")
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret-token")
        check = _check_serving(open_project(root))
    finally:
        server.shutdown()
        server.server_close()
    assert check.status == "ok" and "answering /health" in check.detail
    assert seen == [None]
