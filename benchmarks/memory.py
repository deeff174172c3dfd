"""Peak memory of store updates against the size of the store (issue 14, item 5).

    python benchmarks/memory.py [--sizes 5000 20000] [--baseline f44dcdf] [--workdir DIR]

Pooled stores of MER2024 shape (25 layers x 1024, fp16: 51 kB a clip; 5,000 clips = 256 MB,
20,000 = 1 GB, one default 1 GB shard) are built once. Each case then runs in a fresh process
on a hard-linked copy of the store (shards are never written in place, so copies share them),
and reports that process's peak RSS (``ru_maxrss``):

  add10      the update adds 10 new clips (what a run with a few new videos does)
  repack10   10 old clips, spread over the store, change key (a changed upstream clip): their
             shard is rewritten around them

Each case runs with this checkout's code and with the `--baseline` commit's `features/` (a
`git archive` extract: the code before the streamed commit), in the same run. The claim under
test: with this code, peak RSS for the two store sizes differs by less than 100 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, save, timer  # noqa: E402

LAYERS, DIM, CHANGED = 25, 1024, 10
LIMIT_MB = 100

BUILD = """
import sys, numpy as np
from features.storage.store import StoreUpdate, clip_key
path, n = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
with StoreUpdate(path, "embedding", {"benchmark": "memory"}, {f"c{i:06d}": clip_key(i) for i in range(n)}) as up:
    for cid in up.todo:
        up.add(cid, pooled=rng.standard_normal((%d, %d)).astype(np.float16))
""" % (LAYERS, DIM)

CASE = """
import json, resource, sys, time, numpy as np
from features.storage.store import StoreUpdate, clip_key
path, case, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
imports_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
wanted = {f"c{i:06d}": clip_key(i) for i in range(n)}
if case == "add10":
    wanted.update({f"new{i:02d}": clip_key("new", i) for i in range(%d)})
else:  # repack10
    wanted.update({f"c{i:06d}": clip_key(i, "changed") for i in range(0, n, n // %d)})
rng = np.random.default_rng(1)
start = time.perf_counter()
with StoreUpdate(path, "embedding", {"benchmark": "memory"}, wanted) as up:
    todo = len(up.todo)
    for cid in up.todo:
        up.add(cid, pooled=rng.standard_normal((%d, %d)).astype(np.float16))
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"todo": todo, "seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_mb": round(peak_kb / 1024, 1),
                  "after_imports_mb": round(imports_kb / 1024, 1)}))
""" % (CHANGED, CHANGED, LAYERS, DIM)


def _python(code: str, args: list, code_root: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(code_root), MER_CACHE_DIR="off")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=code_root,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {done.stderr[-2000:]}")
    return done.stdout


def _link_copy(src: Path, dst: Path) -> None:
    """A copy sharing the shard files (hard links): updates never write into existing files."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            os.link(f, dst / f.name)


def _baseline_tree(commit: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "features"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--baseline", default="f44dcdf", help="commit measured as the baseline")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mer-memory-"))
    codes = {"this": ROOT, "baseline": _baseline_tree(args.baseline, work / "baseline")}
    results: dict = {"sizes": args.sizes, "baseline_commit": args.baseline, "cases": {}}
    try:
        for n in args.sizes:
            store = work / f"store-{n}"
            with timer() as t:
                _python(BUILD, [store, n], ROOT)
            results[f"build_{n}_s"] = round(t["s"], 1)
            mb = sum(f.stat().st_size for f in store.iterdir()) / 2**20
            print(f"built {n} clips: {mb:.0f} MB in {t['s']:.0f} s")
            for case in ("add10", "repack10"):
                for code, root in codes.items():
                    copy = work / f"{code}-{case}-{n}"
                    _link_copy(store, copy)
                    out = json.loads(_python(CASE, [copy, case, n], root).splitlines()[-1])
                    results["cases"][f"{code}/{case}/{n}"] = out
                    print(f"{code:>8} {case:>8} {n:>6} clips: peak RSS {out['peak_rss_mb']:7.1f} MB"
                          f" (after imports {out['after_imports_mb']:.1f}), {out['seconds']} s")
                    shutil.rmtree(copy)
            shutil.rmtree(store)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    small, large = min(args.sizes), max(args.sizes)
    summary = {}
    for code in codes:
        for case in ("add10", "repack10"):
            diff = (results["cases"][f"{code}/{case}/{large}"]["peak_rss_mb"]
                    - results["cases"][f"{code}/{case}/{small}"]["peak_rss_mb"])
            summary[f"{code}_{case}_rss_diff_mb"] = round(diff, 1)
    summary["this_within_limit"] = all(abs(v) < LIMIT_MB for k, v in summary.items()
                                       if k.startswith("this_"))
    results["summary"] = summary
    for k, v in summary.items():
        print(f"{k}: {v}")
    save("memory", results, summary)


if __name__ == "__main__":
    main()
