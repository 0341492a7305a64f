"""``mloop doctor``: is every store and engine the project is configured with reachable and
compatible? One check per line, each naming its (password-masked) URI and what is wrong.

Checks are cheap and change nothing: no database is created or migrated; object stores get
one probe object under ``.mloop-doctor/`` that is read back and deleted (a missing local store
folder is created, as the first run would create it). mlflow itself is
not imported (a second); MLflow servers are asked over HTTP, MLflow databases over SQL.
Optional extras are looked up, and those with native libraries (onnxruntime, onnx) imported
(importing skl2onnx would take seconds).

Statuses: ``ok``; ``warn`` (works, but look: a store that opening will migrate, an optional
extra the configuration would use); ``fail`` (something will not work). Any fail: exit 1.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import sqlite3
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mloop.extras import EXTRAS, extra_for_module, install_hint, missing_extra_message
from mloop.tracking import redact

if TYPE_CHECKING:
    from mloop.project import Project

Status = Literal["ok", "warn", "fail"]
PROBE_PREFIX = ".mloop-doctor"
TIMEOUT = 5.0
# the addresses a server listens on every interface with: probed on loopback (a comparison,
# never a bind)
_ALL_IPV4 = "0.0.0.0"  # nosec B104
_ANY_HOST = (_ALL_IPV4, "", "::")

# SQLAlchemy's PostgreSQL drivers: URL driver name -> importable module, distribution
_PG_DRIVERS = {"psycopg": ("psycopg", "psycopg"), "psycopg2": ("psycopg2", "psycopg2-binary"),
               "pg8000": ("pg8000", "pg8000"), "asyncpg": ("asyncpg", "asyncpg")}

# imported for real (a native library that may not load); the others are only looked up:
# importing skl2onnx registers every converter and takes seconds
_IMPORT = {"onnxruntime", "onnx"}


@dataclass
class Check:
    check: str  # tracking, registry, artifacts, store, data_uri, ..., driver, serving, extra
    target: str  # what was checked: a masked URI, host:port, an extra's name
    status: Status
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Fail(Exception):
    pass


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _is_sql(uri: str) -> bool:
    return bool(re.match(r"^(sqlite|postgresql|mysql|mssql|oracle)(\+\w+)?://", uri))


def _client_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_version(module: str) -> str | None:
    """The version of the distribution that installed ``module``: its own name, or another
    (the xgboost extra installs the module ``xgboost`` from the distribution xgboost-cpu)."""
    version = _client_version(module)
    if version is None:
        dists = importlib.metadata.packages_distributions().get(module, [])
        version = next((v for v in map(_client_version, dists) if v), None)
    return version


def _mlflow_version() -> str:
    return _client_version("mlflow") or _client_version("mlflow-skinny") or "unknown"


def _mm(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


# ------------------------------------------------------------------------------ HTTP

def _http(method: str, url: str, data: bytes | None = None, timeout: float = TIMEOUT,
          context: ssl.SSLContext | None = None, *, credentials: bool = True
          ) -> tuple[int, bytes]:
    """One request, with MLflow's client credentials (if set) unless ``credentials`` is
    False; (status, body). Only http(s) URLs are opened (urllib would also read ``file:``).
    Network errors raise _Fail with a short reason."""
    if not url.startswith(("http://", "https://")):
        raise _Fail(f"not an http(s) URL: {url}")
    headers = {}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get(
        "MLFLOW_TRACKING_PASSWORD")
    if credentials and token:
        headers["Authorization"] = f"Bearer {token}"
    elif credentials and user and pw:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        # the scheme is checked above (bandit cannot see it)
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:  # nosec B310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Fail(f"unreachable: {reason}") from None


def _check_mlflow_server(uri: str) -> tuple[Status, str]:
    base = uri.rstrip("/")
    code, body = _http("GET", f"{base}/health")
    if code == 401 or code == 403:
        return "fail", (f"/health answered {code}: set MLFLOW_TRACKING_TOKEN or "
                        f"MLFLOW_TRACKING_USERNAME/PASSWORD")
    if code != 200:
        return "fail", f"/health answered {code}: not an MLflow server?"
    code, body = _http("GET", f"{base}/version")
    client = _mlflow_version()
    if code != 200:
        return "warn", f"healthy; /version answered {code}, so compatibility is unknown " \
                       f"(client {client})"
    server = body.decode(errors="replace").strip()
    if not re.match(r"^\d+\.\d+", server):
        return "warn", f"healthy; unexpected /version {server[:40]!r} (client {client})"
    if _mm(server)[:1] != _mm(client)[:1]:
        return "fail", f"MLflow server {server}, client {client}: different major versions"
    if _mm(server) != _mm(client):
        return "warn", f"MLflow server {server}, client {client}: minor versions differ"
    return "ok", f"MLflow server {server} (client {client})"


# ------------------------------------------------------------------------------ SQL

def _sqlite_path(uri: str) -> Path | None:
    rest = uri.split("://", 1)[1]
    if rest in ("", "/", "/:memory:") or ":memory:" in rest:
        return None
    return Path(rest[1:] if rest.startswith("/") else rest)


def _missing_sqlite(path: Path) -> tuple[Status, str]:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.is_dir() and os.access(parent, os.W_OK):
        return "ok", "not created yet (created on first use)"
    return "fail", f"does not exist and cannot be created under {parent}"


def _sql_revision(uri: str) -> tuple[str | None, bool]:
    """(alembic revision or None, whether the database has any table). Raises _Fail."""
    if uri.startswith("sqlite"):
        path = _sqlite_path(uri)
        if path is None:
            return None, False
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=TIMEOUT)
            try:
                tables = {r[0] for r in db.execute(
                    "select name from sqlite_master where type = 'table'")}
                rev = (db.execute("select version_num from alembic_version").fetchone()
                       if "alembic_version" in tables else None)
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            raise _Fail(f"cannot be read as SQLite: {exc}") from None
        return (rev[0] if rev else None), bool(tables)
    import sqlalchemy as sa

    args: dict[str, Any] = {}
    if uri.startswith("postgresql"):
        args["connect_timeout"] = int(TIMEOUT)
    try:
        engine = sa.create_engine(uri, connect_args=args, poolclass=sa.pool.NullPool)
    except ModuleNotFoundError as exc:
        raise _Fail(f"driver '{exc.name}' is not installed") from None
    except Exception as exc:  # bad URL
        raise _Fail(f"bad URL: {exc}") from None
    try:
        with engine.connect() as conn:
            names = set(sa.inspect(conn).get_table_names())
            rev = (conn.execute(sa.text("select version_num from alembic_version")).scalar()
                   if "alembic_version" in names else None)
    except Exception as exc:  # connection refused, auth, missing database: driver-specific
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0:1]
        raise _Fail(f"cannot connect: {first[0] if first else type(exc).__name__}") from None
    finally:
        engine.dispose()
    return rev, bool(names)


def _mlflow_schema_head() -> tuple[str | None, set[str]]:
    """MLflow's newest tracking-schema revision and all known ones, from its migration files
    (read as text: importing them imports mlflow)."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return None, set()
    versions = Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations" \
        / "versions"
    revs, downs = set(), set()
    for f in versions.glob("*.py"):
        text = f.read_text(encoding="utf-8", errors="replace")
        if m := re.search(r'^revision\s*=\s*["\'](\w+)["\']', text, re.M):
            revs.add(m.group(1))
        if m := re.search(r'^down_revision\s*=\s*["\'](\w+)["\']', text, re.M):
            downs.add(m.group(1))
    heads = revs - downs
    return (heads.pop() if len(heads) == 1 else None), revs


