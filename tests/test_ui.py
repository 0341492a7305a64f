"""The dashboard (`mloop ui`) on a real project: a short `mloop demo` (May to mid-June 2011:
real deployments, a canary, a promotion by the loop, weekly windows and a retrain), served
by uvicorn on 127.0.0.1 and driven by Debian's Chromium through Selenium and chromium-driver.

Pages load without console errors, charts hold one mark per stored record, an operator's
promotion through the page moves MLflow's alias and appends an audit event with its reason,
a viewer gets 403 on every action, a POST without the session's CSRF token is refused.
Screenshots of each page are kept under the test's tmp dir and copied to /tmp/ui-shots/.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from mloop.cli.app import main
from mloop.loop.timeline import timeline
from mloop.project import open_project
from mloop.security.audit import list_events
from mloop.security.tokens import create_token
from mloop.ui import create_ui_app
from mloop.ui.app import ACTION_PATHS, SESSION_COOKIE
from mloop.ui.render import NAV

from .helpers import copy_project, require, stop_process_group
from .serving_util import ServerThread

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ui")]

SHOTS = Path("/tmp/ui-shots")
PAGES = [("overview", "/"), ("timeline", "/timeline?at=2011-06-10"),
         ("versions", "/versions"), ("version", "/versions/2"), ("monitoring", "/monitoring"),
         ("loop", "/loop"), ("audit", "/audit"), ("login", "/login"), ("runs", "/runs"),
         ("snapshots", "/snapshots"), ("diff", "/versions/diff?a=1&b=2"), ("cost", "/cost")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project a short demo leaves behind (~60 s: the only training in this module)."""
    out = tmp_path_factory.mktemp("ui") / "demo"
    assert main(["demo", "--out", str(out), "--until", "2011-06-15"]) == 0
    return out / "project"


@pytest.fixture
def project_copy(demo: Path, tmp_path: Path) -> Path:
    """A private copy for a test that changes the registry."""
    return copy_project(demo, tmp_path)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = require("selenium.webdriver",
                        install="pip install -r requirements.lock (selenium is in the lock)")
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if driver_path is None:
        raise AssertionError("chromedriver is not installed: apt-get install -y "
                             "--no-install-recommends chromium-driver "
                             "(scripts/test_setup.sh does this)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--disable-background-networking"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    if found is None:
        raise AssertionError(f"no CSRF field in the page:\n{html[:2000]}")
    return found.group(1)


def _login(url: str, token: str) -> requests.Session:
    s = requests.Session()
    csrf = _csrf(s.get(f"{url}/login").text)
    r = s.post(f"{url}/login", data={"csrf": csrf, "token": token, "next": "/"},
               allow_redirects=False)
    assert r.status_code == 303, r.text
    return s


def _screenshot(driver: Any, name: str, tmp_path: Path) -> Path:
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, min(max(int(height) + 40, 800), 4000))
    shot = tmp_path / f"{name}.png"
    driver.save_screenshot(str(shot))
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SHOTS / shot.name)
    return shot


