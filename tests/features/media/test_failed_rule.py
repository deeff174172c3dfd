"""The "every clip failed" rule counts clips reused from the cache."""
import pytest

from features.reliability.clips import for_each_clip
from features.errors import MerError
from features.media.stages import AudioConfig, extract_audio
from features.media.manifest import Clip, write_manifest
from features.media.ffmpeg import sha256_file
from features.reliability.reports import FailureReport
from features.storage.store import StoreReader
from features.testing import make_corrupt, make_video


def _clip(path, cid):
    return Clip(clip_id=cid, path=str(path), size=path.stat().st_size, sha256=sha256_file(path),
                duration_s=1.0, label="", fold=-1, split="unlabelled")


def test_one_bad_new_clip_next_to_cached_ones_does_not_fail_the_stage(tmp_path):
    good = _clip(make_video(tmp_path / "good.mp4", seconds=0.5), "good")
    bad = _clip(make_corrupt(tmp_path / "bad.mp4"), "bad")
    write_manifest(tmp_path / "m1.csv", [good])
    extract_audio(tmp_path / "m1.csv", AudioConfig(), tmp_path / "out")
    write_manifest(tmp_path / "m2.csv", [good, bad])
    extract_audio(tmp_path / "m2.csv", AudioConfig(), tmp_path / "out")  # raised before the fix
    with StoreReader(tmp_path / "out/audio") as s:
        assert s.ids == ["good"]
    assert FailureReport.read(tmp_path / "out/failures.json")[0].clip_id == "bad"
    write_manifest(tmp_path / "m3.csv", [bad])
    with pytest.raises(MerError, match="every one of 1 clips failed"):
        extract_audio(tmp_path / "m3.csv", AudioConfig(), tmp_path / "out3")


def test_the_rule_itself():
    def boom(cid, _):
        raise ValueError("bad")
    for_each_clip([("a", None)], boom, FailureReport("x"), "x", reused=3)
    with pytest.raises(MerError, match="every one of 1 clips failed; first: a: ValueError"):
        for_each_clip([("a", None)], boom, FailureReport("x"), "x")
