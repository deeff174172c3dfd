"""dvc.yaml's code deps, derived: each stage depends on every project file its entry runs.

    python scripts/dvc_deps.py --check    exit 1 listing each stage whose code deps differ
    python scripts/dvc_deps.py --write    rewrite them in place (`make deps`)

A stage's code deps are the project source files (features/, models/, stages/) that
`features.cache.code_deps.imported_files` finds from the module `features.topology.STAGES` names
for it. A listed project folder (``models``) stays while it covers one of them and stands for the
files under it. --write rewrites only those lines of each stage's `deps:`, sorted after its other
deps; every other line of dvc.yaml (comments, data deps, params, outs) is kept as it is.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever is installed

from features.cache.code_deps import imported_files  # noqa: E402
from features.cache.versions import PROJECT  # noqa: E402
from features.topology import STAGES  # noqa: E402

DVC_YAML = ROOT / "dvc.yaml"
ITEM = re.compile(r"^(\s*)- (.*)$")
KEY = re.compile(r"^(\s*)([\w@-]+):\s*(#.*)?$")  # a key whose value is the lines below it
COMMENT = re.compile(r"\s+#.*$")


@dataclass
class Deps:
    """One stage's `deps:` block: lines [start, end) of dvc.yaml, as items (an item's lines:
    a dep with any continuation lines, or one comment or blank line)."""

    stage: str
    start: int
    end: int
    indent: str = ""  # of the `- ` items
    items: list[list[str]] = field(default_factory=list)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _text(line: str) -> bool:
    """Not blank and not a comment."""
    return bool(line.strip()) and not line.lstrip().startswith("#")


def parse(lines: list[str]) -> dict[str, Deps | None]:
    """Every stage's deps block (None: the stage has none), by stage name."""
    blocks: dict[str, Deps | None] = {}
    in_stages, stage, stage_indent = False, "", -1
    for i, line in enumerate(lines):
        if not _text(line):
            continue
        key = KEY.match(line)
        if _indent(line) == 0:
            in_stages = line.startswith("stages:")
        elif in_stages and key and stage_indent in (-1, _indent(line)):
            stage, stage_indent = key.group(2), _indent(line)
            blocks[stage] = None
        elif in_stages and key and key.group(2) == "deps":
            blocks[stage] = _block(lines, stage, i)
    return blocks


def _block(lines: list[str], stage: str, key: int) -> Deps:
    deps, key_indent, item_indent = Deps(stage, key + 1, key + 1), _indent(lines[key]), -1
    for i in range(key + 1, len(lines)):
        line, indent = lines[i], _indent(lines[i])
        is_item = ITEM.match(line) is not None
        if _text(line) and (indent < key_indent or indent == key_indent and not is_item):
            break  # the next key
        if is_item and item_indent in (-1, indent):
            item_indent, deps.indent = indent, line[:indent]
            deps.items.append([line])
        elif line.strip() and deps.items and indent > item_indent >= 0 and \
                ITEM.match(deps.items[-1][0]):
            deps.items[-1].append(line)  # a dep's options (`- path:` with keys below)
        else:
            deps.items.append([line])
        deps.end = i + 1
    while deps.items and not deps.items[-1][0].strip():  # blank lines before the next key
        deps.items.pop()
        deps.end -= 1
    return deps


def project_path(item: list[str]) -> str:
    """The project file or folder a one-line item lists ("" for a data dep, a comment, ...)."""
    match = ITEM.match(item[0])
    if len(item) > 1 or not match:
        return ""
    path = COMMENT.sub("", match.group(2)).strip().strip("'\"").rstrip("/")
    return path if path.split("/")[0] in PROJECT and "${" not in path else ""


def wanted(listed: list[str], files: frozenset[str]) -> list[str]:
    """The code deps a stage running `files` should list, given the project paths it lists."""
    def under(path: str, folder: str) -> bool:
        return path.startswith(folder + "/")

    folders = [d for d in listed if (ROOT / d).is_dir() and any(under(f, d) for f in files)
               and not any(under(d, other) for other in listed)]
    return sorted(folders + [f for f in files if not any(under(f, d) for d in folders)])


def _stage_files(stage: str) -> frozenset[str]:
    if stage not in STAGES:
        raise SystemExit(f"dvc.yaml stage {stage!r} is not in features/topology.py STAGES.")
    return imported_files(STAGES[stage].module)


def check(path: Path = DVC_YAML) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (missing, extra) code deps, for each stage whose code deps differ."""
    blocks = parse(path.read_text().splitlines(keepends=True))
    out = {}
    for stage in {**blocks, **STAGES}:
        block = blocks.get(stage)
        listed = [p for p in map(project_path, block.items if block else []) if p]
        want = wanted(listed, _stage_files(stage))
        twice = {p for p in listed if listed.count(p) > 1}
        missing, extra = sorted(set(want) - set(listed)), sorted(set(listed) - set(want) | twice)
        if missing or extra:
            out[stage] = (missing, extra)
    return out


def rewrite(text: str) -> str:
    """dvc.yaml `text` with each stage's code deps as `wanted` has them."""
    lines = text.splitlines(keepends=True)
    blocks = parse(lines)
    for stage, deps in blocks.items():
        if deps is None:
            raise SystemExit(f"dvc.yaml stage {stage!r} has no deps: block to write into.")
    for deps in sorted(blocks.values(), key=lambda d: -d.start):  # bottom up: indices hold
        lines[deps.start:deps.end] = _new_block(deps)
    return "".join(lines)


def _new_block(deps: Deps) -> list[str]:
    kept = {project_path(item): item[0] for item in deps.items if project_path(item)}
    other = [item for item in deps.items if not project_path(item)]
    tail = []
    while other and not ITEM.match(other[-1][0]):  # comments after the last data dep stay last
        tail.insert(0, other.pop())
    code = [kept.get(p) or f"{deps.indent}- {p}\n"
            for p in wanted(list(kept), _stage_files(deps.stage))]
    return [line for item in other for line in item] + code + [line for item in tail for line in item]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if any stage's code deps differ")
    mode.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    p.add_argument("--dvc-yaml", type=Path, default=DVC_YAML)
    args = p.parse_args(argv)
    if args.write:
        text = args.dvc_yaml.read_text()
        new = rewrite(text)
        if new != text:
            args.dvc_yaml.write_text(new)
        print(f"{args.dvc_yaml}: code deps {'rewritten' if new != text else 'already current'}")
        return 0
    diffs = check(args.dvc_yaml)
    for stage, (missing, extra) in diffs.items():
        print(f"{stage}: " + "; ".join(f"{what} {', '.join(paths)}" for what, paths in
                                       (("missing", missing), ("extra", extra)) if paths))
    if diffs:
        print(f"{len(diffs)} stage(s) of {args.dvc_yaml} have stale code deps: run "
              "`make deps` (python scripts/dvc_deps.py --write)", file=sys.stderr)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
