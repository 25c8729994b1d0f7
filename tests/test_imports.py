"""Every module of the package imports with the declared dependencies alone."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ibot

MODULES = sorted(m.name for m in pkgutil.walk_packages(ibot.__path__, prefix="ibot."))


def test_the_package_has_its_modules() -> None:
    # walk_packages found the tree (an empty list would make the test below vacuous).
    assert {"ibot.cli", "ibot.train.loop", "ibot.eval.corruptions", "ibot.data.datasets"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_python_m_ibot_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "ibot", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "pretrain" in done.stdout


def _imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement of ``path``, at any depth (lazy imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# package -> the sub-packages it must not import: the data flow runs one way.
FORBIDDEN = {
    "eval": ("ibot.train",),
    "train": ("ibot.eval",),
    "data": ("ibot.train", "ibot.eval", "ibot.losses", "ibot.models"),
    "models": ("ibot.train", "ibot.eval", "ibot.losses"),
    "losses": ("ibot.train", "ibot.eval"),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_do_not_import_upwards(package: str) -> None:
    root = Path(ibot.__file__).parent / package
    files = sorted(root.rglob("*.py"))
    assert len(files) > 1
    found = {
        f"{path.relative_to(root.parent)} imports {name}"
        for path in files
        for name in _imported_modules(path)
        if name.startswith(FORBIDDEN[package])
    }
    assert not found, sorted(found)


def test_the_layer_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ibot.train.loop import train\n    import ibot.eval.knn\n")
    assert {"ibot.train.loop", "ibot.eval.knn"} <= _imported_modules(module)


def _import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (lazy imports too), for every module under ``root``."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {name: (_imported_modules(path) & modules.keys()) - {name} for name, path in modules.items()}


def _import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of ``graph`` as one of its paths back to its start (a module reached from itself)."""
    cycles = []
    for start in sorted(graph):
        paths, seen = [[start]], {start}
        while paths:  # breadth first: the shortest way back
            path = paths.pop(0)
            for nxt in sorted(graph[path[-1]]):
                if nxt == start:
                    cycles.append([*path, start])
                    paths = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    paths.append([*path, nxt])
    return cycles


def test_no_import_cycles() -> None:
    # A cycle ties the layers together (ibot.report <-> ibot.eval.commands was one): each module's
    # imports, lazy ones included, must lead down and never back to it.
    graph = _import_graph(Path(ibot.__file__).parent, "ibot")
    assert {"ibot.report", "ibot.eval.commands", "ibot.run_folder"} <= graph.keys()
    assert "ibot.run_folder" in graph["ibot.eval.commands"]  # the graph holds the edges it should
    cycles = _import_cycles(graph)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_the_cycle_check_sees_lazy_cycles(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "eval").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "eval" / "__init__.py").write_text("")
    (package / "report.py").write_text("def f():\n    from pkg.eval.commands import format_lr\n")
    (package / "eval" / "commands.py").write_text("from pkg import report\n")
    (package / "leaf.py").write_text("import pkg.report\n")
    cycles = _import_cycles(_import_graph(package, "pkg"))
    assert ["pkg.report", "pkg.eval.commands", "pkg.report"] in cycles
    assert not any(c[0] == "pkg.leaf" for c in cycles)  # importing a cycle is not being in one
