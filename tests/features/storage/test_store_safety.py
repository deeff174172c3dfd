"""Store safety: one writer at a time, cleanup of the store's own files only, kept clips."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from features.storage.store import StoreError, StoreReader, StoreUpdate, clip_key, prune, write_store
from stages.cli import main as mer

ENV = dict(os.environ, PYTHONPATH=os.getcwd())
# A writer that adds clips c0000..c<n-1>; with a gate file it waits for it before committing.
WRITER = """
import os, sys, time, numpy as np
from features.storage.store import StoreUpdate, clip_key
path, n, gate = sys.argv[1], int(sys.argv[2]), sys.argv[3]
wanted = {f"c{i:04d}": clip_key(i) for i in range(n)}
with StoreUpdate(path, "embedding", {}, wanted, part_mb=0.01) as up:
    print("todo", len(up.todo), flush=True)
    for cid in up.todo:
        i = int(cid[1:])
        up.add(cid, np.full((1, 3, 8), i, np.float16), pooled=np.full((2, 8), i, np.float16))
    while gate != "-" and not os.path.exists(gate):
        time.sleep(0.05)
"""


def _writer(path, n, gate="-"):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n), str(gate)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _pooled(n, layers=2, dim=4):
    return [(f"c{i}", None, None, np.full((layers, dim), i, np.float16)) for i in range(n)]


def test_a_second_writer_waits_for_the_first(tmp_path):
    """Two real processes update one store: the second waits, then reuses the first's clips."""
    first = _writer(tmp_path / "s", 50, tmp_path / "gate")
    assert first.stdout.readline().split() == ["todo", "50"]
    second = _writer(tmp_path / "s", 100)
    waiting = second.stderr.readline()  # without a lock it would run to the end instead
    assert "being updated by another process" in waiting and f"pid {first.pid}" in waiting
    time.sleep(0.5)
    assert second.poll() is None  # still blocked while the first holds the store
    (tmp_path / "gate").touch()
    assert first.wait(60) == 0
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert out.split()[:2] == ["todo", "50"]  # it saw the first writer's committed clips
    _writer(tmp_path / "clean", 100).communicate(timeout=60)
    with StoreReader(tmp_path / "s") as a, StoreReader(tmp_path / "clean") as b:
        assert a.ids == b.ids and a.keys == b.keys
        np.testing.assert_array_equal(a.pooled(), b.pooled())
    assert not (tmp_path / "s" / ".lock").exists()


def test_a_second_update_in_the_same_process_is_an_error_not_a_deadlock(tmp_path):
    with StoreUpdate(tmp_path / "s", "audio", {}, {"a": "k"}) as up:
        up.add("a", np.zeros(3))
        with pytest.raises(StoreError, match="already being updated by this process"):
            StoreUpdate(tmp_path / "s", "audio", {}, {"a": "k"})
    with StoreUpdate(tmp_path / "s", "audio", {}, {"a": "k"}) as up:  # released: fine again
        assert up.todo == []


JSON_WRITER = """
import sys
from features.reliability.reports import write_json_atomic
for i in range(300):
    write_json_atomic(sys.argv[1], {"writer": sys.argv[2], "i": i, "pad": "x" * 2000})
"""


