"""The package's import graph, read with `ast` (nothing is imported): no cycles, and a base that does not reach up.

- Module-level imports (those that run when a module is imported: at the top level, in module-level
  `if`/`try`/`with` blocks and in class bodies, not under `if TYPE_CHECKING:`) must form no cycle.
  Imports inside functions are lazy and allowed to point anywhere. Importing `a.b.c` also runs the
  `__init__` of the packages `a.b` and `a` (those the importing module is not itself inside), so
  those edges count too.
- The base (`llmjax.errors`, `llmjax.storage`, `llmjax.runlog`, `llmjax.config.*`) imports nothing
  above it, not even lazily: everything else imports the base, never the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "llmjax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
BASE = {"llmjax.errors", "llmjax.storage", "llmjax.runlog"}
BASE_PACKAGES = ("llmjax.config",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = all_modules()


def is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], eager_only: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements in `body`: with `eager_only`, those that run at import time."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not eager_only:
                out += _imports(node.body, eager_only)
        elif isinstance(node, ast.If):
            if not (eager_only and _is_type_checking(node.test)):
                out += _imports(node.body, eager_only)
            out += _imports(node.orelse, eager_only)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out += _imports(block, eager_only)
        elif isinstance(node, (ast.With, ast.ClassDef, ast.For, ast.While)):
            out += _imports(node.body, eager_only)
    return out


def _resolve(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package's modules an import statement in `module` names (a `from X import y` names X.y when that is
    a module, else X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:  # relative: from the package of `module`
        anchor = module.split(".") if is_package(module) else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _with_packages(module: str, target: str) -> set[str]:
    """`target` and the packages whose `__init__` importing it runs, less those `module` is itself inside
    (they are already being imported) and the root package."""
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)} | {module}
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {t for t in chain if t in MODULES and t not in own}


def import_graph(eager_only: bool = True) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _imports(tree.body, eager_only):
            for target in _resolve(name, node):
                edges |= _with_packages(name, target)
        graph[name] = edges - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a path a -> ... -> a."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component (breadth-first)."""
    start = min(comp)
    parent: dict[str, str] = {}
    todo = [start]
    while todo:
        nxt = []
        for v in todo:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        todo = nxt
    return sorted(comp)


def in_base(name: str) -> bool:
    return name in BASE or any(name == p or name.startswith(p + ".") for p in BASE_PACKAGES)


def test_the_walk_sees_the_package():
    assert {"llmjax.config", "llmjax.config.rules.validate", "llmjax.errors", "llmjax.cli", "llmjax.train.loop"} <= set(
        MODULES)
    graph = import_graph()
    assert "llmjax.errors" in graph["llmjax.storage"]
    assert "llmjax.config.schema" in graph["llmjax.config.loading"]
    assert "llmjax.models.families" in import_graph(eager_only=False)["llmjax.infer.engine"]


def test_find_cycles_names_them():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if in_base(m)))
def test_the_base_imports_nothing_above_it(module):
    """config, errors, storage and runlog import only each other, even inside functions."""
    above = sorted(t for t in import_graph(eager_only=False)[module] if not in_base(t))
    assert not above, f"{module} reaches above the base: {', '.join(above)}"


def test_errors_import_nothing_from_the_package():
    assert import_graph(eager_only=False)["llmjax.errors"] == set()
