"""Stage functions of the media stages `audio` and `faces`: decode audio, crop faces.

Each reads the manifest, works out every clip's cache key (its content hash plus this stage's
fingerprint), computes only clips whose key has no stored result, and writes its store plus
``failures.json`` into its output folder. `denoise` and `asr` live in features/audio/stages.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.cache import versions
from features.media.faces import FacesConfig, extract_faces
from features.media.ffmpeg import DECODE_TIMEOUT_S, load_audio
from features.media.manifest import read_manifest
from features.params import as_dict
from features.reliability.clips import for_each_clip
from features.reliability.isolate import Isolated
from features.reliability.reports import FailureReport
from features.storage.store import StoreReader, StoreUpdate, clip_key

AUDIO_DIR, FACES_DIR = "audio", "faces"


@dataclass
class AudioConfig:
    """params.yaml `audio`."""
    sample_rate: int = 16000  # Hz; every speech encoder here expects 16 kHz mono


def open_update(out: Path, kind: str, meta: dict, wanted: dict[str, str], desc: str) -> StoreUpdate:
    up = StoreUpdate(out, kind, meta, wanted)
    print(f"[{desc}] {len(wanted)} clips: {up.reused} cached, {len(up.todo)} to compute")
    return up


def extract_audio(manifest: str | os.PathLike, cfg: AudioConfig, out_dir: str | os.PathLike) -> Path:
    """Decode every clip's audio to mono PCM at cfg.sample_rate into one store."""
    clips = {c.clip_id: c for c in read_manifest(manifest)}
    out, failures = Path(out_dir), FailureReport("audio")
    fp = {**as_dict(cfg), "code": versions.fingerprint("audio")}
    wanted = {cid: clip_key("audio", c.sha256, fp) for cid, c in clips.items()}
    with open_update(out / AUDIO_DIR, "audio", fp, wanted, "audio") as up:
        def work(clip_id, clip):
            wav = load_audio(clip.path, clip_id, sr=cfg.sample_rate, expected_s=clip.duration_s)
            up.add(clip_id, np.asarray(wav, dtype=np.float32), attrs={"sample_rate": cfg.sample_rate})
        for_each_clip(((cid, clips[cid]) for cid in up.todo), work, failures, "audio",
                      total=len(up.todo), checkpoint=up.checkpoint, reused=up.reused)
    failures.write(out / "failures.json")
    return out / AUDIO_DIR


def crop_faces(manifest: str | os.PathLike, cfg: FacesConfig, out_dir: str | os.PathLike) -> Path:
    """Sample frames, crop the largest face per frame, store uint8 crops per clip.

    Frames without a face get the documented fallback (see `features.media.faces`); clips where no frame
    had a face are listed under ``notes`` in failures.json with reason ``no_face``.
    """
    clips = {c.clip_id: c for c in read_manifest(manifest)}
    out, failures = Path(out_dir), FailureReport("faces")
    fp = {**as_dict(cfg), "code": versions.fingerprint("faces")}
    wanted = {cid: clip_key("faces", c.sha256, fp) for cid, c in clips.items()}
    with open_update(out / FACES_DIR, "faces", fp, wanted, "faces") as up, \
            Isolated(extract_faces, DECODE_TIMEOUT_S, "reading the frames of") as isolated:
        def work(clip_id, clip):  # in a child process: a decoder crash fails this clip only
            faces = isolated(clip_id, clip.path, clip_id, cfg)
            up.add(clip_id, faces.crops, attrs={"times": faces.times,
                                                "detected": faces.detected.astype(np.uint8)})
        for_each_clip(((cid, clips[cid]) for cid in up.todo), work, failures, "faces",
                      total=len(up.todo), checkpoint=up.checkpoint, reused=up.reused)
    with StoreReader(out / FACES_DIR, kind="faces") as store:  # notes cover cached clips too
        for cid in store.ids:
            if not np.any(store.attrs(cid)["detected"]):
                failures.note(cid, "no_face", f"no face found in any sampled frame; stored the "
                              f"'{cfg.fallback}' fallback crops.")
    failures.write(out / "failures.json")
    return out / FACES_DIR
