"""Frame-level reads take one kept layer straight from HDF5, in the stored dtype, owning its data."""
import h5py
import numpy as np
import pytest

from features.storage.dataset import FeatureSet
from features.storage.store import StoreError, StoreReader, write_store

K, D = 4, 8


def _items(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"c{i}", rng.normal(size=(K, 50 + i, D)).astype(np.float16), None,
             rng.normal(size=(6, D)).astype(np.float16)) for i in range(n)]


@pytest.fixture
def store(tmp_path):
    write_store(tmp_path / "hubert", "embedding", {"layers_frames": [0, 2, 4, -1]}, _items(5),
                shard_mb=1e-3)
    return tmp_path / "hubert"


def test_layer_read_equals_whole_clip_read_and_owns_its_data(store):
    with StoreReader(store) as reader:
        for cid in reader.ids:
            for k in (*range(K), -1):
                arr = reader.frame_layer(cid, k)
                whole = reader.get(cid)
                assert arr.dtype == whole.dtype == np.float16  # stored dtype, no float32 yet
                np.testing.assert_array_equal(arr, whole[k])
                assert arr.base is None or arr.base.nbytes == arr.nbytes  # not a view of [K, T, D]
                assert arr.flags.owndata or arr.base.nbytes == arr.nbytes
        with pytest.raises(StoreError, match="out of range"):
            reader.frame_layer("c0", K)


def test_layer_read_does_not_read_the_other_layers(store, monkeypatch):
    got = []
    real = h5py.Dataset.__getitem__

    def counting(self, sel, *args, **kw):  # what HDF5 hands back per read
        out = real(self, sel, *args, **kw)
        if self.name.startswith("/clips/"):
            got.append(np.asarray(out).nbytes)
        return out

    with StoreReader(store) as reader:
        monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
        arr = reader.frame_layer("c3", 2)
        assert sum(got) == arr.nbytes == 53 * D * 2  # one layer: a whole-clip read is K times this
        got.clear()
        with FeatureSet(store.parent) as feats:
            frames = feats.frames("hubert", ["c0", "c1"], layer=4)
        assert sum(got) == sum(f.nbytes for f in frames) == (50 + 51) * D * 2
