"""The HDF5 feature store: the only module that calls h5py.

A store is a folder holding a few large HDF5 shards and one small ``store.json`` that lists them:

    <store>/store.json           kind, meta (config, fingerprint), shards in order, format version,
                                 checksums {shard: sha256, size, mtime_ns, inode, clips}
    <store>/shard-<hash>.h5      attrs: format, version, kind, complete=1
        /index  [n] utf-8 clip ids       /keys [n] per-clip cache keys (see below)
        /clips/<clip_id>                 one dataset per clip: PCM [S] | crops [F,H,W,3] | frames [K,T,D]
        /pooled [L, n, D]                pooled vectors, layer-major (one layer = one contiguous slice)

Why shards: DVC deduplicates whole files, so a shard that did not change is never uploaded again,
and a folder of ~1 GB shards pushes far faster than one file per clip.

Incremental and crash-safe (`StoreUpdate`): every clip carries a cache *key* (a hash of its content
hash and the stage fingerprint). An update keeps every shard whose clips are all still wanted with
the same key (the file is not touched), copies still-valid clips out of shards that lost some,
computes only the rest, and writes them in small *part* files under ``<store>/.parts/`` (each
written to a temporary name, fsynced and renamed, with ``complete`` set last). A killed run leaves
its finished parts behind; the next run reuses them. `commit` packs the new clips into shards in a
deterministic order (pooled rows copied in blocks: memory does not grow with the store), writes
``store.json`` atomically, then deletes the shard, part and temporary names it no longer lists and
nothing else (it refuses a non-empty folder that is not a store).

Integrity: every shard's sha256 is recorded in ``store.json`` with the file's size, mtime_ns and
inode when it is written. Before its clips are reused or read, a shard whose stat differs from the
record (a `dvc checkout`/pull, a copy, damage) is hashed again: a match records the new stat (the
next run is fast again), a mismatch is damage. An update sets a damaged shard aside
(``<shard>.damaged-<time>``, never deleted) and recomputes its clips; a reader raises, naming the
shard and the fix. Unchanged stats cost no hashing; `features.storage.verify` hashes every shard.

Safety: one writer at a time (`StoreLock`, held for the whole update); temporary names carry the
pid and a random part; clips that leave `wanted` are *kept* (hidden from readers, reused if wanted
again) until `prune`. `features.reliability.faults` points mark where the crash tests exit hard.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from features.cache import hashcache
from features.reliability import faults
from features.errors import MerError

FORMAT = "mer-store"
VERSION = 2
INDEX = "store.json"
PARTS = ".parts"
RANKS = ".ranks"  # rank stores of a torchrun job (features.embedding.distributed), inside the output store
LOCK = ".lock"
TMP_PREFIX = ".tmp-"
SHARD_RE = re.compile(r"shard-[0-9a-f]{32}\.h5")
PART_RE = re.compile(r"part-[0-9a-f]{32}\.h5")
DAMAGED_RE = re.compile(r"shard-[0-9a-f]{32}\.h5\.damaged-\d{8}T\d{6}(-\d+)?")  # set aside
HASH_CHUNK = 4 * 2**20
POOLED_CHUNK_ROWS = 128
SUBSET_FRACTION = 0.2  # below this share of a store's clips, pooled() reads rows one by one
_STR = h5py.string_dtype("utf-8")


class StoreError(MerError):
    """A store is missing, incomplete, of the wrong kind, or lacks a requested key."""


def check_clip_id(clip_id: str) -> str:
    """Clip ids become HDF5 names: refuse the characters HDF5 treats specially."""
    if not clip_id or "/" in clip_id or clip_id in (".", ".."):
        raise StoreError(f"clip id {clip_id!r} cannot be stored: ids must be non-empty and contain no '/'.")
    return clip_id


def clip_key(*parts: object) -> str:
    """The cache key of one clip's result: a hash of everything that decides it."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


# ----------------------------------------------------------------------------- shard files

@dataclass
class _Entry:
    array: np.ndarray | None
    attrs: Mapping | None
    pooled: np.ndarray | None


class _Rows:
    """What a new shard is written from, one clip (or one block of pooled rows) at a time."""

    def __len__(self) -> int: ...
    def clip(self, j: int) -> tuple[np.ndarray | None, Mapping | None]: ...
    def pooled_layout(self) -> tuple[int, int, np.dtype] | None: ...  # (layers, dim, dtype)
    def pooled_block(self, j0: int, j1: int) -> np.ndarray: ...       # [L, j1 - j0, D]