def _check_mlflow_db(uri: str) -> tuple[Status, str]:
    if uri.startswith("sqlite"):
        path = _sqlite_path(uri)
        if path is not None and not path.exists():
            return _missing_sqlite(path)
    rev, has_tables = _sql_revision(uri)
    if rev is None:
        if has_tables:
            return "fail", "has tables but no MLflow schema (alembic_version missing)"
        return "ok", "empty (MLflow creates its tables on first use)"
    head, known = _mlflow_schema_head()
    client = _mlflow_version()
    if head is None or rev == head:
        return "ok", f"MLflow schema {rev} (client {client})"
    if rev in known:
        return "fail", (f"MLflow schema {rev} is behind this client's {head} (MLflow {client}): "
                        f"back it up, then run `mlflow db upgrade <uri>`")
    return "fail", f"MLflow schema {rev} is newer than this client (MLflow {client}): " \
                   f"upgrade mlflow"


def _check_tracking(uri: str) -> tuple[Status, str]:
    if _is_http(uri):
        return _check_mlflow_server(uri)
    if _is_sql(uri):
        return _check_mlflow_db(uri)
    if uri.startswith("file://") or "://" not in uri:
        path = Path(uri.removeprefix("file://"))
        return _local_writable(path, "MLflow file store")
    return "warn", f"scheme '{uri.split(':', 1)[0]}' is not checked"


