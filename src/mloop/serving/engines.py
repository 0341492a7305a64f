"""Estimators from other libraries on the verified fast path: LightGBM and XGBoost through
onnxmltools.

skl2onnx converts a scikit-learn pipeline step by step and knows only scikit-learn's own
estimators; a pipeline ending in ``lightgbm.LGBMRegressor`` / ``LGBMClassifier`` or
``xgboost.XGBRegressor`` / ``XGBClassifier`` converts once onnxmltools' converter for that
library is registered with it (skl2onnx's documented way, ``update_registered_converter``).
The whole pipeline, preprocessing included, then runs as one onnxruntime graph, which was
measured faster than each library's own predict even on already-preprocessed rows, on this
2-core machine, with one thread:

* LightGBM ``Booster.predict``: one row 33 us against 54 us; 64 rows 257 us against 701 us;
* XGBoost ``inplace_predict`` (its fastest call, no DMatrix), 300 trees of depth 6: one row
  33 us against 244 us; 64 rows 270 us against 471 us
  (``benchmarks/serving/bench_xgboost_engines.py``: XGBoost's own engine would have kept
  the original's preprocessing too, and is slower even without it);

and either original also pays milliseconds of scikit-learn preprocessing per call.

Such a graph depends on two more libraries than a scikit-learn one: onnxmltools made it, and
the estimator's library runs the original it is verified against. They go into the verdict's
``against`` (``engine_libraries``), so another version of either is noticed at load like
another skl2onnx or scikit-learn.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# libraries a verdict can depend on beyond mloop.serving.compiled.LIBRARIES, and which of all
# of them make the graph (another version of one: the graph is made again, not only checked)
ENGINE_LIBRARIES = ("lightgbm", "xgboost", "onnxmltools")
GRAPH_MAKERS = ("skl2onnx", "onnxmltools")
# a verdict's library key -> the distributions that install it (the first one installed
# gives the version): the xgboost extra installs xgboost-cpu, which is imported as xgboost
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {"xgboost": ("xgboost", "xgboost-cpu")}


@dataclass(frozen=True)
class Engine:
    """A library whose scikit-learn estimators onnxmltools converts."""

    library: str  # its top-level module, and its key in a verdict's ``against``
    converter: str  # "module:function" of onnxmltools' converter
    aliases: dict[str, str]  # estimator class name -> skl2onnx alias
    # options of the classifier's and of the regressor's converter
    classifier_options: dict[str, Any]
    regressor_options: dict[str, Any] | None


_CLASSIFIER_OPTIONS = {"nocl": [True, False], "zipmap": [True, False]}
ENGINES = (
    Engine("lightgbm",
           "onnxmltools.convert.lightgbm.operator_converters.LightGbm:convert_lightgbm",
           {"LGBMRegressor": "LightGbmLGBMRegressor",
            "LGBMClassifier": "LightGbmLGBMClassifier"},
           _CLASSIFIER_OPTIONS, {"split": None}),
    Engine("xgboost",
           "onnxmltools.convert.xgboost.operator_converters.XGBoost:convert_xgboost",
           {"XGBRegressor": "XGBoostXGBRegressor", "XGBClassifier": "XGBoostXGBClassifier"},
           _CLASSIFIER_OPTIONS, None),
)
_registered: set[type] = set()
_lock = threading.Lock()


def final_estimator(model: Any) -> Any:
    """The last step of a pipeline, or the model itself."""
    steps = getattr(model, "steps", None)
    return steps[-1][1] if steps else model


def engine_of(estimator: Any) -> Engine | None:
    """The engine whose converter takes ``estimator`` (LightGBM's or XGBoost's regressor or
    classifier; not their rankers, nor XGBoost's random forests), or None."""
    cls = type(estimator)
    top = cls.__module__.split(".")[0]
    return next((e for e in ENGINES if e.library == top and cls.__name__ in e.aliases), None)


def engine_libraries(model: Any) -> tuple[str, ...]:
    """The libraries, beyond scikit-learn's, that ``model``'s compiled graph and its
    verification depend on."""
    engine = engine_of(final_estimator(model))
    return () if engine is None else (engine.library, "onnxmltools")


def prepare(model: Any, require: Any) -> None:
    """Make skl2onnx able to convert ``model``'s final estimator when it is LightGBM's or
    XGBoost's. ``require(module)`` imports a module of the ``fast`` extra or raises
    CompileUnsupported."""
    final = final_estimator(model)
    engine = engine_of(final)
    if engine is not None:
        require("onnxmltools")
        with _lock:
            if type(final) not in _registered:
                _register(engine, type(final))
                _registered.add(type(final))


def _register(engine: Engine, cls: type) -> None:
    """Register onnxmltools' converter of ``engine`` for ``cls`` with skl2onnx."""
    import importlib

    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import (
        calculate_linear_classifier_output_shapes,
        calculate_linear_regressor_output_shapes,
    )

    module, _, function = engine.converter.partition(":")
    convert: Callable[..., Any] = getattr(importlib.import_module(module), function)
    alias = engine.aliases[cls.__name__]
    if cls.__name__.endswith("Classifier"):
        update_registered_converter(cls, alias, calculate_linear_classifier_output_shapes,
                                    convert, options=engine.classifier_options)
    else:
        update_registered_converter(cls, alias, calculate_linear_regressor_output_shapes,
                                    convert, options=engine.regressor_options)
