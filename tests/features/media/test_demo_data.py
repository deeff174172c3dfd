"""The committed synthetic demo set (data/demo) has the MER2024 layout the pipeline expects.

Reads the committed files only; nothing is generated here.
"""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import pytest

DEMO = Path(__file__).resolve().parents[3] / "data" / "demo"
CLASSES = {"neutral", "angry", "happy", "sad", "worried", "surprise"}
CASCADE = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"


def read_rows(name: str) -> list[dict[str, str]]:
    with open(DEMO / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def labels() -> list[dict[str, str]]:
    return read_rows("labels.csv")


def sampled_clips(labels) -> list[Path]:
    """One labelled clip per class plus two unlabelled ones: the media checks stay fast."""
    first = {}
    for row in labels:
        first.setdefault(row["discrete"], DEMO / "video" / f"{row['name']}.mp4")
    unlab = sorted((DEMO / "unlabelled").glob("*.mp4"))
    return [first[c] for c in sorted(first)] + [unlab[0], unlab[-1]]


def test_labels_header_classes_and_files(labels):
    with open(DEMO / "labels.csv") as f:
        assert f.readline().strip() == "name,discrete"
    assert len(labels) >= 60
    assert {r["discrete"] for r in labels} == CLASSES
    names = [r["name"] for r in labels]
    assert len(set(names)) == len(names)
    missing = [n for n in names if not (DEMO / "video" / f"{n}.mp4").is_file()]
    assert not missing, f"labels.csv rows without a video: {missing[:5]}"
    assert all(not n.endswith(".mp4") for n in names), "names are file stems"


def test_unlabelled_clips_are_not_in_labels(labels):
    unlab = sorted(p.stem for p in (DEMO / "unlabelled").glob("*.mp4"))
    assert len(unlab) >= 30
    assert not set(unlab) & {r["name"] for r in labels}


def test_reference_transcripts_cover_every_clip():
    rows = read_rows("reference_transcripts.csv")
    texts = {r["name"]: r["text"] for r in rows}
    clips = {p.stem for p in DEMO.glob("*/*.mp4")}
    assert set(texts) == clips
    assert all(t.strip() for t in texts.values())


def probe(path: Path) -> list[dict]:
    exe = shutil.which("ffprobe")
    if exe is None:
        pytest.skip("ffprobe not on PATH")
    out = subprocess.run([exe, "-v", "error", "-show_streams", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["streams"]


def test_sampled_clips_have_44k1_audio_and_h264_video(labels):
    for clip in sampled_clips(labels):
        streams = probe(clip)
        audio = [s for s in streams if s["codec_type"] == "audio"]
        video = [s for s in streams if s["codec_type"] == "video"]
        assert audio and int(audio[0]["sample_rate"]) == 44100, clip.name
        assert video and video[0]["codec_name"] == "h264", clip.name
        assert 1.5 <= float(video[0]["duration"]) <= 4.0, clip.name


def test_sampled_clips_show_a_haar_detectable_face(labels):
    cascade = cv2.CascadeClassifier(CASCADE)
    assert not cascade.empty()
    for clip in sampled_clips(labels):
        cap = cv2.VideoCapture(str(clip))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        found = False
        for i in (0, n // 3, 2 * n // 3, n - 1):
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, frame = cap.read()
            assert ok, f"{clip.name}: frame {i} did not decode"
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            if len(cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5)):
                found = True
                break
        cap.release()
        assert found, f"{clip.name}: no face found by the Haar cascade in 4 frames"


def test_demo_set_stays_small():
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total < 12 * 1024 * 1024