def _local_writable(path: Path, what: str) -> tuple[Status, str]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return "fail", f"{what}: {probe} is not a folder"
    if not os.access(probe, os.W_OK):
        return "fail", f"{what}: {probe} is not writable"
    return "ok", f"{what}: {'writable' if probe == path else 'created on first use'}"


# ------------------------------------------------------------------------------ stores

def _probe_object_store(uri: str) -> tuple[Status, str]:
    """Write, read back and delete one small object under .mloop-doctor/."""
    from mloop.storage import ObjectStore, s3_settings

    where = ""
    if uri.startswith("s3://"):
        cfg = s3_settings()
        where = f" (endpoint {cfg['endpoint']} from {cfg['from']})" if cfg["endpoint"] else \
            " (AWS)"
    rel = f"{PROBE_PREFIX}/probe-{uuid.uuid4().hex}"
    payload = f"mloop doctor {uuid.uuid4().hex}".encode()
    try:
        store = ObjectStore(uri)
        store.write_bytes(rel, payload)
        try:
            if store.read_bytes(rel) != payload:
                return "fail", f"read back something else than was written{where}"
        finally:
            store.delete(rel)
            # locally the folder; on S3 the marker pyarrow leaves when a folder's last key goes
            with contextlib.suppress(OSError):
                store.fs.delete_dir(store.path(PROBE_PREFIX))
    except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ValueError...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return "fail", f"write/read/delete failed{where}: {msg}"
    return "ok", f"write, read, delete ok{where}"


def _check_mloop_store(uri: str) -> tuple[Status, str]:
    from mloop.store.db import HEAD_REVISION, MIGRATIONS

    if uri.startswith("sqlite"):
        path = _sqlite_path(uri)
        if path is not None and not path.exists():
            status, detail = _missing_sqlite(path)
            return status, detail.replace("first use", "first use, migrated to "
                                          f"{HEAD_REVISION}")
    rev, has_tables = _sql_revision(uri)
    known = {f.name.split("_", 1)[0] for f in (MIGRATIONS / "versions").glob("[0-9]*_*.py")}
    if rev == HEAD_REVISION:
        return "ok", f"schema {rev} (head)"
    if rev is None:
        if has_tables:
            return "fail", "has tables but no mloop schema (alembic_version missing): " \
                           "another application's database?"
        return "warn", f"empty: run `mloop db upgrade` (head {HEAD_REVISION}; any command " \
                       f"that opens it migrates it)"
    if rev in known:
        return "warn", f"behind: schema {rev}, head {HEAD_REVISION}: run `mloop db upgrade`"
    return "fail", f"schema {rev} is newer than this mloop (head {HEAD_REVISION}): " \
                   f"upgrade mloop"


def _experiment_artifact_location(project: Project) -> str | None:
    """The artifact location of the project's experiment if it exists already (what runs
    use), asked without importing mlflow; None when unknown or not created yet."""
    uri = project.uris["tracking_uri"]
    try:
        if _is_http(uri):
            q = urllib.parse.urlencode({"experiment_name": project.name})
            code, body = _http("GET", f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/"
                                      f"get-by-name?{q}")
            if code == 200:
                return json.loads(body)["experiment"].get("artifact_location")
            return None
        if _is_sql(uri):
            if uri.startswith("sqlite"):
                path = _sqlite_path(uri)
                if path is None or not path.exists():
                    return None
            import sqlalchemy as sa

            engine = sa.create_engine(uri, poolclass=sa.pool.NullPool)
            try:
                with engine.connect() as conn:
                    if not sa.inspect(conn).has_table("experiments"):
                        return None
                    return conn.execute(sa.text(
                        "select artifact_location from experiments where name = :n"),
                        {"n": project.name}).scalar()
            finally:
                engine.dispose()
    except Exception:  # the tracking line reports what is wrong with the tracking store
        return None
    return None


