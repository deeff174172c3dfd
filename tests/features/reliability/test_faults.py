"""Hard exits at named points (MER_FAULT): each rerun recovers and equals a clean run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from features.reliability import faults
from features.storage.store import StoreError, StoreReader

ENV = dict(os.environ, PYTHONPATH=os.getcwd())
# Clips c0000..c<n-1>; `salt` changes the key and values of every even clip (so an update repacks
# and cleans up); a part file every 10 clips.
WRITER = """
import sys, numpy as np
from features.storage.store import StoreUpdate, clip_key
path, n, salt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
value = lambda i: i + (salt * 1000 if i % 2 == 0 else 0)
wanted = {f"c{i:04d}": clip_key(i, salt if i % 2 == 0 else 0) for i in range(n)}
with StoreUpdate(path, "embedding", {"m": 1}, wanted, shard_mb=0.004) as up:
    print("todo", len(up.todo), flush=True)
    for cid in up.todo:
        i = int(cid[1:])
        up.add(cid, np.full((1, 3, 8), value(i), np.float16),
               pooled=np.full((2, 8), value(i), np.float16))
        if i % 10 == 0:
            up.checkpoint()
"""


def _run(args, fault=""):
    env = dict(ENV, MER_FAULT=fault) if fault else ENV
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _write(path, n, salt=0, fault=""):
    done = _run([WRITER, str(path), str(n), str(salt)], fault)
    if fault:
        assert done.returncode == faults.EXIT_CODE, done.stderr  # the point was reached
    else:
        assert done.returncode == 0, done.stderr
    return done


def _same(path_a, path_b):
    with StoreReader(path_a) as a, StoreReader(path_b) as b:
        assert a.ids == b.ids and a.keys == b.keys and a.kept == b.kept
        np.testing.assert_array_equal(a.pooled(), b.pooled())
        for cid in a.ids:
            np.testing.assert_array_equal(a.get(cid), b.get(cid))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The uninterrupted result: 120 clips at salt 0, then updated to 200 clips at salt 1."""
    path = tmp_path_factory.mktemp("clean") / "s"
    _write(path, 120)
    _write(path, 200, salt=1)
    return path


@pytest.mark.parametrize("fault", ["store.mid_shard@9", "store.before_index", "store.cleanup@2",
                                   "store.cleanup@6"])
def test_a_hard_exit_during_an_update_then_a_rerun_equals_a_clean_run(tmp_path, clean, fault):
    path = tmp_path / "s"
    _write(path, 120)
    _write(path, 200, salt=1, fault=fault)
    with StoreReader(path) as s:  # the store opens, in its old or its new state
        assert len(s) in (120, 200)
    _write(path, 200, salt=1)
    _same(path, clean)
    assert not [p for p in path.iterdir() if p.name.startswith((".tmp", ".parts", ".lock"))]


def test_finished_parts_survive_a_hard_exit_exactly(tmp_path):
    """A first run dies in its 5th part file: parts 1-4 (clips 0..30) are reused, not one more."""
    _write(tmp_path / "s", 200, fault="store.mid_shard@5")
    with pytest.raises(StoreError):
        StoreReader(tmp_path / "s")  # never committed: no store to half-read
    rerun = _write(tmp_path / "s", 200)
    assert rerun.stdout.split()[:2] == ["todo", str(200 - 31)]
    _write(tmp_path / "clean", 200)
    _same(tmp_path / "s", tmp_path / "clean")


MERGER = """
import sys
from pathlib import Path
from features.embedding import distributed
from features.storage.store import clip_key
wanted = {f"c{i:04d}": clip_key(i) for i in range(60)}
ranks = [Path(sys.argv[2], f"rank-{r}") for r in range(2)]
distributed.merge(Path(sys.argv[1]), "embedding", {"compression": None, "shard_mb": 0.05}, wanted, ranks)
"""


