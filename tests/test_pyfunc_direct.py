"""A custom pyfunc version is served through its flavour's own predict, past MLflow's schema
enforcement of frames mloop already validated, with the same answers as ``pyfunc.predict``;
a frame enforcement would change still goes through ``pyfunc.predict``. Real MLflow (SQLite),
a real registered PythonModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mloop.project import open_project
from mloop.registry.candidates import load_pyfunc
from mloop.serving.model import load_served
from mloop.serving.pyfunc_direct import DirectPredict

from .helpers import copy_project, register_pyfunc, rentals_frame


class Rentals(mlflow.pyfunc.PythonModel):
    """A deterministic hand-written rentals model: what a team ships as a custom pyfunc."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
        effect = model_input["weather"].map({"Clear": 0.0, "Mist": -10.0, "Rain": -30.0})
        return (20.0 + 2.5 * model_input["temp"] + 0.5 * model_input["hour"]
                + effect.fillna(0.0)).to_numpy()


def _rows(n: int) -> pd.DataFrame:
    return rentals_frame(n, seed=3)[["hour", "weather", "temp"]].astype({"hour": "float64"})


def _served_custom(serving_registry: Path, tmp_path: Path) -> tuple[Any, Any]:
    root = copy_project(serving_registry, tmp_path)
    version = register_pyfunc(root, Rentals())
    project = open_project(root)
    served = load_served(project, version, compile=None)
    return served, load_pyfunc(project, version)[1]


def test_a_custom_pyfunc_answers_as_pyfunc_predict_does_without_the_recheck(
        serving_registry: Path, tmp_path: Path) -> None:
    served, pyfunc = _served_custom(serving_registry, tmp_path)
    rows = _rows(200)
    cols = {name: rows[name].tolist() for name in served.schema.names}
    got = served.predict_columns(cols)
    expected = pyfunc.predict(rows)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    direct = served.predict_frame
    assert isinstance(direct, DirectPredict) and direct.eligible
    assert direct.direct(served.schema.frame(cols))  # MLflow's enforcement is skipped


def test_a_frame_mlflow_would_convert_or_refuse_goes_through_pyfunc_predict(
        serving_registry: Path, tmp_path: Path) -> None:
    """int32 hours where the signature says double: MLflow converts them before the model
    sees them, so that frame is not handed over directly (and the answer is pyfunc's);
    int64 hours it refuses, and the same error reaches the caller."""
    served, pyfunc = _served_custom(serving_registry, tmp_path)
    direct = served.predict_frame
    rows = _rows(20).astype({"hour": "int32"})
    assert not direct.direct(rows)
    np.testing.assert_array_equal(np.asarray(direct(rows)), np.asarray(pyfunc.predict(rows)))
    with pytest.raises(MlflowException, match="Can not safely convert int64 to float64"):
        direct(rows.astype({"hour": "int64"}))
