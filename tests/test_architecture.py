"""The shape of the code, checked: no import cycle between modules or between packages, and
each package imports only from its own layer or below (DESIGN.md, "The shape of the code").

Imports are read from the source with ``ast``, wherever they stand: at module level, inside
functions (the lazy imports that keep the CLI fast) and under ``TYPE_CHECKING`` (a type is a
dependency too). A cycle hidden inside a function is still a cycle; it only fails later, at
the first call that closes it. Nothing of mloop is imported here.

The tests have a shape too: names they share live in helper modules (helpers.py,
serving_util.py, ...), never in conftest.py or a test module for another to import; and a
test skips for a missing optional part only through helpers.missing, which fails instead
under CI.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each package of mloop (a folder, or a top-level module: ``mloop.project`` is the package
# ``project``; ``mloop`` itself is the public façade) and its layer, bottom first. A module
# imports only from packages of its own layer or below; within a layer the cycle tests keep
# the order.
LAYERS: list[tuple[str, set[str]]] = [
    ("foundation: imports nothing of mloop above it",
     {"errors", "_version", "extras", "config", "storage", "store", "memory", "metrics",
      "timeparse", "prometheus_env"}),
    ("records kept elsewhere: MLflow's tracking store, snapshots, the audit chain and tokens",
     {"tracking_read", "tracking_sql", "tracking", "data", "security"}),
    ("the composition root every service receives", {"project"}),
    ("what the services build on: pipelines, the feature store, the inference log and labels, "
     "the gauges' base",
     {"pipeline", "traffic", "collector", "features"}),
    ("model versions: candidates, gates, aliases, promotion", {"registry"}),
    ("the built-in tabular models; the server's app, models and deployments",
     {"tabular", "serving"}),
    ("watching what serves, tuning, exporting to other systems, model cards (they read "
     "monitored windows)", {"monitoring", "tuning", "export", "cards"}),
    ("the loop that retrains and promotes", {"loop"}),
    ("processes and services behind one command each",
     {"server", "status", "doctor", "demo", "scaffold"}),
    ("the user's surface: the CLI, the dashboard, the package façade, project templates",
     {"cli", "ui", "mloop", "__main__", "templates"}),
]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. mloop.serving.app
    target: str  # the module it imports (a package's __init__ when the name is defined there)
    where: str  # file:line, and how the import is hidden if it is

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}  ({self.where})"


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _hidden(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    """'in a function', 'under TYPE_CHECKING' or '' for an import statement."""
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return ", in a function"
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return ", under TYPE_CHECKING"
    return ""


def read_imports(root: Path) -> list[Import]:
    """Every import between modules of the package at ``root`` (relative ones resolved)."""
    modules = _modules(root)
    top = root.name

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from a import b`: the module a.b if there is one, else a (b is a name in it)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                         for a in node.names]
            else:
                continue
            where = f"{path.relative_to(root.parent)}:{node.lineno}{_hidden(node, parents)}"
            for name in dict.fromkeys(names):
                if name != top and not name.startswith(top + "."):
                    continue
                target = resolve(name)
                if target is not None and target != module:
                    found.append(Import(module, target, where))
    return found


def package_of(module: str) -> str:
    """``mloop.serving.app`` -> ``serving``; ``mloop.project`` -> ``project``; ``mloop`` ->
    ``mloop``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def graphs(imports: list[Import]) -> tuple[nx.DiGraph, nx.DiGraph]:
    """The module graph and the package graph; each edge keeps the imports that make it."""
    files, packages = nx.DiGraph(), nx.DiGraph()
    for imp in imports:
        for graph, a, b in ((files, imp.source, imp.target),
                            (packages, package_of(imp.source), package_of(imp.target))):
            if a != b:
                graph.add_edge(a, b)
                graph.edges[a, b].setdefault("imports", []).append(imp)
    return files, packages


def cycles(graph: nx.DiGraph) -> list[str]:
    """One cycle per strongly connected group, as its path and the imports that close it."""
    out = []
    for group in sorted(nx.strongly_connected_components(graph), key=sorted):
        if len(group) < 2:
            continue
        edges = nx.find_cycle(graph.subgraph(group), source=min(group))
        path = " -> ".join([*(a for a, _ in edges), edges[0][0]])
        lines = [f"  {graph.edges[a, b]['imports'][0]}" for a, b in edges]
        out.append("\n".join([path, *lines]))
    return out


@functools.cache
def _mloop() -> tuple[nx.DiGraph, nx.DiGraph]:
    return graphs(read_imports(SRC / "mloop"))


