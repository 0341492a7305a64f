"""Resolving import paths from mloop.yaml: the pipeline entry and step overrides.

``module:function`` where ``module`` may be a file in the project folder (``pipeline:tabular``
loads ``<project>/pipeline.py``) or any importable module.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mloop.errors import ConfigError, PipelineDefinitionError
from mloop.extras import extra_for_module, install_hint
from mloop.pipeline.dsl import Pipeline

BUILTIN_PIPELINE = "mloop.tabular.pipeline:tabular"


def import_object(path: str, *, root: Path | None = None, key: str = "") -> Any:
    """Import ``module:attr`` (or ``module.attr``); errors name the config key."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"'{key}': '{path}' is not an import path like 'package.module:name'",
                          key=key)
    if root is not None:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        top = module_name.split(".")[0]
        local = (root / f"{top}.py").exists() or (root / top / "__init__.py").exists()
        loaded = sys.modules.get(top)
        loaded_file = getattr(loaded, "__file__", None) or ""
        if local and loaded is not None and not Path(loaded_file).is_relative_to(root):
            # Another project's module of the same name (e.g. pipeline.py): load ours.
            for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
                del sys.modules[name]
            sys.path.remove(str(root))
            sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = extra_for_module(module_name)
        hint = f"; {install_hint(extra)}" if extra else ""
        raise ConfigError(f"'{key}': cannot import module '{module_name}' ({exc}){hint}",
                          key=key) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"'{key}': module '{module_name}' has no attribute '{attr}'",
                              key=key)
        obj = getattr(obj, part)
    return obj


def load_pipeline(entry: str | None, root: Path) -> Pipeline:
    path = entry or BUILTIN_PIPELINE
    obj = import_object(path, root=root, key="pipeline.entry")
    if not isinstance(obj, Pipeline):
        raise PipelineDefinitionError(
            f"pipeline.entry '{path}' is a {type(obj).__name__}, not a function decorated with "
            f"@mloop.pipeline")
    return obj


def load_overrides(steps: dict[str, str], root: Path) -> dict[str, Callable[..., Any]]:
    out = {}
    for name, path in steps.items():
        fn = import_object(path, root=root, key=f"pipeline.steps.{name}")
        if not callable(fn):
            raise ConfigError(f"'pipeline.steps.{name}': '{path}' is not callable",
                              key=f"pipeline.steps.{name}")
        out[name] = fn
    return out
