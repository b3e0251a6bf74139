"""The package's shape: no import cycle among its modules, and none hidden by a deferred import.

The import graph is read from the source (every ``import`` and ``from ... import``, at any
depth), so a cycle fails here even where a function-level import would let it run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rnnkit

PACKAGE = Path(rnnkit.__file__).parent
# The command line imports its subcommands' modules only when they run, so --help stays fast;
# the demo's settings, which it reads to build its options, check their values the same way.
# `rnnkit bench` likewise imports torch and the kernels only after parsing its arguments.
DEFERRED_ALLOWED = {"rnnkit.cli", "rnnkit._demo_config", "rnnkit.bench"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``(imported rnnkit module, deferred?)`` for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, deferred) for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom) and child.module in modules:
                for alias in child.names:
                    target = f"{child.module}.{alias.name}"
                    found.append((target if target in modules else child.module, deferred))
            visit(child, inner)

    visit(tree, False)
    return found


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    deferred: list[tuple[str, str]] = []
    for name, path in modules.items():
        for target, is_deferred in _imports(path, modules):
            if target == name:
                continue
            edges[name].add(target)
            if is_deferred:
                deferred.append((name, target))
    return edges, deferred


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    edges, _ = _graph()
    assert len(edges) > 20  # the whole package was read
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_deferred_imports_outside_the_command_line():
    _, deferred = _graph()
    offenders = [(name, target) for name, target in deferred if name not in DEFERRED_ALLOWED]
    assert offenders == []


def test_nothing_under_ops_imports_the_modules():
    edges, _ = _graph()
    modules_files = {"rnnkit.cells", "rnnkit.layers", "rnnkit.stateful"}
    for name, targets in edges.items():
        if name.startswith("rnnkit.ops"):
            assert not targets & modules_files, f"{name} imports {targets & modules_files}"