@pytest.mark.slow  # two processes importing torch
def test_a_hard_exit_mid_merge_then_a_rerun_equals_a_clean_merge(tmp_path):
    from features.embedding import distributed
    from features.storage.store import StoreUpdate, clip_key
    wanted = {f"c{i:04d}": clip_key(i) for i in range(60)}
    ranks = [tmp_path / "ranks" / f"rank-{r}" for r in range(2)]
    for r, rank in enumerate(ranks):
        with StoreUpdate(rank, "embedding", {}, {c: k for j, (c, k) in enumerate(wanted.items())
                                                if j % 2 == r}) as up:
            for cid in up.todo:
                i = int(cid[1:])
                up.add(cid, np.full((1, 2, 4), i, np.float16), pooled=np.full((3, 4), i, np.float16))
    args = [MERGER, str(tmp_path / "out"), str(tmp_path / "ranks")]
    crashed = _run(args, "distributed.mid_merge@2")  # the second rank store's first block
    assert crashed.returncode == faults.EXIT_CODE, crashed.stderr
    done = _run(args)
    assert done.returncode == 0, done.stderr
    distributed.merge(tmp_path / "clean", "embedding", {"compression": None, "shard_mb": 0.05},
                      wanted, ranks)
    _same(tmp_path / "out", tmp_path / "clean")
    with StoreReader(tmp_path / "out") as s:
        assert len(s) == 60


ASR = """
import sys
from features.audio.asr import AsrConfig
from features.audio.stages import transcribe_audio
transcribe_audio(sys.argv[1], AsrConfig(transcripts_csv=sys.argv[2]), sys.argv[3])
"""
PREPARE = """
import sys
from features.media.manifest import PrepareConfig, prepare
prepare(PrepareConfig(videos=sys.argv[1], labels=sys.argv[2]), sys.argv[3])
"""


def test_a_hard_exit_mid_write_of_transcripts_then_a_rerun_equals_a_clean_run(tmp_path):
    from features.storage.store import write_store
    ids = [f"c{i}" for i in range(5)]
    write_store(tmp_path / "audio", "audio", {}, [(c, np.zeros(160, np.float32), None, None)
                                                  for c in ids])
    (tmp_path / "t.csv").write_text("name,text\n" + "".join(f"{c},words of {c}\n" for c in ids))
    args = [ASR, str(tmp_path / "audio"), str(tmp_path / "t.csv")]
    _run(args + [str(tmp_path / "clean")])
    first = _run(args + [str(tmp_path / "out")])
    assert first.returncode == 0, first.stderr
    (tmp_path / "t.csv").write_text("name,text\n" + "".join(f"{c},new words {c}\n" for c in ids))
    crashed = _run(args + [str(tmp_path / "out")], "json.mid_write:transcripts.json")
    assert crashed.returncode == faults.EXIT_CODE, crashed.stderr
    old = json.loads((tmp_path / "out/transcripts.json").read_text())  # whole, the old one
    assert old["transcripts"]["c0"]["text"] == "words of c0"
    assert _run(args + [str(tmp_path / "out")]).returncode == 0
    assert _run(args + [str(tmp_path / "clean")]).returncode == 0
    assert (tmp_path / "out/transcripts.json").read_text() == \
        (tmp_path / "clean/transcripts.json").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.json",
                                                                    "transcripts.json"]


def test_a_hard_exit_mid_write_of_the_prepare_cache_then_a_rerun_equals_a_clean_run(tmp_path):
    from features.testing import make_video
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, label in enumerate(["happy", "sad", "happy", "sad"]):
        make_video(videos / f"v{i}.mp4", seconds=0.3)
    (tmp_path / "labels.csv").write_text("name,discrete\n" + "".join(
        f"v{i},{lab}\n" for i, lab in enumerate(["happy", "sad", "happy", "sad"])))
    args = [PREPARE, str(videos), str(tmp_path / "labels.csv")]
    crashed = _run(args + [str(tmp_path / "out")], "json.mid_write:probes.json")
    assert crashed.returncode == faults.EXIT_CODE, crashed.stderr
    for out in ("out", "clean"):
        done = _run(args + [str(tmp_path / out)])
        assert done.returncode == 0, done.stderr
    for name in ("manifest.csv", "probes.json"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "clean" / name).read_text()