class _MemoryRows(_Rows):
    """Entries added in this process (a part file's content)."""

    def __init__(self, entries: Sequence[_Entry]):
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def clip(self, j):
        return self.entries[j].array, self.entries[j].attrs

    def pooled_layout(self):
        pooled = [e.pooled for e in self.entries if e.pooled is not None]
        if not pooled:
            return None
        if len(pooled) != len(self.entries):
            raise StoreError("every clip of a pooled store needs pooled vectors.")
        return pooled[0].shape[0], pooled[0].shape[1], pooled[0].dtype

    def pooled_block(self, j0, j1):
        return np.stack([e.pooled for e in self.entries[j0:j1]], axis=1)


class _ShardRows(_Rows):
    """Clips copied out of existing shards or parts: read clip by clip and in pooled blocks of
    consecutive rows, so a commit holds one block, never a shard or the store."""

    def __init__(self, sources: Sequence[tuple["_Shard", int]]):
        self.sources = list(sources)

    def __len__(self) -> int:
        return len(self.sources)

    def clip(self, j):
        sh, i = self.sources[j]
        ds = sh.clips.get(sh.ids[i])
        return (None, None) if ds is None else (ds[()], dict(ds.attrs))

    def pooled_layout(self):
        first = self.sources[0][0].pooled if self.sources else None
        return None if first is None else (first.shape[0], first.shape[2], first.dtype)

    def pooled_block(self, j0, j1):
        pieces, j = [], j0
        while j < j1:  # runs of consecutive rows of one source: one read each
            sh, i = self.sources[j]
            k = j + 1
            while k < j1 and self.sources[k][0] is sh and self.sources[k][1] == i + (k - j):
                k += 1
            pieces.append(sh.pooled[:, i:i + (k - j)])
            j = k
        return np.concatenate(pieces, axis=1)


def _temp_name(path: Path) -> Path:
    """A temporary name no other process uses (pid + random), recognisable by cleanup."""
    return path.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def _write_shard(path: Path, kind: str, ids: list[str], keys: list[str], rows: _Rows,
                 compression: str | None, checksum: bool = True) -> dict | None:
    """Write one complete shard atomically: temporary name, ``complete`` last, fsync, rename.
    Returns its integrity record for store.json (None with `checksum=False`: part files)."""
    tmp = _temp_name(path)
    with h5py.File(tmp, "w") as h5:
        h5.attrs.update(format=FORMAT, version=VERSION, kind=kind)
        clips = h5.create_group("clips")
        for j, cid in enumerate(ids):
            array, attrs = rows.clip(j)
            if array is not None:
                ds = clips.create_dataset(cid, data=array, compression=compression)
                for k, v in (attrs or {}).items():
                    ds.attrs[k] = v
            if j == 0:
                faults.point("store.mid_shard")
        h5.create_dataset("index", data=np.array(ids, dtype=object), dtype=_STR)
        h5.create_dataset("keys", data=np.array(keys, dtype=object), dtype=_STR)
        layout = rows.pooled_layout()
        if layout is not None:
            _write_pooled(h5, rows, len(ids), layout, compression)
        h5.attrs["complete"] = 1  # written last: its presence means the file is whole
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    digest = _checksum(tmp) if checksum else None  # what was written, before anyone can touch it
    os.replace(tmp, path)  # keeps the inode and mtime: the stat below is the file's
    return None if digest is None else {"sha256": digest, "clips": len(ids), **_stat(path)}


def _write_pooled(h5: h5py.File, rows: _Rows, n: int, layout: tuple, compression: str | None):
    layers, dim, dtype = layout
    # Chunks of one layer x POOLED_CHUNK_ROWS clips: a layer for all clips is a run of adjacent
    # chunks, and one clip's vectors cost L small chunk reads, not L whole layers.
    chunk = min(n, POOLED_CHUNK_ROWS)
    ds = h5.create_dataset("pooled", shape=(layers, n, dim), dtype=dtype, compression=compression,
                           chunks=(1, chunk, dim) if n and layers and dim else None)
    for j0 in range(0, n, POOLED_CHUNK_ROWS):  # whole chunks at a time: no partial rewrites
        j1 = min(n, j0 + POOLED_CHUNK_ROWS)
        ds[:, j0:j1] = rows.pooled_block(j0, j1)


