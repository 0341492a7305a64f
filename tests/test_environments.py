"""Environments: one project, three SQLite environments (dev -> staging -> prod), each with
its own MLflow registry and mloop store. A version trained in dev is carried to staging as a
new version that points back, gated against staging's champion; prod takes it only after it
served in staging for ``promotion.soak`` without a breach and with a recorded approval.

The soak is judged at an injected instant (``now=``, a day after the real promotion into
staging) rather than waited for; the deployment rows it reads are the real ones the
promotion wrote.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from .cluster import BUCKET, Cluster
from .helpers import SMALL_CONFIG, rentals_frame, run_cli

ENVIRONMENTS = """\
gates:
  non_inferiority: {metric: mae, margin: 0.5, resamples: 200}
environments:
  dev: {}
  staging:
    stores:
      tracking_uri: sqlite:///.mloop/staging/mlflow.db
      store_uri: sqlite:///.mloop/staging/mloop.db
      artifact_root: .mloop/staging/artifacts
      data_uri: .mloop/staging/data
    serving: {port: 8101}
  prod:
    stores:
      tracking_uri: sqlite:///.mloop/prod/mlflow.db
      store_uri: sqlite:///.mloop/prod/mloop.db
      artifact_root: .mloop/prod/artifacts
      data_uri: .mloop/prod/data
    serving: {port: 8102}
promotion:
  order: [dev, staging, prod]
  soak: 24h
  approval: {prod: true}
"""
GOOD = "{max_iter: 30, random_state: 0}"
WORSE = "{max_iter: 1, max_depth: 1, random_state: 0}"


def _config(params: str) -> str:
    return SMALL_CONFIG.replace("{max_iter: 30, random_state: 0}", params) + ENVIRONMENTS


def _train(root: Path, params: str) -> int:
    from mloop.pipeline.artifacts import load_output
    from mloop.pipeline.runner import run_pipeline
    from mloop.project import open_project

    (root / "mloop.yaml").write_text(_config(params))
    result = run_pipeline(open_project(root, env="dev"))
    assert result.status == "succeeded"
    reg = next(s for s in result.steps if s.step == "register")
    project = open_project(root, env="dev")
    return int(load_output(reg.outputs["output"], project.outputs,
                           project.snapshots)["version"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dev holds v1 (good) and v2 (much worse); staging and prod are empty."""
    root = tmp_path_factory.mktemp("envs") / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame().to_parquet(root / "data" / "rentals.parquet", index=False)
    assert _train(root, WORSE) == 1
    assert _train(root, GOOD) == 2
    return root


@pytest.fixture
def root(trained: Path, tmp_path: Path) -> Path:
    """A private copy (its own SQLite stores; dev's artifact paths stay the module's)."""
    dst = tmp_path / "proj"
    shutil.copytree(trained, dst)
    return dst


def _env(root: Path, name: str) -> Any:
    from mloop.project import open_project

    return open_project(root, env=name)


def _to(root: Path, target: str, version: int, **kw: Any) -> Any:
    from mloop.registry.env_promotion import promote_to_environment
    from mloop.registry.environments import source_environment

    tgt = _env(root, target)
    src = _env(root, source_environment(tgt, target))
    return promote_to_environment(src, tgt, version, reason=f"to {target}", **kw)


def _events(project: Any, kind: str) -> list[Any]:
    from mloop.security.audit import list_events

    return list_events(project.store, kind=kind, limit=100)


def _versions(project: Any) -> list[int]:
    return sorted(v.version for v in project.tracking.model_versions(
        project.config.model_name))


# ------------------------------------------------------------------ config and --env

def test_env_option_opens_that_environments_stores(trained: Path) -> None:
    from mloop.project import open_project

    dev, staging = open_project(trained), open_project(trained, env="staging")
    assert dev.env == "dev"  # the first of promotion.order, without --env
    assert staging.uris["store_uri"].endswith(".mloop/staging/mloop.db")
    assert staging.uris["data_uri"] != dev.uris["data_uri"]
    assert staging.uris["outputs_uri"] == dev.uris["outputs_uri"]  # not overridden
    assert staging.config.serving.port == 8101
    assert _versions(dev) == [1, 2] and _versions(staging) == []


