"""Cache validity, stage level: which changes must re-encode a clip, which must not.

A clip's result is reused only when its upstream key and the encoder's fingerprint match. Every
EncoderConfig field is classified below, so a new field fails this test until someone decides
whether it changes the numbers (a miss is fine, a wrong hit is not).
"""
import dataclasses
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
from features.reliability.reports import write_json_atomic
from features.storage.store import StoreReader

WORDS = ["i", "am", "so", "happy", "sad", "angry", "today", "why", "this", "is"]
# field -> a changed value; each must re-encode every clip
MUST_INVALIDATE = {
    "layers_frames": [0, -1], "pooling": "cls", "dtype": "bfloat16", "store_dtype": "float32",
    "quantize": "int8",
}
# max_seconds truncates speech only (the speech family fingerprints it: tests/features/encoders/test_encoders.py);
# device: cpu vs cuda differ by float noise only, like batching; compression and shard_mb change
# how shards are written, never the stored values (tests/features/embedding/test_engine.py checks they are equal).
MUST_NOT = {"batch_size": 1, "device": "auto", "input": "elsewhere.json", "max_seconds": 5.0,
            "compression": "gzip", "shard_mb": 1e-4}
# chunking (speech only): tests/features/encoders/test_encoder_options.py checks it enters the fingerprint.
SPECIAL = {"family", "model", "gguf_file", "trust_remote_code", "chunking"}  # and the tests below


def _bert(folder, seed=0):
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)  # positional: transformers 5 ignores vocab_file=
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=32)).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def bf16_cpu(monkeypatch):
    """dtype: bfloat16 is refused on CPUs without native bf16; here only its key matters."""
    import features.encoders.base as base

    monkeypatch.setattr(base, "cpu_has_bf16", lambda: True)


@pytest.fixture
def setup(tmp_path):
    texts = {"a": "i am so happy", "b": "why is this sad", "c": "angry today"}
    src = tmp_path / "transcripts.json"
    write_json_atomic(src, {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}"} for cid, t in texts.items()}})
    model = _bert(tmp_path / "bert")
    return tmp_path, src, model


def _keys(tmp_path, src, **cfg):
    out = tmp_path / "store"
    embed_store("t", EncoderConfig(family="text", **cfg), src, out)
    with StoreReader(out) as s:
        return dict(s.keys)


def _recomputed(before, after):
    return {cid for cid in after if before.get(cid) != after[cid]}


def test_every_config_field_is_classified():
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    assert names == set(MUST_INVALIDATE) | set(MUST_NOT) | SPECIAL


@pytest.mark.parametrize("field", sorted(MUST_INVALIDATE))
def test_changes_that_must_re_encode(setup, field):
    tmp_path, src, model = setup
    base = _keys(tmp_path, src, model=str(model))
    changed = _keys(tmp_path, src, model=str(model), **{field: MUST_INVALIDATE[field]})
    assert _recomputed(base, changed) == set(base)


@pytest.mark.parametrize("field", sorted(MUST_NOT))
def test_changes_that_must_not_re_encode(setup, field):
    tmp_path, src, model = setup
    base = _keys(tmp_path, src, model=str(model))
    assert _recomputed(base, _keys(tmp_path, src, model=str(model),
                                   **{field: MUST_NOT[field]})) == set()


def test_weights_and_inputs(setup):
    tmp_path, src, model = setup
    base = _keys(tmp_path, src, model=str(model))
    # Same folder, same config, other weights (a retrained checkpoint copied over): re-encode all.
    other = _bert(tmp_path / "bert_seed1", seed=1)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    retrained = _keys(tmp_path, src, model=str(model))
    assert _recomputed(base, retrained) == set(base)
    # The same weights in another folder (a teammate's checkout): the key holds what computes
    # the features, never where the model lives, so nothing is recomputed.
    moved = shutil.copytree(model, tmp_path / "moved")
    assert _recomputed(retrained, _keys(tmp_path, src, model=str(moved))) == set()
    # One clip's upstream result changed: only that clip.
    before = _keys(tmp_path, src, model=str(moved))
    data = src.read_text().replace('"k-b"', '"k-b2"')
    src.write_text(data)
    assert _recomputed(before, _keys(tmp_path, src, model=str(moved))) == {"b"}
