"""Encoder options: EncoderConfig checked where it is built, bf16 refused on CPUs without it,
int8 quantisation, and `chunking: mertools` against MERTools' algorithm re-implemented here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import _bert  # noqa: E402
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor  # noqa: E402

from features.params import from_section  # noqa: E402
from features.encoders import EncoderConfig, base, load_encoder  # noqa: E402
from features.embedding.engine import Engine  # noqa: E402
from features.errors import ConfigError  # noqa: E402
from features.testing import speech_like  # noqa: E402

SR = 16000


@pytest.mark.parametrize("bad,match", [
    ({"pooling": "max"}, "pooling 'max' is unknown"),
    ({"family": "vision", "pooling": "last"}, "unknown for the vision family"),
    ({"family": "smell"}, "known families are"),
    ({"dtype": "int8"}, "dtype 'int8' is unknown"),
    ({"batch_size": "8"}, "batch_size = '8' .* must be a int"),
    ({"batch_size": 0}, "batch_size = 0 must be > 0"),
    ({"device": "gpu"}, "device 'gpu' is unknown"),
    ({"layers_frames": [-1, "x"]}, "layers_frames"),
    ({"chunking": "mertools"}, "applies to the \\['speech'\\] family only"),
    ({"family": "speech", "gguf_file": "m.gguf"}, "gguf_file"),
    ({"family": "speech", "chunking": "mertools", "pooling": "cls"}, "needs pooling: mean"),
    ({"quantize": "int4"}, "quantize 'int4' is unknown"),
    ({"quantize": "int8", "dtype": "bfloat16"}, "cannot be combined"),
    ({"quantize": "int8", "device": "cuda"}, "CPU dynamic quantisation"),
    ({"store_dtype": "int8"}, "store_dtype"),
    ({"compression": "zstd"}, "compression"),
    ({"shard_mb": 0}, "shard_mb"),
    ({"model": ""}, "model is empty"),
])
def test_config_is_checked_where_it_is_built(bad, match, tmp_path):
    """A typo fails on construction: no model is looked at (the model path does not exist)."""
    section = {"family": "text", "model": str(tmp_path / "absent"), **bad}
    with pytest.raises(ConfigError, match=match):
        EncoderConfig(**section)
    with pytest.raises(ConfigError, match=f"embed.encoders.x: .*{match}"):  # as stages build it
        from_section(EncoderConfig, section, "embed.encoders.x")
    with pytest.raises(ConfigError, match="unknown key"):
        from_section(EncoderConfig, {"family": "text", "model": "m", "poolng": "mean"}, "e")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _bert(tmp_path_factory.mktemp("opts") / "bert")


def test_bf16_refused_on_cpu_without_native_support(bert, monkeypatch):
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "avx512f"})  # a CPU without bf16
    with pytest.raises(ConfigError, match="emulated"):
        load_encoder(EncoderConfig(family="text", model=bert, dtype="bfloat16"))
    load_encoder(EncoderConfig(family="text", model=bert))  # float32 still fine
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    enc = load_encoder(EncoderConfig(family="text", model=bert, dtype="bfloat16"))
    assert enc.fingerprint()["dtype"] == "bfloat16" and next(enc.model.parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(base, "cpu_flags", lambda: {"amx_bf16"})
    assert base.cpu_has_bf16()


def test_int8_quantisation_is_in_the_fingerprint_and_close_to_fp32(bert):
    texts = ["i am so happy today", "why is this sad", "angry"]
    fp32 = load_encoder(EncoderConfig(family="text", model=bert))
    int8 = load_encoder(EncoderConfig(family="text", model=bert, quantize="int8"))
    assert fp32.fingerprint()["quantize"] == ""
    assert int8.fingerprint()["quantize"] == f"int8:{torch.backends.quantized.engine}"
    assert {k: v for k, v in int8.fingerprint().items() if k != "quantize"} == \
        {k: v for k, v in fp32.fingerprint().items() if k != "quantize"}
    assert not any(type(m) is torch.nn.Linear for m in int8.model.modules())  # every Linear swapped
    for a, b in zip(fp32.encode(texts), int8.encode(texts)):
        cos = (a.pooled * b.pooled).sum(1) / np.linalg.norm(a.pooled, axis=1) / np.linalg.norm(b.pooled, axis=1)
        assert cos.min() > 0.99 and not np.array_equal(a.pooled, b.pooled)


# ---------------------------------------------------------------- MERTools' long-clip algorithm

@pytest.fixture(scope="module")
def hubert320(tmp_path_factory):
    """A tiny HuBERT with hubert-large's front end (stride 320, layer norm, stable layer norm)."""
    folder = tmp_path_factory.mktemp("mertools") / "hubert"
    torch.manual_seed(0)
    HubertModel(HubertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        conv_dim=(8,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder)
    return str(folder)


def mertools_reference(folder: str, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MERTools' extract_audio_huggingface.py as issue 16 describes it, written from that
    description: normalise the whole clip; if longer than 10 s, zero-pad to whole 10 s pieces
    and run them as a batch with no attention mask; every frame (padding's too) is kept.
    Returns (per-layer mean over all frames [L, D], frames of every layer [L, T, D])."""
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder)
    model = HubertModel.from_pretrained(folder).eval()
    values = extractor(wave, sampling_rate=SR, return_tensors="pt").input_values  # [1, n]
    maxlen = 10 * SR
    if values.shape[1] > maxlen:
        pieces = torch.zeros(1, -(-values.shape[1] // maxlen) * maxlen)
        pieces[:, : values.shape[1]] = values
        values = pieces.view(-1, maxlen)
    with torch.no_grad():
        states = model(values, output_hidden_states=True).hidden_states  # L x [P, T, D]
    frames = torch.stack([h.reshape(-1, h.shape[-1]) for h in states]).numpy()  # [L, P*T, D]
    # The exact mean: a float32 np.mean over ~1,000 frames is itself ~2e-5 (relative) off here.
    return frames.astype(np.float64).mean(axis=1), frames


def _relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.slow  # ~14 s on 2 busy cores: 47 s of audio through two pipelines
def test_mertools_chunking_reproduces_mertools(hubert320):
    waves = {s: speech_like(seconds=s, seed=s) for s in (5, 12, 25)}
    enc = load_encoder(EncoderConfig(family="speech", model=hubert320, chunking="mertools",
                                     layers_frames=[-1, -2], batch_size=3))
    assert enc.fingerprint()["chunking"] == "mertools"
    # Through the engine: the 5 s clip shares a padded batch with 10 s pieces.
    got = {}
    Engine(enc, workers=0).run(list(waves), waves.__getitem__, got.__setitem__, pytest.fail)
    for seconds, wave in waves.items():
        pooled, frames = mertools_reference(hubert320, wave)
        assert _relative(got[seconds].pooled, pooled) < 1e-5, seconds
        assert got[seconds].frames.shape == frames[[-1, -2]].shape  # [K, 50 x 10 s x pieces, D]
        assert _relative(got[seconds].frames, frames[[-1, -2]]) < 1e-5, seconds
        # MERTools' utterance feature: sum of the last four layers, averaged over frames.
        assert _relative(got[seconds].pooled[-4:].sum(0), frames[-4:].astype(np.float64).sum(0).mean(0)) < 1e-5
    assert got[25].frames.shape[1] == 3 * 499
    # The default mode is the same single pass up to 10 s, and a different feature beyond.
    default = load_encoder(EncoderConfig(family="speech", model=hubert320, layers_frames=[-1, -2]))
    short, long = default.encode([waves[5], waves[12]])
    assert _relative(short.pooled, got[5].pooled) < 1e-5
    assert _relative(long.pooled, got[12].pooled) > 1e-3 and long.frames.shape[1] == 599
