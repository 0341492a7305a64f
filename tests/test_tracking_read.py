"""The direct reader of MLflow's SQL schema answers exactly what MlflowClient answers, and
steps aside (to MlflowClient) whenever it cannot be sure: an HTTP server, an unknown schema
revision, MLflow workspaces."""

from __future__ import annotations

import math
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mloop.errors import MloopError
from mloop.project import open_project
from mloop.registry.aliases import mlflow_alias
from mloop.registry.lineage import lineage
from mloop.registry.promotion import alias_drift
from mloop.serving.deploy import desired_state, stop_challenger
from mloop.status import model_versions
from mloop.tracking_read import (
    KNOWN_MLFLOW_REVISIONS,
    ClientTrackingReader,
    SqlTrackingReader,
    mlflow_schema_revision,
    open_reader,
    sql_reader,
)
from mloop.tracking_sql import set_model_alias, set_model_version_tags

from .helpers import SMALL_CONFIG, rentals_frame

MODEL = "rentals"


def _fill(uri: str, artifacts: Path) -> dict[str, Any]:
    """Runs with params, tags and awkward metrics; four versions of MODEL (one deleted), tags
    on them, aliases (one on the deleted version); an empty second model."""
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("rentals", artifact_location=artifacts.as_uri())
    runs = []
    for i in range(3):
        run = client.create_run(exp, run_name=f"train-{i}" if i else None,
                                tags={"mlflow.runName": "from-tag"} if not i else None)
        rid = run.info.run_id
        client.log_batch(rid, params=[Param("model.max_iter", str(30 + i)),
                                      Param("split.holdout", "0.25")],
                         tags=[RunTag("mloop.step", "train"), RunTag("note", "é ü")],
                         metrics=[Metric("mae", 10.0 - i, 1, 0), Metric("mae", 9.0 - i, 2, 1),
                                  Metric("nan_metric", math.nan, 1, 0),
                                  Metric("inf_metric", math.inf, 1, 0)])
        if i < 2:
            client.set_terminated(rid)
        runs.append(rid)
    client.delete_run(runs[2])  # deleted runs are still readable by id
    client.create_registered_model(MODEL)
    client.create_registered_model("other")
    for i, rid in enumerate([runs[0], runs[1], runs[1], runs[0]], start=1):
        mv = client.create_model_version(MODEL, f"{artifacts.as_uri()}/m{i}", run_id=rid,
                                         tags={"mloop.gates": "passed",
                                               "mloop.metric.mae": str(9.5 - i),
                                               "mloop.pipeline_run_id": f"p{i}"},
                                         description=f"version {i}" if i == 2 else None)
        assert int(mv.version) == i
    client.set_model_version_tag(MODEL, "3", "mloop.gates", "failed")
    client.set_registered_model_alias(MODEL, "champion", "2")
    client.set_registered_model_alias(MODEL, "previous", "1")
    client.set_registered_model_alias(MODEL, "challenger", "2")
    client.set_registered_model_alias(MODEL, "stale", "4")
    client.delete_model_version(MODEL, "4")
    return {"runs": runs, "experiment_id": exp}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    """A real MLflow store on SQLite, written by MlflowClient only."""
    root = tmp_path_factory.mktemp("tracking_read")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    facts = _fill(uri, root / "artifacts")
    return {"uri": uri, "root": root, **facts}


