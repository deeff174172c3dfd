"""FeatureSet: (encoder, layer, ids) -> numpy or torch, across shards, without the layout."""
import numpy as np
import pytest
import torch

from features.dataset import FeatureSet
from features.store import StoreError, write_store


def _items(n, layers=3, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"c{i}", rng.normal(size=(1, 2 + i, dim)).astype(np.float16), None,
             rng.normal(size=(layers, dim)).astype(np.float16)) for i in range(n)]


def test_pooled_and_frames_by_ids(tmp_path):
    items = _items(6)
    write_store(tmp_path / "hubert", "embedding", {}, items, shard_mb=1e-4)  # several shards
    with FeatureSet(tmp_path) as feats:
        assert feats.encoders == ["hubert"] and len(list((tmp_path / "hubert").glob("shard-*"))) > 1
        x = feats.pooled("hubert", layer=-1, ids=["c4", "c1"])
        np.testing.assert_array_equal(x, np.stack([items[4][3][-1], items[1][3][-1]]).astype(np.float32))
        t = feats.pooled("hubert", ids=["c0"], as_tensor=True)
        assert isinstance(t, torch.Tensor) and t.shape == (1, 3, 4) and t.dtype == torch.float32
        frames, mask = feats.frames("hubert", ["c0", "c3"], as_tensor=True)
        assert frames.shape == (2, 1, 5, 4) and mask.sum(1).tolist() == [2, 5]
        np.testing.assert_array_equal(frames[1, :, :5].numpy(), items[3][1].astype(np.float32))
        assert frames[0, :, 2:].abs().sum() == 0
        with pytest.raises(StoreError, match="embed@clip"):
            feats.pooled("clip")
        with pytest.raises(StoreError, match="not in store"):
            feats.pooled("hubert", ids=["nope"])
