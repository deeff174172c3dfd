"""Feature store vs MERTools' one-`.npy`-per-clip layout: write, bytes on disk, read.

    python benchmarks/store.py [--clips 5000] [--frame-clips 300] [--workdir DIR] [--keep]

The same seeded random fp16 arrays are written and read back through each layout:

pooled vectors, MER2024 scale (5,000 clips x 25 layers x 1024):
  ours       `StoreUpdate` exactly as the embed stage drives it (add per clip, `checkpoint()` after
             every batch of 32, commit on exit) -> one shard + store.json; `StoreReader` to read
  npy_layer  MERTools' layout: one folder per feature (here: per layer) holding one `.npy` [1024]
             per clip (125,000 files)
  npy_clip   one `.npy` [25, 1024] per clip (the all-layer dump of s3prl/emotion2vec style)
frame-level states of one layer, a few hundred clips with MER-like durations (50 frames/s):
  ours, ours_gzip, ours_lzf   one dataset per clip (/clips/<id>), what the store does
  ragged     one [sum T, D] dataset + offsets (written with h5py here only, as the alternative)
  npy_clip   one `.npy` [T, D] per clip (MERTools' frame-level layout)

Reads are timed warm (page cache full: median of 3 runs after one untimed run) and, where this
process may write /proc/sys/vm/drop_caches (root), cold (after sync + drop_caches). Every read
includes opening the store. Our writes fsync every file; `np.save` (like MERTools) does not.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timer  # noqa: E402  (common puts the repo root on sys.path)

import h5py  # noqa: E402  (the ragged alternative only; the store itself goes through its API)

from features.storage.store import StoreReader, StoreUpdate, clip_key, write_store  # noqa: E402

LAYERS, DIM = 25, 1024           # HuBERT-large: 24 blocks + the embedding output, 1024-d
FRAME_RATE = 50                  # HuBERT frames per second of audio
BATCH = 32                       # params.mer2024.yaml: hubert batch_size (one checkpoint per batch)


# ----------------------------------------------------------------------------- helpers

def drop_caches() -> bool:
    """Empty the OS page cache (needs root); False where this process may not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def disk_usage(path: Path) -> dict:
    """Files, apparent bytes and allocated bytes (st_blocks) under `path`."""
    files = size = alloc = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(root, name))
            files, size, alloc = files + 1, size + st.st_size, alloc + st.st_blocks * 512
    return {"files": files, "bytes": size, "bytes_allocated": alloc}


def timed_read(fn, cold: bool, repeats: int = 3) -> dict:
    """Warm: one untimed run, then the median of `repeats`. Cold: one run after drop_caches."""
    out = {}
    if cold and drop_caches():
        with timer() as t:
            fn()
        out["cold_s"] = t["s"]
    fn()
    runs = []
    for _ in range(repeats):
        with timer() as t:
            fn()
        runs.append(t["s"])
    out["warm_s"] = statistics.median(runs)
    return out


def mer_durations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Log-normal durations matching MER2024's mean 4.25 s and median 3.81 s, in [0.24, 46.7]."""
    mu, sigma = np.log(3.81), np.sqrt(2 * np.log(4.25 / 3.81))
    return np.clip(rng.lognormal(mu, sigma, n), 0.24, 46.7)


def store_update(path: Path, items: list[tuple[str, np.ndarray | None, np.ndarray | None]],
                 compression: str | None = None) -> None:
    """Write like features.embedding.stage.embed_store: add clip by clip, checkpoint every BATCH clips."""
    wanted = {cid: clip_key("bench", cid) for cid, _a, _p in items}
    with StoreUpdate(path, "embedding", {"benchmark": True}, wanted, compression=compression) as up:
        for start in range(0, len(items), BATCH):
            for cid, array, pooled in items[start:start + BATCH]:
                up.add(cid, array, pooled=pooled)
            up.checkpoint()


# ----------------------------------------------------------------------------- pooled

