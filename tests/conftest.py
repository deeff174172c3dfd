"""Shared fixtures: tiny media files made once per session with real ffmpeg (features.testing)."""
import os
from pathlib import Path

import numpy as np
import pytest

# No hub access in tests: any accidental download attempt fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The weight-hash cache (features.cache.hashcache) goes to a per-run folder, not the user's ~/.cache.
if "MER_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["MER_CACHE_DIR"] = tempfile.mkdtemp(prefix="mer-test-cache-")

from features.testing import make_corrupt, make_video, make_wav  # noqa: E402


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """One file per media case the pipeline must handle (1 s each, 64x64 at 10 fps)."""
    d = tmp_path_factory.mktemp("media")
    return {
        "video": make_video(d / "video.mp4", seconds=1.0, tone_hz=220),
        "silent_video": make_video(d / "silent_video.mp4", seconds=1.0, with_audio=False),
        "wav": make_wav(d / "tone.wav", seconds=1.0, sr=22050, tone_hz=440),
        "stereo_wav": make_wav(d / "stereo.wav", seconds=0.5, sr=48000, channels=2),
        "empty_wav": make_wav(d / "empty.wav", wav=np.zeros(0), sr=16000),
        "corrupt": make_corrupt(d / "corrupt.mp4"),
        "missing": d / "does_not_exist.mp4",
    }
