"""Shard integrity: checksums recorded at write, checked when a shard's stat changed.

The measured defect: 64 bytes flipped in the middle of a shard (a failing disk, an interrupted
copy, a damaged remote object) were reused by the next update and then committed to dvc.lock.
"""
import json
import os

import numpy as np
import pytest

from features.cache import hashcache
from features.cache.keys import remembered, still_to_do
from features.storage import store as store_mod
from features.storage.store import (INDEX, StoreError, StoreReader, StoreUpdate, clip_key,
                                    write_store)
from features.storage.verify import main as verify_main, verify_store

N, PER_SHARD = 12, 4
CLIP_BYTES = 1 * 64 * 32 * 2 + 2 * 32 * 2  # frames [1, 64, 32] + pooled [2, 32], float16
SHARD_MB = PER_SHARD * CLIP_BYTES / 2**20  # 3 shards of 4 clips


def _items(n=N):
    rng = np.random.default_rng(7)
    return {f"c{i:02d}": (rng.standard_normal((1, 64, 32)).astype(np.float16),
                          rng.standard_normal((2, 32)).astype(np.float16)) for i in range(n)}


KEYS = {cid: clip_key(cid, "v1") for cid in _items()}


def _update(path, items, keys=KEYS):
    """One update of `path` to `keys`, computing its todo from `items`; returns the todo."""
    with StoreUpdate(path, "embedding", {"m": 1}, keys, shard_mb=SHARD_MB) as up:
        todo = list(up.todo)
        for cid in todo:
            up.add(cid, items[cid][0], pooled=items[cid][1])
    return todo


@pytest.fixture
def written(tmp_path):
    path, items = tmp_path / "s", _items()
    assert _update(path, items) == list(KEYS)
    return path, items


def _shards(path):
    """[(shard path, its clip ids)] in store order."""
    with StoreReader(path) as reader:
        return [(sh.path, list(sh.ids)) for sh in reader._shards]


def _flip(path):
    """Flip 64 bytes in the middle of a file, keeping its size (its mtime changes)."""
    before = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(before.st_size // 2)
        block = fh.read(64)
        fh.seek(before.st_size // 2)
        fh.write(bytes(b ^ 0xFF for b in block))
    if path.stat().st_mtime_ns == before.st_mtime_ns:  # a coarse clock; a copy changes it anyway
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**6))
    assert path.stat().st_size == before.st_size


@pytest.fixture
def damaged(written):
    path, items = written
    shards = _shards(path)
    assert len(shards) == 3 and [len(ids) for _, ids in shards] == [PER_SHARD] * 3
    victim, ids = shards[1]
    _flip(victim)
    return path, items, victim, ids


@pytest.fixture
def hashes(monkeypatch):
    """Count the store's sha256 computations."""
    calls = []
    real = store_mod._checksum

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(store_mod, "_checksum", counting)
    return calls


def _same(path_a, path_b):
    """Same clips, keys and values (a repacked shard goes last: order may differ)."""
    with StoreReader(path_a) as a, StoreReader(path_b) as b:
        ids = sorted(a.ids)
        assert ids == sorted(b.ids) and a.keys == b.keys
        np.testing.assert_array_equal(a.pooled(ids=ids), b.pooled(ids=ids))
        for cid in ids:
            np.testing.assert_array_equal(a.get(cid), b.get(cid))


