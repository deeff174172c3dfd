"""Noise for robustness tests: audio noise mixed at a target SNR, and degraded video frames.

Audio: white, pink (1/f power), babble (other clips of the corpus summed) or recordings from a
folder (MUSAN's layout: searched recursively), scaled by RMS to the target SNR. A mix that would
overflow int16 full scale is rescaled as a whole, never clipped (MERTools' MER2024-NOISE recipe),
so the SNR stays exact. A noise recording shorter than the clip is looped (recordings are
concatenated, as MERTools does, then a random window is cut). Video: pyramid blur (log2(rate)
`pyrDown` then as many `pyrUp`), down-scaling and JPEG artefacts per frame.

Every random choice comes from `clip_rng(seed, condition, clip_id)`, so a copy depends only on its
own clip and recipe: adding clips or conditions never changes an existing copy.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.errors import ClipError, ConfigError

FULL_SCALE = 32767 / 32768  # int16 full scale on the float [-1, 1] scale
NOISE_KINDS = ("white", "pink", "babble", "folder", "none")  # none: the clean reference
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
# MERTools' MER2024/main-noise.py: SNR from np.arange(5, 11), blur_rate from [1, 2, 4].
MER2024_SNRS = tuple(range(5, 11))
MER2024_BLURS = (1, 2, 4)


@dataclass
class ConditionConfig:
    """params.yaml `noise.conditions.<name>`: one noisy copy of each chosen clip."""
    noise: str = "white"              # white | pink | babble | folder | none (clean reference)
    snr_db: float | list = 10.0       # one SNR, or a list: one value drawn per clip
    noise_dir: str = ""               # noise: folder -> audio files under it (recursive, MUSAN layout)
    talkers: int = 3                  # babble: other clips summed
    blur: int | list = 1              # pyramid blur rate 1 (none), 2, 4 ...; a list: drawn per clip
    downscale: float = 1.0            # frames scaled by this factor and back (0.5 = half resolution)
    jpeg_quality: int = 0             # 0 = off, else each frame JPEG-compressed at this quality
    preset: str = ""                  # "mer2024": snr_db 5..10 and blur 1/2/4 drawn per clip (MERTools)

    def __post_init__(self) -> None:
        if self.preset == "mer2024":
            self.snr_db, self.blur = list(MER2024_SNRS), list(MER2024_BLURS)
        elif self.preset:
            raise ValueError(f"preset {self.preset!r} is unknown; known presets: ['mer2024']")
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"noise {self.noise!r} is unknown; use one of {list(NOISE_KINDS)}")
        for snr in _as_list(self.snr_db):
            if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not math.isfinite(snr):
                raise ValueError(f"snr_db {snr!r} is not a number (dB); write e.g. 10 or [5, 10]")
        for rate in _as_list(self.blur):
            if not isinstance(rate, int) or rate < 1 or rate & (rate - 1):
                raise ValueError(f"blur {rate!r} must be a power of two (1 = no blur, 2, 4, ...)")
        if not 0 < self.downscale <= 1:
            raise ValueError(f"downscale {self.downscale} must be in (0, 1]")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality} must be 0 (off) or 1..100")
        if self.noise == "folder" and not self.noise_dir:
            raise ValueError("noise: folder needs noise_dir (a folder of noise recordings, e.g. MUSAN's noise/)")
        if self.noise == "babble" and self.talkers < 1:
            raise ValueError(f"talkers {self.talkers} must be at least 1")

    def nominal_snr(self) -> float:
        """The condition's SNR on a plot's x axis: the value, or the mean of the drawn ones."""
        return float(np.mean(_as_list(self.snr_db)))


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def clip_rng(seed: int, condition: str, clip_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, condition, clip): order- and subset-independent."""
    return np.random.default_rng([seed, zlib.crc32(condition.encode()), zlib.crc32(clip_id.encode())])


def draw(rng: np.random.Generator, value):
    """One entry of a list setting (drawn), or the setting itself."""
    options = _as_list(value)
    return options[int(rng.integers(len(options)))] if len(options) > 1 else options[0]


# ---------------------------------------------------------------- audio

