"""Seeded fuzzing of the media stages: a few hundred corrupted variants of valid clips through
prepare, audio and faces. No stage may stop; every clip is either done or listed with a reason."""
import subprocess

import numpy as np
import pytest

from features.media import stages as extract

from features.media import ffmpeg as media
from features.media.stages import AudioConfig, crop_faces, extract_audio
from features.media.faces import FacesConfig
from features.media.manifest import CLASSES, PrepareConfig, prepare, read_manifest
from features.reliability.reports import FailureReport
from features.storage.store import StoreReader

pytestmark = pytest.mark.slow
VARIANTS = 240
SEED = 14
# Every reason a broken file may get; "error" (an unexpected exception) is a bug, not listed.
REASONS = {"unreadable", "zero_length", "no_audio", "no_video", "timeout", "decoder_crashed"}
MUTATIONS = ("truncate", "flip", "flip_head", "zeros", "wrong_ext", "splice", "garbage", "empty")


def _encode(path, *args, pipe=False):
    ff = [media.ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
          "testsrc=size=32x32:rate=10:duration=0.6", "-f", "lavfi", "-i",
          "sine=frequency=300:sample_rate=16000:duration=0.6", *args]
    if pipe:  # streamed: no duration in the header, like a browser recording
        with open(path, "wb") as out:
            subprocess.run(ff + ["-"], stdout=out, check=True, capture_output=False)
    else:
        subprocess.run(ff + [str(path)], check=True, capture_output=True)
    return path.read_bytes()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid tiny clips in the containers users bring: name suffix -> bytes."""
    d = tmp_path_factory.mktemp("bases")
    return {
        ".mp4": _encode(d / "a.mp4", "-c:v", "mpeg4", "-c:a", "aac", "-shortest"),
        ".mkv": _encode(d / "b.mkv", "-c:v", "mpeg4", "-c:a", "aac", "-shortest", "-f", "matroska",
                        pipe=True),
        ".avi": _encode(d / "c.avi", "-c:v", "mjpeg", "-c:a", "pcm_s16le", "-shortest"),
        ".mov": _encode(d / "d.mov", "-map", "1:a", "-c:a", "aac"),  # audio only
        ".webm": _encode(d / "e.mp4", "-map", "0:v", "-c:v", "mpeg4"),  # video only, wrong suffix
        ".MP4": _encode(d / "f.mp4", "-t", "0", "-c:v", "mpeg4", "-c:a", "aac"),  # empty streams
    }


def _mutate(rng, data: bytes, other: bytes) -> bytes:
    kind = MUTATIONS[rng.integers(len(MUTATIONS))]
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: rng.integers(0, len(buf))])
    if kind in ("flip", "flip_head"):
        span = min(len(buf), 512) if kind == "flip_head" else len(buf)
        for at in rng.integers(0, max(span, 1), size=rng.integers(1, 24)):
            if buf:
                buf[at] ^= 1 << int(rng.integers(8))
        return bytes(buf)
    if kind == "zeros":
        start, n = int(rng.integers(0, max(len(buf), 1))), int(rng.integers(1, 4096))
        buf[start:start + n] = bytes(len(buf[start:start + n]))
        return bytes(buf)
    if kind == "splice":
        return data[: rng.integers(0, len(data))] + other[rng.integers(0, len(other)):]
    if kind == "garbage":
        return rng.integers(0, 256, int(rng.integers(1, 20000)), dtype=np.uint8).tobytes()
    if kind == "empty":
        return b""
    return data  # wrong_ext: intact content under another container's suffix


def test_fuzzed_clips_are_done_or_listed(tmp_path, bases, monkeypatch):
    monkeypatch.setattr(media, "DECODE_TIMEOUT_S", 30.0)
    monkeypatch.setattr(extract, "DECODE_TIMEOUT_S", 30.0)
    rng = np.random.default_rng(SEED)
    videos, unlab = tmp_path / "video", tmp_path / "unlab"
    videos.mkdir()
    unlab.mkdir()
    rows = [("name", "discrete")]
    for i in range(12):  # intact labelled clips: folds can be made, stages have work that succeeds
        (videos / f"ok{i}.mp4").write_bytes(bases[".mp4"])
        rows.append((f"ok{i}", CLASSES[i % 6]))
    (tmp_path / "labels.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    suffixes = list(bases)
    fuzzed = set()
    for i in range(VARIANTS):
        base, other = (suffixes[j] for j in rng.integers(len(suffixes), size=2))
        suffix = suffixes[rng.integers(len(suffixes))] if rng.random() < 0.3 else base
        (unlab / f"fz{i:03d}{suffix}").write_bytes(_mutate(rng, bases[base], bases[other]))
        fuzzed.add(f"fz{i:03d}")

    prepare(PrepareConfig(videos=str(videos), labels=str(tmp_path / "labels.csv"),
                          unlabelled=str(unlab), folds=2), tmp_path / "prep")
    manifest = tmp_path / "prep/manifest.csv"
    listed = _failures(tmp_path / "prep")
    kept = {c.clip_id for c in read_manifest(manifest)}
    assert fuzzed <= kept | set(listed) and not kept & set(listed)
    assert {f"ok{i}" for i in range(12)} <= kept

    extract_audio(manifest, AudioConfig(), tmp_path / "audio")
    crop_faces(manifest, FacesConfig(max_frames=2, size=16), tmp_path / "faces")
    for stage, kind in (("audio", "audio"), ("faces", "faces")):
        failed = _failures(tmp_path / stage)
        listed.update(failed)
        with StoreReader(tmp_path / stage / stage, kind=kind) as store:
            done = set(store.ids)
        assert kept == done | set(failed) and not done & set(failed), stage
        assert {f"ok{i}" for i in range(12)} <= done, stage
    reasons = {f.reason for f in listed.values()}
    assert reasons <= REASONS, {f.clip_id: (f.reason, f.message) for f in listed.values()
                                if f.reason not in REASONS}
    assert len(listed) > VARIANTS // 4  # the corruptions were real: many clips failed somewhere
    counts = {r: sum(f.reason == r for f in listed.values()) for r in sorted(reasons)}
    print(f"{len(kept)} of {VARIANTS + 12} clips kept by prepare; failures by reason: {counts}")


def _failures(out) -> dict:
    return {f.clip_id: f for f in FailureReport.read(out / "failures.json")}