def test_no_module_of_mloop_imports_one_that_imports_it_back() -> None:
    found = cycles(_mloop()[0])
    assert not found, "import cycles between modules:\n" + "\n".join(found)


def test_no_package_of_mloop_imports_one_that_imports_it_back() -> None:
    found = cycles(_mloop()[1])
    assert not found, "import cycles between packages:\n" + "\n".join(found)


def test_each_package_imports_only_from_its_own_layer_or_below() -> None:
    layer = {pkg: i for i, (_, members) in enumerate(LAYERS) for pkg in members}
    packages = _mloop()[1]
    unplaced = sorted(p for p in packages if p not in layer)
    assert not unplaced, (f"package(s) {', '.join(unplaced)} have no layer: add each to "
                          f"LAYERS in {Path(__file__).name}")
    upward = [f"  {packages.edges[a, b]['imports'][0]}  (layer '{LAYERS[layer[a]][0]}' "
              f"imports layer '{LAYERS[layer[b]][0]}')"
              for a, b in sorted(packages.edges) if layer[b] > layer[a]]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


# ------------------------------------------------------------- the checker, on a small tree

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "pkg"


def test_a_cycle_closed_inside_a_function_is_reported_as_its_path(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "def f():\n    from . import a\n",
    })
    files, _ = graphs(read_imports(root))
    [found] = cycles(files)
    assert found.splitlines()[0] == "pkg.a -> pkg.b -> pkg.a"
    assert "pkg/b.py:2, in a function" in found


def test_imports_under_type_checking_and_relative_ones_count(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from ..high.y import Y\n",
        "high/__init__.py": "",
        "high/y.py": "from pkg.low import x\nclass Y: ...\n",
    })
    _, packages = graphs(read_imports(root))
    [found] = cycles(packages)
    assert "pkg.low.x -> pkg.high.y  (pkg/low/x.py:3, under TYPE_CHECKING)" in found


@pytest.mark.parametrize("statement", ["import pkg.other", "from pkg import other",
                                       "from pkg.other import VALUE", "from . import other"])
def test_each_form_of_import_names_the_module_it_loads(tmp_path: Path, statement: str) -> None:
    root = _tree(tmp_path, {"__init__.py": "", "other.py": "VALUE = 1\n",
                            "user.py": statement + "\n"})
    assert [(i.source, i.target) for i in read_imports(root)] == [("pkg.user", "pkg.other")]


# ------------------------------------------------------------------- the tests' own shape

TESTS = Path(__file__).resolve().parent