def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def snr_db(speech: np.ndarray, noise: np.ndarray) -> float:
    return 20 * math.log10(rms(speech) / max(rms(noise), 1e-20))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr: float, clip_id: str = "?") -> np.ndarray:
    """speech + noise scaled by RMS to `snr` dB; rescaled as a whole if it would overflow."""
    speech, noise = np.asarray(speech, np.float64), np.asarray(noise, np.float64)
    if len(noise) != len(speech):
        raise ValueError(f"noise has {len(noise)} samples, speech {len(speech)}; fit it first")
    s_rms, n_rms = rms(speech), rms(noise)
    if s_rms == 0:
        raise ClipError(clip_id, "silent", "the clip's audio is all zeros: no SNR can be set. "
                        "Drop the clip from the noise condition or fix its audio.")
    if n_rms == 0:
        raise ClipError(clip_id, "silent_noise", "the noise segment drawn for this clip is all zeros; "
                        "remove silent files from the noise folder.")
    mix = speech + noise * (s_rms / 10 ** (snr / 20) / n_rms)
    peak = np.max(np.abs(mix))
    if peak > FULL_SCALE:  # MERTools: rescale, never clip (clipping would add distortion)
        mix *= FULL_SCALE / peak
    return mix.astype(np.float32)


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise shaped to a 1/f power spectrum (amplitude 1/sqrt(f)) in the FFT domain."""
    spec = np.fft.rfft(rng.standard_normal(max(n, 2)))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0  # keep DC finite; it is removed below
    spec /= np.sqrt(f)
    spec[0] = 0.0
    return np.fft.irfft(spec, max(n, 2))[:n]


def fit_noise(parts: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """A random n-sample window of the concatenated recordings, looped while shorter than n."""
    noise = np.concatenate([np.asarray(p, np.float64) for p in parts])
    if len(noise) == 0:
        raise ValueError("empty noise recordings")
    if len(noise) < n:
        noise = np.tile(noise, -(-n // len(noise)))
    start = int(rng.integers(len(noise) - n + 1))
    return noise[start:start + n]


def babble(others: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """Several other talkers summed, each at equal RMS and a random offset (looped to n)."""
    out = np.zeros(n)
    for wav in others:
        part = fit_noise([wav], n, rng)
        out += part / max(rms(part), 1e-12)
    return out


def noise_files(folder: str | Path) -> list[Path]:
    """Audio files under `folder` (recursive: MUSAN keeps noise/<source>/*.wav)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"noise_dir {folder} is not a folder; point it at a folder of noise "
                          "recordings (e.g. MUSAN's noise/).")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"noise_dir {folder} holds no audio files ({', '.join(AUDIO_EXTENSIONS)}); "
                          "point it at a folder of noise recordings.")
    return files


# ---------------------------------------------------------------- video

def pyramid_blur(frame: np.ndarray, rate: int) -> np.ndarray:
    """MERTools' blur: log2(rate) `pyrDown` then as many `pyrUp`; resized back to the frame's
    size when odd sides made the pyramid one pixel off (MERTools keeps the off size)."""
    import cv2

    steps = int(math.log2(rate))
    out = frame
    for _ in range(steps):
        out = cv2.pyrDown(out)
    for _ in range(steps):
        out = cv2.pyrUp(out)
    if out.shape[:2] != frame.shape[:2]:
        out = cv2.resize(out, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR)
    return out


def degrade_frame(frame: np.ndarray, blur: int = 1, downscale: float = 1.0, jpeg_quality: int = 0) -> np.ndarray:
    """One BGR uint8 frame blurred, down-scaled (and back) and JPEG-compressed, in that order."""
    import cv2

    out = pyramid_blur(frame, blur) if blur > 1 else frame
    if downscale < 1:
        h, w = frame.shape[:2]
        small = cv2.resize(out, (max(1, round(w * downscale)), max(1, round(h * downscale))),
                           interpolation=cv2.INTER_AREA)
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if jpeg_quality:
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        out = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else out
    return out


@dataclass
class Recipe:
    """What was drawn for one copy (kept in the copies manifest as lineage)."""
    snr_db: float
    blur: int
    noise: str
    sources: list[str] = field(default_factory=list)  # noise files or babble clip ids used
