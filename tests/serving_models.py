"""Purpose-built pyfunc models for serving tests (importable, so MLflow can load them)."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np


class CrashOnTraffic(mlflow.pyfunc.PythonModel):
    """Passes warm-up (its first call), then fails every prediction: a broken challenger."""

    def load_context(self, context: Any) -> None:
        self.calls = 0

    def predict(self, context, model_input, params=None):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("challenger exploded")
        return np.zeros(len(model_input))


class FailsToLoad(mlflow.pyfunc.PythonModel):
    """A version whose weights cannot be loaded."""

    def load_context(self, context: Any) -> None:
        raise RuntimeError("corrupt weights")

    def predict(self, context, model_input, params=None):
        return np.zeros(len(model_input))
