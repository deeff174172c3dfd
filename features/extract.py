"""Stage functions for the media stages: audio, denoise, asr and faces.

Each reads the manifest or an upstream store, runs one component per clip through
`for_each_clip`, and writes one store (or JSON) plus ``failures.json`` into its output folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.asr import AsrConfig, load_transcripts_csv, make_transcriber
from features.clips import for_each_clip
from features.config import as_dict
from features.denoise import DenoiseConfig, make_denoiser
from features.faces import FacesConfig, extract_faces
from features.manifest import read_manifest
from features.media import load_audio
from features.reports import FailureReport, write_json_atomic
from features.store import StoreReader, StoreWriter

AUDIO_FILE, DENOISED_FILE, FACES_FILE, TRANSCRIPTS_FILE = (
    "audio.h5", "denoised.h5", "faces.h5", "transcripts.json")


@dataclass
class AudioConfig:
    """params.yaml `audio`."""
    sample_rate: int = 16000  # Hz; every speech encoder here expects 16 kHz mono


def extract_audio(manifest: str | os.PathLike, cfg: AudioConfig, out_dir: str | os.PathLike) -> Path:
    """Decode every clip's audio to mono PCM at cfg.sample_rate into one HDF5 store."""
    clips = read_manifest(manifest)
    out, failures = Path(out_dir), FailureReport("audio")
    with StoreWriter(out / AUDIO_FILE, "audio", meta=as_dict(cfg)) as writer:
        def work(clip_id, clip):
            wav = load_audio(clip.path, clip_id, sr=cfg.sample_rate)
            writer.add(clip_id, wav.astype(np.float32), attrs={"sample_rate": cfg.sample_rate})
        for_each_clip(((c.clip_id, c) for c in clips), work, failures, "audio", total=len(clips))
    failures.write(out / "failures.json")
    return out / AUDIO_FILE


def iter_store(reader: StoreReader):
    """(clip_id, array) for every clip of a store, in store order."""
    return ((cid, reader.get(cid)) for cid in reader.ids)


def denoise_audio(audio_store: str | os.PathLike, cfg: DenoiseConfig,
                  out_dir: str | os.PathLike) -> Path:
    """Run the configured denoiser over every clip of an audio store."""
    denoiser = make_denoiser(cfg)
    out, failures = Path(out_dir), FailureReport("denoise")
    with StoreReader(audio_store, kind="audio") as src, \
            StoreWriter(out / DENOISED_FILE, "audio",
                        meta={**src.meta, "denoiser": denoiser.fingerprint()}) as writer:
        def work(clip_id, wav):
            clean = denoiser.process(wav)
            writer.add(clip_id, np.asarray(clean, dtype=np.float32),
                       attrs={"sample_rate": src.meta.get("sample_rate", 16000)})
        for_each_clip(iter_store(src), work, failures, f"denoise[{cfg.backend}]", total=len(src))
    failures.write(out / "failures.json")
    return out / DENOISED_FILE


def transcribe_audio(audio_store: str | os.PathLike, cfg: AsrConfig,
                     out_dir: str | os.PathLike) -> Path:
    """Transcripts for every clip: a user CSV entry wins, ASR fills in the rest."""
    given = load_transcripts_csv(cfg.transcripts_csv) if cfg.transcripts_csv else {}
    out, failures = Path(out_dir), FailureReport("asr")
    texts: dict[str, dict] = {}
    with StoreReader(audio_store, kind="audio") as src:
        todo = [cid for cid in src.ids if cid not in given]
        texts.update({cid: {"text": given[cid], "source": "csv"} for cid in src.ids if cid in given})
        transcriber = make_transcriber(cfg) if todo else None

        def work(clip_id, _):
            texts[clip_id] = {"text": transcriber.transcribe(src.get(clip_id), clip_id),
                              "source": cfg.backend}
        for_each_clip(((cid, None) for cid in todo), work, failures, f"asr[{cfg.backend}]",
                      total=len(todo))
    write_json_atomic(out / TRANSCRIPTS_FILE, {
        "asr": transcriber.fingerprint() if transcriber else None,
        "transcripts": texts})
    failures.write(out / "failures.json")
    return out / TRANSCRIPTS_FILE


def read_transcripts(path: str | os.PathLike) -> dict[str, str]:
    """clip id -> text from the asr stage's output."""
    from features.reports import read_json
    return {cid: t["text"] for cid, t in read_json(path)["transcripts"].items()}


def crop_faces(manifest: str | os.PathLike, cfg: FacesConfig, out_dir: str | os.PathLike) -> Path:
    """Sample frames, crop the largest face per frame, store uint8 crops per clip.

    Frames without a face get the documented fallback (see `features.faces`); clips where no frame
    had a face are listed under ``notes`` in failures.json with reason ``no_face``.
    """
    clips = read_manifest(manifest)
    out, failures = Path(out_dir), FailureReport("faces")
    with StoreWriter(out / FACES_FILE, "faces", meta=as_dict(cfg)) as writer:
        def work(clip_id, clip):
            faces = extract_faces(clip.path, clip_id, cfg)
            writer.add(clip_id, faces.crops, attrs={"times": faces.times,
                                                    "detected": faces.detected.astype(np.uint8)})
            if not faces.detected.any():
                failures.note(clip_id, "no_face", f"no face found in {len(faces.times)} sampled "
                              f"frames; stored the '{cfg.fallback}' fallback crops.")
        for_each_clip(((c.clip_id, c) for c in clips), work, failures, "faces", total=len(clips))
    failures.write(out / "failures.json")
    return out / FACES_FILE
