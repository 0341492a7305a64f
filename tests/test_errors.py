"""The error tree in use: every error importable from ``mloop``, one "no champion" error
naming the command that makes one, one sentence for every missing extra, and
DataSourceError for inputs that cannot be read."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import mloop
import mloop.errors
from mloop.errors import DataSourceError, MissingExtraError, MloopError, ModelNotFoundError
from mloop.extras import EXTRAS, require_extra
from mloop.project import open_project

from .helpers import run_cli

NO_CHAMPION = ("'rentals' has no champion: {}; make one with "
               "`mloop models promote VERSION --reason \"...\"`")

ERRORS = [cls for _, cls in inspect.getmembers(mloop.errors, inspect.isclass)
          if issubclass(cls, MloopError) and cls.__module__ == "mloop.errors"]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_exported_from_mloop_and_drawn_in_the_tree(cls: type) -> None:
    assert cls.__name__ in mloop.__all__
    assert getattr(mloop, cls.__name__) is cls
    assert re.search(rf"^\s*(├──|└──)?\s*{cls.__name__}\b", mloop.errors.__doc__ or "",
                     re.MULTILINE), f"{cls.__name__} is not drawn in errors.py's tree"


# ------------------------------------------------------------------------------ extras

def test_a_missing_extra_names_what_needs_it_and_the_install_command(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.tuning import require_optuna

    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` fails
    with pytest.raises(MissingExtraError,
                       match=r"^`mloop tune` needs Optuna: pip install 'mloop\[tune\]'$") as exc:
        require_optuna()
    assert (exc.value.extra, exc.value.module) == ("tune", "optuna")


def test_an_installed_extra_that_fails_to_import_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "mloop_fake_extra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import mloop_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=re.escape(
            "`mloop predict --engine spark` needs PySpark: pip install 'mloop[spark]' "
            "(importing mloop_fake_extra failed: No module named "
            "'mloop_no_such_dependency')")):
        require_extra("spark", "mloop_fake_extra")


def test_require_extra_returns_the_module_and_names_its_own_feature() -> None:
    assert require_extra("fast", "onnx").__name__ == "onnx"
    with pytest.raises(MissingExtraError, match=re.escape(
            "the tune: section needs Optuna: pip install 'mloop[tune]'")):
        require_extra("tune", "mloop_no_such_module", feature="the tune: section")


def test_every_extra_in_the_table_is_one_pyproject_declares() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(declared), set(EXTRAS) - set(declared)


@pytest.mark.parametrize(("estimator", "extra"), [
    ("lightgbm.LGBMRegressor", "lightgbm"), ("xgboost.sklearn.XGBClassifier", "xgboost")])
def test_a_model_whose_library_is_missing_names_the_key_and_the_extra_that_installs_it(
        monkeypatch: pytest.MonkeyPatch, estimator: str, extra: str) -> None:
    from mloop.errors import ConfigError
    from mloop.pipeline.loader import import_object

    monkeypatch.setitem(sys.modules, extra, None)  # the library is not installed
    module = re.escape(estimator.rpartition(".")[0])
    with pytest.raises(ConfigError, match=(
            rf"^mloop.yaml: 'model.estimator': cannot import module '{module}' .*; "
            rf"pip install 'mloop\[{extra}\]'$")):
        import_object(estimator, key="model.estimator")


def test_a_model_of_a_library_no_extra_installs_gets_no_install_hint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mloop.errors import ConfigError
    from mloop.pipeline.loader import import_object

    with pytest.raises(ConfigError) as exc:
        import_object("mloop_no_such_library.Model", key="model.estimator")
    assert "pip install" not in str(exc.value)


# --------------------------------------------------------------------------- no champion

def test_monitoring_without_a_champion_says_how_to_make_one(make_project) -> None:
    from mloop.monitoring.service import run_monitor

    with pytest.raises(ModelNotFoundError, match=re.escape(
            NO_CHAMPION.format("nothing to monitor against"))) as exc:
        run_monitor(open_project(make_project()))
    assert (exc.value.model, exc.value.version) == ("rentals", None)


def test_a_rollback_without_a_champion_says_how_to_make_one(make_project) -> None:
    from mloop.registry.promotion import rollback

    with pytest.raises(ModelNotFoundError, match=re.escape(
            NO_CHAMPION.format("nothing to roll back"))):
        rollback(open_project(make_project()), reason="bad release")


@pytest.mark.slow
def test_predict_without_a_champion_exits_1_with_one_line(make_project) -> None:
    root = make_project()
    proc = run_cli("predict", "-i", "data/rentals.parquet", "-o", "out.parquet", cwd=root,
                   check=False)
    assert proc.returncode == 1
    assert proc.stderr == "error: " + NO_CHAMPION.format(
        "`mloop predict` scores with it unless --version names a version") + "\n"
    assert proc.stdout == "" and not (root / "out.parquet").exists()


# ----------------------------------------------------------------------- unreadable inputs

def test_a_file_to_score_that_cannot_be_read_is_a_data_source_error(make_project,
                                                                   tmp_path: Path) -> None:
    from mloop.serving.batch import predict_file

    project = open_project(make_project())
    with pytest.raises(DataSourceError, match=r"nowhere\.parquet: no such file$"):
        predict_file(project, tmp_path / "nowhere.parquet", tmp_path / "out.parquet")
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(DataSourceError, match=r"rows\.json: unsupported input type '\.json' "
                                              r"\(use \.parquet or \.csv\)"):
        predict_file(project, tmp_path / "rows.json", tmp_path / "out.parquet", version=1)
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataSourceError, match=r"broken\.parquet: not a readable Parquet file"):
        predict_file(project, tmp_path / "broken.parquet", tmp_path / "out.parquet",
                     version=1)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize(("text", "message"), [
    (None, r"labels\.csv: no such file"),
    ("id,value\nr1,3\n", r"labels\.csv: missing column\(s\) \['request_id', 'label'\]; "
                         r"expected request_id,label"),
    ("request_id,label\nr1,3\n,4\n", r"labels\.csv: line 3: empty request_id"),
])
def test_a_labels_file_that_cannot_be_read_is_a_data_source_error(
        tmp_path: Path, text: str | None, message: str) -> None:
    from mloop.traffic.labels import read_label_file

    path = tmp_path / "labels.csv"
    if text is not None:
        path.write_text(textwrap.dedent(text))
    with pytest.raises(DataSourceError, match=message):
        read_label_file(path, "regression")


def test_a_monitored_file_that_cannot_be_read_is_a_data_source_error(tmp_path: Path) -> None:
    from mloop.monitoring.evaluate import read_table

    with pytest.raises(DataSourceError, match=r"gone\.parquet: no such file or folder"):
        read_table(tmp_path / "gone.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "ok.parquet")
    assert read_table(tmp_path / "ok.parquet").num_rows == 1
