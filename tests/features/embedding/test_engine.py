"""The overlapped engine: same numbers as one clip at a time for every family, long-clip
chunking, out-of-memory halving (faked on CPU), failure isolation, and the embed stage on it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import _bert, _clip_vision, _hubert, _llama  # noqa: E402

from features.embedding.stage import embed_store  # noqa: E402
from features.encoders import EncoderConfig, load_encoder, speech  # noqa: E402
from features.embedding.engine import Engine  # noqa: E402
from features.reliability.reports import write_json_atomic  # noqa: E402
from features.storage.store import StoreReader  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    return {"hubert": _hubert(d / "hubert"), "hubert_group": _hubert(d / "hg", norm="group"),
            "clip": _clip_vision(d / "clip"), "bert": _bert(d / "bert"), "llama": _llama(d / "llama")}


def _items(family, n=7):
    rng = np.random.default_rng(0)
    if family == "speech":
        return {f"s{i}": rng.standard_normal(int(rng.integers(300, 9000))).astype(np.float32) for i in range(n)}
    if family == "vision":
        return {f"v{i}": rng.integers(0, 256, (int(rng.integers(1, 5)), 40, 40, 3), dtype=np.uint8)
                for i in range(n)}
    words = "i am so happy sad angry today you are not very good bad the a day".split()
    return {f"t{i}": " ".join(rng.choice(words, int(rng.integers(0, 12)))) for i in range(n)}


def _run(enc, items, workers=0):
    out, errors = {}, []
    summary = Engine(enc, workers=workers).run(list(items), items.__getitem__, out.__setitem__, errors.append)
    return out, errors, summary


def _close(a, b, tol=1e-4):
    assert a.frames.shape == b.frames.shape
    np.testing.assert_allclose(a.pooled, b.pooled, atol=tol, rtol=tol)
    np.testing.assert_allclose(a.frames, b.frames, atol=tol, rtol=tol)


@pytest.mark.parametrize("name,family,pooling", [
    ("hubert", "speech", "mean"), ("hubert_group", "speech", "mean"), ("clip", "vision", "cls"),
    ("bert", "text", "mean"), ("llama", "text", "last")])
def test_engine_batches_equal_one_by_one(models, name, family, pooling):
    enc = load_encoder(EncoderConfig(family=family, model=models[name], pooling=pooling,
                                     layers_frames=[-1, 0], batch_size=4))
    items = _items(family)
    out, errors, summary = _run(enc, items)
    assert not errors and summary.done == len(items) and set(out) == set(items)
    for cid, item in items.items():
        _close(out[cid], enc.encode([item])[0])


def test_engine_worker_processes_give_the_same_result(models):
    enc = load_encoder(EncoderConfig(family="text", model=models["bert"], batch_size=3))
    items = _items("text", 9)
    out0, _, _ = _run(enc, items)
    out2, _, summary = _run(enc, items, workers=2)
    assert summary.done == 9
    for cid in items:
        np.testing.assert_array_equal(out0[cid].pooled, out2[cid].pooled)


def test_long_speech_is_chunked_and_stitched(models, monkeypatch):
    monkeypatch.setattr(speech, "CHUNK_SECONDS", 0.25)  # 4000 samples
    monkeypatch.setattr(speech, "OVERLAP_SECONDS", 0.05)
    enc = load_encoder(EncoderConfig(family="speech", model=models["hubert"], batch_size=3))
    assert enc.stride == 20
    for n in (4000, 4001, 9000, 16000, 16003):
        plan = enc.chunk_plan(n)
        kept = [(a // enc.stride + s, a // enc.stride + e) for a, _, (s, e) in plan]
        assert kept[0][0] == 0 and kept[-1][1] == enc._frames(n)  # every frame exactly once
        assert all(prev[1] == nxt[0] for prev, nxt in zip(kept, kept[1:]))
        for a, b, (s, e) in plan:
            assert b - a <= 4000 and 0 <= s < e <= enc._frames(b - a)
    wave = np.random.default_rng(3).standard_normal(16000).astype(np.float32)
    clip = enc.encode([wave])[0]
    assert len(enc.prepare(wave)) == 5
    assert clip.frames.shape == (1, enc._frames(16000), 32)
    np.testing.assert_allclose(clip.pooled[-1], clip.frames[0].mean(0), atol=1e-5)
    # Short clips are untouched by chunking; the engine joins chunks like encode().
    out, _, _ = _run(enc, {"long": wave, "short": wave[:3000]})
    _close(out["long"], clip)
    monkeypatch.setattr(speech, "CHUNK_SECONDS", 20.0)
    _close(out["short"], enc.encode([wave[:3000]])[0])


class _OomAbove(torch.nn.Module):
    """Wraps a model; raises CUDA's out-of-memory error for batches larger than `limit`."""

    def __init__(self, model, limit):
        super().__init__()
        self.inner, self.limit, self.config, self.calls = model, limit, model.config, []

    def forward(self, input_ids, **kw):
        self.calls.append(input_ids.shape[0])
        if input_ids.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return self.inner(input_ids=input_ids, **kw)