def _same(a: Any, b: Any) -> bool:
    """Equality that counts NaN equal to NaN (a metric logged as NaN reads back as NaN)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__") and type(a) is type(b):
        return all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def _readers(uri: str) -> tuple[SqlTrackingReader, ClientTrackingReader]:
    direct = sql_reader(uri)
    assert direct is not None
    return direct, ClientTrackingReader(lambda: MlflowClient(uri, uri))


def test_the_installed_mlflow_writes_a_schema_revision_the_direct_reader_knows(store) -> None:
    direct = sql_reader(store["uri"])
    assert isinstance(direct, SqlTrackingReader)
    assert mlflow_schema_revision(direct.registry) in KNOWN_MLFLOW_REVISIONS


def test_direct_reader_lists_the_versions_mlflow_client_lists(store) -> None:
    direct, client = _readers(store["uri"])
    got = direct.model_versions(MODEL)
    assert [v.version for v in got] == [3, 2, 1]  # newest first, the deleted one left out
    assert got == client.model_versions(MODEL)
    assert got[1].aliases == ("challenger", "champion")
    assert got[1].description == "version 2" and got[0].tags["mloop.gates"] == "failed"
    assert got[2].metrics == {"mae": 8.5}
    # the direct reader also says where each version's files are, so loading a version needs
    # no registry client to resolve ``models:/``
    for v in got:
        assert v.storage_location and v.storage_location.startswith("file:"), v
        assert client.model_version(MODEL, v.version).storage_location is None
    assert direct.model_versions(MODEL, limit=2) == client.model_versions(MODEL, limit=2)
    assert direct.model_versions("other") == client.model_versions("other") == []
    assert direct.model_versions("no-such-model") == client.model_versions("no-such-model") == []


@pytest.mark.parametrize("version", [1, 2, 3, 4, 99])
def test_direct_reader_gets_one_version_as_mlflow_client_does(store, version: int) -> None:
    direct, client = _readers(store["uri"])
    assert direct.model_version(MODEL, version) == client.model_version(MODEL, version)
    assert (direct.model_version(MODEL, version) is None) == (version in (4, 99))


@pytest.mark.parametrize("alias", ["champion", "challenger", "previous", "stale", "nothing"])
def test_direct_reader_resolves_aliases_as_mlflow_client_does(store, alias: str) -> None:
    direct, client = _readers(store["uri"])
    assert direct.alias(MODEL, alias) == client.alias(MODEL, alias)
    assert direct.aliases(MODEL) == client.aliases(MODEL)
    assert direct.alias("no-such-model", alias) is client.alias("no-such-model", alias) is None


def test_direct_reader_reads_runs_as_mlflow_client_does(store) -> None:
    direct, client = _readers(store["uri"])
    for run_id in store["runs"]:
        got = direct.run(run_id)
        assert got is not None and _same(got, client.run(run_id))
    first = direct.run(store["runs"][0])
    assert first is not None
    assert first.run_name == "from-tag" and first.params["model.max_iter"] == "30"
    assert first.metrics["mae"] == 9.0 and math.isnan(first.metrics["nan_metric"])
    assert first.tags["note"] == "é ü" and first.status == "FINISHED"
    deleted = direct.run(store["runs"][2])
    assert deleted is not None and deleted.lifecycle_stage == "deleted"
    assert direct.run("0" * 32) is client.run("0" * 32) is None


def test_an_mlflow_schema_revision_it_does_not_know_falls_back_to_mlflow_client(
        store, tmp_path: Path) -> None:
    copy = tmp_path / "mlflow.db"
    shutil.copy(Path(store["uri"][len("sqlite:///"):]), copy)
    with sqlite3.connect(copy) as conn:
        conn.execute("update alembic_version set version_num = 'f0000000000f'")
    uri = f"sqlite:///{copy}"
    assert sql_reader(uri) is None
    reader = open_reader(uri, uri, lambda: MlflowClient(uri, uri))
    assert isinstance(reader, ClientTrackingReader) and reader.kind == "client"


def test_a_database_that_is_not_mlflows_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("create table t (x int)")
    assert sql_reader(f"sqlite:///{path}") is None
    assert sql_reader(f"sqlite:///{tmp_path / 'missing.db'}") is None
    assert sql_reader("mysql+nosuchdriver://u@127.0.0.1/db") is None  # MLflow will say why
    assert not (tmp_path / "missing.db").exists()  # left for MLflow to create


def test_an_http_tracking_server_gets_the_client_reader_without_connecting() -> None:
    made: list[str] = []
    reader = open_reader("http://127.0.0.1:9", None, lambda: made.append("client"))  # type: ignore[arg-type,func-returns-value]
    assert reader.kind == "client" and made == []


def test_mlflow_workspaces_switched_on_fall_back(store, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_ENABLE_WORKSPACES", "true")
    assert sql_reader(store["uri"]) is None
    monkeypatch.delenv("MLFLOW_ENABLE_WORKSPACES")
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    assert sql_reader(store["uri"]) is None


# ------------------------------------------------------------------ the services on top

@pytest.fixture(scope="module")
def project_root(tmp_path_factory) -> Path:
    """An mloop project whose MLflow store holds the versions above (no training needed)."""
    root = tmp_path_factory.mktemp("tracking_read_project") / "rentals"
    (root / "data").mkdir(parents=True)
    (root / "mloop.yaml").write_text(textwrap.dedent(SMALL_CONFIG))
    rentals_frame(50).to_parquet(root / "data" / "rentals.parquet", index=False)
    (root / ".mloop").mkdir()
    _fill(f"sqlite:///{root / '.mloop' / 'mlflow.db'}", root / ".mloop" / "artifacts")
    return root


def _through_client(root: Path) -> Any:
    """The project with MlflowClient as its reader (built here: ``project.mlflow`` would also
    point MLflow's process-wide registry URI at this project, for every later test)."""
    project = open_project(root)
    uris = project.uris
    project.__dict__["tracking"] = ClientTrackingReader(
        lambda: MlflowClient(uris["tracking_uri"], uris["registry_uri"]))
    return project


def test_read_services_answer_the_same_through_either_reader(project_root: Path) -> None:
    direct, client = open_project(project_root), _through_client(project_root)
    assert direct.tracking.kind == "sql"
    assert model_versions(direct, limit=10) == model_versions(client, limit=10)
    assert [m["aliases"] for m in model_versions(direct)] == [[], ["challenger", "champion"],
                                                               ["previous"]]
    assert lineage(direct, 2) == lineage(client, 2)
    assert desired_state(direct) == desired_state(client)
    assert alias_drift(direct) == alias_drift(client)
    assert [mlflow_alias(direct, a) for a in ("champion", "challenger", "stale")] == [2, 2, None]


def test_read_services_do_not_import_mlflow_on_a_known_sql_store(project_root: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from mloop.project import open_project
        from mloop.registry.lineage import lineage
        from mloop.registry.promotion import history
        from mloop.serving.deploy import desired_state
        from mloop.status import project_status
        project = open_project({str(project_root)!r})
        project_status(project); history(project); desired_state(project); lineage(project, 1)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "mlflow"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ aliases written directly

def _alias_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("select * from registered_model_aliases").fetchall())


def test_an_alias_written_directly_is_the_row_mlflow_client_writes(store, tmp_path) -> None:
    src = Path(store["uri"][len("sqlite:///"):])
    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    direct = sql_reader(f"sqlite:///{ours}")
    assert direct is not None
    set_model_alias(direct.registry, MODEL, "champion", 3)
    set_model_alias(direct.registry, MODEL, "challenger", None)
    set_model_alias(direct.registry, MODEL, "canary-2", 1)
    client = MlflowClient(f"sqlite:///{theirs}", f"sqlite:///{theirs}")
    client.set_registered_model_alias(MODEL, "champion", "3")
    client.delete_registered_model_alias(MODEL, "challenger")
    client.set_registered_model_alias(MODEL, "canary-2", "1")
    assert _alias_rows(ours) == _alias_rows(theirs)
    read_back = MlflowClient(f"sqlite:///{ours}", f"sqlite:///{ours}")
    assert read_back.get_model_version_by_alias(MODEL, "champion").version == 3
    assert read_back.get_model_version(MODEL, "3").aliases == ["champion"]


def _version_tag_rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return sorted(conn.execute("select * from model_version_tags").fetchall())


def test_version_tags_written_directly_are_the_rows_mlflow_client_writes(store,
                                                                          tmp_path) -> None:
    """Gate results are tagged on the version this way (no MlflowClient opened)."""
    src = Path(store["uri"][len("sqlite:///"):])
    ours, theirs = tmp_path / "ours.db", tmp_path / "theirs.db"
    shutil.copy(src, ours)
    shutil.copy(src, theirs)
    direct = sql_reader(f"sqlite:///{ours}")
    assert direct is not None
    tags = {"mloop.gates": "passed", "mloop.gate.size": "pass value=2.2 threshold=50"}
    set_model_version_tags(direct.registry, MODEL, 3, tags)  # mloop.gates replaces "failed"
    client = MlflowClient(f"sqlite:///{theirs}", f"sqlite:///{theirs}")
    for key, value in tags.items():
        client.set_model_version_tag(MODEL, "3", key, value)
    assert _version_tag_rows(ours) == _version_tag_rows(theirs)
    read_back = MlflowClient(f"sqlite:///{ours}", f"sqlite:///{ours}")
    assert read_back.get_model_version(MODEL, "3").tags["mloop.gates"] == "passed"
    with pytest.raises(MloopError, match="model 'rentals' has no version 4 in MLflow"):
        set_model_version_tags(direct.registry, MODEL, 4, tags)  # deleted
    assert _version_tag_rows(ours) == _version_tag_rows(theirs)


@pytest.mark.parametrize(("alias", "version", "message"), [
    ("champion", 4, "model 'rentals' has no version 4 in MLflow"),  # deleted
    ("champion", 99, "model 'rentals' has no version 99 in MLflow"),
    ("latest", 1, "'latest' is not an alias MLflow accepts"),
    ("v3", 1, "'v3' is not an alias MLflow accepts"),
    ("two words", 1, "'two words' is not an alias MLflow accepts"),
])
def test_a_direct_alias_write_refuses_what_mlflow_refuses_and_changes_nothing(
        store, tmp_path, alias: str, version: int, message: str) -> None:
    path = tmp_path / "mlflow.db"
    shutil.copy(Path(store["uri"][len("sqlite:///"):]), path)
    before = _alias_rows(path)
    direct = sql_reader(f"sqlite:///{path}")
    assert direct is not None
    with pytest.raises(MloopError, match=re.escape(message)):
        set_model_alias(direct.registry, MODEL, alias, version)
    assert _alias_rows(path) == before


def test_a_challenger_moves_without_importing_mlflow_and_mlflow_client_sees_it(
        project_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "rentals"
    shutil.copytree(project_root, root)
    code = textwrap.dedent(f"""
        import sys
        from mloop.project import open_project
        from mloop.serving.deploy import deploy_challenger, desired_state
        project = open_project({str(root)!r})
        deploy_challenger(project, 1, mode="canary", weight=0.2, reason="try v1")
        print(desired_state(project).to_dict())
        print(sorted(m for m in sys.modules if m.split(".")[0] == "mlflow"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["{'champion': 2, 'challenger': 1, 'mode': 'canary', 'weight': 0.2}", "[]"]
    uri = f"sqlite:///{root / '.mloop' / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    assert client.get_model_version_by_alias(MODEL, "challenger").version == 1
    stop_challenger(open_project(root), reason="done")
    assert "challenger" not in client.get_registered_model(MODEL).aliases


@pytest.mark.postgres
@pytest.mark.slow
def test_direct_reader_and_alias_writer_agree_with_mlflow_client_on_postgres(
        pg_url: str, tmp_path: Path) -> None:
    facts = _fill(pg_url, tmp_path / "artifacts")
    direct, client = _readers(pg_url)
    assert direct.model_versions(MODEL) == client.model_versions(MODEL)
    assert [direct.alias(MODEL, a) for a in ("champion", "stale")] == [
        client.alias(MODEL, a) for a in ("champion", "stale")] == [2, None]
    assert all(_same(direct.run(r), client.run(r)) for r in facts["runs"])
    set_model_alias(direct.registry, MODEL, "champion", 3)
    assert MlflowClient(pg_url, pg_url).get_model_version_by_alias(MODEL, "champion").version == 3
    direct.close()