def _probe_mlflow_proxy(uri: str) -> tuple[Status, str]:
    base = f"{uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{PROBE_PREFIX}/" \
           f"probe-{uuid.uuid4().hex}"
    payload = f"mloop doctor {uuid.uuid4().hex}".encode()
    code, body = _http("PUT", base, payload)
    if code in (404, 503) or (code == 400 and b"serve" in body.lower()):
        return "warn", ("the server does not proxy artifacts (--no-serve-artifacts): clients "
                        "write to its default artifact root themselves (not checked)")
    if code != 200:
        return "fail", f"upload through the server failed ({code}): " \
                       f"{body.decode(errors='replace')[:200]}"
    try:
        code, got = _http("GET", base)
        if code != 200 or got != payload:
            return "fail", f"download through the server failed ({code})"
    finally:
        _http("DELETE", base)
    return "ok", "proxied by the tracking server: upload, download, delete ok"


def _check_artifacts(project: Project) -> tuple[str, Status, str]:
    tracking = project.uris["tracking_uri"]
    existing = _experiment_artifact_location(project)
    location = existing or project.artifact_location
    origin = f"experiment '{project.name}'" if existing else "new experiments"
    if location is None or location.startswith("mlflow-artifacts:"):
        shown = location or f"{tracking.rstrip('/')} (server default)"
        if not _is_http(tracking):
            return shown, "warn", f"{origin}: mlflow-artifacts without a server"
        try:
            status, detail = _probe_mlflow_proxy(tracking)
        except _Fail as exc:
            status, detail = "fail", str(exc)
        return shown, status, f"{origin}: {detail}"
    if location.startswith(("file://", "s3://")) or "://" not in location:
        if location.startswith("file://"):  # Path.as_uri() quotes spaces and such
            status, detail = _probe_object_store(urllib.parse.unquote(location[7:]))
        else:
            status, detail = _probe_object_store(location)
        return location, status, f"{origin}: {detail}"
    return location, "warn", f"{origin}: scheme '{location.split(':', 1)[0]}' is not checked"


# ------------------------------------------------------------------------------ the rest

def _pg_driver_checks(uris: dict[str, str]) -> list[Check]:
    out: list[Check] = []
    seen: set[str] = set()
    for key in ("tracking_uri", "registry_uri", "store_uri"):
        uri = uris.get(key, "")
        m = re.match(r"^postgresql(?:\+(\w+))?://", uri)
        if not m:
            continue
        driver = m.group(1) or "psycopg2"  # SQLAlchemy's default for postgresql://
        if driver in seen:
            continue
        seen.add(driver)
        module, dist = _PG_DRIVERS.get(driver, (driver, driver))
        try:
            importlib.import_module(module)
        except ImportError as exc:
            detail = (missing_extra_message("postgres") if driver == "psycopg" else
                      f"postgresql+{driver}:// needs {dist}: pip install {dist}, or "
                      f"{install_hint('postgres')} and write postgresql+psycopg://")
            out.append(Check("driver", f"postgresql+{driver}", "fail",
                             f"{detail} ({module} is not importable: {exc})"))
            continue
        version = _client_version(dist) or _client_version(module) or "?"
        out.append(Check("driver", f"postgresql+{driver}", "ok", f"{module} {version}"))
    return out


def _check_serving(project: Project) -> Check:
    cfg = project.config.serving
    host, port = cfg.host, cfg.port
    target = f"{host}:{port}"
    if port == 0:
        return Check("serving", target, "ok", "port 0: any free port")
    probe_host = "127.0.0.1" if host in _ANY_HOST else host
    try:
        with socket.create_connection((probe_host, port), timeout=1.0):
            listening = True
    except OSError:
        listening = False
    if listening:
        scheme = "https" if cfg.tls_cert else "http"
        try:
            # our own server, maybe with a self-signed certificate: a liveness probe that
            # reads only /health and sends no credentials, so an unverified TLS peer learns
            # nothing and can only make the check say "not mloop serve"
            unverified = ssl._create_unverified_context()  # nosec B323
            code, body = _http("GET", f"{scheme}://{probe_host}:{port}/health", timeout=2.0,
                               context=unverified if cfg.tls_cert else None,
                               credentials=False)
            alive = code == 200 and json.loads(body).get("status") == "alive"
        except (_Fail, ValueError, AttributeError):
            alive = False
        if alive:
            return Check("serving", target, "ok", "in use by a server answering /health "
                                                  "(mloop serve)")
        return Check("serving", target, "fail", "port in use by something that is not "
                                                "mloop serve (no /health): pick serving.port")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        return Check("serving", target, "fail", f"cannot bind: {exc.strerror or exc}")
    return Check("serving", target, "ok", "free")


