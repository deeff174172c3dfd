"""`mer store verify PATH...`: hash every shard of a store and compare it with its record.

Updates and readers hash a shard only when its stat changed since it was recorded (fast, and
enough after a copy, a `dvc checkout` or a damaged download); damage that keeps size, mtime and
inode (a failing disk under a file nobody wrote) is found only by reading every byte, which is
what this does. It changes nothing: a damaged shard is reported with its fix, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from features.storage.store import (DAMAGED_RE, INDEX, RANKS, StoreError, _read_index, _records,
                                    check_shard, damaged_message)

UNRECORDED_NOTE = ("written before shard checksums were recorded: its next update records them "
                   "(this check cannot tell whether it is intact)")


def verify_store(path: str | os.PathLike) -> dict:
    """Check every shard of the store at `path` by its sha256, whatever its stat says.

    Returns ``{path, kind, ok, shards: [{name, status, sha256, actual, size}], set_aside,
    problems}``; status is ``ok``, ``damaged``, ``missing`` or ``unrecorded`` (not counted as a
    problem). Raises StoreError when `path` is not a readable store.
    """
    folder = Path(path)
    info = _read_index(folder)
    records = _records(info)
    shards, problems = [], []
    for name in info["shards"]:
        check = check_shard(folder, name, records.get(name), always=True)
        status = "ok" if check.status == "restat" else check.status  # content is what counts
        shards.append({"name": name, "status": status,
                       "sha256": (check.record or {}).get("sha256"), "actual": check.actual,
                       "size": (check.record or {}).get("size")})
        if not check.usable:
            problems.append(damaged_message(folder, check))
    aside = sorted(p.name for p in folder.iterdir() if DAMAGED_RE.fullmatch(p.name))
    return {"path": str(folder), "kind": info["kind"], "ok": not problems, "shards": shards,
            "set_aside": aside, "problems": problems}


def find_stores(path: Path) -> list[Path]:
    """`path` itself when it is a store, else every store under it (rank stores excluded)."""
    if (path / INDEX).is_file():
        return [path]
    return sorted(i.parent for i in path.rglob(INDEX) if RANKS not in i.parts)


def main(argv: list[str] | None = None) -> int:
    """Verify stores; exit status 1 when any shard is damaged or missing (or no store found)."""
    p = argparse.ArgumentParser(prog="mer store verify", description="Hash every shard of the "
                                "given stores (or of every store under a folder) and compare it "
                                "with the checksum recorded when it was written.")
    p.add_argument("paths", nargs="+", help="stores, or folders searched for stores")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = p.parse_args(argv)
    reports = [_verify_one(store) for path in map(Path, args.paths)
               for store in (find_stores(path) or [path])]
    if args.json:
        print(json.dumps(reports, indent=1))
    else:
        for report in reports:
            _print(report)
    return 0 if all(r["ok"] for r in reports) else 1


def _verify_one(store: Path) -> dict:
    """verify_store, with a store that cannot be read reported instead of stopping the others."""
    try:
        return verify_store(store)
    except StoreError as err:
        return {"path": str(store), "ok": False, "error": True, "shards": [], "set_aside": [],
                "problems": [str(err)]}


def _print(report: dict) -> None:
    shards = report["shards"]
    good = sum(s["status"] == "ok" for s in shards)
    print(f"{report['path']}: " + ("not a readable store" if report.get("error") else
                                   f"{good}/{len(shards)} shard(s) intact"
                                   + ("" if report["ok"] else ", DAMAGED")))
    for problem in report["problems"]:
        print(f"  {problem}")
    unrecorded = sum(s["status"] == "unrecorded" for s in shards)
    if unrecorded:
        print(f"  {unrecorded} shard(s) {UNRECORDED_NOTE}.")
    for name in report["set_aside"]:
        print(f"  {name}: a damaged shard an update set aside (its clips were recomputed); "
              f"delete it once you no longer need it.")


if __name__ == "__main__":  # until `mer store verify` is wired: python -m features.storage.verify
    sys.exit(main())
