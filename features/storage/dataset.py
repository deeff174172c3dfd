"""Cached features by (encoder, layer, clip ids): the one way heads read embedding stores.

    with FeatureSet("artifacts/features") as feats:
        ids = feats.common_ids(["hubert", "clip"], wanted_ids)     # clips every store has
        x = feats.pooled("hubert", layer=-1, ids=ids)              # [N, D] float32
        every = feats.pooled("hubert", ids=ids)                    # [N, L, D]
        frames = feats.frames("hubert", ids, layer=-1)             # [T_i, D] per clip

Stores open lazily and once; `close()` (or the `with` block) closes them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from features.errors import ConfigError
from features.storage.store import INDEX, StoreError, StoreReader


class FeatureSet:
    """Every embedding store under a features folder (one sub-folder per encoder)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._open: dict[str, StoreReader] = {}

    @property
    def encoders(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / INDEX).is_file())

    def store(self, encoder: str) -> StoreReader:
        if encoder not in self._open:
            if not (self.root / encoder / INDEX).is_file():
                raise StoreError(f"no feature store {encoder!r} under {self.root}; have "
                                 f"{self.encoders}. Run `dvc repro embed@{encoder}`.")
            self._open[encoder] = StoreReader(self.root / encoder, kind="embedding")
        return self._open[encoder]

    def ids(self, encoder: str) -> list[str]:
        return list(self.store(encoder).ids)

    def common_ids(self, encoders: Iterable[str], ids: Sequence[str]) -> list[str]:
        """The ids (in the given order) that every listed store holds."""
        stores = [self.store(e) for e in encoders]
        return [c for c in ids if all(c in s for s in stores)]

    def n_layers(self, encoder: str) -> int:
        """Pooled layers the store keeps (hidden states including the embedding output)."""
        store = self.store(encoder)
        if not store.has_pooled:
            raise StoreError(f"store {encoder!r} has no pooled vectors; rerun embed@{encoder}.")
        return int(store.pooled_shape[0])

    def pooled(self, encoder: str, layer: int | None = None,
               ids: Sequence[str] | None = None) -> np.ndarray:
        """float32 [N, D] for one layer (reads only its slice), [N, L, D] for all; `ids` order."""
        return self.store(encoder).pooled(layer, ids).astype(np.float32, copy=False)

    def frames(self, encoder: str, ids: Sequence[str], layer: int) -> list[np.ndarray]:
        """Frame-level states [T_i, D] of one stored layer (one of `layers_frames`) per clip."""
        store = self.store(encoder)
        k = self.frame_layer(encoder, layer)
        return [store.frame_layer(cid, k) for cid in ids]

    def frame_layer(self, encoder: str, layer: int) -> int:
        """Position of `layer` among the layers the store keeps frame-level states for."""
        store = self.store(encoder)
        stored = list(store.meta.get("layers_frames") or [])
        n = store.pooled_shape[0] if store.has_pooled else None
        norm = (lambda v: v % n) if n else (lambda v: v)
        if not stored or norm(layer) not in [norm(v) for v in stored]:
            raise ConfigError(
                f"frames_layer {layer} is not kept at frame level in store {encoder!r} (it keeps "
                f"layers_frames {stored}); set the head's frames_layer to one of those, or add "
                f"it to embed.encoders.{encoder}.layers_frames and rerun embed.")
        return [norm(v) for v in stored].index(norm(layer))

    def dim(self, encoder: str) -> int | None:
        store = self.store(encoder)
        return int(store.pooled_shape[2]) if store.has_pooled else None

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()

    def __enter__(self) -> "FeatureSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
