"""The HDF5 feature store: the only module that calls h5py.

A store is a folder holding a few large HDF5 shards and one small ``store.json`` that lists them:

    <store>/store.json           kind, meta (config, fingerprint), shards in order, format version
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
deterministic order, writes ``store.json`` atomically, then deletes what it no longer lists.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from features.errors import MerError

FORMAT = "mer-store"
VERSION = 2
INDEX = "store.json"
PARTS = ".parts"
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


def _write_shard(path: Path, kind: str, ids: list[str], keys: list[str],
                 entries: Sequence[_Entry], compression: str | None) -> None:
    """Write one complete shard atomically: temporary name, ``complete`` last, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        h5.attrs.update(format=FORMAT, version=VERSION, kind=kind)
        clips = h5.create_group("clips")
        for cid, e in zip(ids, entries):
            if e.array is not None:
                ds = clips.create_dataset(cid, data=e.array, compression=compression)
                for k, v in (e.attrs or {}).items():
                    ds.attrs[k] = v
        h5.create_dataset("index", data=np.array(ids, dtype=object), dtype=_STR)
        h5.create_dataset("keys", data=np.array(keys, dtype=object), dtype=_STR)
        pooled = [e.pooled for e in entries if e.pooled is not None]
        if pooled:
            if len(pooled) != len(entries):
                raise StoreError(f"{path}: every clip of a pooled store needs pooled vectors.")
            stacked = np.stack(pooled, axis=1)  # [L, n, D]
            # Chunks of one layer x POOLED_CHUNK_ROWS clips: a layer for all clips is a run of
            # adjacent chunks, and one clip's vectors cost L small chunk reads, not L whole layers.
            rows = min(stacked.shape[1], POOLED_CHUNK_ROWS)
            h5.create_dataset("pooled", data=stacked, compression=compression,
                              chunks=(1, rows, stacked.shape[2]) if stacked.size else None)
        h5.attrs["complete"] = 1  # written last: its presence means the file is whole
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Shard:
    """One open, complete shard file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.h5 = h5py.File(path, "r")
        except OSError as err:
            raise StoreError(f"shard {path} cannot be opened ({err}); delete the store folder "
                             f"and rerun its stage.") from err
        if self.h5.attrs.get("format") != FORMAT or not self.h5.attrs.get("complete"):
            self.h5.close()
            raise StoreError(f"shard {path} is incomplete (interrupted write?); rerun its stage.")
        self.ids = [_s(x) for x in self.h5["index"][()]]
        self.keys = [_s(x) for x in self.h5["keys"][()]]
        self.clips = self.h5["clips"]
        self.pooled = self.h5.get("pooled")
        self._block: np.ndarray | None = None

    def entry(self, i: int) -> _Entry:
        """One clip, for copying into a new shard; the pooled block is read once per shard."""
        ds = self.clips.get(self.ids[i])
        if self.pooled is not None and self._block is None:
            self._block = self.pooled[()]
        pooled = self._block[:, i] if self._block is not None else None
        return _Entry(None if ds is None else ds[()],
                      None if ds is None else dict(ds.attrs), pooled)

    def close(self) -> None:
        self._block = None
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
    info = json.loads(index.read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise StoreError(f"store {folder} has format {info.get('format')}/{info.get('version')}, "
                         f"this code reads {FORMAT}/{VERSION}; rerun its stage.")
    return info


def _write_index(folder: Path, info: dict) -> None:
    tmp = folder / (INDEX + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(info, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / INDEX)


# ----------------------------------------------------------------------------- reading

class StoreReader:
    """Read a finished store: ``with StoreReader(path) as s: s.get(id); s.pooled(layer=-1)``."""

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = Path(path)
        info = _read_index(self.path)
        self.kind, self.meta = info["kind"], info["meta"]
        if kind is not None and self.kind != kind:
            raise StoreError(f"store {self.path} holds {self.kind!r} data, expected {kind!r}.")
        self._shards = [_Shard(self.path / name) for name in info["shards"]]
        self.ids: list[str] = [cid for sh in self._shards for cid in sh.ids]
        self.keys: dict[str, str] = {cid: k for sh in self._shards for cid, k in zip(sh.ids, sh.keys)}
        self._where = {cid: (s, i) for s, sh in enumerate(self._shards) for i, cid in enumerate(sh.ids)}
        self._row = {cid: r for r, cid in enumerate(self.ids)}

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
        if ids is not None and len(ids) < SUBSET_FRACTION * len(self.ids):
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
        out = {"path": str(self.path), "kind": self.kind, "clips": len(self.ids), "bytes": size,
               "shards": len(self._shards), "meta": self.meta}
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
    """Bring the store at `path` to exactly the clips of `wanted`, computing only what is missing.

        with StoreUpdate(path, "embedding", meta, wanted={id: key}) as up:
            for cid in up.todo:              # clips with no valid cached result
                up.add(cid, array, attrs=..., pooled=...)
                up.checkpoint()              # optional: persist finished work now (resume point)
        # leaving the block commits: store.json lists exactly `wanted` minus clips never added

    Clips in `todo` that are never added (they failed) are simply absent from the store; the
    next run lists them in `todo` again. On an exception the store is not committed, but finished
    parts stay for the next run.
    """

    def __init__(self, path: str | os.PathLike, kind: str, meta: Mapping | None,
                 wanted: Mapping[str, str], shard_mb: float = 1024.0, part_mb: float = 64.0,
                 compression: str | None = None):
        self.path = Path(path)
        self.kind, self.meta = kind, json.loads(json.dumps(dict(meta or {}), default=str))
        self.wanted = dict(wanted)
        for cid in self.wanted:
            check_clip_id(cid)
        self.shard_bytes, self.part_bytes = shard_mb * 2**20, part_mb * 2**20
        self.compression = compression
        if self.path.is_file():
            self.path.unlink()  # an old single-file store: replaced by a folder
        (self.path / PARTS).mkdir(parents=True, exist_ok=True)
        self._cached: dict[str, tuple[_Shard, int]] = {}  # valid old results, by clip id
        self._open: list[_Shard] = []
        self._keep: list[str] = []  # shard files kept untouched
        self._scan_old()
        self.todo = [cid for cid in self.wanted if cid not in self._cached and cid not in self._kept_ids]
        self._pending: list[tuple[str, _Entry]] = []
        self._pending_bytes = 0
        self.reused = len(self.wanted) - len(self.todo)

    def _scan_old(self) -> None:
        try:
            info = _read_index(self.path)
            shards = info["shards"] if info["kind"] == self.kind else []
        except StoreError:
            shards = []
        self._kept_ids: set[str] = set()
        for name in shards:
            sh = self._try_open(self.path / name)
            if sh is None:
                continue
            valid = [self.wanted.get(c) == k for c, k in zip(sh.ids, sh.keys)]
            if all(valid) and sh.ids:
                self._keep.append(name)  # untouched: DVC will not re-upload it
                self._kept_ids.update(sh.ids)
            self._remember(sh, valid)
        for part in sorted((self.path / PARTS).glob("part-*.h5")):
            sh = self._try_open(part)
            if sh is not None:
                self._remember(sh, [self.wanted.get(c) == k for c, k in zip(sh.ids, sh.keys)])

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
                     [e for _, e in self._pending], self.compression)
        sh = _Shard(path)
        self._open.append(sh)
        self._remember(sh, [True] * len(ids))
        self._pending, self._pending_bytes = [], 0

    def commit(self) -> Path:
        """Pack the clips that are not in kept shards into new shards; publish store.json."""
        self.checkpoint()
        order = [cid for cid in self.wanted if cid in self._cached]
        shards = list(self._keep)
        for group in self._groups(order):
            ids = [cid for cid, _ in group]
            name = f"shard-{clip_key(ids, [self.wanted[c] for c in ids])}.h5"
            _write_shard(self.path / name, self.kind, ids, [self.wanted[c] for c in ids],
                         [e for _, e in group], self.compression)
            shards.append(name)
        _write_index(self.path, {"format": FORMAT, "version": VERSION, "kind": self.kind,
                                 "meta": self.meta, "shards": shards,
                                 "clips": len(self._kept_ids) + len(order)})
        self._close_all()
        self._collect_garbage(set(shards))
        return self.path

    def _groups(self, order: list[str]):
        """Yield lists of (clip_id, entry) of about shard_bytes each, in `wanted` order."""
        group, size = [], 0
        for cid in order:
            sh, i = self._cached[cid]
            entry = sh.entry(i)
            group.append((cid, entry))
            size += sum(a.nbytes for a in (entry.array, entry.pooled) if a is not None)
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
        for f in self.path.iterdir():
            if f.name not in live and f.name != INDEX and f.is_file():
                f.unlink()
        shutil.rmtree(self.path / PARTS, ignore_errors=True)

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


def write_store(path: str | os.PathLike, kind: str, meta: Mapping | None,
                items: Iterable[tuple[str, np.ndarray | None, Mapping | None, np.ndarray | None]],
                **kwargs) -> Path:
    """Write a whole store at once from (clip_id, array, attrs, pooled) tuples (tests, tools)."""
    items = list(items)
    wanted = {cid: clip_key(cid, i) for i, (cid, *_rest) in enumerate(items)}
    with StoreUpdate(path, kind, meta, wanted, **kwargs) as up:
        for cid, array, attrs, pooled in items:
            up.add(cid, array, attrs=attrs, pooled=pooled)
    return Path(path)
