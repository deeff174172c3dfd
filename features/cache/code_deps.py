"""The project source files a stage entry runs: the code deps scripts/dvc_deps.py writes to dvc.yaml.

The walk follows every project import (lazy ones too: `versions.project_imports` reads the source,
it imports nothing), the parent packages Python runs before a module, and the modules a loader
imports by name, which no import statement shows (`LOADED_BY_NAME`).
"""
from __future__ import annotations

import functools

from features.cache import versions

# Modules that load project modules by name (importlib, a Registry's `modules` table), which no
# import statement shows -> what they may load (a package stands for all its modules).
# tests/stages/test_dvc_deps.py checks that no other module a stage runs loads by name.
LOADED_BY_NAME = {
    "features.encoders": ("features.encoders",),  # encoder families
    "models.heads.registry": ("models.heads", "models.training.pooled_trainer",
                              "models.training.frame_trainer"),  # head types and their trainers
}


@functools.lru_cache(maxsize=None)
def imported_files(module: str) -> frozenset[str]:
    """Project files (relative to the project root) `module` runs: its own, transitively."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(module_imports(name) - seen)
    return frozenset(versions.module_file(m).relative_to(versions.ROOT).as_posix() for m in seen)


@functools.lru_cache(maxsize=None)
def module_imports(name: str) -> frozenset[str]:
    """The project modules running `name` imports directly."""
    parts = name.split(".")
    # Python runs a module's parent packages first; the top-level ones are left out, as
    # versions.project_imports leaves them out
    parents = {".".join(parts[:i]) for i in range(2, len(parts))}
    by_name = {m for target in LOADED_BY_NAME.get(name, ()) for m in package_modules(target)}
    return frozenset(versions.project_imports(name) | parents | by_name)


def package_modules(name: str) -> list[str]:
    """`name` and, for a package, the modules in its folder."""
    path = versions.module_file(name)
    if path.name != "__init__.py":
        return [name]
    return [name] + [f"{name}.{p.stem}" for p in sorted(path.parent.glob("*.py"))
                     if p.name != "__init__.py"]
