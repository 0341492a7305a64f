"""``@step`` and ``@pipeline``: a pipeline function builds a DAG by calling steps.

``@step`` only tags a function. Inside a ``@pipeline`` function, calling a step records a node
and returns a reference to its future output; passing that reference to another step is the
dependency edge. Other arguments are parameters (JSON values, part of the cache key). A step
may take a ``ctx`` argument: the runner injects a :class:`~mloop.pipeline.context.StepContext`.
Outside a pipeline, a step is just its function.

Both decorators keep the decorated function's signature for type checkers and editors
(``ParamSpec``, as Prefect types ``flow``): a step is typed as called, without the ``ctx`` the
runner injects when ``ctx: StepContext`` is its first parameter, and returning what the
function returns (inside a pipeline the value is an :class:`OutputRef` standing for it, which
passes on to the next step as if it were the value). Outside a pipeline a step that takes
``ctx`` is called as ``step.fn(ctx, ...)``.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

from pydantic import BaseModel

from mloop.errors import PipelineDefinitionError

if TYPE_CHECKING:
    from mloop.pipeline.context import StepContext

P = ParamSpec("P")
R = TypeVar("R")

_BUILDING: contextvars.ContextVar[Graph | None] = contextvars.ContextVar("mloop_graph",
                                                                         default=None)


@dataclass(frozen=True)
class OutputRef:
    """A promise of one output of a node, resolved by the runner."""

    node: str
    output: str


@dataclass
class Node:
    name: str
    step: Step
    inputs: dict[str, OutputRef]
    params: dict[str, Any]

    @property
    def upstream(self) -> list[str]:
        return sorted({ref.node for ref in self.inputs.values()})


@dataclass
class Graph:
    pipeline: str
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, step: Step, inputs: dict[str, OutputRef], params: dict[str, Any]) -> str:
        name = step.name
        i = 2
        while name in self.nodes:
            name = f"{step.name}_{i}"
            i += 1
        self.nodes[name] = Node(name, step, inputs, params)
        return name

    def order(self) -> list[Node]:
        """Nodes in dependency order (insertion order is one, since refs point backwards)."""
        return list(self.nodes.values())

    def node(self, name: str) -> Node:
        if name not in self.nodes:
            raise PipelineDefinitionError(
                f"pipeline '{self.pipeline}' has no step '{name}'; steps: "
                f"{', '.join(self.nodes)}")
        return self.nodes[name]

    def downstream(self, name: str) -> list[str]:
        return [n.name for n in self.nodes.values() if name in n.upstream]


@functools.cache
def _mloop_source_digest() -> str:
    """sha256 over mloop's own .py files: an mloop change invalidates cached built-in steps."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    try:
        json.dumps(value, sort_keys=True)
    except TypeError:
        raise PipelineDefinitionError(
            f"{where} must be a JSON value (number, string, list, mapping) or a step output, "
            f"got {type(value).__name__}") from None
    return value


class Step(Generic[P, R]):
    """A function tagged as a pipeline step; called with ``P`` (its parameters but ``ctx``)."""

    def __init__(self, fn: Callable[..., R], *, name: str | None = None,
                 outputs: tuple[str, ...] = ("output",), retries: int | None = None,
                 cache: bool = True,
                 cache_valid: Callable[[Any, dict[str, Any]], bool] | None = None) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__
        self.outputs = tuple(outputs)
        self.retries = retries
        self.cache = cache
        self.cache_valid = cache_valid
        self.signature = inspect.signature(fn)
        self.wants_ctx = "ctx" in self.signature.parameters
        # Callers never pass ctx (the runner injects it), so bind arguments without it.
        self.call_signature = self.signature.replace(parameters=[
            p for p in self.signature.parameters.values() if p.name != "ctx"])

    @functools.cached_property
    def source_hash(self) -> str:
        """The code a cached result depends on: the function, the whole module it lives in
        (helpers change results too), and for mloop's built-ins all of mloop's source."""
        h = hashlib.sha256()
        try:
            h.update(inspect.getsource(self.fn).encode())
        except (OSError, TypeError):
            h.update(f"{self.fn.__module__}.{self.fn.__qualname__}".encode())
        module_file = inspect.getsourcefile(self.fn) if hasattr(self.fn, "__code__") else None
        if module_file and Path(module_file).is_file():
            h.update(Path(module_file).read_bytes())
        if (self.fn.__module__ or "").split(".")[0] == "mloop":
            h.update(_mloop_source_digest().encode())
        return h.hexdigest()

    def with_fn(self, fn: Callable[..., Any]) -> Step[..., Any]:
        """This step's name and outputs, another function (a user override)."""
        base = fn.fn if isinstance(fn, Step) else fn
        return Step(base, name=self.name, outputs=self.outputs, retries=self.retries,
                    cache=self.cache, cache_valid=self.cache_valid)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        graph = _BUILDING.get()
        if graph is None:
            return self.fn(*args, **kwargs)
        try:
            bound = self.call_signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise PipelineDefinitionError(f"step '{self.name}': {exc}") from None
        bound.apply_defaults()
        inputs: dict[str, OutputRef] = {}
        params: dict[str, Any] = {}
        for pname, value in bound.arguments.items():
            if pname == "ctx":
                continue
            if isinstance(value, OutputRef):
                inputs[pname] = value
            else:
                params[pname] = _jsonable(value, f"argument '{pname}' of step '{self.name}'")
        missing = [p for p, spec in self.call_signature.parameters.items()
                   if p not in bound.arguments
                   and spec.default is inspect.Parameter.empty
                   and spec.kind not in (spec.VAR_KEYWORD, spec.VAR_POSITIONAL)]
        if missing:
            raise PipelineDefinitionError(
                f"step '{self.name}' called without argument(s) {', '.join(missing)}")
        name = graph.add(self, inputs, params)
        refs = tuple(OutputRef(name, o) for o in self.outputs)
        # the promise stands in for the value while the graph is built (see the module doc)
        promise: Any = refs[0] if len(refs) == 1 else refs
        return promise


