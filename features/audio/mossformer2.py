"""MossFormer2_SE_48K (ClearerVoice-Studio's 48 kHz speech enhancer) on ModelScope's MossFormer2 blocks.

The model predicts a magnitude mask over a 1920-point STFT (hop 384, Hamming window) from 60 Kaldi
log-mel filterbanks plus their first and second deltas (180 inputs). Its mask network is ModelScope's
MossFormer2 mask net (the same gated-FSMN MossFormer2 blocks) with a 961-channel decoder, returning
the first of its two outputs. Parameter names follow ClearerVoice's checkpoint
(`model.mossformer.<...>`), so `last_best_checkpoint.pt` loads as it is. Checked once against
ClearerVoice's own module (commit in docs/architecture.md): identical keys, shapes and outputs.

Only what ClearerVoice does at random is fixed here: its filterbank uses dither 1.0 (noise added to
the input); this code uses none, so a clip's output does not change between runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SE_SR = 48000
MAX_WAV = 32768.0  # ClearerVoice scales float audio to int16 range before the filterbank


@dataclass(frozen=True)
class SEConfig:
    """The architecture; the defaults are MossFormer2_SE_48K's. Tests build smaller ones."""
    win_len: int = 1920
    win_inc: int = 384
    fft_len: int = 1920
    num_mels: int = 60
    channels: int = 512
    num_blocks: int = 24

    @property
    def bins(self) -> int:
        return self.fft_len // 2 + 1


def build_se_model(cfg: SEConfig):
    """An untrained MossFormer2_SE_48K of `cfg`'s size (weights are loaded and verified by the caller)."""
    import torch.nn as nn
    from modelscope.models.audio.separation.m2.fsmn import UniDeepFsmn
    from modelscope.models.audio.separation.m2.mossformer import MossFormerMaskNet

    class MaskNet(MossFormerMaskNet):
        def __init__(self):
            super().__init__(3 * cfg.num_mels, cfg.channels, num_blocks=cfg.num_blocks, norm="ln", num_spks=2)
            self.conv1_decoder = nn.Conv1d(cfg.channels, cfg.bins, 1, bias=False)
            for block in self.mdl.intra_mdl.mossformerM.fsmn:  # SE: plain FSMN memory, not dilated
                inner = block.conv2.in_channels
                block.gated_fsmn.fsmn = UniDeepFsmn(inner, inner, lorder=20, hidden_size=inner)

        def forward(self, x):  # [B, 180, T] -> mask [B, T, bins] of the first output
            return super().forward(x)[0].transpose(1, 2)

    class Net(nn.Module):  # ClearerVoice's TestNet: features [B, T, 180] in
        def __init__(self):
            super().__init__()
            self.mossformer = MaskNet()

        def forward(self, feats):
            return self.mossformer(feats.transpose(1, 2))

    class MossFormer2SE48K(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Net()

        def forward(self, feats):
            return self.model(feats)

    return MossFormer2SE48K()


def kaldi_fbank(wav, cfg: SEConfig, sr: int = SE_SR):
    """Kaldi-style log mel filterbank ([frames, num_mels]) as torchaudio.compliance.kaldi.fbank
    computes it with ClearerVoice's arguments (Hamming window, snip_edges, DC removal,
    pre-emphasis 0.97, FFT padded to a power of two, power spectrum, mel 20 Hz..Nyquist), dither 0."""
    import torch

    n = cfg.win_len
    if len(wav) < n:
        return torch.zeros(0, cfg.num_mels)
    frames = wav.unfold(0, n, cfg.win_inc).double()
    frames = frames - frames.mean(dim=1, keepdim=True)
    frames = torch.cat([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], dim=1)
    frames = frames * torch.hamming_window(n, periodic=False, dtype=torch.float64)
    nfft = 1 << (n - 1).bit_length()
    power = torch.fft.rfft(frames, nfft).abs() ** 2
    mel = _mel_banks(cfg.num_mels, nfft, sr).to(power.dtype)
    eps = torch.finfo(torch.float32).eps
    return torch.log(torch.clamp(power[:, :nfft // 2] @ mel.T, min=eps)).float()


def _mel_banks(num_mels: int, nfft: int, sr: int):
    """Kaldi's triangular mel banks ([num_mels, nfft/2]), low 20 Hz, high Nyquist."""
    import torch

    mel = lambda f: 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(sr / 2)
    delta = (hi - lo) / (num_mels + 1)
    freqs = mel(np.arange(nfft // 2) * sr / nfft)
    left = lo + np.arange(num_mels)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    up, down = (freqs - left) / (center - left), (right - freqs) / (right - center)
    return torch.from_numpy(np.maximum(0.0, np.minimum(up, down)))


def deltas(x):
    """torchaudio.functional.compute_deltas along time (window 5, edges replicated); x [T, D]."""
    import torch

    padded = torch.cat([x[:1], x[:1], x, x[-1:], x[-1:]], dim=0)
    t = len(x)
    return (2 * (padded[4:4 + t] - padded[:t]) + (padded[3:3 + t] - padded[1:1 + t])) / 10.0


def enhance_48k(model, wav48: np.ndarray, cfg: SEConfig, device) -> np.ndarray:
    """ClearerVoice's one-pass decode: mask from fbank+deltas, applied to the STFT, inverse STFT."""
    import torch

    audio = torch.from_numpy(np.asarray(wav48, np.float32) * MAX_WAV)
    if len(audio) < cfg.win_len:
        return np.asarray(wav48, np.float32).copy()
    fb = kaldi_fbank(audio, cfg)
    d1 = deltas(fb)
    feats = torch.cat([fb, d1, deltas(d1)], dim=1)[None].to(device)
    window = torch.hamming_window(cfg.win_len, periodic=False)
    spec = torch.stft(audio, cfg.fft_len, cfg.win_inc, cfg.win_len, window=window, center=False,
                      return_complex=True)  # [bins, frames]
    with torch.inference_mode():
        mask = model(feats)[0].T.float().cpu()  # [bins, frames]
    frames = min(mask.shape[1], spec.shape[1])
    out = torch.istft(spec[:, :frames] * mask[:, :frames], cfg.fft_len, cfg.win_inc, cfg.win_len,
                      window=window, center=False).numpy()
    # Samples after the last full frame are silent, as in ClearerVoice (its istft pads them).
    return (np.pad(out, (0, max(0, len(audio) - len(out))))[:len(audio)] / MAX_WAV).astype(np.float32)


def frames_of(seconds: float, cfg: SEConfig) -> int:
    return max(0, math.floor((seconds * SE_SR - cfg.win_len) / cfg.win_inc) + 1)
