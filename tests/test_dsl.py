"""@step and @pipeline: how calls inside a pipeline function become a graph."""

from __future__ import annotations

import importlib.util
import re
from importlib import resources
from pathlib import Path

import pytest

from mloop import pipeline, step
from mloop.config import parse_config
from mloop.errors import PipelineDefinitionError
from mloop.pipeline.dsl import OutputRef
from mloop.tabular.pipeline import tabular

from .helpers import require


@step
def load(path: str) -> list[int]:
    return [1, 2, 3]


@step(outputs=("train", "test"))
def split(rows: list[int], fraction: float = 0.5) -> tuple[list[int], list[int]]:
    cut = int(len(rows) * fraction)
    return rows[:cut], rows[cut:]


@step
def fit(ctx, train: list[int], test: list[int], lr: float) -> dict:
    return {"n": len(train)}


def test_steps_called_inside_a_pipeline_become_nodes_wired_by_their_outputs() -> None:
    @pipeline(name="p")
    def p(cfg: dict) -> None:
        rows = load(path=cfg["path"])
        train, test = split(rows)
        fit(train, test, lr=0.1)

    graph = p.build({"path": "x.csv"})
    assert list(graph.nodes) == ["load", "split", "fit"]
    assert graph.nodes["split"].inputs == {"rows": OutputRef("load", "output")}
    assert graph.nodes["split"].params == {"fraction": 0.5}
    assert graph.nodes["fit"].inputs == {"train": OutputRef("split", "train"),
                                         "test": OutputRef("split", "test")}
    assert graph.nodes["fit"].params == {"lr": 0.1}
    assert graph.downstream("split") == ["fit"]


def test_a_step_outside_a_pipeline_is_its_plain_function() -> None:
    assert split([1, 2, 3, 4]) == ([1, 2], [3, 4])


def test_calling_a_step_twice_gives_two_nodes() -> None:
    @pipeline
    def twice(cfg: None) -> None:
        load(path="a")
        load(path="b")

    assert list(twice.build(None).nodes) == ["load", "load_2"]


def test_a_missing_argument_names_the_step_and_argument() -> None:
    @pipeline
    def bad(cfg: None) -> None:
        fit(load(path="a"), lr=0.1)

    with pytest.raises(PipelineDefinitionError, match=r"step 'fit' called without argument"
                                                      r"\(s\) test"):
        bad.build(None)


def test_a_non_json_param_is_refused_with_its_name() -> None:
    @pipeline
    def bad(cfg: None) -> None:
        load(path=object())

    with pytest.raises(PipelineDefinitionError, match=r"argument 'path' of step 'load' must be "
                                                      r"a JSON value"):
        bad.build(None)


def test_an_empty_pipeline_is_refused() -> None:
    @pipeline(name="empty")
    def empty(cfg: None) -> None:
        return None

    with pytest.raises(PipelineDefinitionError, match="pipeline 'empty' calls no steps"):
        empty.build(None)


def test_the_init_template_wires_the_same_graph_as_the_built_in_pipeline() -> None:
    """The template is an editable copy of the built-in wiring; it must not drift from it."""
    src = resources.files("mloop") / "templates" / "tabular" / "pipeline.py"
    spec = importlib.util.spec_from_loader("template_pipeline", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(src.read_text(), "template_pipeline.py", "exec"), module.__dict__)
    cfg = parse_config("project: p\ndata: {path: d.csv}\ntarget: y\n"
                       "features: {time_column: t}\nmetrics: [mae]\n")
    built_in, template = tabular.build(cfg), module.tabular.build(cfg)
    assert template.pipeline == built_in.pipeline == "tabular"
    assert [(n.name, n.inputs, n.params, n.step.source_hash) for n in template.order()] == [
        (n.name, n.inputs, n.params, n.step.source_hash) for n in built_in.order()]


def test_decorated_steps_pipelines_and_open_project_keep_their_signatures_for_mypy() -> None:
    """mypy checks tests/typed_dsl_usage.py: each `# N:` / `# E:` line must get that note or
    error, and no other line an error (the runner's `ctx` left out of a step's signature)."""
    api = require("mypy.api", install="pip install -r requirements.lock (the dev tools)")
    import mloop

    usage = Path(__file__).with_name("typed_dsl_usage.py")
    package = Path(mloop.__file__).parent
    # only mloop's typed surface is analysed (the rest is skipped): seconds, not a minute
    out, err, _status = api.run([
        str(usage), str(package / "__init__.py"), str(package / "pipeline" / "dsl.py"),
        str(package / "pipeline" / "context.py"), str(package / "project.py"),
        "--follow-imports=skip",
        "--cache-dir=/dev/null", "--no-error-summary", "--hide-error-context", "--no-pretty"])
    assert not err, err
    got: dict[tuple[int, str], list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"(?:.*[/\\])?typed_dsl_usage\.py:(\d+): (error|note): (.*)", line)
        if m:
            kind = "E" if m.group(2) == "error" else "N"
            got.setdefault((int(m.group(1)), kind), []).append(m.group(3))
    expected = {(n, kind): text.strip()
                for n, line in enumerate(usage.read_text().splitlines(), start=1)
                for kind, text in re.findall(r"# ([EN]): (.+)$", line)}
    assert expected, "the usage file lost its expectations"
    for (n, kind), text in expected.items():
        assert any(text in msg for msg in got.get((n, kind), [])), (n, text, got.get((n, kind)))
    unexpected = {key: msgs for key, msgs in got.items() if key[1] == "E" and key not in expected}
    assert not unexpected, unexpected
