"""The HDF5 feature store: the only module that calls h5py.

One store is one HDF5 file holding every clip of one stage's output (audio PCM, face crops, or one
encoder's embeddings). Layout (version 1):

    /                       attrs: format="mer-store", version=1, kind, meta (JSON), complete=1
    /index                  [N] utf-8 clip ids, in write order
    /clips/<clip_id>        one dataset per clip: PCM [S], crops [F,H,W,3], frame states [K,T,D]
                            (attrs of the dataset: per-clip facts such as sample_rate, layers)
    /pooled                 [L, N, D] one pooled vector per layer per clip (embedding stores);
                            layer-major so one layer for all clips is one contiguous slice

Writes are crash-safe: everything goes to ``<path>.tmp``, ``complete`` is written last, the file is
fsynced and atomically renamed over ``<path>``. A reader refuses a file without ``complete``, so a
killed writer can never leave a store that opens as if it were whole.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from features.errors import MerError

FORMAT = "mer-store"
VERSION = 1
_STR = h5py.string_dtype("utf-8")


class StoreError(MerError):
    """A store is missing, incomplete, of the wrong kind, or lacks a requested key."""


def check_clip_id(clip_id: str) -> str:
    """Clip ids become HDF5 names: refuse the characters HDF5 treats specially."""
    if not clip_id or "/" in clip_id or clip_id in (".", ".."):
        raise StoreError(f"clip id {clip_id!r} cannot be stored: ids must be non-empty and contain no '/'.")
    return clip_id


class StoreWriter:
    """Write one store: ``with StoreWriter(path, kind, meta) as w: w.add(id, array)``.

    On an exception inside the ``with`` block the temporary file is removed and any existing
    store at ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike, kind: str, meta: Mapping | None = None,
                 compression: str | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._h5 = h5py.File(self.tmp, "w")
        self._h5.attrs["format"] = FORMAT
        self._h5.attrs["version"] = VERSION
        self._h5.attrs["kind"] = kind
        self._h5.attrs["meta"] = json.dumps(dict(meta or {}), sort_keys=True, default=str)
        self._clips = self._h5.create_group("clips")
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._pooled: list[np.ndarray] = []
        self._compression = compression

    def add(self, clip_id: str, array: np.ndarray | None = None, attrs: Mapping | None = None,
            pooled: np.ndarray | None = None) -> None:
        """Store one clip: its per-clip array (optional) and/or its pooled [L, D] vectors."""
        check_clip_id(clip_id)
        if clip_id in self._seen:
            raise StoreError(f"clip {clip_id!r} written twice to {self.path}.")
        if array is None and pooled is None:
            raise StoreError(f"clip {clip_id!r}: nothing to store (neither array nor pooled).")
        if array is not None:
            ds = self._clips.create_dataset(clip_id, data=np.asarray(array),
                                            compression=self._compression)
            for k, v in (attrs or {}).items():
                ds.attrs[k] = v
        if pooled is not None:
            if self._pooled and pooled.shape != self._pooled[0].shape:
                raise StoreError(f"clip {clip_id!r}: pooled shape {pooled.shape} differs from "
                                 f"{self._pooled[0].shape} of earlier clips.")
            self._pooled.append(np.asarray(pooled))
        elif self._pooled:
            raise StoreError(f"clip {clip_id!r}: every clip of a pooled store needs pooled vectors.")
        self._ids.append(clip_id)
        self._seen.add(clip_id)

    def close(self) -> Path:
        """Finish the file and atomically move it into place; returns the final path."""
        h5 = self._h5
        h5.create_dataset("index", data=np.array(self._ids, dtype=object), dtype=_STR)
        if self._pooled:
            stacked = np.stack(self._pooled, axis=1)  # [L, N, D]
            h5.create_dataset("pooled", data=stacked, chunks=_pooled_chunks(stacked.shape),
                              compression=self._compression)
        h5.attrs["complete"] = 1  # written last: its presence means the file is whole
        h5.flush()
        h5.close()
        with open(self.tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._h5.id.valid:
            self._h5.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pooled_chunks(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    # One layer, many clips per chunk: reading a layer for all clips touches few chunks.
    layers, n, dim = shape
    return (1, max(1, min(n, max(1, (1 << 20) // max(1, dim * 4)))), dim)


class StoreReader:
    """Read a finished store. ``with StoreReader(path) as s: s.get(id); s.pooled(layer=-1)``."""

    def __init__(self, path: str | os.PathLike, kind: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"store {self.path} does not exist; run the stage that writes it "
                             f"(`dvc repro`).")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise StoreError(f"store {self.path} cannot be opened ({err}); delete it and rerun "
                             f"its stage.") from err
        attrs = self._h5.attrs
        if attrs.get("format") != FORMAT or not attrs.get("complete"):
            self._h5.close()
            raise StoreError(f"store {self.path} is not a complete mer store (interrupted write?); "
                             f"delete it and rerun its stage.")
        self.kind = str(attrs["kind"])
        if kind is not None and self.kind != kind:
            self._h5.close()
            raise StoreError(f"store {self.path} holds {self.kind!r} data, expected {kind!r}.")
        self.meta = json.loads(attrs["meta"])
        self.ids: list[str] = [s.decode() if isinstance(s, bytes) else s
                               for s in self._h5["index"][()]]
        self._row = {cid: i for i, cid in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self._row

    def _dataset(self, clip_id: str) -> h5py.Dataset:
        if clip_id not in self._h5["clips"]:
            raise StoreError(f"clip {clip_id!r} is not in store {self.path} "
                             f"(it may have failed upstream: see the stage's failures.json).")
        return self._h5["clips"][clip_id]

    def get(self, clip_id: str) -> np.ndarray:
        """The per-clip array of one clip."""
        return self._dataset(clip_id)[()]

    def attrs(self, clip_id: str) -> dict:
        return {k: _py(v) for k, v in self._dataset(clip_id).attrs.items()}

    @property
    def has_pooled(self) -> bool:
        return "pooled" in self._h5

    @property
    def pooled_shape(self) -> tuple[int, int, int]:
        """(layers, clips, dim) of the pooled matrix."""
        if not self.has_pooled:
            raise StoreError(f"store {self.path} has no pooled vectors.")
        return tuple(self._h5["pooled"].shape)

    def pooled(self, layer: int | None = None, ids: Sequence[str] | None = None) -> np.ndarray:
        """Pooled vectors: [N, D] for one layer (negative counts from the end) or [N, L, D] for all."""
        ds = self._h5["pooled"] if self.has_pooled else None
        if ds is None:
            raise StoreError(f"store {self.path} has no pooled vectors.")
        if layer is not None:
            n_layers = ds.shape[0]
            if not -n_layers <= layer < n_layers:
                raise StoreError(f"layer {layer} out of range for {self.path} ({n_layers} layers).")
            block = ds[layer % n_layers]  # contiguous [N, D]
        else:
            block = np.moveaxis(ds[()], 0, 1)  # [N, L, D]
        if ids is None:
            return block
        return block[self.rows(ids)]

    def rows(self, ids: Iterable[str]) -> np.ndarray:
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise StoreError(f"{len(missing)} clip(s) not in store {self.path}, e.g. {missing[:3]}; "
                             f"they failed upstream or the store is stale: rerun `dvc repro`.")
        return np.array([self._row[i] for i in ids], dtype=np.int64)

    def summary(self) -> dict:
        """What a person wants to know about the store (used by `mer store inspect`)."""
        out = {"path": str(self.path), "kind": self.kind, "clips": len(self.ids),
               "bytes": self.path.stat().st_size, "meta": self.meta}
        if self.has_pooled:
            ds = self._h5["pooled"]
            out["pooled"] = {"layers": ds.shape[0], "dim": ds.shape[2], "dtype": str(ds.dtype)}
        if self.ids and self.ids[0] in self._h5["clips"]:
            first = self._h5["clips"][self.ids[0]]
            out["per_clip"] = {"example_shape": list(first.shape), "dtype": str(first.dtype)}
        return out

    def close(self) -> None:
        self._h5.close()

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
