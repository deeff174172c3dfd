"""dvc.yaml lists every project module a stage runs as a dependency (derived, not hand-kept)."""
import functools
import re
from pathlib import Path

import pytest
import yaml

from features.cache import versions

ROOT = Path(__file__).resolve().parents[2]


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


@functools.lru_cache(maxsize=None)
def imported_files(module: str) -> frozenset[str]:
    """The source files of `module` and every project module it imports, transitively."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(versions.project_imports(name) - seen)
    return frozenset(str(versions.module_file(m).relative_to(versions.ROOT)) for m in seen)


def missing_deps(spec: dict) -> list[str]:
    match = re.search(r"python -m (stages\.\w+)", spec["cmd"])
    assert match, f"cannot tell the module of {spec['cmd']!r}"
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    deps = [d.rstrip("/") for d in deps if "${" not in d]
    return sorted(f for f in imported_files(match.group(1))
                  if not any(f == d or f.startswith(d + "/") for d in deps))


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_imported_module_is_a_dependency(stage):
    missing = missing_deps(_stages()[stage])
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not depend on {missing}"


def test_the_walk_sees_lazy_imports():
    files = imported_files("stages.embed")
    assert {"stages/embed.py", "features/embedding/stage.py", "features/storage/store.py"} <= files
    assert any(f.startswith("features/encoders/") for f in files)  # imported inside a function
