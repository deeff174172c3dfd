"""Tiny real media for tests and demos, made with ffmpeg, espeak-ng and numpy (no fixtures on disk)."""
from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np

from features.media.ffmpeg import ffmpeg_exe


def make_video(path: str | Path, seconds: float = 1.0, with_audio: bool = True, sr: int = 44100,
               size: int = 64, fps: int = 10, tone_hz: float = 220.0) -> Path:
    """An mp4 (or any container the suffix names) with a test pattern and, optionally, a sine tone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}x{size}:rate={fps}"]
    if with_audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={tone_hz}:sample_rate={sr}", "-c:a", "aac"]
    # mpeg4 and aac are ffmpeg's native encoders, present in every build (imageio-ffmpeg's too).
    cmd += ["-t", str(seconds), "-c:v", "mpeg4", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


def make_wav(path: str | Path, wav: np.ndarray | None = None, seconds: float = 1.0, sr: int = 16000,
             tone_hz: float = 220.0, channels: int = 1) -> Path:
    """A 16-bit PCM WAV of `wav` (float in [-1, 1]) or of a 0.5-amplitude tone; 0 samples allowed."""
    if wav is None:
        t = np.arange(int(round(seconds * sr))) / sr
        wav = 0.5 * np.sin(2 * np.pi * tone_hz * t)
    pcm = (np.clip(np.asarray(wav, dtype=np.float64), -1, 1) * 32767).astype("<i2")
    pcm = np.repeat(pcm[:, None], channels, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sr)
        out.writeframes(pcm.tobytes())
    return path


def make_corrupt(path: str | Path, nbytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a media file name: what a truncated or broken download looks like."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
    return path


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def make_speech(path: str | Path, text: str, wpm: int = 150) -> Path:
    """A WAV of `text` spoken by espeak-ng (22.05 kHz mono); needs the espeak-ng binary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-s", str(wpm), "-w", str(path), text], check=True,
                   capture_output=True)
    return path


def speech_like(seconds: float = 2.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, syllabic test signal: a gliding glottal pulse train through three vowel formants,
    gated into two 0.25 s syllables per second with pauses between them. Speech enhancers keep it;
    a plain sine tone they may remove as stationary noise."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * rng.standard_normal()  # gliding pitch
    phase = np.cumsum(f0 / sr)
    source = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
    out = np.zeros(n)
    for formant, bw in ((700, 110), (1220, 120), (2600, 160)):
        r = np.exp(-np.pi * bw / sr)
        a = [1, -2 * r * np.cos(2 * np.pi * formant / sr), r * r]
        out += lfilter([1 - r], a, source)
    syllables = np.clip(np.sin(2 * np.pi * 2.0 * t), 0, None) ** 0.5  # 0.25 s on, 0.25 s off
    out *= syllables
    return (0.3 * out / np.max(np.abs(out))).astype(np.float32)


def tiny_llama(folder: str | Path, words: list[str], layers: int = 3, max_positions: int = 64,
               seed: int = 0) -> str:
    """A random Llama (width 32) with a word-level tokenizer over `words`, saved like a user's
    model folder (tests of the LLM paths: adapt@, the ASR rewrite)."""
    import torch
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *words])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         eos_token_id=1, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
