"""Bad input gets a reason, never a crash: odd names and headers, label CSVs in Chinese encodings,
audio-only files in faces, decoders that hang or crash, and stage entries' one-line errors."""
import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from features.media import ffmpeg as media_mod
from features.audio.asr import load_transcripts_csv
from features.errors import ClipError
from features.media.faces import extract_faces
from features.media.manifest import CLASSES, PrepareConfig, prepare, read_manifest
from features.media.ffmpeg import ffmpeg_exe, probe
from features.reliability.reports import FailureReport

ROOT = Path(__file__).resolve().parents[3]


def _ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """0.5 s, 32x32, with a tone: copied under every name a test needs."""
    path = tmp_path_factory.mktemp("clip") / "c.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=5:duration=0.5", "-f", "lavfi", "-i",
            "sine=frequency=300:sample_rate=16000:duration=0.5", "-c:v", "mpeg4", "-c:a", "aac",
            "-shortest", path)
    return path


def _corpus(root: Path, clip: Path, names, rows=None, encoding="utf-8") -> PrepareConfig:
    """Videos under `names` (str or bytes), 12 labelled clips c0..c11, labels CSV of `rows`."""
    video = root / "video"
    video.mkdir()
    for name in [f"c{i}" for i in range(12)] + list(names):
        target = os.path.join(os.fsencode(video), name if isinstance(name, bytes)
                              else os.fsencode(name + ".mp4"))
        Path(os.fsdecode(target)).write_bytes(clip.read_bytes())
    rows = rows if rows is not None else [("name", "discrete")]
    rows = rows + [(f"c{i}", CLASSES[i % 6]) for i in range(12)]
    with open(root / "labels.csv", "w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows(rows)
    return PrepareConfig(videos=str(video), labels=str(root / "labels.csv"), folds=2)


def _failures(out: Path) -> dict:
    return {f.clip_id: f for f in FailureReport.read(out / "failures.json")}


def test_header_without_duration_is_measured(tmp_path, clip):
    """Browser recordings (streamed webm/mkv) say `Duration: N/A`: the duration is read instead."""
    streamed = tmp_path / "rec.webm"
    with open(streamed, "wb") as out:  # written to a pipe, so the muxer cannot go back for it
        subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(clip), "-c", "copy", "-f",
                        "matroska", "-"], stdout=out, check=True)
    header = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(streamed)],
                            capture_output=True, text=True).stderr
    assert "Duration: N/A" in header
    assert probe(streamed).duration_s == pytest.approx(0.5, abs=0.1)
    cfg = _corpus(tmp_path, clip, [])
    (Path(cfg.videos) / "rec.webm").write_bytes(streamed.read_bytes())
    prepare(cfg, tmp_path / "out")
    clips = {c.clip_id: c for c in read_manifest(tmp_path / "out/manifest.csv")}
    assert clips["rec"].duration_s == pytest.approx(0.5, abs=0.1) and clips["rec"].split == "unlabelled"


def test_unusable_file_names_are_listed_and_skipped(tmp_path, clip):
    cfg = _corpus(tmp_path, clip, ["..", ".", b"caf\xe9.mp4", "ok name"])
    prepare(cfg, tmp_path / "out")
    failures = _failures(tmp_path / "out")
    assert {k: f.reason for k, f in failures.items()} == {
        "..": "bad_name", ".": "bad_name", "caf\\xe9": "bad_name"}
    assert "rename the file" in failures["caf\\xe9"].message
    ids = {c.clip_id for c in read_manifest(tmp_path / "out/manifest.csv")}
    assert ids == {f"c{i}" for i in range(12)} | {"ok name"}
    json.loads((tmp_path / "out/failures.json").read_text(encoding="utf-8"))  # valid UTF-8 JSON


def test_short_label_rows_fail_their_clip_only(tmp_path, clip):
    rows = [("name", "discrete"), ("orphan",), ("", "sad"), ("half", "")]
    cfg = _corpus(tmp_path, clip, ["orphan", "half"], rows=rows)
    prepare(cfg, tmp_path / "out")
    failures = _failures(tmp_path / "out")
    assert {k: f.reason for k, f in failures.items()} == {
        "orphan": "bad_label_row", "labels.csv:3": "bad_label_row", "half": "bad_label_row"}
    assert "line 2" in failures["orphan"].message and "no class" in failures["orphan"].message
    ids = {c.clip_id for c in read_manifest(tmp_path / "out/manifest.csv")}
    assert ids == {f"c{i}" for i in range(12)}  # not silently "unlabelled"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "gb18030", "utf-16"])
