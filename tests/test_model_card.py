"""Model cards (`mloop models card`, mloop.cards) on the bike-sharing example: v1 trained,
gated and promoted by `mloop run`'s service, three weeks of May 2011 served through the
inference log's writer, two of them labelled, monitored in weekly windows; v2 trained and
never gated nor served.

Every number the card shows is compared with the record it comes from, read here another way
(MlflowClient, the store's rows through SQLAlchemy, the snapshot store); what was never
recorded must say so."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from mloop.cli.app import main
from mloop.project import open_project

from .helpers import BIKE, copy_bike

pytestmark = pytest.mark.slow

DESCRIPTION = "Hourly bike rentals of the next day, for staffing the docks."
LIMITATIONS = "Trained on Washington D.C. <2011> weather only; not for other cities & snow."


def _serve(project: Any, frame: pd.DataFrame, version: int) -> list[str]:
    """``frame``'s rows answered by ``version`` at their own hour, written by the writer the
    server uses; returns the request ids."""
    from mloop.serving.model import load_served
    from mloop.traffic.inference_log import InferenceLog, LogEntry, new_request_id

    served = load_served(project, version)
    cols = {c: frame[c].astype(object).where(frame[c].notna(), None).tolist()
            for c in served.schema.names}
    preds = served.predict_columns(cols)
    log = InferenceLog(project.uris["inference_log_uri"], commit_interval=3600)
    ids = []
    for i, when in enumerate(frame["datetime"]):
        ts = pd.Timestamp(when, tz="UTC").timestamp()
        rid = new_request_id(ts)
        ids.append(rid)
        log.append(LogEntry([rid], ts, version, "champion", 2.0, [preds[i]],
                            {c: [v[i]] for c, v in cols.items()}))
    log.close()
    return ids


@pytest.fixture(scope="module")
def bike(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mloop.monitoring.service import run_monitor
    from mloop.registry.training import train_candidate
    from mloop.storage import ObjectStore
    from mloop.traffic.labels import store_labels

    root = copy_bike(tmp_path_factory.mktemp("card") / "bike")
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace(
        "  name: bike-sharing\n",
        f"  name: bike-sharing\n  description: {DESCRIPTION}\n"
        f"  limitations: \"{LIMITATIONS}\"\n"))
    project = open_project(root)
    first = train_candidate(project)
    assert first.version == 1 and first.gating.promotion is not None  # champion now
    data = pd.read_parquet(BIKE / "data" / "bike_hourly.parquet")
    may = data[(data["datetime"] >= "2011-05-01") & (data["datetime"] < "2011-05-27")]
    ids = _serve(project, may, 1)
    labelled = may["datetime"] < "2011-05-15"
    store_labels(ObjectStore(project.uris["inference_log_uri"]),
                 dict(zip([i for i, x in zip(ids, labelled, strict=True) if x],
                          may.loc[labelled, "cnt"].astype(float), strict=True)),
                 task="regression", source="test")
    assert run_monitor(project, window="7d")["evaluated"]
    # a fresh version of the same project: trained, never gated, never served
    assert train_candidate(open_project(root), use_cache=False, gate=False).version == 2
    return root


def _card(root: Path, version: int) -> dict[str, Any]:
    from mloop.cards import build_card

    return build_card(open_project(root), version)


def _md_rows(md: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with ``header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_card_metrics_and_gates_are_the_recorded_ones(bike: Path) -> None:
    from mlflow.tracking import MlflowClient

    from mloop.cards.render import num, render_markdown
    from mloop.store.models import GateResultRow, GateRunRow

    project = open_project(bike)
    card = _card(bike, 1)
    client = MlflowClient(project.uris["tracking_uri"], project.uris["registry_uri"])
    mv = client.get_model_version("bike-sharing", "1")
    parent = client.get_run(mv.tags["mloop.mlflow_parent_run_id"])
    holdout = {k: v for k, v in parent.data.metrics.items() if k.startswith("holdout_")}
    assert card["metrics"] == {"source": "mlflow_run", "run_id": parent.info.run_id,
                               "values": holdout}
    assert set(holdout) == {"holdout_mae", "holdout_rmse", "holdout_r2"}
    # the class the train step fitted, as it recorded it
    assert card["estimator"] == "sklearn.ensemble._hist_gradient_boosting.gradient_boosting." \
        "HistGradientBoostingRegressor"

    with project.store.session() as s:
        run = s.scalars(sa.select(GateRunRow).where(GateRunRow.version == 1)
                        .order_by(GateRunRow.id.desc())).first()
        stored = list(s.scalars(sa.select(GateResultRow).where(
            GateResultRow.gate_run_id == run.id).order_by(GateResultRow.id)))
    assert card["gates"]["passed"] is run.passed is True
    assert [(r["gate"], r["status"], r["value"], r["threshold"]) for r in
            card["gates"]["results"]] == [(r.gate, r.status, r.value, r.threshold)
                                          for r in stored]
    # the slices are the slice gate's stored detail, row for row
    [slice_row] = [r for r in stored if r.gate == "slice.weathersit"]
    [sliced] = card["slices"]
    assert sliced["column"] == "weathersit" and sliced["slices"] == slice_row.detail["slices"]
    assert any(x["status"] == "pass" for x in sliced["slices"])

    md = render_markdown(card)
    assert _md_rows(md, "metric") == [[k, num(v)] for k, v in sorted(holdout.items())]
    assert [row[:4] for row in _md_rows(md, "gate")] == [
        [r.gate, r.status, num(r.value), num(r.threshold)] for r in stored]
    assert _md_rows(md, "slice") == [
        [x["slice"], num(x["rows"]), num(x.get("value")), num(x.get("worse_by")), x["status"]]
        for x in slice_row.detail["slices"]]


def test_card_training_data_is_the_snapshot_and_its_profile(bike: Path) -> None:
    project = open_project(bike)
    card = _card(bike, 1)
    digest = project.tracking.model_version("bike-sharing", 1).tags["mloop.snapshot.train"]
    snap, profile = project.snapshots.get(digest), project.snapshots.profile(digest)
    train = card["training_data"]["train"]
    assert (train["digest"], train["rows"], train["columns"]) == (digest, snap.rows,
                                                                 len(snap.schema))
    stats = profile["columns"]["datetime"]
    assert train["period"] == {"column": "datetime", "min": stats["min"], "max": stats["max"]}
    # the example trains on January to April 2011 (data.until, exclusive)
    assert stats["min"].startswith("2011-01-01") and stats["max"] < "2011-05-01"
    by_name = {c["column"]: c for c in train["profile"]["columns"]}
    assert set(by_name) == set(profile["columns"])
    temp = profile["columns"]["temp"]
    assert {k: by_name["temp"][k] for k in ("mean", "std", "min", "max", "missing_rate")} == {
        k: temp[k] for k in ("mean", "std", "min", "max", "missing_rate")}
    assert by_name["weathersit"]["n_unique"] == profile["columns"]["weathersit"]["n_unique"]
    holdout = project.snapshots.get(card["training_data"]["holdout"]["digest"])
    assert card["training_data"]["holdout"]["rows"] == holdout.rows
    assert card["intended_use"]["description"] == DESCRIPTION
    assert card["intended_use"]["limitations"] == LIMITATIONS


def test_card_serving_history_is_the_deployments_and_the_windows_it_answered(bike: Path
                                                                            ) -> None:
    from mloop.cards.render import num, render_markdown
    from mloop.store.db import as_utc
    from mloop.store.models import DeploymentRow, MonitorWindowRow

    project = open_project(bike)
    card = _card(bike, 1)
    with project.store.session() as s:
        deployments = list(s.scalars(sa.select(DeploymentRow).where(DeploymentRow.version == 1)))
        windows = list(s.scalars(sa.select(MonitorWindowRow).where(MonitorWindowRow.spec == "7d")
                                 .order_by(MonitorWindowRow.start)))
    [dep] = deployments
    assert [(d["alias"], d["action"], d["traffic"], d["ended_at"])
            for d in card["serving"]["deployments"]] == [(dep.alias, dep.action, dep.traffic,
                                                          None)]
    served = card["serving"]["windows"]
    assert len(served) == len(windows) >= 3
    for w, row in zip(served, windows, strict=True):
        assert (w["id"], w["start"], w["rows"], w["drifted"], w["drift_share"],
                w["metric_value"], w["reference_metric"], w["label_coverage"]) == (
            row.id, as_utc(row.start).isoformat(), row.rows, row.drifted, row.drift_share,
            row.metric_value, row.reference_metric, row.label_coverage)
        assert w["shared_with"] == []
        assert w["drifted_features"] == [c["column"] for c in row.report["drift"]["columns"]
                                         if c["drifted"]]
    labelled = [w for w in served if w["metric_value"] is not None]
    assert labelled and len(labelled) < len(served)  # the last week has no labels
    summary = card["serving"]["summary"]
    assert summary["rows"] == sum(r.rows for r in windows)
    assert (summary["metric_min"], summary["metric_max"]) == (
        min(w["metric_value"] for w in labelled), max(w["metric_value"] for w in labelled))

    rows = _md_rows(render_markdown(card), "window")
    assert [(r[0], r[3]) for r in rows] == [(str(w.id), str(w.rows)) for w in windows]
    for r, w in zip(rows, windows, strict=True):
        if w.metric_value is not None:
            assert r[7].startswith(f"mae {num(w.metric_value)} (reference "
                                   f"{num(w.reference_metric)}")
        else:
            assert "mae" not in r[7].split(";")[0]


def test_a_fresh_version_card_says_not_recorded_for_what_never_happened(bike: Path) -> None:
    from mloop.cards.render import render_markdown

    card = _card(bike, 2)
    assert card["gates"] is None and card["slices"] == []
    assert card["serving"]["deployments"] == [] and card["serving"]["windows"] == []
    assert {"gates", "slices", "serving.deployments", "serving.windows"} <= set(
        card["not_recorded"])
    assert card["metrics"]["values"]  # trained and evaluated: those are recorded
    md = render_markdown(card)
    assert "## Gates\n\nnot recorded: never gated." in md
    assert "### Deployments\n\nnot recorded: never deployed." in md
    assert "not recorded: no monitored window holds traffic it answered." in md
    assert "| gate |" not in md and "| window |" not in md


def test_a_version_registered_outside_mloop_has_a_card_that_invents_nothing(
        bike: Path, tmp_path: Path) -> None:
    """A version made with MlflowClient alone (v1's files, no mloop tags): no training data,
    metrics, gates, serving or pipeline run was recorded for it, and the card says so."""
    from mloop.cards.render import render_html, render_markdown

    from .helpers import copy_project

    root = copy_project(bike, tmp_path)
    client = open_project(root).mlflow
    source = client.get_model_version("bike-sharing", "1").source
    assert int(client.create_model_version("bike-sharing", source=source).version) == 3
    card = _card(root, 3)
    assert {"task", "estimator", "training_data.train", "training_data.holdout", "metrics",
            "gates", "serving.deployments", "serving.windows",
            "lineage.pipeline_run"} <= set(card["not_recorded"])
    assert card["metrics"]["values"] is None and card["training_data"]["train"] is None
    md = render_markdown(card)
    assert "## Metrics (holdout)\n\nnot recorded." in md
    assert "- training snapshot: not recorded" in md and "| metric |" not in md
    assert "not recorded" in render_html(card)


class _Cells(HTMLParser):
    """The text of each ``<td>`` of the table with a given id."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.rows = table_id, False, []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", self.table_id) in attrs:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag == "td":
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = False
        elif tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell).strip())
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def test_mloop_models_card_writes_html_and_markdown_and_prints_json(bike: Path,
                                                                    tmp_path: Path,
                                                                    capsys: Any) -> None:
    from mloop.cards.render import num

    html_file, md_file = tmp_path / "card.html", tmp_path / "card.md"
    assert main(["-C", str(bike), "models", "card", "1", "--html", str(html_file),
                 "--md", str(md_file), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1 and printed["not_recorded"] == _card(bike, 1)[
        "not_recorded"]
    page = html_file.read_text()
    # the team's words, escaped: the limitation's "<2011>" is text, not a tag
    assert "&lt;2011&gt;" in page and "<2011>" not in page and DESCRIPTION in page
    cells = _Cells("gates-table")
    cells.feed(page)
    assert [row[:4] for row in cells.rows if row] == [
        [r["gate"], r["status"], num(r["value"]), num(r["threshold"])]
        for r in printed["gates"]["results"]]
    assert md_file.read_text().startswith("# Model card: bike-sharing v1\n")

    assert main(["-C", str(bike), "models", "card", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Model card: bike-sharing v2") and "never gated" in out


@pytest.mark.parametrize(("args", "message"), [
    (["7"], "model 'bike-sharing' has no version 7 (see `mloop models list`)"),
    (["1", "--html", "{tmp}"], "--html {tmp}: is a folder; name the file to write"),
    (["1", "--html", "{tmp}/same", "--md", "{tmp}/same"],
     "--html and --md both name {tmp}/same: give each its own file"),
])
def test_mloop_models_card_refuses_bad_input_and_writes_nothing(bike: Path, tmp_path: Path,
                                                                capsys: Any, args: list[str],
                                                                message: str) -> None:
    before = sorted(tmp_path.iterdir())
    full = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["-C", str(bike), "models", "card", *full, "--md", str(tmp_path / "x.md")]
                if "--md" not in full else ["-C", str(bike), "models", "card", *full]) == 1
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == before


def test_card_text_is_not_part_of_training(tmp_path: Path) -> None:
    """``model.description``/``limitations`` leave the train step's parameters (its cache
    key) and the config hash as they were: editing them retrains nothing. A value that is not
    text is refused naming the file, line and key."""
    from mloop.config import load_config
    from mloop.errors import ConfigError
    from mloop.tabular.pipeline import tabular

    root = copy_bike(tmp_path / "bike")
    plain = load_config(root / "mloop.yaml")
    cfg = root / "mloop.yaml"
    cfg.write_text(cfg.read_text().replace(
        "  name: bike-sharing\n", f"  name: bike-sharing\n  description: {DESCRIPTION}\n"))
    described = load_config(root / "mloop.yaml")
    assert described.model.description == DESCRIPTION
    assert described.config_hash() == plain.config_hash()
    assert [n.params for n in tabular.build(described).order()] == [
        n.params for n in tabular.build(plain).order()]

    cfg.write_text(cfg.read_text().replace(f"description: {DESCRIPTION}",
                                           "description: [a, b]"))
    with pytest.raises(ConfigError, match=r"mloop\.yaml:\d+: 'model\.description': Input "
                                          r"should be a valid string"):
        load_config(root / "mloop.yaml")


@pytest.mark.postgres
def test_card_reads_gates_deployments_and_windows_from_a_postgres_store(
        make_project: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same card with mloop's store on PostgreSQL (where a window's ``versions`` is read
    out of its JSON report by the database): each number is the stored row's."""
    from mloop.monitoring.service import run_monitor
    from mloop.registry.training import train_candidate
    from mloop.store.models import GateResultRow, MonitorWindowRow

    from .helpers import SMALL_CONFIG, log_traffic, rentals_frame

    monkeypatch.setenv("MLOOP_STORE_URI", pg_url)
    root = make_project(SMALL_CONFIG + "gates: {auto_promote: true}\n")
    project = open_project(root)
    assert project.store.url == pg_url
    assert train_candidate(project).gating.promotion is not None
    for day, seed in (("2024-03-01", 1), ("2024-03-02", 2), ("2024-03-03", 3)):
        log_traffic(project, rentals_frame(200, seed=seed), day)
    assert run_monitor(project, window="1d")["evaluated"]

    card = _card(root, 1)
    with project.store.session() as s:
        windows = list(s.scalars(sa.select(MonitorWindowRow).order_by(MonitorWindowRow.start)))
        results = list(s.scalars(sa.select(GateResultRow).order_by(GateResultRow.id)))
    assert [(w["id"], w["rows"], w["drift_share"]) for w in card["serving"]["windows"]] == [
        (w.id, w.rows, w.drift_share) for w in windows if 1 in w.report["versions"]]
    assert len(card["serving"]["windows"]) >= 2
    assert [(r["gate"], r["value"]) for r in card["gates"]["results"]] == [
        (r.gate, r.value) for r in results]
    assert [d["action"] for d in card["serving"]["deployments"]] == ["promote"]
