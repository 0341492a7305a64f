"""Typed use of ``@step``, ``@pipeline`` and ``open_project``, checked by mypy in test_dsl.py
(never imported).

A line ending in a comment "N: text" must get a mypy note containing the text, one ending in
"E: text" an error containing it; any other line must pass.
"""

from typing import reveal_type

from mloop import open_project, pipeline, step
from mloop.pipeline.context import StepContext


@step
def load(path: str, limit: int = 10) -> list[int]:
    return list(range(limit))


@step(outputs=("train", "test"))
def split(rows: list[int], fraction: float = 0.5) -> tuple[list[int], list[int]]:
    cut = int(len(rows) * fraction)
    return rows[:cut], rows[cut:]


@step
def fit(ctx: StepContext, train: list[int], *, lr: float) -> dict[str, float]:
    ctx.log_metric("rows", len(train))
    return {"lr": lr}


@step(cache=False)
def score(ctx: StepContext, model: dict[str, float], rows: list[int]) -> float:
    return model["lr"] * len(rows)


@pipeline
def bare(path: str) -> None:
    train, test = split(load(path))
    score(fit(train, lr=0.1), test)


@pipeline(name="named")
def named(path: str, *, limit: int) -> None:
    load(path, limit=limit)


reveal_type(load)  # N: Step[[path: str, limit: int =], list[int]]
reveal_type(split)  # N: Step[[rows: list[int], fraction: float =], tuple[list[int], list[int]]]
reveal_type(fit)  # N: Step[[train: list[int], *, lr: float], dict[str, float]]
reveal_type(score)  # N: Step[[model: dict[str, float], rows: list[int]], float]
reveal_type(fit([1], lr=0.1))  # N: dict[str, float]
reveal_type(bare)  # N: Pipeline[[path: str]]
reveal_type(named("x.csv", limit=3))  # N: Graph

load(3)  # E: Argument 1 to "__call__" of "Step" has incompatible type "int"; expected "str"
fit([1], 0.1)  # E: Too many positional arguments for "__call__" of "Step"
score({"lr": 0.1})  # E: Missing positional argument "rows" in call to "__call__" of "Step"
named("x.csv")  # E: Missing named argument "limit" for "__call__" of "Pipeline"
bare(path=1)  # E: Argument "path" to "__call__" of "Pipeline" has incompatible type "int"

reveal_type(open_project("."))  # N: mloop.project.Project
open_project(3)  # E: Argument 1 to "open_project" has incompatible type "int"
