from __future__ import annotations

import copy
import pickle
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import BaseModel

from mloop.config import (
    Duration,
    NotHashed,
    ProjectConfig,
    load_config,
    parse_config,
    parse_window,
    unhashed_fields,
)
from mloop.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

VALID = """\
project: demo
data:
  path: data/x.csv
target: y
"""


def test_minimal_config_gets_embedded_defaults() -> None:
    cfg = parse_config(VALID)
    assert cfg.project == "demo"
    assert cfg.stores.tracking_uri == "sqlite:///.mloop/mlflow.db"
    assert cfg.stores.store_uri == "sqlite:///.mloop/mloop.db"
    assert cfg.split.holdout == 0.2
    assert cfg.model_name == "demo"


def test_unknown_key_names_line_and_suggests_the_right_one() -> None:
    text = VALID + "modle:\n  params: {}\n"
    with pytest.raises(ConfigError, match=r"mloop.yaml:5: unknown key 'modle' \(did you mean "
                                          r"'model'\?\)"):
        parse_config(text)


def test_unknown_nested_key_names_its_parent() -> None:
    text = VALID + "split:\n  holdot: 0.3\n"
    with pytest.raises(ConfigError, match=r":6: unknown key 'holdot' under 'split' \(did you "
                                          r"mean 'holdout'\?\)"):
        parse_config(text)


def test_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'target'"):
        parse_config("project: demo\ndata:\n  path: x.csv\n")


def test_out_of_range_value_names_key_line_and_value() -> None:
    text = VALID + "split:\n  holdout: 1.5\n"
    with pytest.raises(ConfigError, match=r"mloop.yaml:6: 'split.holdout': Input should be "
                                          r"less than 1 \(got 1.5\)"):
        parse_config(text)


def test_wrong_type_names_expected_type() -> None:
    text = VALID + "split:\n  seed: lots\n"
    with pytest.raises(ConfigError, match=r"'split.seed': Input should be a valid integer"):
        parse_config(text)


def test_invalid_choice_lists_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"'task': Input should be 'regression' or "
                                          r"'classification' \(got \"regresion\"\)"):
        parse_config(VALID + "task: regresion\n")


def test_data_needs_a_path_or_sql() -> None:
    with pytest.raises(ConfigError, match=r"'data': needs either 'path'"):
        parse_config("project: demo\ndata:\n  since: '2024-01-01'\ntarget: y\n")


def test_sql_source_needs_url() -> None:
    with pytest.raises(ConfigError, match=r"'sql' needs 'url'"):
        parse_config("project: demo\ndata:\n  sql: select 1\ntarget: y\n")


def test_malformed_yaml_reports_line() -> None:
    with pytest.raises(ConfigError, match=r"mloop.yaml:3: not valid YAML: mapping values are "
                                          r"not allowed here"):
        parse_config("project: demo\ndata: {path: x.csv}\ntarget: y: z\n")


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match=r"expected a mapping at the top level, got list"):
        parse_config("- a\n- b\n")


def test_empty_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"file is empty"):
        parse_config("")


def test_env_interpolation_fills_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    cfg = parse_config("project: demo\ndata:\n  sql: select * from t\n"
                       "  url: postgresql://u:${DB_PASSWORD}@127.0.0.1/test\ntarget: y\n")
    assert cfg.data.url == "postgresql://u:s3cret@127.0.0.1/test"


def test_unset_env_var_is_an_error_naming_key_and_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    text = "project: demo\ndata:\n  path: ${NOPE_NOT_SET}/x.csv\ntarget: y\n"
    with pytest.raises(ConfigError, match=r"mloop.yaml:3: 'data.path' refers to environment "
                                          r"variable \$\{NOPE_NOT_SET\}, which is not set"):
        parse_config(text)


def test_bad_project_name_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'project': String should match pattern"):
        parse_config(VALID.replace("project: demo", "project: 'my project!'"))


def test_error_carries_structured_fields() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(VALID + "split:\n  holdout: 2\n", file="/p/mloop.yaml")
    assert (info.value.file, info.value.line, info.value.key) == ("/p/mloop.yaml", 6,
                                                                  "split.holdout")


def test_unknown_key_inside_a_column_expectation_suggests_the_right_one() -> None:
    text = VALID + "validation:\n  columns:\n    price:\n      mn: 0\n"
    with pytest.raises(ConfigError, match=r":8: unknown key 'mn' under "
                                          r"'validation.columns.price' \(did you mean 'min'\?\)"):
        parse_config(text)


def test_duplicate_key_is_an_error_naming_both_lines() -> None:
    with pytest.raises(ConfigError, match=r"mloop.yaml:5: duplicate key 'target' \(first set on "
                                          r"line 4\)"):
        parse_config(VALID + "target: z\n")


