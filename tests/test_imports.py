"""No import cycles among the project's modules (features, models, stages).

A cycle works only while every module in it happens to need the others' names late enough, and
breaks on an innocent reordering of imports; with imports going one way, a module can be read,
tested and imported on its own. Module-level imports must form no cycle at all. Imports inside
functions (kept lazy to spare a heavy library) must not go back either, with one exception: a
package's `__init__` may import its own submodules on first use (`features.encoders` loads a
family that way), since every submodule imports through its package anyway.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping

from features.cache.versions import PROJECT, ROOT, module_file, project_imports


def project_modules() -> list[str]:
    """Every module of the project packages, by dotted name."""
    names = []
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _is_module(name: str) -> bool:
    try:
        module_file(name)
        return True
    except ModuleNotFoundError:
        return False


def _top_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (not in functions or
    `if TYPE_CHECKING:` blocks; class bodies, `if`, `try` and `with` blocks do run)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _top_level(node.orelse)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                yield from _top_level(getattr(node, block, None) or [])


def module_level_imports(name: str) -> set[str]:
    """Project modules `name` imports at import time (`from pkg import mod` names pkg and mod)."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _top_level(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: `from . import x`, `from ..a import b`
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m != name and m.split(".")[0] in PROJECT and m not in PROJECT
            and _is_module(m)}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, iterative)."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path, on_path = [root], {root}
        todo = [iter(sorted(graph.get(root, ())))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:  # every import of path[-1] explored: no cycle through it
                last = path.pop()
                on_path.discard(last)
                done.add(last)
                todo.pop()
                continue
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                todo.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _message(cycle: list[str] | None) -> str:
    return "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_module_level_imports_form_no_cycle():
    graph = {m: module_level_imports(m) for m in project_modules()}
    assert "features.errors" in graph["features.audio.asr"]  # the walker sees the imports
    cycle = find_cycle(graph)
    assert cycle is None, _message(cycle)


def test_lazy_imports_do_not_go_back_either():
    modules = project_modules()
    packages = {m for m in modules if module_file(m).name == "__init__.py"}
    graph = {m: {i for i in project_imports(m)
                 if not (m in packages and i.startswith(m + "."))}  # a package loading its own parts
             for m in modules}
    cycle = find_cycle(graph)
    assert cycle is None, _message(cycle)
