"""The prepare stage: manifest rows, folds, and clear errors for bad corpora."""
import csv
import subprocess

import numpy as np
import pytest

from features.errors import ConfigError
from features.media.manifest import CLASSES, PrepareConfig, prepare, read_manifest
from features.media.ffmpeg import ffmpeg_exe
from features.reliability.reports import FailureReport


def _video(path, seconds=0.5):
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size=32x32:rate=5:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency=300:sample_rate=44100:duration={seconds}", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True)


@pytest.fixture(scope="module")
def one_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "v.mp4"
    _video(path)
    return path


def _corpus(root, one_video, labels, unlabelled=(), extra_rows=()):
    (root / "video").mkdir()
    (root / "unlab").mkdir()
    for name in labels:
        (root / "video" / f"{name}.mp4").write_bytes(one_video.read_bytes())
    for name in unlabelled:
        (root / "unlab" / f"{name}.mp4").write_bytes(one_video.read_bytes())
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("name", "discrete"), *labels.items(), *extra_rows])
    return PrepareConfig(videos=str(root / "video"), labels=str(root / "labels.csv"),
                         unlabelled=str(root / "unlab"), folds=2)


def test_manifest_rows_and_stratified_folds(tmp_path, one_video):
    labels = {f"c{i}": CLASSES[i % 6] for i in range(12)}
    cfg = _corpus(tmp_path, one_video, labels, unlabelled=["u0", "u1"])
    prepare(cfg, tmp_path / "out")
    clips = {c.clip_id: c for c in read_manifest(tmp_path / "out/manifest.csv")}
    assert len(clips) == 14
    assert clips["c3"].label == "sad" and clips["c3"].split == "labelled"
    assert clips["u0"].label == "" and clips["u0"].fold == -1 and clips["u0"].split == "unlabelled"
    assert 0.4 < clips["c0"].duration_s < 0.7 and len(clips["c0"].sha256) == 64
    for cls in CLASSES:  # two clips per class, two folds: one in each
        assert sorted(c.fold for c in clips.values() if c.label == cls) == [0, 1]
    again = tmp_path / "again"
    prepare(cfg, again)
    assert (again / "manifest.csv").read_text() == (tmp_path / "out/manifest.csv").read_text()


def test_missing_and_unreadable_clips_are_reported_not_fatal(tmp_path, one_video):
    labels = {f"c{i}": CLASSES[i % 6] for i in range(12)}
    cfg = _corpus(tmp_path, one_video, labels, extra_rows=[("ghost", "happy")])
    (tmp_path / "unlab" / "broken.mp4").write_bytes(b"not a video at all")
    prepare(cfg, tmp_path / "out")
    failures = {f.clip_id: f for f in FailureReport.read(tmp_path / "out/failures.json")}
    assert failures["ghost"].reason == "missing_file" and "ghost" in failures["ghost"].message
    assert failures["broken"].reason == "unreadable"
    assert len(read_manifest(tmp_path / "out/manifest.csv")) == 12


def test_bad_labels_are_clear_errors(tmp_path, one_video):
    cfg = _corpus(tmp_path, one_video, {"a": "happy", "b": "joyful"})
    with pytest.raises(ConfigError, match="outside.*'b'.*'joyful'"):
        prepare(cfg, tmp_path / "out")
    (tmp_path / "labels.csv").write_text("name,discrete\na,happy\na,sad\n")
    with pytest.raises(ConfigError, match="duplicate clip id 'a'"):
        prepare(cfg, tmp_path / "out")
    (tmp_path / "labels.csv").write_text("file,emotion\na,happy\n")
    with pytest.raises(ConfigError, match="name,discrete"):
        prepare(cfg, tmp_path / "out")


def test_id_in_both_folders_is_an_error(tmp_path, one_video):
    labels = {f"c{i}": CLASSES[i % 6] for i in range(12)}
    cfg = _corpus(tmp_path, one_video, labels, unlabelled=["c1"])
    with pytest.raises(ConfigError, match="both in"):
        prepare(cfg, tmp_path / "out")


def test_probe_cache_skips_unchanged_files_and_catches_changed_ones(tmp_path, one_video, monkeypatch):
    import os

    import features.media.manifest as manifest
    labels = {f"c{i}": CLASSES[i % 6] for i in range(18)}
    cfg = _corpus(tmp_path, one_video, labels)
    prepare(cfg, tmp_path / "out")
    first = (tmp_path / "out/manifest.csv").read_text()
    probed = []
    real = manifest.probe
    monkeypatch.setattr(manifest, "probe", lambda p, cid=None: probed.append(cid) or real(p, cid))
    prepare(cfg, tmp_path / "out")
    assert probed == [] and (tmp_path / "out/manifest.csv").read_text() == first
    # A file replaced in place (new content, new mtime) is re-read: a miss, never a stale hit.
    target = tmp_path / "video/c4.mp4"
    _video(target, seconds=0.8)
    os.utime(target, ns=(1, 2))
    prepare(cfg, tmp_path / "out")
    assert probed == ["c4"]
    clips = {c.clip_id: c for c in read_manifest(tmp_path / "out/manifest.csv")}
    assert clips["c4"].duration_s > 0.7 and clips["c4"].sha256 != clips["c3"].sha256
    (tmp_path / "video/c5.mp4").unlink()  # removed clips leave the cache
    prepare(cfg, tmp_path / "out")
    assert not any("/c5.mp4|" in k for k in manifest.read_json(tmp_path / "out/probes.json")["probes"])


@pytest.mark.filterwarnings("ignore:The least populated class")  # sklearn's, on tiny classes
@pytest.mark.parametrize("seed,n_splits,n", [(0, 5, 72), (1, 5, 5030), (7, 3, 40), (123, 4, 333)])
def test_stratified_folds_are_sklearns(seed, n_splits, n):
    """prepare's folds equal sklearn's StratifiedKFold(shuffle=True) without importing it."""
    from sklearn.model_selection import StratifiedKFold

    from features.media.manifest import stratified_folds

    rng = np.random.default_rng(seed)
    # imbalanced like MER2024 (surprise 3.8 %), names in a shuffled order of first appearance
    y = rng.choice(["neutral", "angry", "happy", "sad", "worried", "surprise"], size=n,
                   p=[0.25, 0.24, 0.21, 0.14, 0.12, 0.04])
    expected = np.empty(n, dtype=np.int64)
    for k, (_, held) in enumerate(StratifiedKFold(n_splits, shuffle=True, random_state=seed)
                                  .split(np.zeros(n), y)):
        expected[held] = k
    np.testing.assert_array_equal(stratified_folds(y, n_splits, seed), expected)


@pytest.mark.slow
def test_no_unlabelled_clips_under_dvc(tmp_path, one_video):
    """params.yaml's "none" for prepare.unlabelled (data/no_unlabelled) works in `dvc repro`
    (an empty path makes DVC fail before prepare runs)."""
    import os
    import shutil
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[3]
    for name in ("features", "models", "stages", "data/no_unlabelled"):
        shutil.copytree(root / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "dvc.yaml", tmp_path / "dvc.yaml")
    labels = {f"c{i}": CLASSES[i % 6] for i in range(12)}
    _corpus(tmp_path / "data", one_video, labels)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"].update(videos="data/video", labels="data/labels.csv",
                             unlabelled="data/no_unlabelled", folds=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "repro", "prepare"]):
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    clips = read_manifest(tmp_path / "artifacts/prepare/manifest.csv")
    assert len(clips) == 12 and all(c.split == "labelled" for c in clips)
