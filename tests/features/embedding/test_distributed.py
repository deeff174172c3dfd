"""Scale-out: two CPU ranks under a real torchrun (gloo) give the store a single process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from tiny_models import _bert, _hubert  # noqa: E402

from features.embedding.distributed import shard, still_to_do  # noqa: E402
from features.embedding.stage import embed_store  # noqa: E402
from features.encoders import EncoderConfig  # noqa: E402
from features.reliability.reports import write_json_atomic  # noqa: E402
from features.storage.store import StoreReader, write_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
# What each rank runs: the library call the stage makes, with the configs passed as JSON.
RANK_SCRIPT = """
import json, sys
from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
for name, (cfg, src, out) in json.loads(sys.argv[1]).items():
    embed_store(name, EncoderConfig(**cfg), src, out, workers=0)
"""


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    words = "i am so happy sad angry today you are not very good bad the a day".split()
    texts = {f"c{i:02d}": " ".join(rng.choice(words, int(rng.integers(1, 10)))) for i in range(11)}
    write_json_atomic(d / "transcripts.json", {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}"} for cid, t in texts.items()}})
    waves = [(f"c{i:02d}", rng.standard_normal(int(rng.integers(400, 8000))).astype(np.float32), None, None)
             for i in range(9)]
    write_store(d / "audio", "audio", {}, waves)
    return d, {
        "bert": (dict(family="text", model=_bert(d / "bert"), batch_size=3, layers_frames=[-1, 0]),
                 str(d / "transcripts.json")),
        "hubert": (dict(family="speech", model=_hubert(d / "hubert"), batch_size=2), str(d / "audio")),
    }


def _torchrun(spec: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--no-python", sys.executable, "-c", RANK_SCRIPT, json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _contents(path):
    with StoreReader(path) as s:
        return s.ids, dict(s.keys), s.meta, s.pooled(), {cid: s.get(cid) for cid in s.ids}


def test_two_ranks_merge_into_the_single_process_store(jobs):
    d, configs = jobs
    spec = {name: (cfg, src, str(d / "sharded" / name)) for name, (cfg, src) in configs.items()}
    run = _torchrun(spec)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 1/2" in run.stdout
    for name, (cfg, src) in configs.items():
        single = d / "single" / name
        embed_store(name, EncoderConfig(**cfg), src, single, workers=0)
        ids, keys, meta, pooled, frames = _contents(single)
        s_ids, s_keys, s_meta, s_pooled, s_frames = _contents(d / "sharded" / name)
        assert (s_ids, s_keys, s_meta) == (ids, keys, meta)
        # Other batch mates change results by float noise only (fp16 store: one ulp).
        np.testing.assert_allclose(s_pooled, pooled, atol=2e-3, rtol=2e-3)
        for cid in ids:
            assert s_frames[cid].shape == frames[cid].shape
            np.testing.assert_allclose(s_frames[cid], frames[cid], atol=2e-3, rtol=2e-3)
        assert not (d / "sharded" / name / ".ranks").exists()
        report = json.loads((d / "sharded" / f"{name}.failures.json").read_text())
        assert report["count"] == 0


def test_a_rerun_on_two_ranks_encodes_nothing(jobs):
    d, configs = jobs
    spec = {"bert": (configs["bert"][0], configs["bert"][1], str(d / "sharded" / "bert"))}
    if not (d / "sharded" / "bert" / "store.json").exists():
        pytest.skip("needs the sharded store of the test above")
    run = _torchrun(spec)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[embed bert] 11 clips: 11 cached, 0 to encode" in run.stdout


def test_sharding_is_deterministic_and_skips_valid_clips(tmp_path):
    ids = [f"c{i}" for i in range(7)]
    assert [shard(ids, r, 3) for r in range(3)] == [["c0", "c3", "c6"], ["c1", "c4"], ["c2", "c5"]]
    write_store(tmp_path / "s", "embedding", {}, [(cid, None, None, np.zeros((1, 2))) for cid in ids[:3]])
    with StoreReader(tmp_path / "s") as s:
        keys = dict(s.keys)
    wanted = {**keys, "c1": "changed", **{cid: "new" for cid in ids[3:]}}
    assert still_to_do(tmp_path / "s", wanted) == ["c1", *ids[3:]]
    assert still_to_do(tmp_path / "missing", wanted) == list(wanted)


# Rank 1 finishes its clips (persisted as parts) and then fails, as a rank losing its GPU would.
FAILING_RANK_SCRIPT = """
import json, os, sys
from features.embedding import engine
from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
if os.environ["RANK"] == "1":
    real = engine.Engine.run
    def run(self, *args, **kwargs):
        real(self, *args, **kwargs)
        kwargs["tick"]()
        raise RuntimeError("rank 1 lost its device")
    engine.Engine.run = run
for name, (cfg, src, out) in json.loads(sys.argv[1]).items():
    embed_store(name, EncoderConfig(**cfg), src, out, workers=0)
"""


@pytest.mark.slow
def test_a_failed_rank_keeps_its_work_and_the_rerun_finishes(jobs, tmp_path):
    d, configs = jobs
    cfg, src = configs["bert"]
    out = tmp_path / "bert"
    spec = json.dumps({"bert": (cfg, src, str(out))})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--no-python", sys.executable, "-c"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd + [FAILING_RANK_SCRIPT, spec], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "rank 1 lost its device" in run.stderr + run.stdout
    parts = list((out / ".ranks" / "rank-1-of-2" / ".parts").glob("part-*.h5"))
    assert parts, "the failed rank's finished clips were deleted"
    with StoreReader(out) as s:
        assert len(s) == 6  # rank 0's share was merged
    rerun = subprocess.run(cmd + [RANK_SCRIPT, spec], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # Rank 1's finished clips came from its parts (todo is resharded, so rank 0 may redo some).
    assert "[embed[bert rank 1/2]] 0/0 clips done" in rerun.stdout, rerun.stdout
    assert not (out / ".ranks").exists()
    single = d / "single" / "bert"  # built by the first test of this module when it ran
    if not (single / "store.json").exists():
        embed_store("bert", EncoderConfig(**cfg), src, single, workers=0)
    ids, keys, meta, pooled, _ = _contents(single)
    s_ids, s_keys, s_meta, s_pooled, _ = _contents(out)
    # Same clips, keys and values; the order is the order work was committed in (rank 0's first).
    assert (sorted(s_ids), s_keys, s_meta) == (sorted(ids), keys, meta)
    order = [s_ids.index(cid) for cid in ids]
    np.testing.assert_allclose(s_pooled[order], pooled, atol=2e-3, rtol=2e-3)