def test_every_shard_records_its_checksum_and_stat(written):
    path, _ = written
    info = json.loads((path / INDEX).read_text())
    assert sorted(info["checksums"]) == sorted(info["shards"])
    for name, rec in info["checksums"].items():
        st = (path / name).stat()
        assert rec == {"sha256": store_mod._checksum(path / name), "clips": PER_SHARD,
                       "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def test_update_sets_a_damaged_shard_aside_and_recomputes_exactly_its_clips(damaged, tmp_path,
                                                                            capsys):
    path, items, victim, ids = damaged
    bad = victim.read_bytes()
    listed = json.loads((path / INDEX).read_text())["shards"]
    others = {n: (path / n).stat().st_mtime_ns for n in listed if n != victim.name}
    assert _update(path, items) == ids
    out = capsys.readouterr().out
    aside = list(path.glob(f"{victim.name}.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # kept, never deleted
    line = [ln for ln in out.splitlines() if victim.name in ln]
    assert len(line) == 1 and f"its {PER_SHARD} clip(s) will be recomputed" in line[0]
    assert str(aside[0]) in line[0]
    for name, mtime in others.items():  # the intact shards were not rewritten
        assert (path / name).stat().st_mtime_ns == mtime
    _update(tmp_path / "clean", items)
    _same(path, tmp_path / "clean")
    assert verify_store(path)["ok"] and verify_store(path)["set_aside"] == [aside[0].name]
    assert _update(path, items) == []  # still a store: the set-aside file is not a stranger
    assert aside[0].exists()


def test_an_update_that_fails_after_setting_a_shard_aside_recovers(damaged):
    """store.json still lists the moved shard: readers name it missing, the rerun recomputes it."""
    path, items, _, ids = damaged
    with pytest.raises(RuntimeError):
        with StoreUpdate(path, "embedding", {"m": 1}, KEYS, shard_mb=SHARD_MB):
            raise RuntimeError("the stage failed")
    with pytest.raises(StoreError, match="is missing.*dvc checkout"):
        StoreReader(path)
    assert _update(path, items) == ids and verify_store(path)["ok"]


def test_verify_reports_the_damaged_shard(damaged, capsys):
    path, _, victim, _ = damaged
    report = verify_store(path)
    assert not report["ok"]
    assert {s["name"]: s["status"] for s in report["shards"]}[victim.name] == "damaged"
    assert sorted(s["status"] for s in report["shards"]) == ["damaged", "ok", "ok"]
    assert verify_main([str(path)]) == 1
    out = capsys.readouterr().out
    assert victim.name in out and f"dvc checkout {path}" in out and "dvc repro" in out
    assert verify_main(["--json", str(path.parent)]) == 1  # a folder is searched for stores
    (found,) = json.loads(capsys.readouterr().out)
    assert found["path"] == str(path) and not found["ok"]


def test_verify_finds_damage_that_kept_the_stat(written):
    """Bit rot under an unchanged stat escapes the fast check; verify reads every byte."""
    path, _ = written
    victim = _shards(path)[0][0]
    st = victim.stat()
    _flip(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert verify_main([str(path)]) == 1
    with StoreReader(path):  # stat unchanged: no hashing, by design
        pass


def test_reading_a_damaged_shard_is_an_error_naming_it_and_the_fix(damaged):
    path, _, victim, _ = damaged
    fix = rf"{victim.name}.*damaged.*dvc checkout {path}.*dvc repro"
    with pytest.raises(StoreError, match=fix):
        StoreReader(path)
    with StoreReader(path, on_damage="skip") as reader:  # what a stage asks before loading a model
        assert reader.damaged == [victim.name] and len(reader) == N - PER_SHARD


def test_the_all_cached_fast_path_sees_the_damaged_clips(damaged):
    """`embed`'s no-model path (keys.still_to_do) must not call damaged clips cached."""
    path, _, _, ids = damaged
    assert remembered(path, None) is None
    assert still_to_do(path, KEYS) == ids
    assert not list(path.glob("*.damaged-*"))  # a read-only check moves nothing


def test_an_untouched_store_is_not_hashed(written, hashes):
    path, items = written
    index = (path / INDEX).read_bytes()
    assert _update(path, items) == []
    with StoreReader(path) as reader:
        reader.pooled()
    assert still_to_do(path, KEYS) == []
    assert hashes == []
    assert (path / INDEX).read_bytes() == index  # DVC sees the same store.json


def test_a_touched_intact_shard_passes_and_its_new_stat_is_recorded(written, hashes):
    path, items = written
    victim = _shards(path)[0][0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert _update(path, items) == []
    assert hashes == [victim.name]
    rec = json.loads((path / INDEX).read_text())["checksums"][victim.name]
    assert rec["mtime_ns"] == st.st_mtime_ns + 5 * 10**9
    assert _update(path, items) == [] and hashes == [victim.name]  # the next run is fast again


def test_a_read_only_reader_hashes_a_large_changed_shard_once(written, hashes, monkeypatch):
    """After a `dvc pull` a head may read a store many times before any update records the new
    stat: the sha256 is remembered by stat (hashcache), store.json is not written."""
    path, _ = written
    monkeypatch.setattr(hashcache, "MIN_BYTES", 0)
    victim = _shards(path)[0][0]
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    index = (path / INDEX).read_bytes()
    for _ in range(3):
        with StoreReader(path):
            pass
    assert hashes == [victim.name] and (path / INDEX).read_bytes() == index


def test_a_missing_shard_is_named_and_recomputed(written, capsys):
    path, items = written
    victim, ids = _shards(path)[2]
    victim.unlink()
    with pytest.raises(StoreError, match=rf"{victim.name} is missing.*dvc checkout"):
        StoreReader(path)
    assert _update(path, items) == ids
    assert f"{victim.name} listed in store.json is missing" in capsys.readouterr().out


def test_a_truncated_shard_is_set_aside(written):
    path, items = written
    victim, ids = _shards(path)[0]
    with open(victim, "r+b") as fh:
        fh.truncate(100)
    assert _update(path, items) == ids
    assert len(list(path.glob(f"{victim.name}.damaged-*"))) == 1


def test_a_store_written_before_checksums_keeps_working_and_gets_them(written, capsys):
    path, items = written
    info = json.loads((path / INDEX).read_text())
    del info["checksums"]
    (path / INDEX).write_text(json.dumps(info))
    with StoreReader(path) as reader:
        assert len(reader) == N
    assert verify_main([str(path)]) == 0
    assert "written before shard checksums were recorded" in capsys.readouterr().out
    assert _update(path, items) == []
    recorded = json.loads((path / INDEX).read_text())["checksums"]
    assert {n: r["sha256"] for n, r in recorded.items()} == \
        {n: store_mod._checksum(path / n) for n in info["shards"]}
    assert verify_store(path)["ok"]


def test_write_store_records_checksums_too(tmp_path):
    items = [(cid, a, None, p) for cid, (a, p) in _items(3).items()]
    write_store(tmp_path / "w", "embedding", {}, items)
    assert verify_store(tmp_path / "w")["ok"]
    assert [s["status"] for s in verify_store(tmp_path / "w")["shards"]] == ["ok"]


def test_the_embed_stage_recomputes_the_damaged_shard_instead_of_reusing_it(tmp_path, capsys):
    """The measured case end to end: `embed` printed `N cached, 0 to encode (no model loaded)`
    and kept the damaged shard. Now the damaged clip is encoded again, the others are reused."""
    from tiny_models import _bert

    from features.embedding.stage import embed_store
    from features.encoders import EncoderConfig
    from features.reliability.reports import write_json_atomic

    src, out = tmp_path / "transcripts.json", tmp_path / "store"
    texts = {"a": "i am so happy", "b": "why is this sad", "c": "angry today"}
    write_json_atomic(src, {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}"} for cid, t in texts.items()}})
    cfg = EncoderConfig(family="text", model=str(_bert(tmp_path / "bert")), shard_mb=1e-6)
    embed_store("t", cfg, src, out)  # one clip per shard
    with StoreReader(out) as reader:
        clean = {cid: (reader.get(cid), reader.pooled(ids=[cid])) for cid in reader.ids}
    victim, ids = _shards(out)[1]
    _flip(victim)
    capsys.readouterr()
    embed_store("t", cfg, src, out)
    printed = capsys.readouterr().out
    assert "no model loaded" not in printed and "2 cached, 1 to encode" in printed
    assert victim.name in printed and list(out.glob(f"{victim.name}.damaged-*"))
    with StoreReader(out) as reader:
        for cid in ids:
            np.testing.assert_array_equal(reader.get(cid), clean[cid][0])
            np.testing.assert_array_equal(reader.pooled(ids=[cid]), clean[cid][1])
    assert verify_store(out)["ok"]
