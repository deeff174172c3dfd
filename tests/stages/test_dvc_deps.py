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


def _loads_by_name(module: str) -> bool:
    """`module` imports by name, or holds a table of modules a Registry imports by name."""
    def called(node: ast.Call) -> str:
        return getattr(node.func, "attr", getattr(node.func, "id", ""))

    calls = [n for n in ast.walk(ast.parse(versions.module_file(module).read_text()))
             if isinstance(n, ast.Call)]
    return any(called(n) == "import_module" or called(n) == "Registry" and
               any(k.arg == "modules" for k in n.keywords) for n in calls)


def _loaded(module: str) -> set[str]:
    return {m for t in code_deps.LOADED_BY_NAME[module] for m in code_deps.package_modules(t)}


def test_every_module_a_stage_runs_that_loads_by_name_is_declared():
    modules = set()
    for entry in STAGES.values():
        todo = [entry.module]
        while todo:
            name = todo.pop()
            if name not in modules:
                modules.add(name)
                todo.extend(code_deps.module_imports(name))
    generic = {"features.registry"}  # imports only what the tables of the modules above name
    assert {m for m in modules if _loads_by_name(m)} - generic == set(code_deps.LOADED_BY_NAME)


def test_the_by_name_tables_name_only_declared_modules():
    from features.encoders import FAMILY_MODULES
    from models.heads import registry
    assert {f"features.encoders.{f}" for f in FAMILY_MODULES} <= _loaded("features.encoders")
    trainers = {registry.get(name).trainer for name in registry.MODULES}
    assert set(registry.MODULES.values()) | trainers <= _loaded("models.heads.registry")


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
