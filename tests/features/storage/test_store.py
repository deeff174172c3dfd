"""The feature store: round trips, incremental updates, crash safety, clear errors."""
import numpy as np
import pytest

from features.storage.store import StoreError, StoreReader, StoreUpdate, clip_key, write_store


def _items(n=5, layers=3, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"clip{i}", rng.standard_normal((1, i + 2, dim)).astype(np.float16), {"layers": [-1]},
             rng.standard_normal((layers, dim)).astype(np.float16)) for i in range(n)]


def _same(path_a, path_b):
    with StoreReader(path_a) as a, StoreReader(path_b) as b:
        assert sorted(a.ids) == sorted(b.ids)
        ids = sorted(a.ids)
        np.testing.assert_array_equal(a.pooled(ids=ids), b.pooled(ids=ids))
        for cid in ids:
            np.testing.assert_array_equal(a.get(cid), b.get(cid))
            assert a.keys[cid] == b.keys[cid]


def test_round_trip(tmp_path):
    items = _items()
    write_store(tmp_path / "s", "embedding", {"encoder": "x"}, items)
    with StoreReader(tmp_path / "s", kind="embedding") as s:
        assert s.ids == [f"clip{i}" for i in range(5)]
        assert s.meta == {"encoder": "x"}
        assert s.pooled_shape == (3, 5, 4)
        pooled = np.stack([it[3] for it in items])
        np.testing.assert_array_equal(s.pooled(layer=-1), pooled[:, -1])
        np.testing.assert_array_equal(s.pooled(layer=0, ids=["clip3", "clip1"]), pooled[[3, 1], 0])
        np.testing.assert_array_equal(s.pooled(), pooled)
        np.testing.assert_array_equal(s.get("clip2"), items[2][1])
        assert s.attrs("clip2") == {"layers": [-1]}
        assert "clip4" in s and "nope" not in s
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_clear_errors(tmp_path):
    write_store(tmp_path / "s", "embedding", {}, _items())
    with pytest.raises(StoreError, match="does not exist"):
        StoreReader(tmp_path / "missing")
    with pytest.raises(StoreError, match="expected 'audio'"):
        StoreReader(tmp_path / "s", kind="audio")
    with StoreReader(tmp_path / "s") as s:
        with pytest.raises(StoreError, match="'ghost' is not in store"):
            s.get("ghost")
        with pytest.raises(StoreError, match="layer 7 out of range"):
            s.pooled(layer=7)
        with pytest.raises(StoreError, match="not in store"):
            s.pooled(layer=0, ids=["clip0", "ghost"])


def test_rejects_bad_ids_duplicates_and_strangers(tmp_path):
    with pytest.raises(StoreError, match="no '/'"):
        StoreUpdate(tmp_path / "a", "audio", {}, {"a/b": "k"})
    with pytest.raises(StoreError, match="written twice"):
        with StoreUpdate(tmp_path / "a", "audio", {}, {"a": "k"}) as up:
            up.add("a", np.zeros(3))
            up.checkpoint()
            up.add("a", np.zeros(3))
    with pytest.raises(StoreError, match="not among"):
        with StoreUpdate(tmp_path / "b", "audio", {}, {"a": "k"}) as up:
            up.add("zzz", np.zeros(3))


def test_incremental_update_reuses_keeps_and_removes(tmp_path):
    items = {cid: (arr, attrs, pooled) for cid, arr, attrs, pooled in _items(6)}
    keys = {cid: clip_key(cid, "v1") for cid in items}
    first = {c: keys[c] for c in ["clip0", "clip1", "clip2", "clip3"]}
    with StoreUpdate(tmp_path / "s", "embedding", {}, first) as up:
        assert up.todo == list(first)
        for cid in up.todo:
            up.add(cid, items[cid][0], pooled=items[cid][2])
    shard_files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard-*.h5")}

    # Add two clips: only they are computed, the old shard file is left untouched.
    second = {**first, "clip4": keys["clip4"], "clip5": keys["clip5"]}
    with StoreUpdate(tmp_path / "s", "embedding", {}, second) as up:
        assert up.todo == ["clip4", "clip5"] and up.reused == 4
        for cid in up.todo:
            up.add(cid, items[cid][0], pooled=items[cid][2])
    for name, mtime in shard_files.items():
        assert (tmp_path / "s" / name).stat().st_mtime_ns == mtime
    # Remove one and change the key of another: the changed one is recomputed, the removed gone.
    third = {c: k for c, k in second.items() if c != "clip1"}
    third["clip2"] = clip_key("clip2", "v2")
    with StoreUpdate(tmp_path / "s", "embedding", {}, third) as up:
        assert up.todo == ["clip2"]
        up.add("clip2", items["clip2"][0], pooled=items["clip2"][2])
    with StoreReader(tmp_path / "s") as s:
        assert sorted(s.ids) == ["clip0", "clip2", "clip3", "clip4", "clip5"]
        assert s.keys["clip2"] == third["clip2"]
        np.testing.assert_array_equal(s.pooled(layer=1, ids=["clip5"])[0], items["clip5"][2][1])
    assert not (tmp_path / "s" / ".parts").exists()


def test_failed_update_keeps_previous_store_and_finished_parts(tmp_path):
    items = _items(4)
    write_store(tmp_path / "s", "embedding", {}, items[:2])
    wanted = {cid: clip_key(cid, i) for i, (cid, *_r) in enumerate(items)}
    with pytest.raises(RuntimeError):
        with StoreUpdate(tmp_path / "s", "embedding", {}, wanted) as up:
            up.add("clip2", items[2][1], pooled=items[2][3])
            up.checkpoint()
            raise RuntimeError("crash inside the stage")
    with StoreReader(tmp_path / "s") as s:
        assert s.ids == ["clip0", "clip1"]
    with StoreUpdate(tmp_path / "s", "embedding", {}, wanted) as up:
        assert up.todo == ["clip3"]  # clip2's finished part is reused
        up.add("clip3", items[3][1], pooled=items[3][3])
    with StoreReader(tmp_path / "s") as s:
        assert sorted(s.ids) == ["clip0", "clip1", "clip2", "clip3"]


# Crash recovery (a hard exit at each named point of an update, then a rerun equal to a clean
# run) is tested deterministically in test_faults.py.


def test_summary_for_inspect(tmp_path):
    write_store(tmp_path / "s", "embedding", {"encoder": "x"}, _items())
    with StoreReader(tmp_path / "s") as s:
        info = s.summary()
    assert info["clips"] == 5 and info["pooled"] == {"layers": 3, "dim": 4, "dtype": "float16"}
    assert info["per_clip"]["dtype"] == "float16" and info["shards"] == 1


def test_subset_reads_equal_full_reads_across_shards(tmp_path):
    items = _items(n=300, layers=4, dim=8)
    write_store(tmp_path / "s", "embedding", {}, items, shard_mb=0.01)
    with StoreReader(tmp_path / "s") as s:
        assert len({s._where[c][0] for c in s.ids}) > 3  # several shards
        full = s.pooled()
        for ids in (["clip7"], ["clip299", "clip0", "clip150"], [], [f"clip{i}" for i in range(0, 300, 2)]):
            rows = s.rows(ids)
            np.testing.assert_array_equal(s.pooled(ids=ids), full[rows])
            np.testing.assert_array_equal(s.pooled(layer=-1, ids=ids), full[rows, -1])
        with pytest.raises(StoreError, match="not in store"):
            s.pooled(ids=["clip1", "nope"])