def _click_to(browser: Any, element: Any, url: str) -> None:
    """Click ``element`` and wait until the browser is at ``url``: a click returns before the
    page it leads to has loaded (on a busy machine, seconds later)."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.wait import WebDriverWait

    element.click()
    WebDriverWait(browser, 60).until(ec.url_to_be(url))


def _severe(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_every_page_loads_in_chromium_without_console_errors(demo: Path, browser: Any,
                                                             tmp_path: Path) -> None:
    app = create_ui_app(open_project(demo))
    with ServerThread(app) as srv:
        times = {}
        for name, path in PAGES:
            requests.get(srv.url + path, timeout=30)  # warm: templates compiled, modules in
            start = time.perf_counter()
            r = requests.get(srv.url + path, timeout=30)
            times[name] = (time.perf_counter() - start) * 1000
            assert r.status_code == 200, (path, r.text[-2000:])
            browser.get(srv.url + path)
            assert browser.find_element("css selector", "header .brand").text == "mloop"
            assert _severe(browser) == [], (path, _severe(browser))
            shot = _screenshot(browser, name, tmp_path)
            assert shot.stat().st_size > 10_000, shot
    print("ui page times (ms, warm, demo project): "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    assert max(times.values()) < 1000, times  # the 300 ms p95 target has its own benchmark


def test_timeline_draws_one_mark_per_stored_record(demo: Path, browser: Any) -> None:
    project = open_project(demo)
    tl = timeline(project)
    assert tl.stints and tl.decisions and tl.windows and tl.retrains  # the demo made them
    app = create_ui_app(project)
    with ServerThread(app) as srv:
        browser.get(f"{srv.url}/timeline?at=2011-06-10")

        def count(selector: str) -> int:
            return len(browser.find_elements("css selector", selector))

        assert count("svg.timeline .mark.stint") == len(tl.stints)
        assert count("svg.timeline .mark.decision") == len(tl.decisions)
        assert not tl.bucketed and tl.window_count == len(tl.windows)  # one mark each
        assert count("svg.timeline .mark.drift") == len(tl.windows)
        assert count("svg.timeline .mark.perf") == sum(
            1 for w in tl.windows if w["metric_value"] is not None)
        assert count("svg.timeline .mark.retrain") == len(tl.retrains)
        assert count("#decisions tr.decision") == len(tl.decisions)
        # the question the timeline exists for: what served then, and why
        answer = browser.find_element("css selector", "#answer").text
        champion = next(s for s in tl.stints if s.alias == "champion" and s.end is None)
        assert f"v{champion.version} served as champion" in answer
        assert champion.reason in answer
        # a promoted version's stint starts where its promotion is marked, in event time
        promo = next(d for d in tl.decisions if d.kind == "promote"
                     and d.version == champion.version)
        assert champion.start == promo.at
        retrain = next(r for r in tl.retrains if r["version"] == champion.version)
        assert promo.at.isoformat() == retrain["decided_at"]
        browser.get(f"{srv.url}/monitoring")
        cells = sum(len(w["report"]["drift"]["columns"]) for w in
                    _windows_with_reports(project))
        assert count("svg.heatmap .mark.cell") == cells


def _windows_with_reports(project: Any) -> list[dict[str, Any]]:
    from mloop.monitoring.windows_store import list_windows

    return [w for w in list_windows(project, limit=120, with_reports=True)
            if (w["report"].get("drift") or {}).get("columns")]


def test_operator_promotion_through_the_page_moves_the_alias_and_is_audited(
        project_copy: Path, browser: Any, tmp_path: Path) -> None:
    project = open_project(project_copy)
    token = create_token(project.store, role="admin", name="alice").token
    before = project.tracking.model_versions(project.config.model_name, limit=10)
    champion = next(v.version for v in before if "champion" in v.aliases)
    last_event = list_events(project.store, limit=1)[0].id
    target = next(v.version for v in before if v.version != champion)
    app = create_ui_app(project)
    with ServerThread(app) as srv:
        browser.delete_all_cookies()
        browser.get(f"{srv.url}/login?next=/versions/{target}")
        browser.find_element("id", "token").send_keys(token)
        _click_to(browser, browser.find_element("id", "login"),
                  f"{srv.url}/versions/{target}")
        assert "logged in as 'alice' (operator)" in browser.find_element(
            "css selector", ".flash").text
        form = browser.find_element("id", "promote-form")
        form.find_element("name", "reason").send_keys("ui test: back to the earlier model")
        form.find_element("name", "force").click()  # its gates vs the better champion may fail
        logged_in = browser.find_element("css selector", ".flash")
        form.find_element("css selector", "button").click()
        # the promotion takes seconds (gates, MLflow): wait for the page it redirects to,
        # not the login's flash still on screen
        from selenium.webdriver.support.expected_conditions import staleness_of
        from selenium.webdriver.support.wait import WebDriverWait

        WebDriverWait(browser, 60).until(staleness_of(logged_in))
        flash = browser.find_element("css selector", ".flash").text
        _screenshot(browser, "promoted", tmp_path)
        assert f"v{target} is now champion (was v{champion}" in flash, flash
    fresh = open_project(project_copy)
    from mloop.registry.aliases import mlflow_alias

    assert mlflow_alias(fresh, "champion") == target
    # the promotion, and (when the demo left a challenger on canary) the canary it ended
    recorded = [e for e in list_events(fresh.store, limit=5) if e.id > last_event]
    assert sorted(e.kind for e in recorded) in (["promote"], ["override"], ["promote", "stop"],
                                                ["override", "stop"]), recorded
    event = next(e for e in recorded if e.kind in ("promote", "override"))
    assert event.payload["reason"] == "ui test: back to the earlier model"
    assert event.payload["version"] == target and event.payload["replaced"] == champion
    assert event.actor.startswith("alice (token #")


def test_viewer_gets_403_on_every_action_and_changes_nothing(project_copy: Path) -> None:
    project = open_project(project_copy)
    viewer = create_token(project.store, role="viewer", name="bob").token
    events_before = list_events(project.store, limit=1)[0].id
    with ServerThread(create_ui_app(project)) as srv:
        s = _login(srv.url, viewer)
        csrf = _csrf(s.get(f"{srv.url}/").text)
        for path in ACTION_PATHS:
            r = s.post(srv.url + path, data={"csrf": csrf, "version": "1", "reason": "x",
                                             "weight": "0.2"}, allow_redirects=False)
            assert r.status_code == 403, (path, r.status_code)
            assert "has role &#39;viewer&#39;: it may read, not act" in r.text
        # not logged in at all: 401 on every action
        anon = requests.Session()
        csrf = _csrf(anon.get(f"{srv.url}/login").text)
        for path in ACTION_PATHS:
            r = anon.post(srv.url + path, data={"csrf": csrf, "version": "1", "reason": "x"},
                          allow_redirects=False)
            assert r.status_code == 401, (path, r.status_code)
    assert list_events(project.store, limit=1)[0].id == events_before


def test_a_post_without_the_session_csrf_token_is_refused(project_copy: Path) -> None:
    project = open_project(project_copy)
    admin = create_token(project.store, role="admin", name="carol").token
    champion = project.tracking.model_versions(project.config.model_name, limit=10)
    with ServerThread(create_ui_app(project)) as srv:
        s = _login(srv.url, admin)
        for data in ({"version": "1", "reason": "no token"},
                     {"version": "1", "reason": "forged", "csrf": "not-the-session-token"}):
            r = s.post(f"{srv.url}/actions/rollback", data=data, allow_redirects=False)
            assert r.status_code == 403 and "CSRF" in r.text, r.text[-500:]
    after = project.tracking.model_versions(project.config.model_name, limit=10)
    assert [v.aliases for v in after] == [v.aliases for v in champion]


def test_session_cookie_is_httponly_strict_and_secure_under_tls(demo: Path) -> None:
    for secure in (False, True):
        with ServerThread(create_ui_app(open_project(demo), secure=secure)) as srv:
            cookie = requests.get(f"{srv.url}/login").headers["set-cookie"].lower()
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert ("secure" in cookie.split("; ")) is secure


def test_reading_needs_a_login_when_auth_is_on(demo: Path) -> None:
    project = open_project(demo)
    viewer = create_token(project.store, role="viewer", name="dana").token
    with ServerThread(create_ui_app(project, auth=True)) as srv:
        assert requests.get(f"{srv.url}/timeline").status_code == 401
        assert _login(srv.url, viewer).get(f"{srv.url}/timeline").status_code == 200


def test_mloop_ui_refuses_a_public_host_without_a_token(tmp_path: Path, capsys: Any) -> None:
    from .helpers import copy_bike

    root = copy_bike(tmp_path / "bike")
    assert main(["-C", str(root), "ui", "--host", "0.0.0.0"]) == 1
    assert ("the dashboard on 0.0.0.0 needs a token (auth is on beyond loopback): "
            "`mloop tokens create --role viewer`") in capsys.readouterr().err


def test_mloop_ui_serves_https_and_its_session_cookie_is_secure(tmp_path: Path) -> None:
    """`mloop ui --tls-cert --tls-key` on real HTTPS (a self-signed certificate made here):
    a login over TLS works and its cookie is Secure; plain HTTP on that port is refused."""
    from .helpers import MLOOP_BIN, copy_bike, self_signed_cert
    from .serving_util import free_port

    root = copy_bike(tmp_path / "bike")
    cert, key = self_signed_cert(tmp_path / "tls")
    viewer = create_token(open_project(root).store, role="viewer", name="erin").token
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen([MLOOP_BIN, "-C", str(root), "ui", "--port", str(port),
                                 "--auth", "--tls-cert", str(cert), "--tls-key", str(key)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={k: v for k, v in os.environ.items()
                                     if k != "MLOOP_PROJECT"})
    try:
        s = requests.Session()  # verify= on each call: REQUESTS_CA_BUNDLE beats s.verify
        tls = {"verify": str(cert), "timeout": 30}  # the only CA this client trusts
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mloop ui exited {proc.returncode}:\n{log.read_text()}")
            try:
                if s.get(f"{url}/health", verify=str(cert), timeout=2).ok:
                    break
            except requests.RequestException:
                if time.time() > deadline:
                    raise
            time.sleep(0.2)
        assert f"on https://127.0.0.1:{port} (login required" in log.read_text()
        assert s.get(f"{url}/audit", allow_redirects=False, **tls).status_code == 401
        csrf = _csrf(s.get(f"{url}/login", **tls).text)
        r = s.post(f"{url}/login", data={"csrf": csrf, "token": viewer, "next": "/audit"},
                   allow_redirects=False, **tls)
        assert r.status_code == 303, r.text
        cookie = r.headers["set-cookie"].lower()
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        assert "secure" in cookie.split("; ") and "httponly" in cookie.split("; ")
        assert s.get(f"{url}/audit", **tls).status_code == 200  # the Secure cookie came back
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        stop_process_group(proc, grace=30)


@pytest.mark.parametrize("command", ["ui", "serve"])
@pytest.mark.parametrize("case", ["cert alone", "missing cert", "not a certificate",
                                  "another cert's key", "a key with a password",
                                  "missing in mloop.yaml"])
def test_a_bad_tls_pair_stops_the_start_naming_the_file(tmp_path: Path, capsys: Any,
                                                        command: str, case: str) -> None:
    """`mloop ui` and `mloop serve` check the same TLS options the same way, before binding:
    exit 1, one message naming the file and where it was given, nothing announced."""
    from .helpers import copy_bike, self_signed_cert

    root = copy_bike(tmp_path / "bike")
    cert, key = self_signed_cert(tmp_path / "tls")
    _, other_key = self_signed_cert(tmp_path / "tls", name="other")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    gone = tmp_path / "gone.crt"
    locked = tmp_path / "locked.key"  # the same key, encrypted: uvicorn would prompt for it
    from cryptography.hazmat.primitives import serialization

    locked.write_bytes(serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    args, expected = {
        "cert alone": (["--tls-cert", str(cert)],
                       "--tls-cert and --tls-key go together: pass both or neither"),
        "missing cert": (["--tls-cert", str(gone), "--tls-key", str(key)],
                         f"--tls-cert {gone}: no such file"),
        "not a certificate": (["--tls-cert", str(junk), "--tls-key", str(key)],
                              f"--tls-cert {junk}: not a PEM certificate"),
        "another cert's key": (["--tls-cert", str(cert), "--tls-key", str(other_key)],
                               f"--tls-key {other_key}: not the unencrypted PEM private key "
                               f"of {cert}"),
        "a key with a password": (["--tls-cert", str(cert), "--tls-key", str(locked)],
                                  f"--tls-key {locked}: not the unencrypted PEM private key "
                                  f"of {cert}"),
        "missing in mloop.yaml": ([], f"serving.tls_cert in mloop.yaml {root / 'certs/ui.crt'}:"
                                      f" no such file"),
    }[case]
    if case == "missing in mloop.yaml":
        cfg = root / "mloop.yaml"
        cfg.write_text(cfg.read_text().replace(
            "serving:\n", "serving:\n  tls_cert: certs/ui.crt\n  tls_key: certs/ui.key\n", 1))
    assert main(["-C", str(root), command, "--port", "1", *args]) == 1
    said = capsys.readouterr().err
    assert expected in " ".join(said.split()), said
    assert "mloop ui for" not in said and "serving '" not in said


def test_serve_ui_mounts_the_dashboard_under_ui_with_the_servers_auth(
        project_copy: Path, browser: Any) -> None:
    """`mloop serve --ui` on real HTTP with auth on: /predict answers a predict token, the
    dashboard under /ui needs a login to read, its links and redirects stay under /ui, and a
    viewer logged in there cannot act."""
    import pyarrow.parquet as pq

    from mloop.ui.mount import build_app_with_ui

    from .serving_util import FAST

    project = open_project(project_copy)
    viewer = create_token(project.store, role="viewer", name="erin").token
    scorer = create_token(project.store, role="predict", name="svc").token
    cfg = project.config.serving.model_copy(update=FAST)
    events_before = list_events(project.store, limit=1)[0].id
    with ServerThread(build_app_with_ui(project, cfg, auth=True)) as srv:
        # the server still serves: a row of the project's data through /predict
        inputs = [c["name"] for c in srv.get("/model", headers={
            "Authorization": f"Bearer {scorer}"}).json()["champion"]["signature"]]
        row = pq.read_table(project_copy / project.config.data.path).slice(0, 1).to_pylist()[0]
        record = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()
                  if k in inputs}
        body = {"records": [record]}
        r = srv.post("/predict", body, headers={"Authorization": f"Bearer {scorer}"})
        assert r.status_code == 200 and r.json()["version"] >= 1, r.text
        assert srv.post("/predict", body).status_code == 401
        # the dashboard: auth on, so reading needs a login; its login page is under /ui
        assert srv.get("/ui/timeline").status_code == 401
        assert 'action="/ui/login"' in srv.get("/ui/login").text
        browser.delete_all_cookies()
        browser.get(f"{srv.url}/ui/versions/2")  # 401: its page links to the login
        browser.get_log("browser")  # (the 401 itself is logged: expected here)
        _click_to(browser, browser.find_element("link text", "Log in with an mloop token"),
                  f"{srv.url}/ui/login?next=/versions/2")
        browser.find_element("id", "token").send_keys(viewer)
        _click_to(browser, browser.find_element("id", "login"), f"{srv.url}/ui/versions/2")
        assert "logged in as 'erin' (viewer)" in browser.find_element(
            "css selector", ".flash").text
        assert _severe(browser) == [], _severe(browser)  # the stylesheet came from /ui/static
        links = {a.get_attribute("href") for a in browser.find_elements(
            "css selector", "header nav a")}
        assert links == {f"{srv.url}/ui{href}" for _, href, _ in NAV}
        for _, href, _ in NAV:
            browser.get(f"{srv.url}/ui{href}")
            assert browser.find_element("css selector", "header .who").text.startswith("erin")
            assert _severe(browser) == [], (href, _severe(browser))
        # the viewer's session cannot act, through the mounted app either
        s = _login(f"{srv.url}/ui", viewer)
        csrf = _csrf(s.get(f"{srv.url}/ui/").text)
        for path in ACTION_PATHS:
            r = s.post(f"{srv.url}/ui{path}", data={"csrf": csrf, "version": "1",
                                                    "reason": "x", "weight": "0.2"},
                       allow_redirects=False)
            assert r.status_code == 403, (path, r.status_code)
    assert list_events(project.store, limit=1)[0].id == events_before


def test_audit_page_checks_new_events_on_each_visit_and_the_whole_chain_on_demand(
        project_copy: Path, browser: Any) -> None:
    import sqlalchemy as sa

    from mloop.security.audit import append_event

    project = open_project(project_copy)
    with ServerThread(create_ui_app(project)) as srv:
        browser.get(f"{srv.url}/audit")
        n = len(list_events(project.store, limit=100_000))
        chain = browser.find_element("id", "chain").text
        assert chain.startswith(f"Audit chain intact: {n} events"), chain
        append_event(project.store, "note", {"why": "ui test"})
        browser.refresh()
        assert browser.find_element("id", "chain").text.startswith(
            f"Audit chain intact: {n + 1} events")
        # an old event edited in place: the visit's incremental check does not rehash it,
        # the full check the page offers does, and names it
        first = min(e.id for e in list_events(project.store, limit=100_000))
        with project.store.engine.begin() as conn:
            conn.execute(sa.text("update events set actor = 'mallory' where id = :i"),
                         {"i": first})
        _click_to(browser, browser.find_element("id", "verify-all"), f"{srv.url}/audit?verify=all")
        chain = browser.find_element("id", "chain").text
        assert chain.startswith(f"Audit chain broken: event {first} ("), chain
        assert "was modified after it was written" in chain


def test_timeline_reads_decisions_by_kind_not_the_newest_events_of_all_kinds(
        project_copy: Path) -> None:
    from mloop.security.audit import append_event

    project = open_project(project_copy)
    decisions = timeline(project).decisions
    for i in range(len(decisions) + 5):  # routine events newer than every decision
        append_event(project.store, "loop.tick", {"i": i})
    again = timeline(project, max_events=len(decisions))
    assert [d.event_id for d in again.decisions] == [d.event_id for d in decisions]


def test_monitoring_heatmap_shades_a_chi_square_column_without_a_score_threshold(
        project_copy: Path, browser: Any) -> None:
    """A categorical column tested by chi-square has a p-value, no score threshold
    (``threshold: null``, as the full demo's empty-season windows store): the page draws it
    against its minimum effect instead of failing."""
    import sqlalchemy as sa

    from mloop.store.models import MonitorWindowRow

    project = open_project(project_copy)
    with project.store.session() as s:
        row = s.scalars(sa.select(MonitorWindowRow).order_by(MonitorWindowRow.id.desc())).first()
        report = dict(row.report)
        report["drift"] = {**report["drift"], "columns": [
            {**c, "method": "chisquare", "threshold": None, "min_effect": 0.1}
            for c in report["drift"]["columns"]]}
        row.report = report
        s.commit()
    cells = sum(len(w["report"]["drift"]["columns"]) for w in _windows_with_reports(project))
    with ServerThread(create_ui_app(project)) as srv:
        assert requests.get(f"{srv.url}/monitoring", timeout=30).status_code == 200
        browser.get(f"{srv.url}/monitoring")
        assert len(browser.find_elements("css selector", "svg.heatmap .mark.cell")) == cells


def test_bucket_windows_keeps_the_worst_drift_and_the_metric_range_of_each_bucket() -> None:
    from datetime import UTC, datetime, timedelta

    from mloop.loop.timeline import bucket_windows

    t0 = datetime(2011, 1, 1, tzinfo=UTC)
    rows = [{"start": t0 + timedelta(hours=i), "end": t0 + timedelta(hours=i + 1), "rows": 10,
             "drifted": i == 1234, "drift_share": 0.9 if i == 1234 else 0.01 * (i % 7),
             "prediction_drifted": False, "quality_findings": 0, "metric": "mae",
             "metric_value": float(i), "reference_metric": 1.0, "label_coverage": 0.5}
            for i in range(3000)]
    out = bucket_windows(rows, t0, t0 + timedelta(hours=3000), 1000)
    assert len(out) == 1000
    assert sum(b["windows"] for b in out) == 3000 and sum(b["rows"] for b in out) == 30_000
    worst = next(b for b in out if b["drifted"])
    assert worst["drift_share"] == 0.9 and worst["drifted_windows"] == 1
    assert worst["start"] <= rows[1234]["start"].isoformat() < worst["end"]
    first = out[0]
    assert (first["metric_min"], first["metric_value"], first["metric_max"]) == (0.0, 1.0, 2.0)
    assert [b["start"] for b in out] == sorted(b["start"] for b in out)


def _add_windows(project: Any, n: int) -> None:
    """``n`` more windows of the project's spec after its last, copied from a real one and
    written as the monitor writes them (rows of monitor_windows), evaluated a second apart."""
    from datetime import UTC, datetime, timedelta

    import sqlalchemy as sa

    from mloop.monitoring.windows_store import window_spec
    from mloop.store.models import MonitorWindowRow

    spec = window_spec(project)
    with project.store.session() as s:
        last = s.scalars(sa.select(MonitorWindowRow).where(MonitorWindowRow.spec == spec)
                         .order_by(MonitorWindowRow.seq.desc()).limit(1)).one()
        cols = {c.key: getattr(last, c.key) for c in MonitorWindowRow.__table__.columns
                if c.key != "id"}
        end = last.end.replace(tzinfo=UTC)
        wall = datetime.now(UTC)
        rows = [{**cols, "seq": last.seq + 1 + i, "start": end + timedelta(hours=i),
                 "end": end + timedelta(hours=i + 1), "drift_share": (i % 10) / 10,
                 "evaluated_at": wall + timedelta(seconds=i)} for i in range(n)]
        s.execute(sa.insert(MonitorWindowRow), rows)
        s.commit()


def test_timeline_buckets_thousands_of_windows_and_keeps_every_decision(
        project_copy: Path) -> None:
    from mloop.loop.timeline import timeline_head

    project = open_project(project_copy)
    before = timeline(project)
    _add_windows(project, 3000)
    tl = timeline(project)
    assert tl.bucketed and tl.window_count == len(before.windows) + 3000
    assert 100 < len(tl.windows) <= 1000
    assert sum(w["windows"] for w in tl.windows) == tl.window_count
    # decisions and deployments are few: never bucketed
    assert [d.event_id for d in tl.decisions] == [d.event_id for d in before.decisions]
    with ServerThread(create_ui_app(project)) as srv:
        r = requests.get(f"{srv.url}/timeline?at=2011-06-10", timeout=60)
        assert r.status_code == 200, r.text[-2000:]
        page = r.text
        assert page.count("class='mark drift") == len(tl.windows)
        assert page.count("class='mark decision'") == len(tl.decisions)
        assert len(page) < 1_000_000
        assert "windows drawn as" in page
        # the answer still names the window that held the day, not a bucket
        answer = page[page.index("id=\"answer\""):page.index("chart-card")]
        assert "How it did that" in answer and "rows served by v" in answer
        # a span narrows it to single windows again
        day = tl.windows[len(tl.windows) // 2]["start"][:10]
        r = requests.get(f"{srv.url}/timeline?from={day}&to={day}", timeout=60)
        assert r.status_code == 200, r.text[-2000:]
        assert "windows drawn as" not in r.text
        assert 20 <= r.text.count("class='mark drift") <= 25  # a day of hourly windows
    # the Overview's end of the timeline agrees with the whole one on the big store
    head = timeline_head(project)
    assert [(s.version, s.alias, s.start) for s in head.stints] == [
        (s.version, s.alias, s.start) for s in tl.stints if s.end is None]
    assert [(d.event_id, d.at) for d in head.decisions] == [
        (d.event_id, d.at) for d in tl.decisions[-8:]]
    assert head.windows[0]["id"] == tl.window_count and head.windows[0]["end"] == \
        tl.windows[-1]["end"]


# ----------------------------------------------------------------- runs, snapshots, diff

def _run_steps_twice(project: Any) -> list[str]:
    """Two orchestrator-style runs of the first two steps (`mloop runs create` + `mloop
    step run`): the second one's validate is a cache hit of the first's (ingest reads the
    source each time). Newest first."""
    from mloop.pipeline.runner import create_run, run_single_step

    ids = []
    for _ in range(2):
        run = create_run(project)
        for step in ("ingest", "validate"):
            run_single_step(project, run.pipeline, step, run.id)
        ids.append(run.id)
    return ids[::-1]


def test_runs_page_lists_the_projects_runs_with_their_steps_and_cache_hits(
        project_copy: Path, browser: Any, tmp_path: Path) -> None:
    from mloop.status import list_runs

    project = open_project(project_copy)
    newest = _run_steps_twice(project)
    runs = list_runs(project, limit=50, with_steps=True)
    assert [r["run_id"] for r in runs[:2]] == newest
    assert [(s["step"], s["cache_hit"]) for s in runs[0]["steps"]] == [
        ("ingest", False), ("validate", True)]
    with ServerThread(create_ui_app(project)) as srv:
        browser.get(f"{srv.url}/runs")
        rows = browser.find_elements("css selector", "#runs tr.run")
        assert [r.get_attribute("data-run") for r in rows] == [r["run_id"] for r in runs]
        for row, run in zip(rows, runs, strict=True):
            assert row.find_element("css selector", ".cache-hits").text == \
                f"{run['cache_hits']}/{run['steps_total']}"
            steps = row.find_elements("css selector", ".steps .step")
            assert [s.text.split()[0] for s in steps] == [s["step"] for s in run["steps"]]
            assert len(row.find_elements("css selector", ".step.cached")) == run["cache_hits"]
        # SQLite tracking: no MLflow server, so run ids are text and the hint is given once
        assert browser.find_elements("css selector", "a.mlflow") == []
        assert browser.page_source.count("mlflow ui --backend-store-uri") == 1
        assert runs[-1]["mlflow_run_id"] in browser.page_source
        assert _severe(browser) == [], _severe(browser)
        _screenshot(browser, "runs", tmp_path)
        # one run: each step's cache verdict, duration and peak memory
        _click_to(browser, rows[0].find_element("css selector", "td a"),
                  f"{srv.url}/runs/{newest[0]}")
        assert browser.find_element("id", "cache-hits").text == "1/2 steps cached"
        cells = [[td.text for td in tr.find_elements("css selector", "td")]
                 for tr in browser.find_elements("css selector", "#steps tr.step")]
        assert [(c[0], c[1], c[2]) for c in cells] == [
            ("ingest", "succeeded", "miss"), ("validate", "succeeded", "hit")]
        full = next(r for r in runs if r["steps_total"] == 7)
        browser.get(f"{srv.url}/runs/{full['run_id'][:8]}")  # a unique prefix is enough
        cells = [[td.text for td in tr.find_elements("css selector", "td")]
                 for tr in browser.find_elements("css selector", "#steps tr.step")]
        assert [c[0] for c in cells] == [s["step"] for s in full["steps"]]
        # (a step answered from the cache ran nothing: no peak, "n/a"; a loop's refit
        # reuses its held-out fit's ingest, validate and snapshot)
        assert [c[4] for c in cells] == [
            "n/a" if s["peak_memory_mb"] is None else f"{s['peak_memory_mb']:.4g}"
            for s in full["steps"]]
        assert _severe(browser) == [], _severe(browser)
        _screenshot(browser, "run", tmp_path)


def test_snapshots_page_lists_each_snapshot_with_its_profile(demo: Path, browser: Any,
                                                             tmp_path: Path) -> None:
    from mloop.status import snapshots

    project = open_project(demo)
    snaps = snapshots(project, limit=30, with_profiles=True)
    assert snaps and all(s["profile"] for s in snaps)
    with ServerThread(create_ui_app(project)) as srv:
        browser.get(f"{srv.url}/snapshots")
        rows = browser.find_elements("css selector", "#snapshots tr.snapshot")
        assert [r.get_attribute("data-digest") for r in rows] == [s["digest"] for s in snaps]
        first = rows[0]
        assert first.find_element("css selector", "summary").text.startswith(
            f"{len(snaps[0]['profile'])} columns")
        first.find_element("css selector", "summary").click()  # <details> opens, no JS
        shown = [tr.find_elements("css selector", "td")[0].text for tr in
                 first.find_elements("css selector", "table.profile tr")[1:]]
        assert shown == [c["column"] for c in snaps[0]["profile"]]
        assert _severe(browser) == [], _severe(browser)
        _screenshot(browser, "snapshots", tmp_path)


def test_version_diff_shows_both_versions_metric_values_and_a_delta(
        demo: Path, browser: Any, tmp_path: Path) -> None:
    from mloop.registry.lineage import diff

    project = open_project(demo)
    expected = diff(project, 1, 2)
    assert expected["metrics"]
    with ServerThread(create_ui_app(project)) as srv:
        browser.get(f"{srv.url}/versions")
        form = browser.find_element("id", "diff-form")
        for name, value in (("a", "1"), ("b", "2")):
            field = form.find_element("name", name)
            field.clear()
            field.send_keys(value)
        _click_to(browser, form.find_element("css selector", "button"),
                  f"{srv.url}/versions/diff?a=1&b=2")
        for m in expected["metrics"]:
            row = browser.find_element("css selector",
                                       f"#diff-metrics tr[data-metric='{m['key']}']")
            assert row.find_element("css selector", "td.a").text == f"{m['a']:.4g}"
            assert row.find_element("css selector", "td.b").text == f"{m['b']:.4g}"
            assert row.find_element("css selector", "td.delta").text.startswith(
                f"{m['b'] - m['a']:+.4g}")
        # lower MAE is better: a drop is marked better, whichever way round
        mae = next(m for m in expected["metrics"] if m["key"] == "mae")
        css = browser.find_element("css selector", "#diff-metrics tr[data-metric='mae'] "
                                                    "td.delta").get_attribute("class")
        assert ("better" if mae["b"] < mae["a"] else "worse") in css.split()
        # each version's training snapshot and compile verdict, side by side
        train = next(r for r in expected["data"] if r["key"] == "train")
        data = browser.find_element("id", "diff-data").text
        assert train["a"][:16] in data and train["b"][:16] in data
        compiled = browser.find_element("id", "diff-compiled").text
        for side in ("a", "b"):
            verdict = expected["compiled"][side]
            assert f"{verdict['max_abs_diff']:.3g}" in compiled
        assert _severe(browser) == [], _severe(browser)
        _screenshot(browser, "diff", tmp_path)


@pytest.mark.parametrize(("query", "status", "named"), [
    ("a=one&b=2", 400, "query parameter 'a' must be an integer, got 'one'"),
    ("a=1&b=2.5", 400, "query parameter 'b' must be an integer, got '2.5'"),
    ("a=1", 400, "query parameter 'b' is required"),
    ("a=0&b=1", 400, "query parameter 'a' must be >= 1, got 0"),
    ("a=1&b=999", 404, "has no version 999"),
])
def test_version_diff_refuses_bad_input_with_a_4xx_naming_the_value(
        demo: Path, query: str, status: int, named: str) -> None:
    import html

    with ServerThread(create_ui_app(open_project(demo))) as srv:
        r = requests.get(f"{srv.url}/versions/diff?{query}", timeout=30)
    assert r.status_code == status, r.text[-500:]
    assert named in html.unescape(r.text)


@pytest.mark.parametrize(("path", "status", "named"), [
    ("/runs?limit=lots", 400, "query parameter 'limit' must be an integer, got 'lots'"),
    ("/runs?limit=100000", 400, "query parameter 'limit' must be between 1 and 200, "
                                "got 100000"),
    ("/runs/no-such-run", 404, "no pipeline run 'no-such-run'"),
    ("/snapshots?limit=-3", 400, "query parameter 'limit' must be between 1 and 200, got -3"),
    # these two were a 500 from int() before the pages shared one checker
    ("/audit?limit=all", 400, "query parameter 'limit' must be an integer, got 'all'"),
    ("/monitoring?limit=5000", 400, "query parameter 'limit' must be between 1 and 2000, "
                                    "got 5000"),
])
def test_runs_and_snapshots_pages_refuse_bad_input_naming_it(
        demo: Path, path: str, status: int, named: str) -> None:
    import html

    with ServerThread(create_ui_app(open_project(demo))) as srv:
        r = requests.get(srv.url + path, timeout=30)
    assert r.status_code == status, r.text[-500:]
    assert named in html.unescape(r.text)


def test_version_page_shows_the_compile_verdict_recorded_on_the_version(
        demo: Path, browser: Any) -> None:
    from mloop.serving.compiled import TAG, Verdict

    project = open_project(demo)
    tags = project.tracking.model_version(project.config.model_name, 2).tags
    verdict = Verdict.from_tag(tags.get(TAG))
    assert verdict is not None and verdict.max_abs_diff is not None  # the demo compiles
    with ServerThread(create_ui_app(project)) as srv:
        browser.get(f"{srv.url}/versions/2")
        text = browser.find_element("id", "compiled").text
    assert text.startswith(f"Compile verdict (ONNX)\n{verdict.status}")
    assert verdict.detail in text
    assert browser.find_element("css selector", "#compiled .max-diff").text == \
        f"{verdict.max_abs_diff:.3g}"


def test_mlflow_links_go_to_the_tracking_server_or_say_how_to_start_one() -> None:
    from mloop.ui.links import mlflow_ui

    server = mlflow_ui("https://bob:s3cret@mlflow.example.com:5000/")
    assert server.hint is None
    assert server.run_url("abc", "7") == \
        "https://mlflow.example.com:5000/#/experiments/7/runs/abc"
    assert server.run_url("abc") == "https://mlflow.example.com:5000/#/runs/abc"
    assert server.version_url("bike sharing", 3) == \
        "https://mlflow.example.com:5000/#/models/bike%20sharing/versions/3"
    local = mlflow_ui("sqlite:////srv/p/.mloop/mlflow.db")
    assert local.base is None and local.run_url("abc", "7") is None
    assert local.hint == "mlflow ui --backend-store-uri sqlite:////srv/p/.mloop/mlflow.db"
    pg = mlflow_ui("postgresql://mloop:hunter2@db:5432/mlflow", secrets={"hunter2"})
    assert "hunter2" not in (pg.hint or "") and pg.hint is not None and "db:5432" in pg.hint


# ------------------------------------------------------------ Overview traffic, window page

def _newest_window(project: Any) -> dict[str, Any]:
    from mloop.monitoring.windows_store import get_window, list_windows

    return get_window(project, list_windows(project, limit=1)[0]["id"])


def _text(browser: Any, selector: str) -> str:
    return str(browser.find_element("css selector", selector).text)


def test_overview_shows_the_newest_windows_rate_latency_coverage_and_open_alerts(
        demo: Path, browser: Any, tmp_path: Path) -> None:
    from datetime import datetime

    project = open_project(demo)
    w = _newest_window(project)
    traffic = w["report"]["traffic"]
    assert traffic["requests"] and traffic["latency_ms"]  # the monitor recorded them
    hours = (datetime.fromisoformat(w["end"]) - datetime.fromisoformat(w["start"])
             ).total_seconds() / 3600
    with ServerThread(create_ui_app(project)) as srv:
        browser.get(f"{srv.url}/")
        assert _severe(browser) == [], _severe(browser)
        _screenshot(browser, "overview-traffic", tmp_path)
        assert _text(browser, "#request-rate").startswith(
            f"request rate: {traffic['requests'] / hours:,.1f} requests/hour "
            f"({traffic['requests']:,} requests in {hours:.4g} h)")
        p50, p99 = traffic["latency_ms"]["p50"], traffic["latency_ms"]["p99"]
        assert _text(browser, "#latency") == f"scoring latency p50 / p99: {p50:.3g} / {p99:.3g} ms"
        assert _text(browser, "#label-coverage") == f"label coverage: {w['label_coverage']:.0%}"
        # no server in this process: said, not guessed from the log
        assert "not served by this process" in _text(browser, "#live")
        alerts = [e.text for e in browser.find_elements("css selector", "#alerts li.alert")]
    # the alerts are the monitor's own rules on that window: drift and findings it stored
    assert w["drifted"] and w["quality_findings"]  # the demo's newest window has both
    assert f"input drift in {w['drift_share']:.0%} of features" in alerts
    assert f"{w['quality_findings']} data-quality finding(s)" in alerts


def test_live_traffic_sums_the_servers_counters_and_estimates_latency_quantiles() -> None:
    from datetime import UTC, datetime, timedelta

    from mloop.serving.metrics import ServingMetrics
    from mloop.ui.live import live_traffic

    m = ServingMetrics()
    for status, n in (("200", 16), ("500", 2), ("422", 2)):
        m.requests.labels("predict", status, "1").inc(n)
    for seconds in [0.003] * 10 + [0.015] * 9 + [0.3]:  # buckets (2,5] (10,20] (200,500] ms
        m.latency.labels("predict").observe(seconds)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    live = live_traffic([*m.requests.collect(), *m.latency.collect()],
                        since=now - timedelta(seconds=40), now=now)
    assert (live.requests, live.server_errors, live.client_errors) == (20, 2, 2)
    assert live.error_rate == 0.1 and live.per_second == 0.5
    # Prometheus's histogram_quantile: rank 10 of 20 ends the (2, 5] ms bucket; rank 19.8
    # falls 0.8 of the way into the (200, 500] ms bucket, which holds one observation
    assert live.p50_ms == pytest.approx(5.0)
    assert live.p99_ms == pytest.approx(200 + 300 * 0.8)


def test_overview_inside_serve_ui_shows_the_servers_own_request_counters(
        project_copy: Path, browser: Any) -> None:
    import pyarrow.parquet as pq

    from mloop.ui.mount import build_app_with_ui

    from .serving_util import FAST

    project = open_project(project_copy)
    cfg = project.config.serving.model_copy(update=FAST)
    with ServerThread(build_app_with_ui(project, cfg, auth=False)) as srv:
        inputs = [c["name"] for c in srv.get("/model").json()["champion"]["signature"]]
        row = pq.read_table(project_copy / project.config.data.path).slice(0, 1).to_pylist()[0]
        record = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()
                  if k in inputs}
        for _ in range(3):
            assert srv.post("/predict", {"records": [record]}).status_code == 200
        assert srv.post("/predict", {"records": "not a list"}).status_code in (400, 422)
        browser.get(f"{srv.url}/ui/")
        assert _severe(browser) == [], _severe(browser)
        assert _text(browser, "#live-rate").startswith("requests: 4 (")
        assert _text(browser, "#live-errors").startswith(
            "error rate (5xx): 0.00% (0 errors, 1 refused 4xx)")
        assert re.fullmatch(r"HTTP latency p50 / p99: [\d.e+-]+ / [\d.e+-]+ ms",
                            _text(browser, "#live-latency"))


def test_window_page_draws_reference_and_window_bars_for_every_feature(
        demo: Path, browser: Any, tmp_path: Path) -> None:
    project = open_project(demo)
    w = _newest_window(project)
    columns = w["report"]["drift"]["columns"]
    pred = w["report"]["prediction_drift"]["columns"][0]
    bins = sum(len(c["labels"]) for c in columns) + len(pred["labels"])
    with ServerThread(create_ui_app(project)) as srv:
        # the heatmap links each cell to its window's page, at the feature
        browser.get(f"{srv.url}/monitoring")
        links = [a.get_dom_attribute("href") for a in browser.find_elements(
            "css selector", "svg.heatmap a")]
        link = f"/monitoring/windows/{w['id']}#f-{columns[0]['column']}"
        assert link in links
        browser.get(srv.url + link)
        assert _severe(browser) == [], _severe(browser)
        _screenshot(browser, "window", tmp_path)

        def count(selector: str) -> int:
            return len(browser.find_elements("css selector", selector))

        assert count("svg.dist .mark.ref") == bins
        assert count("svg.dist .mark.cur") == bins
        assert count("#distributions svg.dist") == len(columns)
        assert count("#distributions .mark.cur.drifted") == sum(
            len(c["labels"]) for c in columns if c["drifted"])
        assert count(f"#f-{columns[0]['column']} svg.dist") == 1
        assert count("#prediction svg.dist") == 1
        assert count("#quality tr.finding") == len(w["report"]["quality"])
        # a bar's title gives its share: the stored one
        first = browser.find_element("css selector", "#distributions .mark.cur title")
        assert first.get_attribute("textContent") == (
            f"{columns[0]['labels'][0]}: {columns[0]['window_hist'][0]:.1%} of this window")


def test_window_page_of_a_window_evaluated_before_histograms_says_they_were_not_recorded(
        project_copy: Path) -> None:

    from mloop.store.models import MonitorWindowRow

    project = open_project(project_copy)
    w = _newest_window(project)
    with project.store.session() as s:
        row = s.get(MonitorWindowRow, w["id"])
        report = {k: v for k, v in row.report.items() if k != "traffic"}
        report["drift"] = {**report["drift"], "columns": [
            {k: v for k, v in c.items() if k != "window_hist"}
            for c in report["drift"]["columns"]]}
        row.report = report
        s.commit()
    with ServerThread(create_ui_app(project)) as srv:
        page = requests.get(f"{srv.url}/monitoring/windows/{w['id']}", timeout=30)
        overview = requests.get(f"{srv.url}/", timeout=30).text
    assert page.status_code == 200, page.text[-2000:]
    assert page.text.count("Histograms not recorded for this window.") == len(
        report["drift"]["columns"])
    assert "class='mark ref'" not in page.text.split('id="prediction"')[0]
    assert "scoring latency p50 / p99: <span class=\"muted\">not recorded for this window" \
        in overview
    # without the recorded requests, the rate is the window's rows per hour, and says so
    assert f"rows/hour <span class=\"muted\">({w['rows']:,} rows in " in overview


@pytest.mark.parametrize("window_id, message", [
    ("987654", "no monitored window 987654 for &#39;bike-sharing&#39;"),
    ("last", "no monitored window &#39;last&#39;: a window id is a whole number"),
])
def test_an_unknown_window_is_a_404_naming_it(demo: Path, window_id: str, message: str) -> None:
    with ServerThread(create_ui_app(open_project(demo))) as srv:
        r = requests.get(f"{srv.url}/monitoring/windows/{window_id}", timeout=30)
    assert r.status_code == 404
    assert message in r.text
