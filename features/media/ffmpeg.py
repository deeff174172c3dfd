"""Media access through ffmpeg only: locate the binary, probe a file, decode its audio, hash it.

Only the ``ffmpeg`` binary is required (imageio-ffmpeg ships one); ffprobe is never used, so
`probe` parses the stream summary that ``ffmpeg -i`` prints. Every ffmpeg call has a time limit
(DECODE_TIMEOUT_S): a file that hangs the decoder fails its clip with reason ``timeout``.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from features.errors import ClipError, ConfigError


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` learns from one file; fields are None where the file does not say."""

    duration_s: float | None
    has_audio: bool
    has_video: bool
    width: int | None
    height: int | None
    fps: float | None
    audio_sample_rate: int | None


def ffmpeg_exe() -> str:
    """The ffmpeg binary: the one on PATH, else the one imageio-ffmpeg ships."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as err:
        raise ConfigError(
            f"ffmpeg not found: it is not on PATH and imageio-ffmpeg cannot provide one ({err}). "
            "Install ffmpeg (e.g. `apt-get install ffmpeg`) or `pip install imageio-ffmpeg`."
        ) from err


def _clip_id(path: str | Path, clip_id: str | None) -> str:
    return clip_id if clip_id is not None else Path(path).stem


def _checked_path(path: str | Path, clip_id: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ClipError(clip_id, "unreadable",
                        f"{p} does not exist or is not a file; check the videos folder in params.yaml.")
    # Absolute paths keep ffmpeg from reading a leading '-' or 'name:' as an option or protocol.
    return str(p.resolve())


# Seconds one decoder call may take (a probe, one clip's audio, one clip's frames): generous for
# hours of audio, finite for a file on a stalled mount or a stream that never ends.
DECODE_TIMEOUT_S = float(os.environ.get("MER_DECODE_TIMEOUT_S", "300"))


def _timeout_error(clip_id: str, src: str, what: str) -> ClipError:
    return ClipError(clip_id, "timeout",
                     f"ffmpeg {what} {src} took over {DECODE_TIMEOUT_S:g} s and was stopped; the "
                     "file may be damaged or on a stalled disk. Check it, or raise "
                     "MER_DECODE_TIMEOUT_S for very long recordings.")


def _ffmpeg_stderr(args: list[str], clip_id: str, src: str, what: str) -> str:
    """Run ffmpeg with `args` under the time limit; its stderr as text (exit status not judged)."""
    try:
        run = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", *args], capture_output=True,
                             check=False, timeout=DECODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise _timeout_error(clip_id, src, what) from None
    return run.stderr.decode("utf-8", errors="replace") + run.stdout.decode("utf-8", "replace")


# ---------------------------------------------------------------- probe (parses `ffmpeg -i`)

_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_STREAM = re.compile(r"^\s*Stream #0:\d+\S*: (Video|Audio): (.*)$", re.MULTILINE)
_SIZE = re.compile(r"(?<![\w.])(\d{2,5})x(\d{2,5})(?![\w.])")  # 2+ digits skips hex tags "0x..."
_FPS = re.compile(r"(\d+(?:\.\d+)?)(k?) (?:fps|tbr)\b")
_RATE = re.compile(r"(\d+) Hz")


def probe(path: str | Path, clip_id: str | None = None) -> MediaInfo:
    """Stream facts of a media file; ClipError('unreadable') when ffmpeg cannot open it."""
    clip_id = _clip_id(path, clip_id)
    src = _checked_path(path, clip_id)
    # `ffmpeg -i` with no output exits 1 by design; success is judged by the "Input #0" header.
    text = _ffmpeg_stderr(["-i", src], clip_id, src, "probing")
    if "Input #0" not in text:
        raise ClipError(clip_id, "unreadable",
                        f"ffmpeg cannot open {src}: {_last_line(text)}. The file is corrupt or "
                        "not a media file; re-export or remove it from the dataset.")
    info = _parse_probe(text)
    if info.duration_s is None and (info.has_audio or info.has_video):
        # Streamed recordings (browser webm) carry no duration in the header: read to the end.
        info = replace(info, duration_s=measure_duration(src, clip_id))
    return info


_OUT_TIME = re.compile(r"^out_time_us=(\d+)\s*$", re.MULTILINE)


def measure_duration(src: str, clip_id: str) -> float:
    """Seconds of media in `src`, from the packet times of a copy to nowhere (nothing decoded)."""
    text = _ffmpeg_stderr(["-v", "error", "-i", src, "-map", "0", "-c", "copy", "-f", "null", "-",
                           "-progress", "pipe:1", "-nostats"], clip_id, src, "reading")
    times = _OUT_TIME.findall(text)
    return int(times[-1]) / 1e6 if times else 0.0


def _parse_probe(text: str) -> MediaInfo:
    video, audio = None, None
    for kind, desc in _STREAM.findall(text):
        if kind == "Video" and video is None and "(attached pic)" not in desc:
            video = desc  # cover art in audio files is a still image, not a video stream
        elif kind == "Audio" and audio is None:
            audio = desc
    width = height = fps = rate = None
    if video is not None:
        size = _SIZE.search(video)
        if size:
            width, height = int(size.group(1)), int(size.group(2))
        rates = _FPS.search(video)
        if rates:
            fps = float(rates.group(1)) * (1000.0 if rates.group(2) else 1.0)
    if audio is not None:
        hz = _RATE.search(audio)
        rate = int(hz.group(1)) if hz else None
    dur = _DURATION.search(text)
    duration = (int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3))) if dur else None
    return MediaInfo(duration_s=duration, has_audio=audio is not None, has_video=video is not None,
                     width=width, height=height, fps=fps, audio_sample_rate=rate)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output from ffmpeg"


# ---------------------------------------------------------------- audio decoding

def load_audio(path: str | Path, clip_id: str, sr: int = 16000,
               expected_s: float | None = None) -> np.ndarray:
    """First audio stream of `path` as float32 mono at `sr` Hz, decoded by ffmpeg into a pipe.

    The pipe is read in chunks straight into the output array (sized from `expected_s` when
    given, grown when short), so a long recording never sits in memory twice.
    Raises ClipError with reason ``no_audio`` (no audio stream), ``unreadable`` (missing or
    corrupt file), ``zero_length`` (an audio stream that decodes to no samples) or ``timeout``.
    """
    src = _checked_path(path, clip_id)
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-i", src, "-map", "0:a:0",
           "-f", "f32le", "-acodec", "pcm_f32le", "-ac", "1", "-ar", str(sr), "pipe:1"]
    timed_out = threading.Event()
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: stderr can never block ffmpeg
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, bufsize=0)
        killer = threading.Timer(DECODE_TIMEOUT_S, lambda: (timed_out.set(), proc.kill()))
        killer.start()
        try:
            raw = _read_all(proc.stdout, 4 * (int((expected_s or 10.0) * sr * 1.02) + sr))
            code = proc.wait()
        finally:
            killer.cancel()
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors.seek(0)
        stderr = errors.read().decode("utf-8", errors="replace")
    if timed_out.is_set():
        raise _timeout_error(clip_id, src, "decoding")
    if code != 0:
        raise _decode_error(clip_id, src, stderr)
    wav = raw[: len(raw) // 4 * 4].view("<f4")
    if wav.size == 0:
        raise ClipError(clip_id, "zero_length",
                        f"the audio stream of {src} decodes to 0 samples; the recording is empty. "
                        "Re-export the clip or drop it from the dataset.")
    return wav


CHUNK_BYTES = 1 << 20  # read from the decoder's pipe 1 MiB at a time


def _read_all(pipe, size_hint: int) -> np.ndarray:
    """Every byte of `pipe` as uint8, read in chunks into one buffer that doubles when full
    (sized by the caller's estimate, so usually never), then trimmed."""
    buf = np.empty(max(size_hint, CHUNK_BYTES), dtype=np.uint8)
    filled = 0
    while True:
        if filled + CHUNK_BYTES > len(buf):
            buf = np.resize(buf, 2 * len(buf))
        got = pipe.readinto(memoryview(buf[filled:filled + CHUNK_BYTES]))
        if not got:
            break
        filled += got
    # Trim: a copy only when the estimate was far off, so the store never keeps the slack.
    return buf[:filled] if filled > 0.9 * len(buf) else buf[:filled].copy()


def _decode_error(clip_id: str, src: str, stderr: str) -> ClipError:
    if "matches no streams" in stderr:
        return ClipError(clip_id, "no_audio",
                         f"{src} has no audio stream. Audio features cannot be computed for it; "
                         "supply a version with sound or drop the clip.")
    return ClipError(clip_id, "unreadable",
                     f"ffmpeg cannot decode the audio of {src}: {_last_line(stderr)}. The file is "
                     "corrupt or in an unsupported format; re-export it (e.g. to mp4/aac).")


# ---------------------------------------------------------------- hashing

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks so large videos and weights fit in memory.
    For model weights, hashed on every run, use `features.cache.hashcache.sha256_file`."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