def _check_extras(project: Project) -> list[Check]:
    cfg = project.config
    # the extras this configuration uses, and what in it uses them
    wanted = {
        "fast": ("serving.compile.enabled (the ONNX fast path)" if cfg.serving.compile.enabled
                 else None),
        "tune": "the tune: section (`mloop tune`)" if cfg.tune is not None else None,
        "kubeflow": ("the kubeflow: section (`mloop export kubeflow`)"
                     if "kubeflow" in cfg.model_fields_set else None),
        "spark": ("the spark: section (`mloop predict --engine spark`)"
                  if "spark" in cfg.model_fields_set else None),
    }
    # a model named by an import path whose package an extra installs (lightgbm., xgboost.)
    estimator = cfg.model.estimator or ""
    for name in ("lightgbm", "xgboost"):
        wanted[name] = (f"model.estimator ({estimator})"
                        if extra_for_module(estimator) == name else None)
    out = []
    for extra in wanted:
        modules = EXTRAS[extra].modules
        versions, missing = [], []
        for module in modules:
            try:
                if module in _IMPORT:
                    importlib.import_module(module)
                elif importlib.util.find_spec(module) is None:
                    raise ModuleNotFoundError(f"No module named '{module}'")
                versions.append(f"{module} {_module_version(module) or '?'}")
            except Exception as exc:  # ImportError, or a broken install raising anything
                missing.append(f"{module} ({type(exc).__name__}: {str(exc)[:80]})")
        why = wanted.get(extra)
        if not missing:
            out.append(Check("extra", extra, "ok", ", ".join(versions)))
        elif why:
            fallback = "; serving runs the original model" if extra == "fast" else ""
            out.append(Check("extra", extra, "warn",
                             f"{missing_extra_message(extra, feature=why)} (not importable: "
                             f"{', '.join(missing)}){fallback}"))
        else:
            names = ", ".join(m.split(" (")[0] for m in missing)
            out.append(Check("extra", extra, "ok", f"not installed (not configured): {names}"))
    return out


def _run(check: str, target: str, fn: Any, *args: Any) -> Check:
    try:
        status, detail = fn(*args)
    except _Fail as exc:
        status, detail = "fail", str(exc)
    except Exception as exc:  # a doctor reports; it does not crash
        status, detail = "fail", f"{type(exc).__name__}: {exc}"
    return Check(check, target, status, detail)


def run_doctor(project: Project) -> list[Check]:
    """Every check, in a stable order: tracking, registry, artifacts, mloop store, object
    stores, drivers, serving, extras."""
    uris = project.uris
    checks = [_run("tracking", uris["tracking_uri"], _check_tracking, uris["tracking_uri"])]
    if uris["registry_uri"] == uris["tracking_uri"]:
        checks.append(Check("registry", uris["registry_uri"], checks[0].status,
                            "same as tracking"))
    else:
        checks.append(_run("registry", uris["registry_uri"], _check_tracking,
                           uris["registry_uri"]))
    try:
        target, status, detail = _check_artifacts(project)
        checks.append(Check("artifacts", target, status, detail))
    except Exception as exc:  # _Fail from the server, or anything unexpected
        detail = str(exc) if isinstance(exc, _Fail) else f"{type(exc).__name__}: {exc}"
        checks.append(Check("artifacts", project.artifact_location or "", "fail", detail))
    checks.append(_run("store", uris["store_uri"], _check_mloop_store, uris["store_uri"]))
    for key in ("data_uri", "outputs_uri", "inference_log_uri"):
        checks.append(_run(key.removesuffix("_uri"), uris[key], _probe_object_store,
                           uris[key]))
    checks += _pg_driver_checks(uris)
    checks.append(_check_serving(project))
    checks += _check_extras(project)
    secrets = project.config.secrets
    for c in checks:
        c.target, c.detail = redact(c.target, secrets), redact(c.detail, secrets)
    return checks


def summary(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not any(c.status == "fail" for c in checks),
            "checks": [c.to_dict() for c in checks]}
