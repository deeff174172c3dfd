"""Face crops for the vision encoder: sample frames at a fixed rate, crop the largest face.

Frames are taken every 1/fps seconds from the start; when that gives more than `max_frames`,
`max_frames` frames are spread evenly over the whole clip instead. The largest face an OpenCV
Haar cascade finds is cropped as a square (its box grown by `margin` on every side; parts outside
the frame are black) and resized to `size` x `size` RGB.

Fallback for a frame without a face: `center` keeps the centre square crop of the frame, marked
detected=False; `skip` drops the frame. With `center`, a clip where no frame shows a face keeps
its centre crops (so the encoder still gets an input; the stage records the clip from
`detected`). A clip with no video stream (an audio file) raises ClipError(reason='no_video'), one
with no decodable frame ClipError(reason='unreadable'); with `skip`, a clip with no face at all
raises ClipError(reason='no_face').
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from features.errors import ClipError, ConfigError, ModelLoadError
from features.media.ffmpeg import probe

DETECTORS = {"haar": "haarcascade_frontalface_default.xml"}
FALLBACKS = ("center", "skip")
DETECT_MAX_SIDE = 640  # detect on a downscaled frame: faster, and MER videos are <= 720p anyway
ASSUMED_FPS = 25.0  # when a container does not report its frame rate


@dataclass
class FacesConfig:
    """params.yaml `faces` section."""

    fps: float = 2.0
    size: int = 112
    max_frames: int = 16
    detector: str = "haar"
    min_face: int = 24  # smallest face side in pixels of the original frame
    margin: float = 0.2  # fraction of the face box added on each side
    fallback: str = "center"  # center | skip (see module docstring)

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"faces.detector {self.detector!r} is unknown; use one of {sorted(DETECTORS)}.")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"faces.fallback {self.fallback!r} is unknown; use one of {list(FALLBACKS)}.")
        if self.fps <= 0 or self.size < 8 or self.max_frames < 1 or self.min_face < 1 or self.margin < 0:
            raise ConfigError(
                f"faces: need fps > 0, size >= 8, max_frames >= 1, min_face >= 1, margin >= 0; got "
                f"fps={self.fps}, size={self.size}, max_frames={self.max_frames}, "
                f"min_face={self.min_face}, margin={self.margin}."
            )


@dataclass
class FaceCrops:
    crops: np.ndarray  # uint8 [F, size, size, 3] RGB
    times: np.ndarray  # float32 [F] seconds from the clip start
    detected: np.ndarray  # bool [F]: False where the fallback crop was used


def extract_faces(video_path: str | Path, clip_id: str, cfg: FacesConfig | None = None) -> FaceCrops:
    """Face crops of one clip; see the module docstring for sampling and the no-face fallback."""
    cfg = cfg or FacesConfig()
    detector = load_detector(cfg.detector)
    crops, times, detected = [], [], []
    for time, frame in sample_frames(video_path, clip_id, cfg.fps, cfg.max_frames):
        box = largest_face(detector, frame, cfg.min_face)
        if box is None and cfg.fallback == "skip":
            continue
        crop = face_crop(frame, box, cfg.margin) if box is not None else center_crop(frame)
        crop = cv2.resize(crop, (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
        crops.append(cv2.cvtColor(crop, cv2.COLOR_BGR2RGB))
        times.append(time)
        detected.append(box is not None)
    if not crops:
        raise ClipError(
            clip_id,
            "no_face",
            f"no face found in any sampled frame of {video_path} (fallback 'skip'); use "
            f"faces.fallback: center to keep centre crops, or lower faces.min_face.",
        )
    return FaceCrops(
        crops=np.stack(crops).astype(np.uint8),
        times=np.asarray(times, dtype=np.float32),
        detected=np.asarray(detected, dtype=bool),
    )


@functools.cache
def load_detector(name: str) -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / DETECTORS[name]
    detector = cv2.CascadeClassifier(str(path))
    if detector.empty():
        raise ModelLoadError(
            f"face detector {name!r}: could not load {path}; reinstall opencv-python-headless."
        )
    return detector


def sample_frames(
    video_path: str | Path, clip_id: str, fps: float, max_frames: int
) -> list[tuple[float, np.ndarray]]:
    """(seconds, BGR frame) pairs; decodes sequentially, since seeking is unreliable across codecs."""
    cap = cv2.VideoCapture(str(video_path))
    try:
        if not cap.isOpened():
            raise _no_frames(video_path, clip_id, "OpenCV cannot open it")
        video_fps = cap.get(cv2.CAP_PROP_FPS)
        video_fps = video_fps if 0 < video_fps < 1000 else ASSUMED_FPS
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if count <= 0:  # some containers do not say (0, or -1 with some backends)
            count = count_frames(video_path)
        wanted = set(sample_indices(count, video_fps, fps, max_frames))
        frames = []
        for index in range(max(wanted, default=-1) + 1):
            if not cap.grab():
                break
            if index in wanted:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    frames.append((index / video_fps, frame))
    finally:
        cap.release()
    if not frames:
        raise _no_frames(video_path, clip_id, "it has no decodable video frame")
    return frames


def _no_frames(video_path: str | Path, clip_id: str, why: str) -> ClipError:
    """no_video for an audio-only file (ffmpeg sees no video stream), else unreadable."""
    if not probe(video_path, clip_id).has_video:  # raises 'unreadable' itself if ffmpeg cannot open it
        return ClipError(clip_id, "no_video", f"{video_path} has no video stream (audio only?): no "
                         "face crops. Supply the video version or drop the clip.")
    return ClipError(clip_id, "unreadable", f"{why}: {video_path}; check the file and its codec.")


def count_frames(video_path: str | Path) -> int:
    """Frames counted by decoding, for containers that do not report a count."""
    cap = cv2.VideoCapture(str(video_path))
    count = 0
    while cap.grab():
        count += 1
    cap.release()
    return count


def sample_indices(count: int, video_fps: float, fps: float, max_frames: int) -> list[int]:
    """Frame indices every 1/fps s from the start, or max_frames spread evenly if that is more."""
    if count <= 0:
        return []
    duration = count / video_fps
    n = max(1, math.ceil(duration * fps - 1e-9))
    times = np.arange(n) / fps if n <= max_frames else np.arange(max_frames) * duration / max_frames
    return sorted(set(np.clip(np.round(times * video_fps), 0, count - 1).astype(int).tolist()))


def largest_face(
    detector: cv2.CascadeClassifier, frame: np.ndarray, min_face: int
) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest detected face in frame pixels, or None."""
    scale = min(1.0, DETECT_MAX_SIDE / max(frame.shape[:2]))
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    smallest = max(1, round(min_face * scale))
    faces = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return tuple(int(round(v / scale)) for v in (x, y, w, h))  # type: ignore[return-value]


def face_crop(frame: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    x, y, w, h = box
    return square_crop(frame, x + w / 2, y + h / 2, max(w, h) * (1 + 2 * margin))


def center_crop(frame: np.ndarray) -> np.ndarray:
    height, width = frame.shape[:2]
    return square_crop(frame, width / 2, height / 2, min(height, width))


def square_crop(frame: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
    """Square of `side` px centred at (cx, cy); parts outside the frame stay black."""
    side_px = max(1, int(round(side)))
    x0, y0 = int(round(cx - side_px / 2)), int(round(cy - side_px / 2))
    height, width = frame.shape[:2]
    out = np.zeros((side_px, side_px, 3), dtype=frame.dtype)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side_px, width), min(y0 + side_px, height)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = frame[sy0:sy1, sx0:sx1]
    return out