def test_out_of_memory_halves_the_batch_and_retries(models):
    enc = load_encoder(EncoderConfig(family="text", model=models["bert"], batch_size=8))
    items = _items("text", 16)
    reference = {cid: enc.encode([t])[0] for cid, t in items.items()}
    enc.backbone = _OomAbove(enc.backbone, limit=2)
    engine = Engine(enc, workers=0)
    out, errors = {}, []
    summary = engine.run(list(items), items.__getitem__, out.__setitem__, errors.append)
    assert not errors and set(out) == set(items)
    assert summary.oom_retries >= 2 and engine.state.limit == 2
    assert max(enc.backbone.calls[-3:]) <= 2  # later batches stay at the reduced size
    for cid in items:
        _close(out[cid], reference[cid])
    enc.backbone.limit = 0  # even one clip does not fit: that clip fails, the run goes on
    out, errors, summary = _run(enc, dict(list(items.items())[:2]))
    assert summary.failed == 2 and {e.reason for e in errors} == {"out_of_memory"}


def test_bad_clips_fail_alone(models):
    enc = load_encoder(EncoderConfig(family="speech", model=models["hubert"], batch_size=4))
    items = _items("speech", 5)
    items["empty"] = np.zeros(0, np.float32)
    out, errors, summary = _run(enc, items, workers=1)
    assert [e.clip_id for e in errors] == ["empty"] and errors[0].reason == "zero_length"
    assert summary.done == 5 and summary.failed == 1 and "empty" not in out


def test_embed_store_runs_on_the_engine(models, tmp_path, capsys):
    texts = _items("text", 6)
    src = tmp_path / "transcripts.json"
    write_json_atomic(src, {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}"} for cid, t in texts.items()}})
    cfg = EncoderConfig(family="text", model=models["bert"], batch_size=4, store_dtype="float32")
    embed_store("bert", cfg, src, tmp_path / "store")
    log = capsys.readouterr().out
    assert "[embed bert] 6 clips: 0 cached, 6 to encode" in log and "clips/s" in log
    enc = load_encoder(cfg)
    with StoreReader(tmp_path / "store") as s:
        assert s.ids == list(texts)
        for cid, text in texts.items():
            np.testing.assert_allclose(s.pooled(ids=[cid])[0], enc.encode([text])[0].pooled, atol=1e-5)
    embed_store("bert", cfg, src, tmp_path / "store")
    assert "6 cached, 0 to encode" in capsys.readouterr().out


def test_embed_store_compression_and_shard_size_are_layout_only(models, tmp_path, capsys):
    import h5py

    from features.errors import ConfigError

    texts = _items("text", 6)
    src = tmp_path / "transcripts.json"
    write_json_atomic(src, {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}"} for cid, t in texts.items()}})
    base = dict(family="text", model=models["bert"], batch_size=4)
    embed_store("bert", EncoderConfig(**base), src, tmp_path / "plain")
    # a tiny shard target: several shards; gzip on every dataset; same numbers either way
    embed_store("bert", EncoderConfig(**base, compression="gzip", shard_mb=1e-4), src, tmp_path / "gz")
    shards = sorted((tmp_path / "gz").glob("shard-*.h5"))
    assert len(shards) > 1
    with h5py.File(shards[0], "r") as h5:
        assert h5["pooled"].compression == "gzip"
        assert all(h5["clips"][c].compression == "gzip" for c in h5["clips"])
    with StoreReader(tmp_path / "plain") as a, StoreReader(tmp_path / "gz") as b:
        assert a.ids == b.ids and a.keys == b.keys  # layout never enters the cache keys
        np.testing.assert_array_equal(a.pooled(ids=a.ids), b.pooled(ids=a.ids))
        for cid in a.ids:
            np.testing.assert_array_equal(a.get(cid), b.get(cid))
        assert b.summary()["meta"]["compression"] == "gzip"
    capsys.readouterr()
    with pytest.raises(ConfigError, match="compression 'zstd'"):
        embed_store("bert", EncoderConfig(**base, compression="zstd"), src, tmp_path / "bad")
