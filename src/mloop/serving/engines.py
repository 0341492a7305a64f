"""Estimators from other libraries on the verified fast path: LightGBM through onnxmltools.

skl2onnx converts a scikit-learn pipeline step by step and knows only scikit-learn's own
estimators; a pipeline ending in ``lightgbm.LGBMRegressor`` or ``LGBMClassifier`` converts once
onnxmltools' LightGBM converter is registered with it (skl2onnx's documented way,
``update_registered_converter``). The whole pipeline, preprocessing included, then runs as
one onnxruntime graph, which was measured faster than LightGBM's own ``Booster.predict`` even
on already-preprocessed rows (one row: 33 us against 54 us; 64 rows: 257 us against 701 us,
on this 2-core machine, and the original also pays milliseconds of scikit-learn preprocessing).

Such a graph depends on two more libraries than a scikit-learn one: onnxmltools made it, and
LightGBM runs the original it is verified against. They go into the verdict's ``against``
(``engine_libraries``), so another version of either is noticed at load like another
skl2onnx or scikit-learn.
"""

from __future__ import annotations

import threading
from typing import Any

# libraries a verdict can depend on beyond mloop.serving.compiled.LIBRARIES, and which of all
# of them make the graph (another version of one: the graph is made again, not only checked)
ENGINE_LIBRARIES = ("lightgbm", "onnxmltools")
GRAPH_MAKERS = ("skl2onnx", "onnxmltools")

_LIGHTGBM = ("LGBMRegressor", "LGBMClassifier")
_registered: set[type] = set()
_lock = threading.Lock()


def final_estimator(model: Any) -> Any:
    """The last step of a pipeline, or the model itself."""
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


def is_lightgbm(estimator: Any) -> bool:
    """A LightGBM scikit-learn estimator onnxmltools converts (its ranker is not one)."""
    cls = type(estimator)
    return cls.__module__.split(".")[0] == "lightgbm" and cls.__name__ in _LIGHTGBM


def engine_libraries(model: Any) -> tuple[str, ...]:
    """The libraries, beyond scikit-learn's, that ``model``'s compiled graph and its
    verification depend on."""
    return ENGINE_LIBRARIES if is_lightgbm(final_estimator(model)) else ()


def prepare(model: Any, require: Any) -> None:
    """Make skl2onnx able to convert ``model``'s final estimator when it is LightGBM's.
    ``require(module)`` imports a module of the ``fast`` extra or raises CompileUnsupported."""
    final = final_estimator(model)
    if is_lightgbm(final):
        require("onnxmltools")
        with _lock:
            if type(final) not in _registered:
                _register_lightgbm(type(final))
                _registered.add(type(final))


def _register_lightgbm(cls: type) -> None:
    """Register onnxmltools' LightGBM converter for ``cls`` with skl2onnx."""
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    if cls.__name__ == "LGBMClassifier":
        update_registered_converter(
            cls, "LightGbmLGBMClassifier", calculate_linear_classifier_output_shapes,
            convert_lightgbm, options={"nocl": [True, False], "zipmap": [True, False]})
    else:
        update_registered_converter(
            cls, "LightGbmLGBMRegressor", calculate_linear_regressor_output_shapes,
            convert_lightgbm, options={"split": None})