class _Shard:
    """One open, complete shard file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.h5 = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"shard {path} cannot be opened ({err}): it is damaged. Restore the "
                             f"committed version with `dvc checkout {path.parent}`, or rerun the "
                             f"stage that writes it (`dvc repro <stage>`: it sets the shard aside "
                             f"and recomputes its clips).") from err
        if self.h5.attrs.get("format") != FORMAT or not self.h5.attrs.get("complete"):
            self.h5.close()
            raise StoreError(f"shard {path} is incomplete (interrupted write?); rerun its stage.")
        self.ids = [_s(x) for x in self.h5["index"][()]]
        self.keys = [_s(x) for x in self.h5["keys"][()]]
        self.clips = self.h5["clips"]
        self.pooled = self.h5.get("pooled")

    def nbytes(self, i: int) -> int:
        """Bytes clip i takes (array + pooled row), from metadata only."""
        ds = self.clips.get(self.ids[i])
        row = 0 if self.pooled is None else self.pooled.shape[0] * self.pooled.shape[2]
        return (0 if ds is None else ds.size * ds.dtype.itemsize) + \
            (0 if self.pooled is None else row * self.pooled.dtype.itemsize)

    def close(self) -> None:
        self.h5.close()


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _read_index(folder: Path) -> dict:
    index = folder / INDEX
    if not index.is_file():
        if folder.is_file():
            raise StoreError(f"{folder} is a file, not a store folder (format {VERSION}); "
                             f"delete it and rerun its stage.")
        raise StoreError(f"store {folder} does not exist or is unfinished (no {INDEX}); run the "
                         f"stage that writes it (`dvc repro`).")
    try:
        info = json.loads(index.read_text())
    except ValueError as err:
        raise StoreError(f"{index} is not a store index ({err}).") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
        got = f"{info.get('format')}/{info.get('version')}" if isinstance(info, dict) else "?"
        raise StoreError(f"store {folder} has format {got}, this code reads {FORMAT}/{VERSION}; "
                         f"rerun its stage.")
    bad = [n for n in info.get("shards", []) if not isinstance(n, str) or not SHARD_RE.fullmatch(n)]
    if bad:
        raise StoreError(f"{index} lists shard names this code never writes ({bad[:3]}); the file "
                         f"was edited or damaged: delete the store folder and rerun its stage.")
    return info


def _write_index(folder: Path, info: dict) -> None:
    tmp = _temp_name(folder / INDEX)
    with open(tmp, "w") as fh:
        json.dump(info, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / INDEX)


# ----------------------------------------------------------------------------- integrity

STAT_FIELDS = ("size", "mtime_ns", "inode")


def _checksum(path: Path) -> str:
    """sha256 of a file, streamed in chunks (a shard is ~1 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _records(info: Mapping) -> dict[str, dict]:
    """The well-formed checksum records of store.json (a malformed one counts as unrecorded)."""
    table = info.get("checksums")
    if not isinstance(table, dict):
        return {}
    return {name: rec for name, rec in table.items()
            if isinstance(rec, dict) and isinstance(rec.get("sha256"), str)
            and all(isinstance(rec.get(k), int) for k in STAT_FIELDS)}


@dataclass
class ShardCheck:
    """What one listed shard's check found.

    status: ``ok`` (matches its record), ``restat`` (stat changed, content intact: `record` holds
    the new stat), ``unrecorded`` (a store written before checksums), ``damaged``, ``missing``.
    """
    name: str
    status: str
    record: dict | None = None
    actual: str | None = None  # the sha256 computed now, when one was

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "restat", "unrecorded")


def check_shard(folder: Path, name: str, record: dict | None, always: bool = False) -> ShardCheck:
    """Check shard `name` of the store at `folder` against its record.

    Only a stat when it matches the record; a sha256 when it differs or with `always` (`mer store
    verify`). Without `always` a large file's sha256 is remembered by stat (`hashcache`), so a
    store read-only after a `dvc pull` (heads, `mer predict`) is hashed once, not on every read.
    """
    path = folder / name
    if not path.is_file():
        return ShardCheck(name, "missing", record)
    if record is None:
        return ShardCheck(name, "unrecorded", None, _checksum(path) if always else None)
    now = _stat(path)
    if not always and all(record[k] == now[k] for k in STAT_FIELDS):
        return ShardCheck(name, "ok", record)
    if now["size"] != record["size"] and not always:
        return ShardCheck(name, "damaged", record)  # no need to read it
    actual = _checksum(path) if always else hashcache.cached(
        "store-sha256", [path], lambda: _checksum(path))
    if actual != record["sha256"]:
        return ShardCheck(name, "damaged", record, actual)
    status = "ok" if all(record[k] == now[k] for k in STAT_FIELDS) else "restat"
    return ShardCheck(name, status, {**record, **now}, actual)


