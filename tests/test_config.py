from __future__ import annotations

import pytest

from mloop.config import parse_config
from mloop.errors import ConfigError

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