class _StepDecorator(Protocol):
    """What ``@step(...)`` with arguments returns: the decorator, with the same typing."""

    @overload
    def __call__(self, fn: Callable[Concatenate[StepContext, P], R], /) -> Step[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Step[P, R]: ...


# A first parameter ``ctx: StepContext`` is the runner's to fill: the first overload drops it
# from the signature callers see. An untyped ``ctx`` matches both, and the step is then Any.
@overload
def step(fn: Callable[Concatenate[StepContext, P], R], /) -> Step[P, R]: ...


@overload
def step(fn: Callable[P, R], /) -> Step[P, R]: ...


@overload
def step(*, name: str | None = None, outputs: tuple[str, ...] | list[str] = ("output",),
         retries: int | None = None, cache: bool = True,
         cache_valid: Callable[[Any, dict[str, Any]], bool] | None = None) -> _StepDecorator: ...


def step(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         outputs: tuple[str, ...] | list[str] = ("output",), retries: int | None = None,
         cache: bool = True,
         cache_valid: Callable[[Any, dict[str, Any]], bool] | None = None) -> Any:
    """Tag a function as a step: ``@step`` or ``@step(name=..., outputs=...)``.

    ``outputs`` names a tuple return value's parts. ``cache=False`` always runs it (a step
    that reads the outside world). ``cache_valid(project, outputs)`` can veto a cache hit whose
    outputs point at something that may have gone (e.g. a deleted model version).
    """

    def wrap(f: Callable[..., Any]) -> Step[..., Any]:
        return Step(f, name=name, outputs=tuple(outputs), retries=retries, cache=cache,
                    cache_valid=cache_valid)

    return wrap(fn) if fn is not None else wrap


class Pipeline(Generic[P]):
    """A function tagged as a pipeline; calling it with ``P`` builds its :class:`Graph`."""

    def __init__(self, fn: Callable[P, Any], *, name: str | None = None) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = name or fn.__name__

    def build(self, *args: Any, overrides: dict[str, Callable[..., Any]] | None = None,
              **kwargs: Any) -> Graph:
        """Run the pipeline function in graph-building mode; apply step overrides by name."""
        graph = Graph(self.name)
        token = _BUILDING.set(graph)
        try:
            self.fn(*args, **kwargs)
        finally:
            _BUILDING.reset(token)
        if not graph.nodes:
            raise PipelineDefinitionError(f"pipeline '{self.name}' calls no steps")
        for step_name, fn in (overrides or {}).items():
            node = graph.node(step_name)
            node.step = node.step.with_fn(fn)
        return graph

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Graph:
        build: Callable[..., Graph] = self.build  # P's arguments, and no overrides
        return build(*args, **kwargs)


@overload
def pipeline(fn: Callable[P, Any], /) -> Pipeline[P]: ...


@overload
def pipeline(*, name: str | None = None) -> Callable[[Callable[P, Any]], Pipeline[P]]: ...


def pipeline(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Tag a function that wires steps together: ``@pipeline`` or ``@pipeline(name=...)``."""

    def wrap(f: Callable[..., Any]) -> Pipeline[...]:
        return Pipeline(f, name=name)

    return wrap(fn) if fn is not None else wrap