def test_a_store_an_environment_names_wins_over_mloop_store_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.project import open_project

    (tmp_path / "mloop.yaml").write_text(SMALL_CONFIG + ENVIRONMENTS)
    monkeypatch.setenv("MLOOP_STORE_URI", "sqlite:////srv/shared/mloop.db")
    monkeypatch.setenv("MLOOP_OUTPUTS_URI", "/srv/shared/outputs")
    staging = open_project(tmp_path, env="staging")
    assert staging.uris["store_uri"] == f"sqlite:///{tmp_path}/.mloop/staging/mloop.db"
    assert staging.uris["outputs_uri"] == "/srv/shared/outputs"  # a key staging leaves unset
    assert open_project(tmp_path).uris["store_uri"] == "sqlite:////srv/shared/mloop.db"


def test_mloop_env_picks_the_environment_a_process_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `mloop --env staging serve` hands its worker processes."""
    from mloop.project import open_project

    (tmp_path / "mloop.yaml").write_text(SMALL_CONFIG + ENVIRONMENTS)
    monkeypatch.setenv("MLOOP_ENV", "prod")
    assert open_project(tmp_path).env == "prod"
    assert open_project(tmp_path).config.serving.port == 8102
    assert open_project(tmp_path, env="staging").env == "staging"  # --env wins


def test_env_option_rejects_an_unknown_environment_listing_the_defined_ones(
        trained: Path) -> None:
    proc = run_cli("-C", str(trained), "--env", "qa", "models", "list", check=False)
    assert proc.returncode == 1
    assert "unknown environment 'qa'; defined: dev, staging, prod" in proc.stderr


def test_env_option_without_environments_says_there_are_none(tmp_path: Path) -> None:
    from mloop.errors import ConfigError
    from mloop.project import open_project

    (tmp_path / "mloop.yaml").write_text(SMALL_CONFIG)
    assert open_project(tmp_path).env is None  # no environments: as before
    with pytest.raises(ConfigError, match="this project defines none"):
        open_project(tmp_path, env="prod")


@pytest.mark.parametrize(("extra", "message"), [
    ("environments:\n  dev: {stores: {stor_uri: x}}\n",
     r"unknown key 'stor_uri' under 'environments.dev.stores' \(did you mean 'store_uri'"),
    ("environments:\n  dev: {serving: {port: 70000}}\n",
     r"'environments.dev.serving.port': Input should be less than or equal to 65535"),
    ("environments:\n  dev: {}\npromotion:\n  order: [dev, prod]\n",
     r"mloop.yaml:\d+: 'promotion.order' names environment 'prod', which 'environments' "
     r"does not define \(defined: dev\)"),
    ("environments:\n  dev: {}\npromotion:\n  approval: {prod: true}\n",
     r"'promotion.approval' names environment 'prod'"),
    ("environments:\n  dev: {}\npromotion:\n  soak: 24\n",
     r"'promotion.soak': 24 is not a duration"),
    ("environments:\n  Prod: {}\n", r"environment name 'Prod' must be lower-case"),
    ("environments:\n  dev: {serving: {tls_cert: a.pem}}\n",
     r"'environments.dev': tls_cert and tls_key go together"),
])
def test_bad_environments_config_names_the_key(extra: str, message: str) -> None:
    from mloop.config import parse_config
    from mloop.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_config(SMALL_CONFIG + extra)


def test_environments_do_not_change_the_config_hash() -> None:
    from mloop.config import parse_config

    assert (parse_config(SMALL_CONFIG + ENVIRONMENTS).config_hash()
            == parse_config(SMALL_CONFIG).config_hash())


# ------------------------------------------------------------------ dev -> staging

def test_promote_to_staging_registers_a_new_version_that_points_back(root: Path) -> None:
    from mloop.security.audit import verify_chain

    dev, staging = _env(root, "dev"), _env(root, "staging")
    done = _to(root, "staging", 2)
    assert (done.version, done.replaced, done.source_env) == (1, None, "dev")
    src = dev.tracking.model_version("rentals", 2)
    mv = staging.tracking.model_version("rentals", 1)
    assert mv.aliases == ("champion",)
    assert mv.tags["mloop.source.env"] == "dev"
    assert mv.tags["mloop.source.version"] == "2"
    assert mv.tags["mloop.source.run_id"] == src.run_id
    assert mv.tags["mloop.origin.run_id"] == src.run_id
    assert mv.tags["mloop.gates"] == "passed"  # staging's own gates, not dev's
    assert mv.metrics == src.metrics  # the holdout metrics travel with it
    holdout = mv.tags["mloop.snapshot.holdout"]
    assert holdout == src.tags["mloop.snapshot.holdout"]
    assert staging.snapshots.get(holdout).rows == dev.snapshots.get(holdout).rows
    assert mv.run_id != src.run_id  # a run of staging's tracking store
    # the stored compiled graph travels too, into the new run, its sha256 intact
    graph = json.loads(mv.tags["mloop.compiled"])["artifact"]
    assert graph["run_id"] == mv.run_id
    assert graph["sha256"] == json.loads(src.tags["mloop.compiled"])["artifact"]["sha256"]
    local = staging.mlflow.download_artifacts(mv.run_id, graph["path"], str(root / "g"))
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == graph["sha256"]
    promote_event = _events(staging, "promote")[0].payload
    assert promote_event["source_env"] == "dev" and promote_event["source_version"] == 2
    assert promote_event["source_run_id"] == src.run_id and promote_event["gates_passed"]
    assert _events(dev, "env.promoted")[0].payload["target_version"] == 1
    assert verify_chain(staging.store).ok
    assert _env(root, "dev").tracking.alias("rentals", "champion") is None  # dev untouched


def test_promotion_into_the_first_environment_or_skipping_one_is_refused(root: Path) -> None:
    from mloop.errors import MloopError
    from mloop.registry.environments import source_environment

    staging = _env(root, "staging")
    with pytest.raises(MloopError, match="'dev' is the first environment"):
        source_environment(staging, "dev")
    with pytest.raises(MloopError, match=r"reaches 'prod' from 'staging'.*not from 'dev'"):
        source_environment(staging, "prod", "dev")
    with pytest.raises(MloopError, match="unknown environment 'qa' for --to"):
        source_environment(staging, "qa")


def test_the_same_version_cannot_be_promoted_twice(root: Path) -> None:
    from mloop.errors import PromotionError

    _to(root, "staging", 2)
    with pytest.raises(PromotionError, match="v2 of 'dev' is in 'staging' already, as v1"):
        _to(root, "staging", 2)


def test_gate_failure_in_the_target_refuses_and_leaves_it_unchanged(root: Path) -> None:
    from mloop.errors import GateFailedError

    _to(root, "staging", 2)
    staging = _env(root, "staging")
    before = (_versions(staging), staging.tracking.aliases("rentals"),
              len(_events(staging, "promote")))
    with pytest.raises(GateFailedError, match=r"v1 of 'dev' failed gate\(s\) in 'staging' "
                                              r"against its champion v1: 'non_inferiority"):
        _to(root, "staging", 1)
    staging = _env(root, "staging")
    assert (_versions(staging), staging.tracking.aliases("rentals"),
            len(_events(staging, "promote"))) == before
    refused = _events(staging, "env.promotion_refused")[0].payload
    assert refused["source_version"] == 1 and "non_inferiority" in refused["error"]


# ------------------------------------------------------------------ staging -> prod

def test_prod_refuses_before_the_soak_naming_it_and_what_remains(root: Path) -> None:
    from mloop.errors import PromotionError

    _to(root, "staging", 2)
    with pytest.raises(PromotionError, match=r"v1 may not go to 'prod' yet: promotion.soak "
                                             r"is 24h as champion in 'staging' without a "
                                             r"breach; it has served \dm\d\ds since .*, "
                                             r"(23h5\dm|24h00m) remain"):
        _to(root, "prod", 1)
    assert _versions(_env(root, "prod")) == []


def test_prod_refuses_a_version_that_breached_during_its_soak(root: Path) -> None:
    from mloop.errors import PromotionError
    from mloop.security.audit import append_event
    from mloop.store.db import utcnow

    _to(root, "staging", 2)
    append_event(_env(root, "staging").store, "monitor.alert",
                 {"model": "rentals", "window": {}, "reasons": ["drift"]})
    with pytest.raises(PromotionError, match=r"1 breach\(es\) were recorded since it started "
                                             r"serving at .*: monitor.alert at"):
        _to(root, "prod", 1, now=utcnow() + timedelta(hours=25))


def test_prod_refuses_without_an_approval(root: Path) -> None:
    from mloop.errors import PromotionError
    from mloop.store.db import utcnow

    _to(root, "staging", 2)
    with pytest.raises(PromotionError, match=r"promotions into 'prod' need an approval .*"
                                             r"`mloop --env staging models approve 1 --to "
                                             r"prod --by NAME`"):
        _to(root, "prod", 1, now=utcnow() + timedelta(hours=25))
    assert _versions(_env(root, "prod")) == []


def test_prod_takes_a_soaked_approved_version_and_audits_it(root: Path) -> None:
    from mloop.registry.environments import approve
    from mloop.security.audit import verify_chain
    from mloop.store.db import utcnow

    _to(root, "staging", 2)
    staging, prod = _env(root, "staging"), _env(root, "prod")
    approval = approve(staging, prod, 1, by="alice", reason="reviewed the canary")
    assert approval["by"] == "alice" and approval["env"] == "prod"
    done = _to(root, "prod", 1, now=utcnow() + timedelta(hours=25))
    assert done.version == 1 and done.soak["met"] and done.approval["by"] == "alice"
    prod = _env(root, "prod")
    mv = prod.tracking.model_version("rentals", 1)
    assert mv.aliases == ("champion",)
    assert (mv.tags["mloop.source.env"], mv.tags["mloop.source.version"]) == ("staging", "1")
    # the lineage reaches back to the dev run that trained it
    assert mv.tags["mloop.origin.run_id"] == _env(root, "dev").tracking.model_version(
        "rentals", 2).run_id
    kinds = [e.kind for e in sorted(_events(prod, "approval") + _events(prod, "promote"),
                                    key=lambda e: e.id)]
    assert kinds == ["approval", "promote"]
    event = _events(prod, "promote")[0].payload
    assert event["approval"]["by"] == "alice" and event["soak"]["required"] == "24h"
    assert event["source_env"] == "staging"
    assert verify_chain(prod.store).ok


def test_an_approval_names_one_version(root: Path) -> None:
    from mloop.errors import PromotionError
    from mloop.registry.environments import approve
    from mloop.store.db import utcnow

    _to(root, "staging", 2)
    staging, prod = _env(root, "staging"), _env(root, "prod")
    with pytest.raises(Exception, match="has no version 7"):
        approve(staging, prod, 7, by="alice")
    with pytest.raises(Exception, match="approving operator's name"):
        approve(staging, prod, 1, by="  ")
    approve(staging, prod, 1, by="alice")
    # the approval was for staging's v1 trained by that run: a different run would not match
    from mloop.registry.environments import find_approval
    assert find_approval(staging, prod, 1, "another-run") is None
    done = _to(root, "prod", 1, now=utcnow() + timedelta(hours=25))
    assert done.approval is not None
    with pytest.raises(PromotionError, match="is in 'prod' already"):
        _to(root, "prod", 1, now=utcnow() + timedelta(hours=25))


# ------------------------------------------------------------------ the CLI

def test_cli_promotes_approves_and_rolls_back_per_environment(root: Path) -> None:
    def cli(*args: str, check: bool = True) -> Any:
        return run_cli("-C", str(root), *args, check=check)

    first = json.loads(cli("models", "promote", "2", "--to", "staging", "--reason", "good",
                           "--json").stdout)
    assert (first["target_env"], first["version"]) == ("staging", 1)
    # an override carries the worse v1 in as staging's v2 (recorded as such)
    forced = json.loads(cli("models", "promote", "1", "--to", "staging", "--force",
                            "--reason", "try it", "--json").stdout)
    assert (forced["version"], forced["replaced"]) == (2, 1)
    soak = cli("--env", "staging", "models", "soak", "2", "--json", check=False)
    assert soak.returncode == 1 and json.loads(soak.stdout)["met"] is False
    # in words: the environment it may not go on to yet, by name (a new user read "the next
    # environment" and "0h00m remain" while a 30 s soak still had seconds to go)
    said = cli("--env", "staging", "models", "soak", "2", check=False)
    assert said.returncode == 1
    assert re.search(r"v2 may not go to 'prod' yet: .* it has served \dm\d\ds since .*, "
                     r"2[34]h\d\dm remain", " ".join(said.stdout.split())), said.stdout
    refused = cli("models", "promote", "2", "--to", "prod", "--reason", "ship", check=False)
    assert refused.returncode == 1 and "promotion.soak is 24h" in refused.stderr
    approved = json.loads(cli("models", "approve", "2", "--to", "prod", "--by", "bob",
                              "--json").stdout)
    assert approved["by"] == "bob" and approved["source_env"] == "staging"
    back = json.loads(cli("--env", "staging", "models", "rollback", "--reason", "worse",
                          "--json").stdout)
    assert (back["version"], back["replaced"]) == (1, 2)
    history = json.loads(cli("--env", "staging", "models", "history", "--json").stdout)
    assert [d["action"] for d in history["deployments"]] == ["rollback", "override",
                                                             "promote"]
    dev = json.loads(cli("models", "history", "--json").stdout)
    assert dev["deployments"] == []  # dev's own history is its own


# ------------------------------------------------------------------ prod at scale

@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.postgres
def test_prod_on_postgres_mlflow_server_and_s3_takes_a_version_from_staging(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dev and staging on SQLite; prod is the scale-out topology: an MLflow tracking server
    (PostgreSQL backend, artifacts proxied to S3 on moto), mloop's store on PostgreSQL,
    snapshots on S3. The version crosses from staging's SQLite registry to the server's."""
    from mlflow.tracking import MlflowClient

    from mloop.registry.environments import approve
    from mloop.security.audit import verify_chain
    from mloop.store.db import utcnow

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(key, cluster.env[key])
    prod_stores = (f"      tracking_uri: {cluster.tracking_uri}\n"
                   f"      store_uri: {cluster.mloop_store_uri}\n"
                   f"      data_uri: s3://{BUCKET}/prod/data\n"
                   f"      outputs_uri: s3://{BUCKET}/prod/outputs\n"
                   f"      inference_log_uri: s3://{BUCKET}/prod/inference\n")
    local_prod = ("      tracking_uri: sqlite:///.mloop/prod/mlflow.db\n"
                  "      store_uri: sqlite:///.mloop/prod/mloop.db\n"
                  "      artifact_root: .mloop/prod/artifacts\n"
                  "      data_uri: .mloop/prod/data\n")
    assert local_prod in ENVIRONMENTS
    root = tmp_path / "proj"
    (root / "data").mkdir(parents=True)
    rentals_frame().to_parquet(root / "data" / "rentals.parquet", index=False)
    (root / "mloop.yaml").write_text(_config(GOOD).replace(local_prod, prod_stores))
    from mloop.pipeline.runner import run_pipeline

    assert run_pipeline(_env(root, "dev")).status == "succeeded"
    _to(root, "staging", 1)
    staging, prod = _env(root, "staging"), _env(root, "prod")
    assert prod.uris["store_uri"] == cluster.mloop_store_uri
    approve(staging, prod, 1, by="alice")
    done = _to(root, "prod", 1, now=utcnow() + timedelta(hours=25))
    assert (done.version, done.target_env, done.approval["by"]) == (1, "prod", "alice")

    client = MlflowClient(tracking_uri=cluster.tracking_uri)
    mv = client.get_model_version_by_alias("rentals", "champion")
    assert mv.version == "1" and mv.tags["mloop.source.env"] == "staging"
    assert mv.tags["mloop.source.run_id"] == staging.tracking.model_version("rentals",
                                                                             1).run_id
    assert any(k.endswith(f"{mv.run_id}/artifacts/model/MLmodel")
               for k in cluster.s3_keys("mlflow/"))
    holdout = mv.tags["mloop.snapshot.holdout"]
    assert f"prod/data/{holdout}/snapshot.json" in cluster.s3_keys("prod/data/")
    prod = _env(root, "prod")
    assert [e.kind for e in sorted(_events(prod, "approval") + _events(prod, "promote"),
                                   key=lambda e: e.id)] == ["approval", "promote"]
    assert verify_chain(prod.store).ok
    assert _events(prod, "gate")[0].payload["passed"] is True  # gated on the server's copy


