"""A pyfunc model's own predict, without re-checking what mloop already checked.

``PyFuncModel.predict`` enforces the input schema on every call (about 0.55 ms for the bike
model's ten columns here, whatever the row count), then sets up a prediction context, and
only then calls the flavour's predict. mloop has already validated every request against the
same signature and built one DataFrame per batch with the signature's dtypes, so the
enforcement re-checks what is known: on a cheap custom model it is most of the call.

Proven per version, not assumed: the first batch of each dtype combination (a column with
nulls changes its dtype) goes through MLflow's own schema enforcement once, and the
flavour's predict is called directly for that combination only if enforcement changed
nothing (same columns, dtypes and values), so the model receives exactly the frame
``pyfunc.predict`` would give it. Anything else goes through ``pyfunc.predict`` as before:
a model whose signature comes from type hints or whose frame MLflow reshapes after its input
example, one with inference parameters (MLflow fills their defaults), a tensor signature, or
a frame enforcement would change or refuse.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

MAX_KINDS = 64  # dtype combinations remembered per model (a few in practice)


class DirectPredict:
    """``(frame) -> predictions`` of a loaded pyfunc: its flavour's predict where proven
    equivalent (see the module docstring), ``pyfunc.predict`` otherwise."""

    def __init__(self, pyfunc: Any) -> None:
        self._pyfunc = pyfunc
        self._fn, self._with_params = _flavour_predict(pyfunc)
        self._verified: dict[tuple[Any, ...], bool] = {}
        self._lock = threading.Lock()

    @property
    def eligible(self) -> bool:
        """Whether the model can skip MLflow's checks at all (per frame, see ``direct``)."""
        return self._fn is not None

    def direct(self, frame: Any) -> bool:
        """Whether ``frame`` (its dtype combination) goes straight to the flavour."""
        if self._fn is None:
            return False
        key = tuple(frame.dtypes.tolist())
        known = self._verified.get(key)
        if known is None:
            known = self._unchanged_by_enforcement(frame)
            with self._lock:
                if len(self._verified) < MAX_KINDS:
                    self._verified[key] = known
        return known

    def __call__(self, frame: Any) -> Any:
        fn = self._fn
        if fn is None or not self.direct(frame):
            return self._pyfunc.predict(frame)
        return fn(frame, params=None) if self._with_params else fn(frame)

    def _unchanged_by_enforcement(self, frame: Any) -> bool:
        from mlflow.models.utils import _enforce_schema

        try:
            enforced = _enforce_schema(frame, self._pyfunc.metadata.get_input_schema(),
                                       self._pyfunc.loader_module)
        except Exception:  # MLflow refuses it: pyfunc.predict raises its own error
            return False
        return (list(getattr(enforced, "columns", [])) == list(frame.columns)
                and bool(enforced.dtypes.equals(frame.dtypes)) and bool(enforced.equals(frame)))


def _flavour_predict(pyfunc: Any) -> tuple[Callable[..., Any] | None, bool]:
    """The flavour's predict function and whether it takes ``params``; (None, False) when
    ``pyfunc.predict`` does more than enforce the schema for this model."""
    fn = getattr(pyfunc, "_predict_fn", None)
    meta = getattr(pyfunc, "metadata", None)
    if fn is None or meta is None or not callable(fn):
        return None, False
    try:
        schema = meta.get_input_schema()
        if (schema is None or schema.is_tensor_spec() or not schema.has_input_names()
                or meta.get_params_schema() is not None
                or meta._is_signature_from_type_hint() or meta._is_type_hint_from_example()):
            return None, False
        param = inspect.signature(fn).parameters.get("params")
    except (AttributeError, TypeError, ValueError):  # another MLflow than the one verified
        return None, False
    return fn, param is not None and param.kind != inspect.Parameter.VAR_KEYWORD