def bench_pooled(work: Path, n: int, rng: np.random.Generator, cold: bool) -> dict:
    arr = rng.standard_normal((n, LAYERS, DIM), dtype=np.float32).astype(np.float16)
    ids = [f"sample_{i:08d}" for i in range(n)]
    ours, per_layer, per_clip = work / "pooled_store", work / "pooled_npy_layer", work / "pooled_npy_clip"
    res: dict = {"clips": n, "layers": LAYERS, "dim": DIM, "dtype": "float16",
                 "array_bytes": int(arr.nbytes), "write": {}, "disk": {}, "read": {}}

    with timer() as t:
        store_update(ours, [(cid, None, arr[i]) for i, cid in enumerate(ids)])
    res["write"]["ours"] = t["s"]
    with timer() as t:
        for layer in range(LAYERS):
            folder = per_layer / f"layer{layer:02d}"
            folder.mkdir(parents=True)
            for i, cid in enumerate(ids):
                np.save(folder / f"{cid}.npy", arr[i, layer])
    res["write"]["npy_layer"] = t["s"]
    with timer() as t:
        per_clip.mkdir(parents=True)
        for i, cid in enumerate(ids):
            np.save(per_clip / f"{cid}.npy", arr[i])
    res["write"]["npy_clip"] = t["s"]
    for name, path in (("ours", ours), ("npy_layer", per_layer), ("npy_clip", per_clip)):
        res["disk"][name] = disk_usage(path)

    layer = LAYERS // 2
    subset = sorted(rng.choice(n, size=min(500, n), replace=False).tolist())
    sub_ids = [ids[i] for i in subset]
    one = ids[int(rng.integers(n))]

    def ours_layer():
        with StoreReader(ours) as s:
            return s.pooled(layer=layer)

    def ours_subset():
        with StoreReader(ours) as s:
            return s.pooled(ids=sub_ids)

    def ours_one():
        with StoreReader(ours) as s:
            return s.pooled(ids=[one])[0]

    def h5_one():  # the same shard read directly: what a row-wise read of /pooled could cost
        with StoreReader(ours) as s:
            shard = s._shards[0]  # noqa: SLF001 - benchmark probe of the layout, not an API use
            return shard.h5["pooled"][:, shard.ids.index(one)]

    def layer_files(cids):
        return np.stack([np.load(per_layer / f"layer{layer:02d}" / f"{c}.npy") for c in cids])

    def all_layer_files(cids):
        return np.stack([np.stack([np.load(per_layer / f"layer{ly:02d}" / f"{c}.npy")
                                   for ly in range(LAYERS)]) for c in cids])

    def clip_files(cids, only_layer=None):
        loaded = [np.load(per_clip / f"{c}.npy") for c in cids]
        return np.stack([x[only_layer] for x in loaded] if only_layer is not None else loaded)

    # correctness first: every layout returns the very same numbers
    assert np.array_equal(ours_layer(), arr[:, layer])
    assert np.array_equal(layer_files(ids), arr[:, layer])
    assert np.array_equal(clip_files(ids, layer), arr[:, layer])
    assert np.array_equal(ours_subset(), arr[subset])
    assert np.array_equal(ours_one(), arr[ids.index(one)])

    res["read"]["one_layer_all_clips"] = {
        "ours": timed_read(ours_layer, cold),
        "npy_layer": timed_read(lambda: layer_files(ids), cold),
        "npy_clip": timed_read(lambda: clip_files(ids, layer), cold)}
    res["read"]["all_layers_500_random_clips"] = {
        "ours": timed_read(ours_subset, cold),
        "npy_layer": timed_read(lambda: all_layer_files(sub_ids), cold, repeats=1),
        "npy_clip": timed_read(lambda: clip_files(sub_ids), cold)}
    res["read"]["all_layers_one_clip"] = {
        "ours": timed_read(ours_one, cold),
        "ours_h5_row_direct": timed_read(h5_one, cold),
        "npy_layer": timed_read(lambda: all_layer_files([one]), cold),
        "npy_clip": timed_read(lambda: clip_files([one]), cold)}
    return res


def bench_commit_scaling(work: Path, sizes: list[int], rng: np.random.Generator) -> dict:
    """`write_store` (one call, 64 MB parts): commit copies every clip out of its part file."""
    out = {}
    for n in sizes:
        arr = rng.standard_normal((n, LAYERS, DIM), dtype=np.float32).astype(np.float16)
        path = work / f"write_store_{n}"
        with timer() as t:
            write_store(path, "embedding", {}, ((f"c{i:06d}", None, None, arr[i]) for i in range(n)))
        out[str(n)] = t["s"]
        shutil.rmtree(path)
    return out


# ----------------------------------------------------------------------------- frames