# ------------------------------------------------------------- ci check against an env

def test_ci_check_gates_a_dev_candidate_against_stagings_champion(root: Path) -> None:
    """`mloop ci check --base-env staging` judges dev's candidate against the champion of
    staging's registry (not dev's, which has none), reads that champion's metrics and data
    from staging, and stores no gate report in dev (one judged against another registry's
    champion must not be reused by a promotion in dev)."""
    import sqlalchemy as sa

    from mloop.errors import MloopError
    from mloop.registry.ci_check import run_ci_check
    from mloop.store.models import GateRunRow

    _to(root, "staging", 2)  # staging's champion: dev's good v2, as staging's v1
    staging = _env(root, "staging")
    (root / "mloop.yaml").write_text(_config(WORSE))  # the PR: the much worse recipe (dev v1)
    dev = _env(root, "dev")
    with dev.store.session() as s:
        before = len(s.scalars(sa.select(GateRunRow)).all())
    check = run_ci_check(dev, base_env="staging")
    assert (check.version, check.base.env, check.base.version) == (1, "staging", 1)
    assert not check.passed
    failed = [r["gate"] for r in check.gates["results"] if r["status"] == "fail"]
    assert failed == ["non_inferiority.mae"]
    champion_mae = staging.tracking.model_version("rentals", 1).metrics
    assert {m["metric"]: m["champion"] for m in check.metrics} == champion_mae
    train = next(s for s in check.data["snapshots"] if s["role"] == "train")
    assert train["champion"] == staging.tracking.model_version(
        "rentals", 1).tags["mloop.snapshot.train"]
    with dev.store.session() as s:
        assert len(s.scalars(sa.select(GateRunRow)).all()) == before
    with pytest.raises(MloopError, match=r"--base-env 'qa': no such environment; mloop\.yaml "
                                         r"defines dev, staging, prod"):
        run_ci_check(dev, base_env="qa")
