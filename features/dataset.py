"""Cached features by (encoder, layer, clip ids), as numpy or torch, without knowing the layout.

    feats = FeatureSet("artifacts/features")
    x = feats.pooled("hubert", layer=-1, ids=clip_ids, as_tensor=True)   # [N, D] torch.float32
    frames, mask = feats.frames("hubert", ids=clip_ids, as_tensor=True)   # [N, K, T, D], [N, T]
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from features.store import INDEX, StoreError, StoreReader


class FeatureSet:
    """Every embedding store under a features folder (one sub-folder per encoder)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.encoders = sorted(p.name for p in self.root.iterdir() if (p / INDEX).is_file()) \
            if self.root.is_dir() else []
        self._open: dict[str, StoreReader] = {}

    def store(self, encoder: str) -> StoreReader:
        if encoder not in self.encoders:
            raise StoreError(f"no feature store {encoder!r} under {self.root}; have {self.encoders}. "
                             f"Run `dvc repro embed@{encoder}`.")
        if encoder not in self._open:
            self._open[encoder] = StoreReader(self.root / encoder, kind="embedding")
        return self._open[encoder]

    def ids(self, encoder: str) -> list[str]:
        return list(self.store(encoder).ids)

    def pooled(self, encoder: str, layer: int | None = None, ids: Sequence[str] | None = None,
               as_tensor: bool = False, dtype=np.float32):
        """[N, D] for one layer, [N, L, D] for all layers; rows in `ids` order."""
        return _out(self.store(encoder).pooled(layer, ids).astype(dtype, copy=False), as_tensor)

    def frames(self, encoder: str, ids: Sequence[str], as_tensor: bool = False, dtype=np.float32):
        """Frame-level states padded to the longest clip: [N, K, T, D] and a validity mask [N, T]."""
        store = self.store(encoder)
        clips = [store.get(cid) for cid in ids]
        longest = max((c.shape[1] for c in clips), default=0)
        k, d = (clips[0].shape[0], clips[0].shape[2]) if clips else (0, 0)
        out = np.zeros((len(clips), k, longest, d), dtype=dtype)
        mask = np.zeros((len(clips), longest), dtype=bool)
        for i, c in enumerate(clips):
            out[i, :, : c.shape[1]] = c
            mask[i, : c.shape[1]] = True
        return _out(out, as_tensor), _out(mask, as_tensor)

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()

    def __enter__(self) -> "FeatureSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _out(array: np.ndarray, as_tensor: bool):
    if not as_tensor:
        return array
    import torch
    return torch.from_numpy(np.ascontiguousarray(array))