def test_label_csv_in_spreadsheet_encodings(tmp_path, clip, encoding):
    rows = [("name", "discrete", "备注"), ("样本_01", "happy", "开心的笑")]
    cfg = _corpus(tmp_path, clip, ["样本_01"], rows=rows, encoding=encoding)
    prepare(cfg, tmp_path / "out")
    clips = {c.clip_id: c for c in read_manifest(tmp_path / "out/manifest.csv")}
    assert clips["样本_01"].label == "happy" and len(clips) == 13


def test_transcripts_csv_in_gb18030(tmp_path):
    path = tmp_path / "transcripts.csv"
    path.write_bytes("name,chinese,english\nsample_1,我很高兴,I am happy\nsample_2\n"
                     .encode("gb18030"))
    assert load_transcripts_csv(path, "zh") == {"sample_1": "我很高兴"}
    assert load_transcripts_csv(path, "en") == {"sample_1": "I am happy"}


def test_audio_only_file_in_faces_is_no_video(tmp_path, media):
    audio = tmp_path / "voice.mp4"  # an audio file under a video name
    _ffmpeg("-i", media["wav"], "-c:a", "aac", audio)
    with pytest.raises(ClipError) as err:
        extract_faces(audio, "voice")
    assert err.value.reason == "no_video" and "voice.mp4" in err.value.detail
    with pytest.raises(ClipError) as err:
        extract_faces(media["corrupt"], "junk")
    assert err.value.reason == "unreadable"


def test_hung_ffmpeg_times_out(tmp_path, media, monkeypatch):
    """A decoder that never finishes (a stalled mount) fails its clip with reason `timeout`."""
    hang = tmp_path / "ffmpeg"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(media_mod, "ffmpeg_exe", lambda: str(hang))
    monkeypatch.setattr(media_mod, "DECODE_TIMEOUT_S", 0.5)
    for call in (lambda: probe(media["video"], "v"), lambda: media_mod.load_audio(media["video"], "v")):
        start = time.perf_counter()
        with pytest.raises(ClipError) as err:
            call()
        assert err.value.reason == "timeout" and time.perf_counter() - start < 10


def test_load_audio_reads_long_audio_in_chunks(tmp_path):
    """More samples than the size hint and several pipe chunks: every sample arrives in order."""
    from features.testing import make_wav

    sr = 16000
    ramp = (np.arange(40 * sr) % 1000) / 1000.0 - 0.5  # 40 s: 2.5 MB of float32, > 2 chunks
    path = make_wav(tmp_path / "long.wav", wav=ramp, sr=sr)
    for hint in (None, 1.0, 40.0):
        wav = media_mod.load_audio(path, "long", sr=sr, expected_s=hint)
        assert wav.dtype == np.float32 and len(wav) == len(ramp)
        np.testing.assert_allclose(wav, ramp, atol=1e-4)


CRASH_HOOK = """
import os
if os.environ.get("MER_TEST_CRASH_ON"):  # a decoder segfault, injected at interpreter start
    import ctypes, cv2
    _real = cv2.VideoCapture
    def _capture(path, *args):
        if os.environ["MER_TEST_CRASH_ON"] in str(path):
            ctypes.string_at(0)
        return _real(path, *args)
    cv2.VideoCapture = _capture
"""


@pytest.mark.slow
def test_decoder_crash_fails_one_clip_and_the_stage_goes_on(tmp_path, clip):
    """OpenCV segfaulting on one file (injected through sitecustomize in every new interpreter)
    fails that clip with `decoder_crashed`; the other clips are cropped."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    cfg = _corpus(tmp_path, clip, ["boom", "after"])
    prepare(cfg, tmp_path / "prep")
    params = {"faces": {**yaml.safe_load((ROOT / "params.yaml").read_text())["faces"],
                        "max_frames": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MER_TEST_CRASH_ON": "boom.mp4",
           "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "stages.faces", "--manifest",
                           str(tmp_path / "prep/manifest.csv"), "--out", str(tmp_path / "faces"),
                           "--params", str(tmp_path / "params.yaml")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    failures = _failures(tmp_path / "faces")
    assert set(failures) == {"boom"} and failures["boom"].reason == "decoder_crashed"
    assert "SIGSEGV" in failures["boom"].message
    from features.storage.store import StoreReader
    with StoreReader(tmp_path / "faces/faces", kind="faces") as store:
        assert set(store.ids) == {f"c{i}" for i in range(12)} | {"after"}


def test_stage_entry_prints_one_error_line(tmp_path):
    """Under `dvc repro` a MerError reads `<stage>: error: <message>`, exit status 1."""
    params = {"prepare": {"videos": str(tmp_path / "nowhere"), "labels": str(tmp_path / "l.csv")}}
    (tmp_path / "l.csv").write_text("name,discrete\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "stages.prepare", "--out", str(tmp_path / "o"),
                           "--params", str(tmp_path / "params.yaml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"prepare: error: video folder {tmp_path / 'nowhere'} does not exist")