def test_interpolated_values_are_known_as_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.tracking import redact

    monkeypatch.setenv("DB_PASSWORD", "hunter2")
    cfg = parse_config("project: demo\ndata:\n  sql: select 1\n"
                       "  url: postgresql://u:${DB_PASSWORD}@db/test\ntarget: y\n")
    assert cfg.secrets == {"hunter2"}
    assert redact(cfg.data.url, cfg.secrets) == "postgresql://u:***@db/test"
    assert redact("token=hunter2", cfg.secrets) == "token=***"
    assert redact("mysql://root:pw@h/db") == "mysql://root:***@h/db"


def test_serving_section_defaults_and_errors() -> None:
    cfg = parse_config(VALID)
    assert (cfg.serving.host, cfg.serving.port, cfg.serving.max_batch_rows) == \
        ("127.0.0.1", 8000, 64)
    assert cfg.serving.inference_log.on_full == "drop"
    with pytest.raises(ConfigError, match=r":6: unknown key 'workres' under 'serving' \(did "
                                          r"you mean 'workers'\?\)"):
        parse_config(VALID + "serving:\n  workres: 2\n")
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        parse_config(VALID + "serving:\n  tls_cert: cert.pem\n")
    with pytest.raises(ConfigError, match="on_full"):
        parse_config(VALID + "serving:\n  inference_log: {on_full: wait}\n")
    # how a model is served does not change what it is
    assert parse_config(VALID + "serving: {port: 9000}\n").config_hash() == cfg.config_hash()


# ------------------------------------------------------------------------------ durations

@pytest.mark.parametrize(("text", "length"), [
    ("30s", timedelta(seconds=30)), ("90m", timedelta(minutes=90)), ("6h", timedelta(hours=6)),
    ("1d", timedelta(days=1)), ("1.5d", timedelta(hours=36)), ("0s", timedelta(0)),
])
def test_a_duration_is_a_timedelta_that_prints_as_written(text: str, length: timedelta) -> None:
    cfg = parse_config(VALID + f"loop:\n  guards: {{cooldown: {text}}}\n")
    cooldown = cfg.loop.guards.cooldown
    assert isinstance(cooldown, timedelta)
    assert cooldown == length
    assert (str(cooldown), f"{cooldown}") == (text, text)
    assert cfg.model_dump(mode="json")["loop"]["guards"]["cooldown"] == text


def test_every_duration_of_the_loop_policy_is_parsed_into_a_timedelta() -> None:
    cfg = parse_config(VALID + "loop:\n  triggers: {schedule: 28d}\n  retrain: {window: 60d}\n"
                       "  guards: {cooldown: 21d}\n  canary: {probation: 5d}\n")
    loop = cfg.loop
    assert loop.canary is not None and loop.triggers.schedule is not None
    assert (loop.triggers.schedule, loop.retrain.window, loop.guards.cooldown,
            loop.canary.probation) == (timedelta(days=28), timedelta(days=60),
                                       timedelta(days=21), timedelta(days=5))
    defaults = parse_config(VALID).loop
    assert defaults.canary is not None
    assert [str(d) for d in (defaults.retrain.window, defaults.guards.cooldown,
                             defaults.canary.probation)] == ["60d", "1d", "3d"]
    assert defaults.triggers.schedule is None


@pytest.mark.parametrize(("value", "shown"), [
    ("3x", "'3x'"), ("1w", "'1w'"), ("-1d", "'-1d'"), ("6 h", "'6 h'"), ("3600", "3600"),
])
def test_a_bad_duration_names_file_line_key_value_and_the_accepted_forms(value: str,
                                                                        shown: str) -> None:
    text = VALID + f"loop:\n  guards:\n    cooldown: {value}\n"
    with pytest.raises(ConfigError, match=rf"mloop.yaml:7: 'loop.guards.cooldown': {shown} is "
                                          rf"not a duration: write a number and a unit "
                                          rf"\(s, m, h or d\), e.g. 30s"):
        parse_config(text)


def test_a_bare_number_of_seconds_is_refused_with_the_form_to_write() -> None:
    with pytest.raises(ConfigError, match=r"'loop.canary.probation': 3600 is not a duration: "
                                          r".*; for seconds write 3600s"):
        parse_config(VALID + "loop:\n  canary: {probation: 3600}\n")


def test_a_duration_survives_copies_and_pickles_with_its_text() -> None:
    cfg = parse_config(VALID + "loop:\n  guards: {cooldown: 36h}\n")
    for clone in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), cfg.model_copy(deep=True)):
        assert clone.loop.guards.cooldown == timedelta(hours=36)
        assert str(clone.loop.guards.cooldown) == "36h"


def test_a_timedelta_given_from_python_becomes_a_duration_written_shortest() -> None:
    assert str(Duration.parse(timedelta(hours=48))) == "2d"
    assert str(Duration.parse(timedelta(minutes=90))) == "90m"
    assert str(Duration.parse(timedelta(milliseconds=1500))) == "1.5s"
    assert Duration.parse(timedelta(milliseconds=1500)) == Duration.parse("1.5s")