def damaged_message(store: Path, check: ShardCheck) -> str:
    """What is wrong with a damaged or missing shard, and the two ways to fix it."""
    what = ("is missing" if check.status == "missing" else
            "is damaged: its content differs from the sha256 recorded when it was written")
    return (f"shard {store / check.name} {what}. Restore the committed version with "
            f"`dvc checkout {store}`, or rerun the stage that writes it (`dvc repro <stage>`: it "
            f"sets the damaged shard aside and recomputes its clips).")


def _set_aside(folder: Path, name: str) -> Path:
    """Move a damaged shard out of the store's way, never over another file: kept for a person
    to inspect or delete (cleanup only deletes the names store.json lists or will list)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target, n = folder / f"{name}.damaged-{stamp}", 1
    while target.exists():
        target, n = folder / f"{name}.damaged-{stamp}-{n}", n + 1
    os.rename(folder / name, target)
    return target


def read_meta(path: str | os.PathLike) -> dict:
    """The meta of the finished store at `path`, from store.json alone (no shard is opened)."""
    return dict(_read_index(Path(path))["meta"])


# ----------------------------------------------------------------------------- one writer

def _own_name(name: str) -> bool:
    """Names a store (or its writer) creates inside its folder; nothing else is ever deleted (and
    of these, cleanup never deletes a damaged shard set aside)."""
    return (name in (INDEX, PARTS, RANKS, LOCK) or name.startswith(TMP_PREFIX)
            or bool(SHARD_RE.fullmatch(name)) or bool(DAMAGED_RE.fullmatch(name)))


def _check_folder(path: Path) -> None:
    """Refuse a file or a non-empty folder that is not a store: cleanup would delete its files."""
    if path.is_file() or path.is_symlink() and not path.is_dir():
        raise StoreError(f"{path} is a file, not a store folder; move it away or choose another "
                         f"output path (nothing was changed).")
    if not path.is_dir():
        return
    strangers = sorted(p.name for p in path.iterdir() if not _own_name(p.name))
    if (path / INDEX).is_file() and _index_format(path / INDEX) != FORMAT:
        strangers.insert(0, INDEX)  # someone else's store.json
    if strangers:
        raise StoreError(f"{path} is not empty and is not a store (it holds {strangers[:3]}); "
                         f"refusing to write a store there, as its cleanup would delete them. "
                         f"Choose an empty or new folder.")


def _index_format(index: Path):
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    return info.get("format") if isinstance(info, dict) else None


class StoreLock:
    """An exclusive lock on one store for the whole of an update (``<store>/.lock``, flock).

    A second writer waits, saying which process it waits for; the kernel drops the lock when its
    holder dies, so a killed run never leaves a store locked. The file is removed on release (and
    a waiter that got the lock on a removed file tries again), so a finished store holds no lock
    file for DVC to see.
    """

    _held: set[Path] = set()  # stores this process holds: a second update here would deadlock

    def __init__(self, folder: Path):
        self.path = Path(folder).resolve() / LOCK
        self._fd: int | None = None

    def acquire(self) -> "StoreLock":
        if self.path in StoreLock._held:
            raise StoreError(f"store {self.path.parent} is already being updated by this process; "
                             f"finish (leave the `with` block of) that update first.")
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    print(f"store {self.path.parent} is being updated by another process "
                          f"(pid {holder}); waiting for it to finish...", file=sys.stderr, flush=True)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as it released it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        StoreLock._held.add(self.path)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None
        StoreLock._held.discard(self.path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- reading

class StoreReader:
    """Read a finished store: ``with StoreReader(path) as s: s.get(id); s.pooled(layer=-1)``.

    Every shard is checked against its recorded checksum first (`check_shard`: a stat, and a
    sha256 only when the stat changed). A damaged shard is an error naming it and the fix; with
    ``on_damage="skip"`` (a stage asking what is cached) its clips are absent instead, so the
    stage recomputes them (its `StoreUpdate` sets the shard aside) and `damaged` names it.
    """

    def __init__(self, path: str | os.PathLike, kind: str | None = None,
                 on_damage: str = "raise"):
        self.path = Path(path)
        info = _read_index(self.path)
        self.kind, self.meta = info["kind"], info["meta"]
        if kind is not None and self.kind != kind:
            raise StoreError(f"store {self.path} holds {self.kind!r} data, expected {kind!r}.")
        self.damaged: list[str] = []
        self._shards: list[_Shard] = []
        try:
            for name in self._intact(info, on_damage):
                self._shards.append(_Shard(self.path / name))
        except BaseException:
            self.close()
            raise
        # Kept clips (stored, but not among the last update's clips: see StoreUpdate) are
        # invisible to readers until they are wanted again; `mer store prune` deletes them.
        self.kept: list[str] = list(info.get("kept", []))
        kept = set(self.kept)
        self.ids: list[str] = [cid for sh in self._shards for cid in sh.ids if cid not in kept]
        self.keys: dict[str, str] = {cid: k for sh in self._shards for cid, k in zip(sh.ids, sh.keys)
                                     if cid not in kept}
        physical = [(s, i, cid) for s, sh in enumerate(self._shards) for i, cid in enumerate(sh.ids)]
        self._where = {cid: (s, i) for s, i, cid in physical if cid not in kept}
        self._row = {cid: r for r, (_, _, cid) in enumerate(physical) if cid not in kept}
        self._physical_rows = len(physical)

    def _intact(self, info: dict, on_damage: str) -> list[str]:
        """The listed shards that pass their check."""
        records, names = _records(info), []
        for name in info["shards"]:
            check = check_shard(self.path, name, records.get(name))
            if not check.usable:
                if on_damage != "skip":
                    raise StoreError(damaged_message(self.path, check))
                self.damaged.append(name)
            else:
                names.append(name)
        return names

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self._where

    def _dataset(self, clip_id: str) -> h5py.Dataset:
        if clip_id not in self._where:
            raise StoreError(f"clip {clip_id!r} is not in store {self.path} "
                             f"(it may have failed upstream: see the stage's failures.json).")
        ds = self._shards[self._where[clip_id][0]].clips.get(clip_id)
        if ds is None:
            raise StoreError(f"clip {clip_id!r} has only pooled vectors in {self.path}.")
        return ds

    def get(self, clip_id: str) -> np.ndarray:
        """The per-clip array of one clip."""
        return self._dataset(clip_id)[()]

    def frame_layer(self, clip_id: str, k: int) -> np.ndarray:
        """Frame states [T, D] of the k-th kept frame layer of one clip (frames [K, T, D]), in the
        stored dtype. HDF5 reads only that slab, and the array owns its data: `get(cid)[k]`
        would read every kept layer and keep them all alive through the view."""
        ds = self._dataset(clip_id)
        if ds.ndim != 3:
            raise StoreError(f"clip {clip_id!r} in {self.path} holds {ds.ndim}-d data, not frame "
                             f"states [K, T, D].")
        if not -ds.shape[0] <= k < ds.shape[0]:
            raise StoreError(f"frame layer {k} out of range for clip {clip_id!r} in {self.path} "
                             f"({ds.shape[0]} kept).")
        return ds[k % ds.shape[0]]

    def attrs(self, clip_id: str) -> dict:
        return {k: _py(v) for k, v in self._dataset(clip_id).attrs.items()}

    @property
    def has_pooled(self) -> bool:
        return bool(self._shards) and self._shards[0].pooled is not None

    @property
    def pooled_shape(self) -> tuple[int, int, int]:
        """(layers, clips, dim) of the pooled matrix."""
        if not self.has_pooled:
            raise StoreError(f"store {self.path} has no pooled vectors.")
        layers, _, dim = self._shards[0].pooled.shape
        return layers, len(self.ids), dim

    def pooled(self, layer: int | None = None, ids: Sequence[str] | None = None) -> np.ndarray:
        """Pooled vectors: [N, D] for one layer (negative counts from the end) or [N, L, D] for all."""
        n_layers = self.pooled_shape[0]
        if layer is not None and not -n_layers <= layer < n_layers:
            raise StoreError(f"layer {layer} out of range for {self.path} ({n_layers} layers).")
        sel = slice(None) if layer is None else layer % n_layers
        if ids is None and self.kept:
            ids = self.ids  # rows of kept clips are not returned
        if ids is not None and len(ids) < SUBSET_FRACTION * self._physical_rows:
            return self._pooled_rows(sel, self.rows(ids))
        if layer is not None:
            block = np.concatenate([sh.pooled[sel] for sh in self._shards])
        else:
            block = np.concatenate([np.moveaxis(sh.pooled[()], 0, 1) for sh in self._shards])
        return block if ids is None else block[self.rows(ids)]

    def _pooled_rows(self, sel: slice | int, rows: np.ndarray) -> np.ndarray:
        """A few clips: read each row where it lies (a whole-store read would dominate)."""
        starts = np.cumsum([0] + [len(sh.ids) for sh in self._shards])
        out = []
        for r in rows:
            s = int(np.searchsorted(starts, r, side="right")) - 1
            row = self._shards[s].pooled[sel, int(r - starts[s])]  # [D] or [L, D]
            out.append(row)
        if not out:
            layers, _, dim = self.pooled_shape
            return np.zeros((0, dim) if isinstance(sel, int) else (0, layers, dim),
                            self._shards[0].pooled.dtype)
        return np.stack(out)

    def rows(self, ids: Iterable[str]) -> np.ndarray:
        ids = list(ids)
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise StoreError(f"{len(missing)} clip(s) not in store {self.path}, e.g. {missing[:3]}; "
                             f"they failed upstream or the store is stale: rerun `dvc repro`.")
        return np.array([self._row[i] for i in ids], dtype=np.int64)

    def summary(self) -> dict:
        """What a person wants to know about the store (used by `mer store inspect`)."""
        size = sum(sh.path.stat().st_size for sh in self._shards)
        out = {"path": str(self.path), "kind": self.kind, "code_version": code_version(self.meta),
               "clips": len(self.ids), "bytes": size, "shards": len(self._shards),
               "kept": len(self.kept), "meta": self.meta}
        if self.has_pooled:
            layers, _, dim = self.pooled_shape
            out["pooled"] = {"layers": layers, "dim": dim,
                             "dtype": str(self._shards[0].pooled.dtype)}
        first = next((cid for cid in self.ids if cid in self._shards[self._where[cid][0]].clips),
                     None)
        if first is not None:
            ds = self._dataset(first)
            out["per_clip"] = {"example_shape": list(ds.shape), "dtype": str(ds.dtype)}
        return out

    def close(self) -> None:
        for sh in self._shards:
            sh.close()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def code_version(meta: dict) -> str | None:
    """The source hash of the code that computed a store, whatever its kind: a StoreRecord's
    `code_version` (encoders, transforms) or the media stages' `code` fingerprint."""
    if meta.get("code_version"):
        return meta["code_version"]
    code = meta.get("code")
    return code.get("code") if isinstance(code, dict) else None


