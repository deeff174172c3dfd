import hashlib

import numpy as np
import pytest

from features.media import ffmpeg as media_mod
from features.errors import ClipError, ConfigError
from features.media.ffmpeg import load_audio, probe, sha256_file


def _peak_hz(wav: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[np.argmax(spectrum)])


def test_probe_video_with_audio(media):
    info = probe(media["video"])
    assert info.has_video and info.has_audio
    assert (info.width, info.height, info.fps, info.audio_sample_rate) == (64, 64, 10.0, 44100)
    assert info.duration_s == pytest.approx(1.0, abs=0.1)


def test_probe_video_without_audio_and_plain_wav(media):
    silent = probe(media["silent_video"])
    assert silent.has_video and not silent.has_audio and silent.audio_sample_rate is None
    wav = probe(media["wav"])
    assert wav.has_audio and not wav.has_video and wav.width is None
    assert wav.audio_sample_rate == 22050 and wav.duration_s == pytest.approx(1.0, abs=0.01)


def test_probe_parses_fractional_fps_and_ignores_cover_art():
    text = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.m4a':
  Duration: 00:01:02.50, start: 0.000000, bitrate: 100 kb/s
  Stream #0:0[0x1](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 96 kb/s
  Stream #0:1[0x0]: Video: mjpeg (Baseline), yuvj420p(pc), 300x300, 90k tbr, 90k tbn (attached pic)
"""
    info = media_mod._parse_probe(text)
    assert not info.has_video and info.has_audio and info.duration_s == pytest.approx(62.5)
    video = media_mod._parse_probe("Input #0\n  Duration: N/A\n  Stream #0:0: Video: h264 (avc1 / "
                               "0x31637661), yuv420p, 1280x720, 29.97 fps, 29.97 tbr\n")
    assert (video.width, video.height, video.fps, video.duration_s) == (1280, 720, 29.97, None)


@pytest.mark.parametrize("case", ["corrupt", "missing"])
def test_probe_unreadable(media, case):
    with pytest.raises(ClipError) as err:
        probe(media[case], clip_id="c1")
    assert err.value.reason == "unreadable" and err.value.clip_id == "c1"
    assert media[case].name in str(err.value)


def test_load_audio_decodes_resamples_and_downmixes(media):
    wav = load_audio(media["video"], "v")
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert len(wav) == pytest.approx(16000, abs=1200)  # aac priming/padding adds a few frames
    assert _peak_hz(wav, 16000) == pytest.approx(220, abs=3)
    tone = load_audio(media["wav"], "w", sr=8000)
    assert len(tone) == 8000 and _peak_hz(tone, 8000) == pytest.approx(440, abs=3)
    assert np.abs(tone).max() == pytest.approx(0.5, abs=0.02)
    stereo = load_audio(media["stereo_wav"], "s")
    assert stereo.ndim == 1 and len(stereo) == 8000


@pytest.mark.parametrize("case, reason", [("silent_video", "no_audio"), ("corrupt", "unreadable"),
                                          ("missing", "unreadable"), ("empty_wav", "zero_length")])
def test_load_audio_failures_name_the_file(media, case, reason):
    with pytest.raises(ClipError) as err:
        load_audio(media[case], "clip7")
    assert err.value.reason == reason and err.value.clip_id == "clip7"
    assert media[case].name in err.value.detail


def test_works_with_imageio_ffmpeg_only(media, monkeypatch):
    """Users may have no system ffmpeg/ffprobe: imageio-ffmpeg's binary must do everything."""
    import imageio_ffmpeg

    monkeypatch.setattr(media_mod.shutil, "which", lambda name: None)
    assert media_mod.ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()
    info = probe(media["video"])
    assert info.has_audio and info.fps == 10.0 and info.width == 64
    assert _peak_hz(load_audio(media["video"], "v"), 16000) == pytest.approx(220, abs=3)
    with pytest.raises(ClipError, match="no audio stream"):
        load_audio(media["silent_video"], "s")


def test_ffmpeg_missing_everywhere_is_a_config_error(monkeypatch):
    import imageio_ffmpeg

    def nothing():
        raise RuntimeError("No ffmpeg exe could be found")

    monkeypatch.setattr(media_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", nothing)
    with pytest.raises(ConfigError, match="apt-get install ffmpeg"):
        media_mod.ffmpeg_exe()


def test_sha256_file_streams_the_whole_file(media):
    data = media["video"].read_bytes()
    assert sha256_file(media["video"], chunk=1000) == hashlib.sha256(data).hexdigest()

