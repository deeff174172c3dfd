"""dvc.yaml lists every project file a stage runs as a dependency, as scripts/dvc_deps.py writes it."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import dvc_deps  # noqa: E402

from features.cache import code_deps, versions  # noqa: E402
from features.topology import STAGES  # noqa: E402

SAMPLE = """\
stages:
  prepare:   # a comment on the stage
    cmd: python -m stages.prepare --out x
    deps:
      - data/in.csv
      # why the next one
      - stages/old_module.py
      - ${some.param}
      - big/folder:
          hash: md5
      - features/errors.py   # kept with its comment
      - models
    params:
      - prepare

  semi_report:
    foreach: ${list}
    do:
      cmd: python -m stages.semi_report
      deps:
      - artifacts/x
      - models
      outs:
        - out
"""


def test_dvc_yaml_code_deps_are_current():
    stale = dvc_deps.check()
    assert not stale, f"stale code deps {stale}: run `make deps`"


def test_the_walk_sees_lazy_imports_parent_packages_and_by_name_loads():
    files = code_deps.imported_files("stages.embed")
    assert {"stages/embed.py", "features/embedding/stage.py", "features/storage/store.py",
            "features/storage/__init__.py"} <= files
    assert {"features/encoders/speech.py", "features/encoders/text.py"} <= files  # by family name
    assert "features/__init__.py" not in files


def _imports_by_name(module: str) -> bool:
    tree = ast.parse(versions.module_file(module).read_text())
    return any(isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", ""))
               == "import_module" for n in ast.walk(tree))


def test_every_loader_by_name_a_stage_runs_is_declared():
    modules = set()
    for entry in STAGES.values():
        todo = [entry.module]
        while todo:
            name = todo.pop()
            if name not in modules:
                modules.add(name)
                todo.extend(code_deps.module_imports(name))
    assert {m for m in modules if _imports_by_name(m)} == set(code_deps.LOADED_BY_NAME)


def test_the_head_registry_loads_only_declared_modules():
    from models.heads import registry
    loads = {m for t in code_deps.LOADED_BY_NAME["models.heads.registry"]
             for m in code_deps.package_modules(t)}
    assert set(registry.MODULES.values()) <= loads
    assert {registry.get(name).trainer for name in registry.MODULES} <= loads


def _code(lines: list[str]) -> list[str]:
    return [dvc_deps.project_path([ln + "\n"]) for ln in lines]


def test_check_names_missing_and_extra_code_deps(tmp_path):
    path = tmp_path / "dvc.yaml"
    path.write_text(SAMPLE)
    prepare = code_deps.imported_files("stages.prepare")
    report = code_deps.imported_files("stages.semi_report")
    stale = dvc_deps.check(path)
    assert stale["prepare"] == (sorted(prepare - {"features/errors.py"}),
                                ["models", "stages/old_module.py"])  # prepare runs no models/
    assert stale["semi_report"] == (sorted(f for f in report if not f.startswith("models/")), [])
    assert set(stale) == set(STAGES)  # the others have no deps here


def test_write_changes_only_code_deps_and_is_idempotent():
    new = dvc_deps.rewrite(SAMPLE)
    lines, old = new.splitlines(), SAMPLE.splitlines()
    end = lines.index("    params:")
    assert lines[:9] == old[:6] + old[7:10]  # the old module goes, the rest stays in order
    assert "      - features/errors.py   # kept with its comment" in lines[9:end]
    assert _code(lines[9:end]) == sorted(code_deps.imported_files("stages.prepare"))
    start = lines.index("      - artifacts/x") + 1
    assert lines[end:start] == old[old.index("    params:"):old.index("      - artifacts/x") + 1]
    assert lines[-2:] == old[-2:]
    assert _code(lines[start:-2]) == sorted(
        ["models", *(f for f in code_deps.imported_files("stages.semi_report")
                     if not f.startswith("models/"))])
    assert all(ln.startswith("      - ") for ln in lines[start:-2])  # the block's own indent
    assert dvc_deps.rewrite(new) == new


def test_write_rewrites_the_project_dvc_yaml_to_itself():
    text = (ROOT / "dvc.yaml").read_text()
    assert dvc_deps.rewrite(text) == text
