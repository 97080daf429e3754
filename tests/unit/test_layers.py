"""The layers as docs/architecture.md draws them, checked by reading every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import genserve

ROOT = Path(genserve.__file__).parent
BELOW_THE_EDGE = ("engine", "model", "training", "storage", "runtime")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(node: ast.AST, here: str) -> list[str]:
    """Modules one import statement names (`from a import b` names a.b when b is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the package of `here`
        package = here.split(".")[: -node.level]
        base = ".".join([*package, base] if base else package)
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(name: str, run: bool = False) -> set[str]:
    """What a module imports, in functions too (a lazy import is still an arrow); with `run`,
    only what can run (imports under `if TYPE_CHECKING:` are for the type checker alone)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if run and isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            found.update(imported(child, name))
            visit(child)

    visit(tree)
    return found


def test_the_edge_imports_neither_torch_nor_the_model_package() -> None:
    bad = {
        (name, dep)
        for name in MODULES
        if name.startswith("genserve.api")
        for dep in imports(name)
        if dep.split(".")[0] in ("torch", "transformers", "peft")
        or dep.startswith("genserve.model")
    }
    assert not bad


def test_nothing_below_the_edge_imports_it() -> None:
    bad = {
        (name, dep)
        for name in MODULES
        if name.split(".")[1:2] and name.split(".")[1] in BELOW_THE_EDGE
        for dep in imports(name)
        if dep.startswith("genserve.api")
    }
    assert not bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as a path that ends where it starts; None if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)) is not None:
            return cycle
    return None


def test_no_import_cycle_among_genserve_modules() -> None:
    graph = {
        name: {d for d in imports(name, run=True) if d in MODULES and d != name} for name in MODULES
    }
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
