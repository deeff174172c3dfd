"""The clip manifest: which clips exist, their content hash, duration, label and fold.

Input is the MER2024 layout: a folder of videos, a label CSV ``name,discrete[,valence]``, an optional
folder of unlabelled videos and an optional transcript CSV. Output is ``manifest.csv`` (one row per
clip that can be decoded) and ``failures.json`` (clips that cannot, and why).
"""
from __future__ import annotations

import csv
import io
import logging
import os
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from features.reliability.clips import for_each_clip
from features.errors import ClipError, ConfigError
from features.media.ffmpeg import probe, sha256_file
from features.reliability.reports import FailureReport, read_json, write_json_atomic
from features.media.textfiles import read_text
from features.storage.store import StoreError, check_clip_id

log = logging.getLogger(__name__)

CLASSES = ("neutral", "angry", "happy", "sad", "worried", "surprise")
UNLABELLED_FOLD = -1


@dataclass
class PrepareConfig:
    """params.yaml `prepare`."""
    videos: str                          # folder of (labelled and test) videos
    labels: str                          # CSV name,discrete[,valence]
    unlabelled: str = ""                 # optional folder of unlabelled videos ("" = none;
                                         # under DVC use the empty data/no_unlabelled)
    folds: int = 5                       # stratified cross-validation folds over labelled clips
    seed: int = 0                        # fold assignment seed
    extensions: list[str] = field(default_factory=lambda: [".mp4", ".avi", ".mkv", ".mov", ".webm"])


@dataclass
class Clip:
    clip_id: str       # file stem, the key in every store
    path: str          # video path as given (relative to the repo when possible)
    size: int          # bytes
    sha256: str        # content hash: the per-clip cache key in later stages
    duration_s: float  # container duration in seconds
    label: str         # one of CLASSES, or "" when unlabelled
    fold: int          # 0..folds-1 for labelled clips, -1 otherwise
    split: str         # "labelled" | "unlabelled"


def read_labels(path: str | os.PathLike) -> tuple[dict[str, str], FailureReport]:
    """name -> class from a MER-style label CSV (UTF-8, with or without BOM, UTF-16 or GB18030),
    and the rows that name no clip or no class (each listed, not fatal).

    Strict about what looks systematic: duplicate ids and classes outside CLASSES stop the stage.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"label CSV {path} does not exist; set prepare.labels in params.yaml.")
    reader = csv.DictReader(io.StringIO(read_text(path, "prepare.labels"), newline=""))
    if not reader.fieldnames or not {"name", "discrete"} <= {f.strip() for f in reader.fieldnames}:
        raise ConfigError(f"label CSV {path} needs columns 'name,discrete' (MER2024 layout); "
                          f"found {reader.fieldnames}.")
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    labels: dict[str, str] = {}
    bad: list[str] = []
    skipped = FailureReport("prepare")
    for line, row in enumerate(reader, start=2):
        name, label = (row["name"] or "").strip(), (row["discrete"] or "").strip().lower()
        if not name or not label:  # a short or blank row: that clip only
            skipped.add(name or f"{path.name}:{line}", "bad_label_row",
                        f"label CSV {path} line {line} has no {'class' if name else 'clip name'} "
                        f"({row!r}); the clip is left out until the row reads name,discrete.")
            continue
        if name in labels:
            raise ConfigError(f"label CSV {path} line {line}: duplicate clip id {name!r}; "
                              f"each clip may be labelled once.")
        if label not in CLASSES:
            bad.append(f"line {line} {name!r}: {label!r}")
        labels[name] = label
    if bad:
        raise ConfigError(f"label CSV {path}: {len(bad)} label(s) outside {list(CLASSES)}: "
                          f"{bad[:5]}. Fix or drop those rows.")
    return labels, skipped


PROBE_CACHE = "probes.json"  # persisted between runs (dvc.yaml: persist: true)


def find_videos(folder: str | os.PathLike, extensions: list[str]) -> dict[str, Path]:
    """clip id (file stem) -> path for every video in `folder` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"video folder {folder} does not exist; fix the path in params.yaml.")
    found: dict[str, Path] = {}
    exts = {e.lower() for e in extensions}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in exts:
            continue
        if path.stem in found:
            raise ConfigError(f"clip id {path.stem!r} appears twice in {folder} "
                              f"({found[path.stem].name}, {path.name}); rename one.")
        found[path.stem] = path
    return found


def assign_folds(labels: list[str], folds: int, seed: int) -> np.ndarray:
    """Seeded stratified fold ids. Classes with fewer clips than folds are spread round-robin."""
    y = np.array(labels)
    smallest = min(np.unique(y, return_counts=True)[1]) if len(y) else 0
    n_splits = min(folds, int(smallest))
    if n_splits < folds:
        log.warning("a class has only %d labelled clips: using %d folds instead of %d",
                    smallest, n_splits, folds)
    if n_splits < 2:
        raise ConfigError(f"cannot make cross-validation folds: a class has {smallest} labelled "
                          f"clip(s); every class needs at least 2.")
    return stratified_folds(y, n_splits, seed)


