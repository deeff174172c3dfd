"""Face crops: frame sampling, the documented no-face fallback, and a real face being found."""

import os

import cv2
import numpy as np
import pytest

from features.errors import ClipError, ConfigError
from features.media.faces import FacesConfig, extract_faces, sample_indices


def _write_video(path, frames, fps=10):
    """mp4 (MPEG-4 part 2, in every OpenCV build) from BGR frames."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def _rectangle_frames(n, width=160, height=120):
    """Dark frames with a bright rectangle in the middle: no face anywhere."""
    frame = np.full((height, width, 3), 30, np.uint8)
    cv2.rectangle(frame, (60, 40), (100, 80), (250, 250, 250), thickness=-1)
    return [frame.copy() for _ in range(n)]


@pytest.fixture(scope="module")
def no_face_video(tmp_path_factory):
    return _write_video(tmp_path_factory.mktemp("faces") / "rect.mp4", _rectangle_frames(30))


def test_no_face_falls_back_to_centre_crops(no_face_video):
    out = extract_faces(no_face_video, "rect", FacesConfig(fps=2.0, size=64))
    assert out.crops.shape == (6, 64, 64, 3) and out.crops.dtype == np.uint8
    assert out.detected.dtype == bool and not out.detected.any()
    np.testing.assert_allclose(out.times, [0, 0.5, 1, 1.5, 2, 2.5], atol=1e-6)
    assert out.times.dtype == np.float32
    # The centre square of the 160x120 frame is x 20..140: the rectangle sits in its middle.
    expected = cv2.resize(_rectangle_frames(1)[0][:, 20:140], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(out.crops[0].astype(int) - expected[..., ::-1].astype(int)).mean() < 8


def test_max_frames_spreads_samples_over_the_clip(no_face_video):
    out = extract_faces(no_face_video, "rect", FacesConfig(fps=2.0, max_frames=4))
    np.testing.assert_allclose(out.times, [0, 0.8, 1.5, 2.2], atol=1e-6)  # 0.75 s apart, on 10 fps frames
    assert sample_indices(30, 10.0, 2.0, 16) == [0, 5, 10, 15, 20, 25]
    assert sample_indices(3, 10.0, 2.0, 16) == [0]  # a clip shorter than 1/fps still gives a frame
    assert sample_indices(0, 10.0, 2.0, 16) == []


def test_skip_fallback_without_any_face_is_a_no_face_error(no_face_video):
    with pytest.raises(ClipError) as err:
        extract_faces(no_face_video, "rect", FacesConfig(fallback="skip"))
    assert err.value.reason == "no_face" and err.value.clip_id == "rect"


def test_unreadable_videos_raise_clip_errors(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for path in (broken, tmp_path / "missing.mp4"):
        with pytest.raises(ClipError) as err:
            extract_faces(path, "bad")
        assert err.value.reason == "unreadable"


def test_config_is_checked():
    with pytest.raises(ConfigError, match="fallback"):
        FacesConfig(fallback="blur")
    with pytest.raises(ConfigError, match="detector"):
        FacesConfig(detector="mtcnn")
    with pytest.raises(ConfigError):
        FacesConfig(fps=0)


def _face_image():
    """Grace Hopper's portrait, which matplotlib ships as sample data."""
    matplotlib = pytest.importorskip("matplotlib")
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if not os.path.exists(path):
        pytest.skip("matplotlib sample data not installed")
    return cv2.resize(cv2.imread(path), (256, 300), interpolation=cv2.INTER_AREA)


def test_real_face_is_detected_and_cropped(tmp_path):
    face = _face_image()
    frames = [np.roll(face, shift, axis=1) for shift in range(0, 20, 2)]
    video = _write_video(tmp_path / "face.mp4", frames)
    out = extract_faces(video, "hopper", FacesConfig(fps=4.0, size=96))
    assert out.crops.shape == (4, 96, 96, 3) and out.detected.all()
    # The face crop is tighter than the centre crop of the whole portrait: it differs from it.
    centre = extract_faces(_write_video(tmp_path / "flat.mp4", [np.full_like(face, 90)] * 10), "flat")
    assert not centre.detected.any()
    whole = cv2.resize(face[22:278], (96, 96))[..., ::-1]
    assert np.abs(out.crops[0].astype(int) - whole.astype(int)).mean() > 20
