"""The house rules of ARCHITECTURE.md "Layout", checked by walking the source's imports (no import runs).

- Imports point down only: flows → tasks → storage → schemas; `schemas` imports nothing of ours,
  `storage` never imports `tasks`, nothing imports `flows`. Every import counts here, including the
  ones inside functions: an import deferred to dodge a layer is still the layer broken.
- No import circle: the graph of imports that run when a module is imported (module level, including
  `try`/`if` blocks, excluding `if TYPE_CHECKING:`) has no cycle. A function-level import that keeps an
  optional dependency out of import time (torch in `storage.torch_dataset`) is not a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import REPO

LAYERS = ("schemas", "storage", "tasks", "flows")  # bottom to top
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package's __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree: ast.Module, import_time_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements; with `import_time_only`, only those that run when the module is imported."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _type_checking(node):
            continue
        if import_time_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _ours(dotted: str) -> str | None:
    """The longest module of ours `dotted` names (a name imported from a module resolves to the module)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(name: str, import_time_only: bool) -> set[str]:
    path, package = MODULES[name]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8")), import_time_only):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            if node.level:
                base = name.split(".") if package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            candidates = [f"{module}.{alias.name}" for alias in node.names] or [module]
        found.update(t for t in map(_ours, candidates) if t and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_walk_sees_the_tree() -> None:
    # The checks below are only as good as the graph: it must hold every layer and known edges.
    assert {name.split(".")[0] for name in MODULES} == set(LAYERS)
    assert "flows.generate" in MODULES and "tasks.llm.base" in MODULES
    assert "schemas.config" in imports_of("flows.generate", import_time_only=True)
    assert "storage.torch_dataset" in imports_of("storage.reader", import_time_only=False)
    assert "storage.torch_dataset" not in imports_of("storage.reader", import_time_only=True)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_only(name: str) -> None:
    layer = name.split(".")[0]
    upward = sorted(t for t in imports_of(name, import_time_only=False) if RANK[t.split(".")[0]] > RANK[layer])
    assert not upward, f"{name} ({layer}) imports {upward}: imports point down only (ARCHITECTURE.md 'Layout')"


def test_no_import_cycle() -> None:
    graph = {name: imports_of(name, import_time_only=True) for name in MODULES}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_backend_imports_another_backend() -> None:
    # Issue 13 part 3: backends are registered in tasks/llm/__init__.py and never import each other.
    backends = {name for name in MODULES if name.startswith("tasks.llm.") and name.rsplit(".", 1)[1] in
                {"openai_compat", "vllm_engine", "transformers_backend", "rules"}}
    assert len(backends) == 4, backends
    for name in backends:
        assert not (imports_of(name, import_time_only=False) & (backends - {name})), name
    assert not (imports_of("tasks.llm.base", import_time_only=False) & backends)