def write_ragged(path: Path, ids: list[str], frames: list[np.ndarray]) -> None:
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in frames])]).astype(np.int64)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("index", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("offsets", data=offsets)
        h5.create_dataset("frames", data=np.concatenate(frames))
        h5.attrs["complete"] = 1
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Ragged:
    def __init__(self, path: Path):
        self.h5 = h5py.File(path, "r")
        self.offsets = self.h5["offsets"][()]
        self.row = {(x.decode() if isinstance(x, bytes) else x): i
                    for i, x in enumerate(self.h5["index"][()])}

    def get(self, cid: str) -> np.ndarray:
        i = self.row[cid]
        return self.h5["frames"][self.offsets[i]:self.offsets[i + 1]]

    def close(self) -> None:
        self.h5.close()


def bench_frames(work: Path, n: int, rng: np.random.Generator, cold: bool) -> dict:
    durations = mer_durations(n, rng)
    lengths = np.maximum(1, (durations * FRAME_RATE).astype(int))
    ids = [f"sample_{i:08d}" for i in range(n)]
    frames = [rng.standard_normal((t, DIM), dtype=np.float32).astype(np.float16) for t in lengths]
    res: dict = {"clips": n, "layers_kept": 1, "dim": DIM, "dtype": "float16",
                 "mean_duration_s": float(durations.mean()), "frames": int(lengths.sum()),
                 "array_bytes": int(sum(f.nbytes for f in frames)),
                 "write": {}, "disk": {}, "read_all": {}, "read_50_random": {}}
    paths = {"ours": work / "frames_store", "ours_gzip": work / "frames_store_gzip",
             "ours_lzf": work / "frames_store_lzf", "ragged": work / "frames_ragged",
             "npy_clip": work / "frames_npy_clip"}
    for name, comp in (("ours", None), ("ours_gzip", "gzip"), ("ours_lzf", "lzf")):
        with timer() as t:  # the store keeps [K, T, D] per clip; K = 1 kept layer here
            store_update(paths[name], [(cid, f[None], None) for cid, f in zip(ids, frames)], comp)
        res["write"][name] = t["s"]
    with timer() as t:
        paths["ragged"].mkdir()
        write_ragged(paths["ragged"] / "frames.h5", ids, frames)
    res["write"]["ragged"] = t["s"]
    with timer() as t:
        paths["npy_clip"].mkdir()
        for cid, f in zip(ids, frames):
            np.save(paths["npy_clip"] / f"{cid}.npy", f)
    res["write"]["npy_clip"] = t["s"]
    for name, path in paths.items():
        res["disk"][name] = disk_usage(path)

    sample = [ids[i] for i in rng.choice(n, size=min(50, n), replace=False)]

    def store_reader(name):
        def read(cids):
            with StoreReader(paths[name]) as s:
                return [s.get(c)[0] for c in cids]
        return read

    def ragged(cids):
        r = Ragged(paths["ragged"] / "frames.h5")
        try:
            return [r.get(c) for c in cids]
        finally:
            r.close()

    def npy(cids):
        return [np.load(paths["npy_clip"] / f"{c}.npy") for c in cids]

    readers = {**{k: store_reader(k) for k in ("ours", "ours_gzip", "ours_lzf")},
               "ragged": ragged, "npy_clip": npy}
    for name, read in readers.items():  # correctness: same arrays back
        got = read(sample[:5])
        assert all(np.array_equal(g, frames[ids.index(c)]) for g, c in zip(got, sample[:5])), name
    for name, read in readers.items():
        res["read_all"][name] = timed_read(lambda r=read: r(ids), cold)
        res["read_50_random"][name] = timed_read(lambda r=read: r(sample), cold)
    return res


# ----------------------------------------------------------------------------- report

def _row(cells, widths):
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def _fmt_read(r: dict) -> str:
    warm = f"{r['warm_s'] * 1000:9.1f} ms warm"
    return warm + (f" {r['cold_s'] * 1000:9.1f} ms cold" if "cold_s" in r else "")


def print_tables(pooled: dict, frames: dict, scaling: dict) -> None:
    w = (26, 12, 16, 9)
    print(f"\nPOOLED: {pooled['clips']} clips x {LAYERS} layers x {DIM} fp16 "
          f"({pooled['array_bytes'] / 2**20:.0f} MiB of arrays)")
    print(_row(["layout", "write s", "disk MiB (alloc)", "files"], w))
    for name in ("ours", "npy_layer", "npy_clip"):
        d = pooled["disk"][name]
        print(_row([name, f"{pooled['write'][name]:.2f}",
                    f"{d['bytes'] / 2**20:.1f} ({d['bytes_allocated'] / 2**20:.1f})", d["files"]], w))
    for what, cases in pooled["read"].items():
        print(f"read {what}:")
        for name, r in cases.items():
            print(f"  {name:24s} {_fmt_read(r)}")
    if scaling:
        print("write_store (one call, default 64 MB parts) seconds by clip count: "
              + ", ".join(f"{k}: {v:.1f}" for k, v in scaling.items()))
    print(f"\nFRAMES: {frames['clips']} clips, 1 layer, {frames['frames']} frames x {DIM} fp16 "
          f"({frames['array_bytes'] / 2**20:.0f} MiB), mean {frames['mean_duration_s']:.2f} s")
    w = (12, 9, 16, 7, 34, 34)
    print(_row(["layout", "write s", "disk MiB (alloc)", "files", "read all", "read 50 random"], w))
    for name in frames["write"]:
        d = frames["disk"][name]
        print(_row([name, f"{frames['write'][name]:.2f}",
                    f"{d['bytes'] / 2**20:.1f} ({d['bytes_allocated'] / 2**20:.1f})", d["files"],
                    _fmt_read(frames["read_all"][name]), _fmt_read(frames["read_50_random"][name])], w))


def summarize(pooled: dict, frames: dict) -> dict:
    layer = pooled["read"]["one_layer_all_clips"]
    speed = {f"{k}_{temp}": layer[k][f"{temp}_s"] / layer["ours"][f"{temp}_s"]
             for k in ("npy_layer", "npy_clip") for temp in ("warm", "cold")
             if f"{temp}_s" in layer["ours"]}
    npy_bytes = min(pooled["disk"]["npy_layer"]["bytes_allocated"],
                    pooled["disk"]["npy_clip"]["bytes_allocated"])
    key = "warm_s"
    fr = {k: frames["read_all"][k][key] for k in ("ours", "ragged")}
    return {
        # the conservative headline: warm cache, against the faster of the two .npy layouts
        "layer_read_speedup_vs_npy": round(min(v for k, v in speed.items() if k.endswith("warm")), 1),
        "layer_read_speedups": {k: round(v, 1) for k, v in speed.items()},
        "layer_read_ms_ours_warm": round(layer["ours"]["warm_s"] * 1000, 2),
        "bytes_ratio_vs_npy": round(pooled["disk"]["ours"]["bytes_allocated"] / npy_bytes, 3),
        "write_speedup_vs_npy_layer": round(pooled["write"]["npy_layer"] / pooled["write"]["ours"], 2),
        # between the two HDF5 layouts the issue names (read all, warm); .npy is listed beside
        "frame_layout_winner": min(fr, key=fr.get),
        "frame_read_all_ms_warm": {k: round(frames["read_all"][k][key] * 1000, 1)
                                   for k in ("ours", "ragged", "npy_clip")},
        "frame_read_all_ratio_ragged_over_ours": round(fr["ragged"] / fr["ours"], 2),
        "cold_cache_measured": "cold_s" in layer["ours"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=5000, help="clips of pooled vectors (MER2024: 5,030)")
    p.add_argument("--frame-clips", type=int, default=300, help="clips of frame-level states")
    p.add_argument("--scaling", type=int, nargs="*", default=[500, 1000],
                   help="clip counts for the one-call write_store timing (none: skip)")
    p.add_argument("--no-cold", action="store_true", help="never drop the page cache")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mer-bench-store-", dir=args.workdir))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    try:
        cold = not args.no_cold and drop_caches()
        pooled = bench_pooled(work, args.clips, rng, cold)
        scaling = bench_commit_scaling(work, args.scaling, rng)
        frames = bench_frames(work, args.frame_clips, rng, cold)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(pooled, frames, scaling)
    summary = summarize(pooled, frames)
    results = {"pooled": pooled, "frames": frames, "write_store_scaling_s": scaling,
               "total_s": time.perf_counter() - start,
               "notes": ["warm = median of 3 after one untimed read; cold = one read after "
                         "sync + drop_caches (only when root)",
                         "every read includes opening the store / files",
                         "our writes fsync each file; np.save does not (MERTools does not)",
                         "same fp16 arrays in every layout; MERTools itself saves fp32 (2x bytes)",
                         "the machine was shared with other jobs (2 cores)"]}
    save("store", results, summary)


if __name__ == "__main__":
    main()