def test_concurrent_json_writes_never_share_a_temporary(tmp_path):
    target = tmp_path / "out.json"
    procs = [subprocess.Popen([sys.executable, "-c", JSON_WRITER, str(target), str(w)],
                              stderr=subprocess.PIPE, text=True, env=ENV) for w in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert json.loads(target.read_text())["i"] == 299
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_refuses_a_folder_or_file_that_is_not_a_store(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("mine")
    with pytest.raises(StoreError, match="not empty and is not a store"):
        write_store(project, "embedding", {}, _pooled(3))
    assert (project / "README.md").read_text() == "mine" and len(list(project.iterdir())) == 1
    (tmp_path / "file.h5").write_text("data")
    with pytest.raises(StoreError, match="is a file"):
        StoreUpdate(tmp_path / "file.h5", "embedding", {}, {"a": "k"})
    assert (tmp_path / "file.h5").read_text() == "data"
    other = tmp_path / "other"
    other.mkdir()
    (other / "store.json").write_text('{"name": "someone else\'s"}')
    with pytest.raises(StoreError, match="not a store"):
        write_store(other, "embedding", {}, _pooled(3))


def test_cleanup_deletes_only_the_stores_own_names(tmp_path):
    write_store(tmp_path / "s", "embedding", {}, _pooled(4))
    (tmp_path / "victim.h5").write_text("keep me")
    index = json.loads((tmp_path / "s/store.json").read_text())
    index["shards"].append("../victim.h5")
    (tmp_path / "s/store.json").write_text(json.dumps(index))
    with pytest.raises(StoreError, match="shard names this code never writes"):
        StoreReader(tmp_path / "s")
    write_store(tmp_path / "s", "embedding", {}, _pooled(5))  # rebuilt, victim untouched
    assert (tmp_path / "victim.h5").read_text() == "keep me"
    with StoreReader(tmp_path / "s") as s:
        assert len(s) == 5


def test_clips_leaving_the_input_are_kept_until_pruned(tmp_path, capsys):
    items = {cid: pooled for cid, _, _, pooled in _pooled(6)}
    keys = {cid: clip_key(cid) for cid in items}
    with StoreUpdate(tmp_path / "s", "embedding", {}, keys, shard_mb=0.0001) as up:  # 1 clip/shard
        for cid in up.todo:
            up.add(cid, pooled=items[cid])
    shards = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard-*.h5")}

    # c1 left the input (a failed decode upstream): readers stop seeing it, its result stays.
    without = {c: k for c, k in keys.items() if c != "c1"}
    with StoreUpdate(tmp_path / "s", "embedding", {}, without) as up:
        assert up.todo == [] and up.kept == ["c1"]
    assert "1 clip(s) no longer in this stage's input are kept" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("shard-*.h5")} == shards
    with StoreReader(tmp_path / "s") as s:
        assert "c1" not in s and s.kept == ["c1"] and s.summary()["kept"] == 1
        assert s.ids == ["c0", "c2", "c3", "c4", "c5"]
        np.testing.assert_array_equal(s.pooled(layer=0)[:, 0], [0, 2, 3, 4, 5])
        np.testing.assert_array_equal(s.pooled(ids=["c5", "c0"])[:, 0, 0], [5, 0])
        with pytest.raises(StoreError, match="not in store"):
            s.rows(["c1"])

    # Back in the input with the same key: reused, not recomputed.
    with StoreUpdate(tmp_path / "s", "embedding", {}, keys) as up:
        assert up.todo == [] and up.kept == []
    with StoreReader(tmp_path / "s") as s:
        assert s.ids == list(keys) and s.kept == []

    # Kept clips survive a repack of other clips, then `mer store prune` deletes them.
    changed = {**without, "c2": clip_key("c2", "v2")}
    with StoreUpdate(tmp_path / "s", "embedding", {}, changed, shard_mb=1) as up:
        assert up.todo == ["c2"]
        up.add("c2", pooled=items["c2"] + 10)
    with StoreReader(tmp_path / "s") as s:
        assert s.kept == ["c1"] and s.pooled(layer=0, ids=["c2"])[0, 0] == 12
    assert mer(["store", "prune", str(tmp_path)]) == 0
    with StoreReader(tmp_path / "s") as s:
        assert s.kept == [] and s.ids == ["c0", "c2", "c3", "c4", "c5"]
        assert s.pooled(layer=0)[:, 0].tolist() == [0, 12, 3, 4, 5]
    with StoreUpdate(tmp_path / "s", "embedding", {}, {**changed, "c1": keys["c1"]}) as up:
        assert up.todo == ["c1"]  # pruned means gone
        up.add("c1", pooled=items["c1"])
    assert prune(tmp_path / "s") == 0


def test_asr_transcripts_of_clips_leaving_the_input_are_kept_until_pruned(tmp_path):
    from features.audio.asr import AsrConfig
    from features.audio.stages import asr_fingerprint, transcribe_audio
    write_store(tmp_path / "audio", "audio", {}, [(c, np.zeros(160, np.float32), None, None)
                                                  for c in ("a", "b")])
    with StoreReader(tmp_path / "audio") as s:
        keys = dict(s.keys)
    cfg = AsrConfig()
    fp = asr_fingerprint(cfg)
    done = {c: {"text": f"hours of work {c}", "source": "faster_whisper",
                "key": clip_key("asr", keys[c], fp)} for c in keys}
    out = tmp_path / "asr"
    out.mkdir()
    (out / "transcripts.json").write_text(json.dumps({"asr": fp, "transcripts": done}))
    write_store(tmp_path / "audio", "audio", {}, [("a", np.zeros(160, np.float32), None, None)])
    with StoreReader(tmp_path / "audio") as s:  # same key for a (same content, same index)
        assert s.keys["a"] == keys["a"]
    transcribe_audio(tmp_path / "audio", cfg, out)  # no model is loaded: nothing to transcribe
    data = json.loads((out / "transcripts.json").read_text())
    assert set(data["transcripts"]) == {"a"} and set(data["kept"]) == {"b"}
    write_store(tmp_path / "audio", "audio", {}, [(c, np.zeros(160, np.float32), None, None)
                                                  for c in ("a", "b")])
    transcribe_audio(tmp_path / "audio", cfg, out)  # b is back: reused, still no model
    data = json.loads((out / "transcripts.json").read_text())
    assert data["transcripts"]["b"]["text"] == "hours of work b" and data["kept"] == {}
    write_store(tmp_path / "audio", "audio", {}, [("a", np.zeros(160, np.float32), None, None)])
    transcribe_audio(tmp_path / "audio", cfg, out)
    assert mer(["store", "prune", str(out / "transcripts.json")]) == 0
    assert json.loads((out / "transcripts.json").read_text())["kept"] == {}