def stratified_folds(y: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """The test-fold ids of sklearn's StratifiedKFold(n_splits, shuffle=True, random_state=seed),
    computed the same way (tests/features/media/test_manifest.py checks they are identical): importing sklearn
    costs ~1.5 s, paid by `prepare` on every run, one clip added or not."""
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    _, class_perm = np.unique(first, return_inverse=True)  # classes in order of appearance
    encoded = class_perm[inverse]
    n_classes = len(first)
    order = np.sort(encoded)
    allocation = np.asarray([np.bincount(order[i::n_splits], minlength=n_classes)
                             for i in range(n_splits)])
    rng = np.random.RandomState(seed)
    out = np.empty(len(y), dtype=np.int64)
    for k in range(n_classes):
        folds_for_class = np.arange(n_splits).repeat(allocation[:, k])
        rng.shuffle(folds_for_class)
        out[encoded == k] = folds_for_class
    return out


def describe(clip_id: str, path: Path, label: str, split: str,
             cache: dict | None = None) -> Clip:
    """Hash and probe one video; `cache` ({path|size|mtime: (sha256, duration)}) skips both."""
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if cache is not None and key in cache:
        sha, duration = cache[key]
    else:
        info = probe(path, clip_id)
        if not info.has_video and not info.has_audio:
            raise ClipError(clip_id, "unreadable", f"{path} has neither a video nor an audio stream.")
        if not info.duration_s:
            raise ClipError(clip_id, "zero_length", f"{path} holds no media time (its streams are "
                            "empty or cut off before the first frame); re-export or drop it.")
        sha, duration = sha256_file(path), round(float(info.duration_s), 3)
    if cache is not None:
        cache[key] = (sha, duration)
    return Clip(clip_id=clip_id, path=str(path), size=stat.st_size, sha256=sha,
                duration_s=duration, label=label, fold=UNLABELLED_FOLD, split=split)


def check_name(clip_id: str, path: Path) -> None:
    """ClipError('bad_name') for a file name that cannot be a clip id in stores, CSV and JSON."""
    try:
        clip_id.encode("utf-8")
        check_clip_id(clip_id)
        problem = any(unicodedata.category(ch) == "Cc" for ch in clip_id)
    except (UnicodeEncodeError, StoreError):
        problem = True
    if problem:
        raise ClipError(printable(clip_id), "bad_name",
                        f"the file name {printable(path.name)!r} is not usable as a clip id (not "
                        "UTF-8, a control character, or '.'/'..'): rename the file.")


def printable(name: str) -> str:
    """A file name from the disk as valid text: undecodable bytes become \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def scan(cfg: PrepareConfig, cache: dict | None = None) -> tuple[list[Clip], FailureReport]:
    """All clips of the corpus with hashes and folds, plus the clips that could not be read.

    `cache` maps path|size|mtime to an earlier (sha256, duration): unchanged files are not
    re-read, which keeps adding a few clips to a large corpus cheap. Entries are added in place.
    """
    labels, failures = read_labels(cfg.labels)
    videos = find_videos(cfg.videos, cfg.extensions)
    unlabelled = find_videos(cfg.unlabelled, cfg.extensions) if cfg.unlabelled else {}
    clash = sorted(set(videos) & set(unlabelled))
    if clash:
        raise ConfigError(f"clip id(s) {clash[:5]} are both in {cfg.videos} and {cfg.unlabelled}; "
                          f"ids must be unique across folders.")
    for name in sorted(set(labels) - set(videos)):
        failures.add(name, "missing_file", f"labelled in {cfg.labels} but no video named "
                     f"{name}.* in {cfg.videos}; add the file or drop the row.")
    unlabel_rows = failures.clip_ids  # a clip whose label row is broken is left out, not unlabelled
    todo = [(cid, (p, labels.get(cid, ""), "labelled" if cid in labels else "unlabelled"))
            for cid, p in videos.items() if cid not in unlabel_rows]
    todo += [(cid, (p, "", "unlabelled")) for cid, p in unlabelled.items()]
    clips: list[Clip] = []

    def work(cid: str, item: tuple[Path, str, str]) -> None:
        check_name(cid, item[0])
        clips.append(describe(cid, *item, cache=cache))
    if todo:
        for_each_clip(todo, work, failures, "prepare", total=len(todo))
    labelled = [c for c in clips if c.label]
    for clip, fold in zip(labelled, assign_folds([c.label for c in labelled], cfg.folds, cfg.seed)):
        clip.fold = int(fold)
    return clips, failures


def write_manifest(path: str | os.PathLike, clips: list[Clip]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[f.name for f in fields(Clip)])
        writer.writeheader()
        writer.writerows(asdict(c) for c in clips)
    os.replace(tmp, path)


def read_manifest(path: str | os.PathLike) -> list[Clip]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist; run the prepare stage first.")
    with open(path, newline="", encoding="utf-8") as fh:
        return [Clip(clip_id=r["clip_id"], path=r["path"], size=int(r["size"]), sha256=r["sha256"],
                     duration_s=float(r["duration_s"]), label=r["label"], fold=int(r["fold"]),
                     split=r["split"]) for r in csv.DictReader(fh)]


def prepare(cfg: PrepareConfig, out_dir: str | os.PathLike) -> list[Clip]:
    """The prepare stage: write ``manifest.csv`` and ``failures.json`` into `out_dir`."""
    out = Path(out_dir)
    cache_path = out / PROBE_CACHE
    old = read_json(cache_path).get("probes", {}) if cache_path.is_file() else {}
    cache = {k: tuple(v) for k, v in old.items()}
    clips, failures = scan(cfg, cache)
    if not clips:
        raise ConfigError(f"no readable video in {cfg.videos}; check prepare.videos and extensions.")
    write_manifest(out / "manifest.csv", clips)
    failures.write(out / "failures.json")
    used = {f"{c.path}|{c.size}|" for c in clips}
    write_json_atomic(cache_path, {"probes": {k: v for k, v in cache.items()
                                              if k.rsplit("|", 1)[0] + "|" in used}})
    return clips