def _reached(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules of the tests folder an import statement loads, by their file's stem:
    ``from .conftest import x``, ``from tests import test_a``, ``import conftest`` ..."""
    if isinstance(node, ast.Import):
        dotted = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        local = node.level > 0 or base == "tests" or base.startswith("tests.")
        dotted = [base] if base and base != "tests" else []
        if local and not dotted:  # `from . import x`, `from tests import x`: x is a module
            dotted = [alias.name for alias in node.names]
    stems = []
    for name in dotted:
        parts = name.split(".")
        if parts[0] == "tests" and len(parts) > 1:
            parts = parts[1:]
        stems.append(parts[0])
    return stems


def imports_of_tests_or_conftest(folder: Path) -> list[str]:
    """Every import, in the folder's ``*.py``, of ``conftest`` or of a ``test_*`` module, as
    ``file:line: statement``. A shared name belongs in ``helpers.py`` (or another helper
    module): a test module that imports another ties the two together (moving or renaming a
    test file breaks an unrelated one; a test function imported by name is collected twice),
    and conftest.py is pytest's file of fixtures and hooks, which pytest loads itself."""
    found = []
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if any(s == "conftest" or s.startswith("test_") for s in _reached(node)):
                found.append(f"{path.parent.name}/{path.name}:{node.lineno}: "
                             f"{ast.unparse(node)}")
    return found


def test_no_test_module_imports_conftest_or_another_test_module() -> None:
    found = imports_of_tests_or_conftest(TESTS)
    assert not found, ("imports of conftest.py or of a test module (move the shared names to "
                       "tests/helpers.py):\n" + "\n".join(found))


@pytest.mark.parametrize("statement", [
    "from .conftest import rentals_frame", "from tests.conftest import BIKE", "import conftest",
    "from . import conftest", "from .test_gates import GOOD", "from tests.test_gates import GOOD",
    "import tests.test_gates", "from tests import test_gates", "from . import helpers, test_a",
    "def f():\n    from .test_a import X"])
def test_each_form_of_importing_a_test_module_or_conftest_is_named(tmp_path: Path,
                                                                   statement: str) -> None:
    text = "import os\n\n" + statement + "\n"  # the import on the last line
    (tmp_path / "test_b.py").write_text(text)
    [found] = imports_of_tests_or_conftest(tmp_path)
    assert found.startswith(f"{tmp_path.name}/test_b.py:{len(text.splitlines())}: ")


@pytest.mark.parametrize("statement", [
    "from .helpers import copy_project", "from .serving_util import metric", "import testing",
    "from tests.helpers import run_cli", "from . import browser", "import pytest"])
def test_imports_of_helper_modules_are_allowed(tmp_path: Path, statement: str) -> None:
    (tmp_path / "test_b.py").write_text(statement + "\n")
    assert imports_of_tests_or_conftest(tmp_path) == []


# ------------------------------------------------------------- skips: only outside CI

SKIPS = ("skip", "importorskip", "skipif", "xfail")


def skips_outside_helpers(folder: Path) -> list[str]:
    """Every ``pytest.skip``, ``importorskip``, ``mark.skipif`` or ``xfail`` in the folder's
    ``*.py`` but helpers.py, as ``file:line``: a test that skips by itself would skip under CI
    too, where every optional part is installed and a skip hides a broken install."""
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.name == "helpers.py":
            continue
        nodes = list(ast.walk(ast.parse(path.read_text(), filename=str(path))))
        called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
        for node in nodes:
            if not (isinstance(node, ast.Attribute) and node.attr in SKIPS):
                continue
            # pytest.mark.skipif / xfail, or a call of pytest.skip / importorskip (not a
            # mention such as pytest.skip.Exception)
            marked = isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
            if marked or id(node) in called:
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("statement", [
    "pytest.skip('no GPU')", "pytest.importorskip('optuna')",
    "@pytest.mark.skipif(True, reason='x')\ndef test_a(): pass",
    "@pytest.mark.xfail\ndef test_a(): pass", "pytestmark = pytest.mark.skip"])
def test_each_form_of_skipping_is_named(tmp_path: Path, statement: str) -> None:
    (tmp_path / "test_b.py").write_text("import pytest\n" + statement + "\n")
    [found] = skips_outside_helpers(tmp_path)
    assert found.startswith("test_b.py:")


def test_tests_skip_only_through_helpers_missing() -> None:
    found = skips_outside_helpers(TESTS)
    assert not found, ("skips outside tests/helpers.py (call helpers.require(module, "
                       "install=...) or helpers.missing(message): they fail under CI):\n"
                       + "\n".join(found))


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    """pyproject's `--dist loadgroup` keeps a module marked xdist_group on one worker (one
    SparkSession for test_spark_predict). It silently stops doing so with some pytest and
    pytest-xdist releases (pytest-dev/pytest-xdist#1386: pytest 9.2 with xdist 3.8), or when
    pyproject's addopts lose it (`pytest`, as README runs it, takes -n and --dist from there):
    here six tests of one group, run under pyproject's own addopts, must all report the same
    one of two workers."""
    import subprocess
    import sys
    import tomllib

    pyproject = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())
    addopts = pyproject["tool"]["pytest"]["ini_options"]["addopts"]
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = {addopts}\n")
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n\npytestmark = pytest.mark.xdist_group('one')\n\n"
        + "".join(f"def test_{i}():\n    pass\n\n" for i in range(6)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v",
                           "test_grouped.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    workers = re.findall(r"^\[(gw\d+)\] \[\s*\d+%\] PASSED test_grouped\.py::test_\d+@one",
                         proc.stdout, flags=re.M)
    assert len(workers) == 6 and len(set(workers)) == 1, f"addopts {addopts!r}\n{proc.stdout}"
    assert re.search(r"^created: 2/2 workers", proc.stdout, flags=re.M), proc.stdout


def test_a_missing_optional_part_skips_here_and_fails_under_ci(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from .helpers import require

    install = "pip install 'mloop[nothing]'"
    for value in (None, "", "false", "0"):  # not CI: a developer's machine
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match=r"mloop_absent.*mloop\[nothing\]"):
            require("mloop_absent", install=install)
    for value in ("true", "1", "True"):
        monkeypatch.setenv("CI", value)
        # BaseException: were require to skip here, pytest.raises(Failed) would let the skip
        # through and this test would report itself skipped, not failed
        with pytest.raises(BaseException) as caught:
            require("mloop_absent", install=install)
        assert caught.type is pytest.fail.Exception, (
            f"CI={value}: a missing optional part raised {caught.type.__name__} "
            f"({caught.value}), not a failure")
        assert re.search(r"mloop_absent is not installed .*mloop\[nothing\].*CI=true",
                         str(caught.value)), caught.value
    assert require("json", install=install).__name__ == "json"  # present: imported