@pytest.mark.parametrize(("text", "size"), [
    ("1d", timedelta(days=1)), ("6h", timedelta(hours=6)), ("1.5h", timedelta(minutes=90)),
    ("5000rows", 5000), (" 7d ", timedelta(days=7)),
])
def test_a_window_is_a_duration_or_a_row_count(text: str, size: timedelta | int) -> None:
    assert parse_window(text) == size


@pytest.mark.parametrize("text", ["0d", "0rows", "1.5rows", "rows", "1w", "daily"])
def test_a_bad_window_names_the_key_and_value(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"mloop.yaml:6: 'monitoring.window': '{text}' is "
                                          rf"not a window size: a duration such as 1d"):
        parse_config(VALID + f"monitoring:\n  window: {text}\n")


def test_the_monitoring_window_keeps_its_text_which_names_the_windows_in_the_store() -> None:
    assert parse_config(VALID + "monitoring: {window: 7d}\n").monitoring.window == "7d"


def test_the_scrape_interval_must_be_a_whole_prometheus_duration() -> None:
    cfg = parse_config(VALID + "kubernetes: {scrape_interval: 1m}\n")
    assert cfg.kubernetes.scrape_interval == timedelta(minutes=1)
    assert str(cfg.kubernetes.scrape_interval) == "1m"
    with pytest.raises(ConfigError, match=r"'kubernetes.scrape_interval': '1.5m': Prometheus "
                                          r"takes a whole number and a unit"):
        parse_config(VALID + "kubernetes: {scrape_interval: 1.5m}\n")


# ---------------------------------------------------------------------------- config_hash

def test_the_sections_left_out_of_config_hash_are_the_ones_that_do_not_shape_the_model(
        ) -> None:
    assert unhashed_fields(ProjectConfig) == dict.fromkeys(
        ["stores", "gates", "serving", "monitoring", "loop", "kubernetes", "airflow",
         "kubeflow", "spark", "security", "tune", "environments", "promotion", "costs"],
        True)


def test_a_marker_on_a_nested_field_leaves_out_only_that_field() -> None:
    class Inner(BaseModel):
        kept: int = 1
        left_out: Annotated[int, NotHashed("for the test")] = 2

    class Outer(BaseModel):
        one: Inner = Inner()
        many: list[Inner] = [Inner()]
        named: dict[str, Inner] = {"a": Inner()}
        maybe: Inner | None = Inner()

    inner = {"left_out": True}
    exclude = unhashed_fields(Outer)
    assert exclude == {"one": inner, "many": {"__all__": inner}, "named": {"__all__": inner},
                       "maybe": inner}
    assert Outer().model_dump(exclude=exclude) == {"one": {"kept": 1}, "many": [{"kept": 1}],
                                                   "named": {"a": {"kept": 1}},
                                                   "maybe": {"kept": 1}}


@pytest.mark.parametrize(("example", "digest"), [
    ("bike_sharing", "6dedca701ce7c749ccf0d0416bc350d0162001bba024bd87f1c355582ca8543d"),
    ("flights", "211346339a2db4fb7380a3ff0cc16414a6169a5d4c0ee3a5d3d911288469b1aa"),
])
def test_the_examples_keep_the_config_hash_their_registered_versions_carry(
        example: str, digest: str) -> None:
    """A change here means every existing project's versions stop matching their config:
    only accept it for a change that really alters what is trained."""
    assert load_config(EXAMPLES / example / "mloop.yaml").config_hash() == digest


@pytest.mark.parametrize("extra", [
    "stores: {data_uri: elsewhere}\n", "gates: {auto_promote: true}\n",
    "serving: {port: 9000}\n", "monitoring: {window: 6h}\n",
    "loop:\n  guards: {cooldown: 24h}\n", "kubernetes: {scrape_interval: 1m}\n",
    "airflow: {dag_id: nightly}\n", "kubeflow: {mloop_bin: /x/mloop}\n",
    "spark: {master: 'local[4]'}\n",
    "tune:\n  search_space: {max_iter: {type: int, low: 10, high: 20}}\n",
])
def test_changing_a_section_that_does_not_shape_the_model_keeps_the_hash(extra: str) -> None:
    assert parse_config(VALID + extra).config_hash() == parse_config(VALID).config_hash()


@pytest.mark.parametrize("extra", [
    "split: {seed: 7}\n", "model: {params: {max_iter: 5}}\n",
    "features: {exclude: [z]}\n", "validation: {min_rows: 10}\n",
    "pipeline: {retries: 1}\n", "profile: {bins: 10}\n", "metrics: [mae]\n",
])
def test_changing_a_section_that_shapes_the_model_changes_the_hash(extra: str) -> None:
    assert parse_config(VALID + extra).config_hash() != parse_config(VALID).config_hash()