def _py(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


# ----------------------------------------------------------------------------- writing

class StoreUpdate:
    """Bring the store at `path` to the clips of `wanted`, computing only what is missing.

        with StoreUpdate(path, "embedding", meta, wanted={id: key}) as up:
            for cid in up.todo:              # clips with no valid cached result
                up.add(cid, array, attrs=..., pooled=...)
                up.checkpoint()              # optional: persist finished work now (resume point)
        # leaving the block commits: readers see exactly `wanted` minus clips never added

    Clips in `todo` that are never added (they failed) are absent for readers; the next run lists
    them in `todo` again. Stored clips that are not in `wanted` at all are *kept* (a transient
    upstream failure must not throw away hours of results): readers do not see them, a later
    update that wants them again with the same key reuses them, and `prune=True` (``mer store
    prune``) deletes them. The update holds the store's lock (`StoreLock`) from here until it
    commits or fails. On an exception the store is not committed, but finished parts stay for
    the next run.
    """

    def __init__(self, path: str | os.PathLike, kind: str, meta: Mapping | None,
                 wanted: Mapping[str, str], shard_mb: float = 1024.0, part_mb: float = 64.0,
                 compression: str | None = None, prune: bool = False):
        self.path = Path(path)
        self.kind, self.meta = kind, json.loads(json.dumps(dict(meta or {}), default=str))
        self.wanted = dict(wanted)
        for cid in self.wanted:
            check_clip_id(cid)
        self.shard_bytes, self.part_bytes = shard_mb * 2**20, part_mb * 2**20
        self.compression, self.prune = compression, prune
        _check_folder(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = StoreLock(self.path).acquire()
        try:
            _check_folder(self.path)  # again: the previous holder may have changed it
            (self.path / PARTS).mkdir(exist_ok=True)
            self._cached: dict[str, tuple[_Shard, int]] = {}  # reusable results, by clip id
            self._retained: dict[str, tuple[_Shard, int, str]] = {}  # kept clips to repack
            self._open: list[_Shard] = []
            self._keep: list[str] = []  # shard files kept untouched
            self._records: dict[str, dict] = {}  # their checksum records, for store.json
            self._kept_ids: set[str] = set()  # clips living in untouched shards
            self.kept: list[str] = []  # stored clips not in `wanted` (kept until a prune)
            self._scan_old()
        except BaseException:
            self._close_all()
            self._lock.release()
            raise
        self.todo = [cid for cid in self.wanted if cid not in self._cached and cid not in self._kept_ids]
        self._pending: list[tuple[str, _Entry]] = []
        self._pending_bytes = 0
        self.reused = len(self.wanted) - len(self.todo)

    def _scan_old(self) -> None:
        try:
            info = _read_index(self.path)
            shards = info["shards"] if info["kind"] == self.kind else []
        except StoreError:
            info, shards = {}, []
        records = _records(info)
        for name in shards:
            sh, record = self._open_listed(name, records.get(name))
            if sh is None:
                continue
            valid = [self.wanted.get(c) == k for c, k in zip(sh.ids, sh.keys)]
            keep = [not self.prune and c not in self.wanted for c in sh.ids]
            if sh.ids and all(v or k for v, k in zip(valid, keep)):
                self._keep.append(name)  # untouched: DVC will not re-upload it
                # A store written before checksums has no record: it is made on this write.
                self._records[name] = record or {"sha256": _checksum(sh.path),
                                                 "clips": len(sh.ids), **_stat(sh.path)}
                self._kept_ids.update(sh.ids)
            else:
                self._retained.update({c: (sh, i, sh.keys[i]) for i, c in enumerate(sh.ids)
                                       if keep[i]})
            self.kept.extend(c for c, k in zip(sh.ids, keep) if k)
            self._remember(sh, valid)
        for part in sorted((self.path / PARTS).glob("part-*.h5")):
            sh = self._try_open(part) if PART_RE.fullmatch(part.name) else None
            if sh is not None:
                self._remember(sh, [self.wanted.get(c) == k for c, k in zip(sh.ids, sh.keys)])

    def _open_listed(self, name: str, record: dict | None) -> tuple[_Shard | None, dict | None]:
        """A listed shard, open, if it passed its check (and its record, new stat included);
        a damaged or unreadable one is set aside and its clips are recomputed."""
        check = check_shard(self.path, name, record)
        if check.status == "missing":
            self._say(name, record, "listed in store.json is missing")
            return None, None
        if check.status == "damaged":
            self._say(name, record, "is damaged (its sha256 differs from the one recorded when "
                                    "it was written)", _set_aside(self.path, name))
            return None, None
        sh = self._try_open(self.path / name)
        if sh is None:  # listed shards were whole when listed: this is damage, not a torn write
            self._say(name, record, "cannot be opened", _set_aside(self.path, name))
        return sh, check.record

    def _say(self, name: str, record: dict | None, what: str, aside: Path | None = None) -> None:
        clips = record.get("clips") if record else None
        count = f"its {clips} clip(s)" if isinstance(clips, int) else "its clips"
        where = f"; the file was moved to {aside} (delete it once you no longer need it)" \
            if aside else ""
        print(f"[store {self.path}] shard {name} {what}: {count} will be recomputed{where}.",
              flush=True)

    def _try_open(self, path: Path) -> _Shard | None:
        try:
            sh = _Shard(path)
        except StoreError:
            return None  # a torn file from a killed run: its clips are recomputed
        self._open.append(sh)
        return sh

    def _remember(self, sh: _Shard, valid: list[bool]) -> None:
        for i, (cid, ok) in enumerate(zip(sh.ids, valid)):
            if ok and cid not in self._kept_ids:
                self._cached.setdefault(cid, (sh, i))

    def add(self, clip_id: str, array: np.ndarray | None = None, attrs: Mapping | None = None,
            pooled: np.ndarray | None = None) -> None:
        """Store one newly computed clip (must be one of `todo`)."""
        if clip_id not in self.wanted:
            raise StoreError(f"clip {clip_id!r} is not among the clips this update was asked for.")
        if clip_id in self._cached or clip_id in self._kept_ids:
            raise StoreError(f"clip {clip_id!r} written twice to {self.path}.")
        if array is None and pooled is None:
            raise StoreError(f"clip {clip_id!r}: nothing to store (neither array nor pooled).")
        entry = _Entry(None if array is None else np.asarray(array), attrs,
                       None if pooled is None else np.asarray(pooled))
        self._pending.append((clip_id, entry))
        self._pending_bytes += sum(a.nbytes for a in (entry.array, entry.pooled) if a is not None)
        if self._pending_bytes >= self.part_bytes:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Persist every clip added so far as one complete part file (the resume point)."""
        if not self._pending:
            return
        ids = [cid for cid, _ in self._pending]
        name = f"part-{clip_key(ids, [self.wanted[c] for c in ids])}.h5"
        path = self.path / PARTS / name
        _write_shard(path, self.kind, ids, [self.wanted[c] for c in ids],
                     _MemoryRows([e for _, e in self._pending]), self.compression,
                     checksum=False)  # a part is never listed: repacked (and hashed) at commit
        sh = _Shard(path)
        self._open.append(sh)
        self._remember(sh, [True] * len(ids))
        self._pending, self._pending_bytes = [], 0

    def commit(self) -> Path:
        """Pack the clips that are not in kept shards into new shards; publish store.json."""
        try:
            self.checkpoint()
            sources = [(cid, *self._cached[cid], self.wanted[cid])
                       for cid in self.wanted if cid in self._cached]
            sources += [(cid, *src) for cid, src in self._retained.items()]
            shards, records = list(self._keep), dict(self._records)
            for group in self._groups(sources):
                ids, keys = [g[0] for g in group], [g[3] for g in group]
                name = f"shard-{clip_key(ids, keys)}.h5"
                records[name] = _write_shard(self.path / name, self.kind, ids, keys,
                                             _ShardRows([(g[1], g[2]) for g in group]),
                                             self.compression)
                shards.append(name)
            faults.point("store.before_index")
            _write_index(self.path, {"format": FORMAT, "version": VERSION, "kind": self.kind,
                                     "meta": self.meta, "shards": shards,
                                     "checksums": {n: records[n] for n in shards},
                                     "clips": len(self._kept_ids) + len(sources),
                                     "kept": sorted(self.kept)})
            self._close_all()
            self._collect_garbage(set(shards))
        finally:
            self._close_all()
            self._lock.release()
        if self.kept:
            print(f"[store {self.path}] {len(self.kept)} clip(s) no longer in this stage's input "
                  f"are kept, not deleted (`mer store prune {self.path}` deletes them).")
        return self.path

    def _groups(self, sources: list):
        """Yield runs of sources of about shard_bytes each, sized from metadata (nothing read)."""
        group, size = [], 0
        for src in sources:
            group.append(src)
            size += src[1].nbytes(src[2])
            if size >= self.shard_bytes:
                yield group
                group, size = [], 0
        if group:
            yield group

    def _close_all(self) -> None:
        for sh in self._open:
            sh.close()
        self._open = []

    def _collect_garbage(self, live: set[str]) -> None:
        """Delete this store's own files that store.json no longer lists, and nothing else."""
        for f in sorted(self.path.iterdir()):
            if f.is_file() and f.name not in live and (SHARD_RE.fullmatch(f.name)
                                                        or f.name.startswith(TMP_PREFIX)):
                f.unlink()
                faults.point("store.cleanup")
        parts = self.path / PARTS
        if parts.is_dir():
            for f in parts.iterdir():
                if f.is_file() and (PART_RE.fullmatch(f.name) or f.name.startswith(TMP_PREFIX)):
                    f.unlink()
                    faults.point("store.cleanup")
            try:
                parts.rmdir()
            except OSError:
                pass  # something that is not ours is in there: leave it

    def __enter__(self) -> "StoreUpdate":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            try:
                self.checkpoint()  # keep finished work for the next run
            finally:
                self._close_all()
                self._lock.release()


def write_store(path: str | os.PathLike, kind: str, meta: Mapping | None,
                items: Iterable[tuple[str, np.ndarray | None, Mapping | None, np.ndarray | None]],
                **kwargs) -> Path:
    """Write a whole store at once from (clip_id, array, attrs, pooled) tuples (tests, tools)."""
    items = list(items)
    wanted = {cid: clip_key(cid, i) for i, (cid, *_rest) in enumerate(items)}
    with StoreUpdate(path, kind, meta, wanted, **kwargs) as up:
        todo = set(up.todo)  # an existing store's clips with the same key are reused
        for cid, array, attrs, pooled in items:
            if cid in todo:
                up.add(cid, array, attrs=attrs, pooled=pooled)
    return Path(path)


def prune(path: str | os.PathLike) -> int:
    """Delete a store's kept clips (see `StoreUpdate`); returns how many were deleted."""
    with StoreReader(path) as reader:
        kind, meta, wanted, kept = reader.kind, reader.meta, dict(reader.keys), len(reader.kept)
    if kept:
        layout = {"compression": meta.get("compression"), "shard_mb": meta.get("shard_mb", 1024.0)}
        with StoreUpdate(path, kind, meta, wanted, prune=True, **layout):
            pass
    return kept
