"""FeatureSet: (encoder, layer, ids) -> numpy, across shards, without the layout."""
import numpy as np
import pytest

from features.storage.dataset import FeatureSet
from features.errors import ConfigError
from features.storage.store import StoreError, write_store


def _items(n, layers=3, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"c{i}", rng.normal(size=(1, 2 + i, dim)).astype(np.float16), None,
             rng.normal(size=(layers, dim)).astype(np.float16)) for i in range(n)]


def test_pooled_frames_and_common_ids(tmp_path):
    items = _items(6)
    write_store(tmp_path / "hubert", "embedding", {"layers_frames": [-1]}, items, shard_mb=1e-4)
    write_store(tmp_path / "clip", "embedding", {}, _items(2))
    with FeatureSet(tmp_path) as feats:
        assert feats.encoders == ["clip", "hubert"]
        assert len(list((tmp_path / "hubert").glob("shard-*"))) > 1  # several shards
        x = feats.pooled("hubert", layer=-1, ids=["c4", "c1"])
        np.testing.assert_array_equal(x, np.stack([items[4][3][-1], items[1][3][-1]])
                                      .astype(np.float32))
        assert x.dtype == np.float32 and feats.pooled("hubert", ids=["c0"]).shape == (1, 3, 4)
        assert feats.n_layers("hubert") == 3 and feats.dim("hubert") == 4
        assert feats.common_ids(["hubert", "clip"], ["c5", "c1", "c0", "zz"]) == ["c1", "c0"]
        frames = feats.frames("hubert", ["c0", "c3"], layer=2)  # layers_frames [-1] = layer 2
        assert [f.shape for f in frames] == [(2, 4), (5, 4)]
        np.testing.assert_array_equal(frames[1], items[3][1][0])
        with pytest.raises(ConfigError, match="layers_frames"):
            feats.frames("hubert", ["c0"], layer=0)
        with pytest.raises(StoreError, match="embed@audio"):
            feats.pooled("audio")
        with pytest.raises(StoreError, match="not in store"):
            feats.pooled("hubert", ids=["nope"])
