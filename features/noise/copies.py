"""Noisy copies of clips as new clips: real mp4 files (degraded video + noisy audio) and a manifest.

A copy of clip ``c`` under condition ``k`` is the clip ``c__k``, with the label and fold of ``c``
(its lineage is in ``lineage.csv``), so every per-clip stage caches it like any other clip. A copy
is rebuilt only when its recipe key (source hash, condition settings, seed, noise sources, code
version) changes; `copies.json` remembers keys and file hashes between runs.
"""
from __future__ import annotations

import csv
import os
import subprocess
import tempfile
import threading
import wave
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from features.cache import versions
from features.reliability.clips import for_each_clip
from features.params import as_dict, from_section
from features.errors import ClipError, ConfigError
from features.media.manifest import Clip, read_manifest, write_manifest
from features.media.ffmpeg import DECODE_TIMEOUT_S, ffmpeg_exe, load_audio, probe, sha256_file
from features.noise.mixing import (ConditionConfig, Recipe, babble, clip_rng, draw, fit_noise, mix_at_snr,
                            noise_files, pink_noise, white_noise)
from features.reliability.reports import FailureReport, read_json, write_json_atomic
from features.storage.store import clip_key

SR = 16000  # copies carry 16 kHz mono audio: what every audio stage decodes to
COPIES, MANIFEST, LINEAGE, VIDEOS = "copies.json", "manifest.csv", "lineage.csv", "videos"


@dataclass
class NoiseConfig:
    """params.yaml `noise`."""
    seed: int = 0
    clips: int = 24                   # labelled clips per condition (balanced over classes); 0 = all
    denoise: list[str] = field(default_factory=lambda: ["none", "deepfilternet"])  # backends scored
    enhance: bool = True              # also score ASR enhancement (best of raw/denoised hypotheses)
    heads: list[str] = field(default_factory=list)   # trained heads scored under noise
    reference: str = ""               # CSV name,text of what each clip says: WER per variant
    conditions: dict = field(default_factory=dict)   # name -> ConditionConfig mapping


def condition_config(cfg: NoiseConfig, name: str) -> ConditionConfig:
    if name not in cfg.conditions:
        raise ConfigError(f"noise.conditions has no {name!r}; known: {sorted(cfg.conditions)}.")
    return from_section(ConditionConfig, cfg.conditions[name], f"noise.conditions.{name}")


def copy_id(clip_id: str, condition: str) -> str:
    return f"{clip_id}__{condition}"


def choose_clips(clips: list[Clip], n: int) -> list[Clip]:
    """n labelled clips spread over the classes (round robin, by id): a fixed, balanced subset."""
    by_class: dict[str, list[Clip]] = {}
    for c in sorted((c for c in clips if c.label), key=lambda c: c.clip_id):
        by_class.setdefault(c.label, []).append(c)
    order = [c for group in zip(*_padded(by_class.values())) for c in group if c is not None]
    return sorted(order[:n] if n else order, key=lambda c: c.clip_id)


def _padded(groups) -> list[list]:
    groups = list(groups)
    width = max((len(g) for g in groups), default=0)
    return [g + [None] * (width - len(g)) for g in groups]


def babble_sources(clip_id: str, pool: list[Clip], talkers: int, seed: int, condition: str) -> list[Clip]:
    """The `talkers` other clips ranked first by a per-pair hash (rendezvous hashing): adding
    clips to the corpus changes a copy's talkers only when a new clip outranks them."""
    rank = lambda c: zlib.crc32(f"{seed}|{condition}|{clip_id}|{c.clip_id}".encode())  # noqa: E731
    return sorted((c for c in pool if c.clip_id != clip_id), key=rank)[:talkers]


class NoiseSource:
    """The noise for one clip of one condition, and what it depends on (for the recipe key)."""

    def __init__(self, cond: ConditionConfig, pool: list[Clip], seed: int, condition: str):
        self.cond, self.pool, self.seed, self.condition = cond, pool, seed, condition
        self.files = noise_files(cond.noise_dir) if cond.noise == "folder" else []
        self.files_id = [(str(p), p.stat().st_size) for p in self.files]

    def depends_on(self, clip: Clip) -> object:
        if self.cond.noise == "folder":
            return self.files_id
        if self.cond.noise == "babble":
            return [c.sha256 for c in babble_sources(clip.clip_id, self.pool, self.cond.talkers,
                                                     self.seed, self.condition)]
        return None

    def make(self, clip: Clip, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        kind = self.cond.noise
        if kind == "white":
            return white_noise(n, rng), []
        if kind == "pink":
            return pink_noise(n, rng), []
        if kind == "babble":
            others = babble_sources(clip.clip_id, self.pool, self.cond.talkers, self.seed, self.condition)
            if not others:
                raise ClipError(clip.clip_id, "no_babble", "babble needs other clips with audio; the "
                                "corpus has none besides this one.")
            return babble([load_audio(c.path, c.clip_id, SR) for c in others], n, rng), \
                [c.clip_id for c in others]
        return self._from_files(clip, n, rng)

    def _from_files(self, clip: Clip, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
        """MERTools: random recordings concatenated until longer than the clip, a random window."""
        parts, used, total = [], [], 0
        while total <= n and len(used) < 1000:
            path = self.files[int(rng.integers(len(self.files)))]
            try:
                wav = load_audio(path, path.stem, SR)
            except ClipError as err:
                raise ClipError(clip.clip_id, "bad_noise_file", f"noise file {path} cannot be used "
                                f"({err.detail}); remove it from {self.cond.noise_dir}.") from err
            parts.append(wav)
            used.append(str(path))
            total += len(wav)
        return fit_noise(parts, n, rng), used


def make_copies(manifest: str | os.PathLike, name: str, cfg: NoiseConfig,
                out_dir: str | os.PathLike) -> Path:
    """Write the noisy copies of condition `name` and their manifest; returns the manifest path."""
    cond = condition_config(cfg, name)
    clips = read_manifest(manifest)
    chosen = choose_clips(clips, cfg.clips)
    if not chosen:
        raise ConfigError(f"noise@{name}: the manifest {manifest} has no labelled clips to copy.")
    out, failures = Path(out_dir), FailureReport(f"noise@{name}")
    source = NoiseSource(cond, clips, cfg.seed, name)
    old = read_json(out / COPIES)["copies"] if (out / COPIES).is_file() else {}
    keys = {c.clip_id: clip_key("noise", c.sha256, as_dict(cond), cfg.seed, source.depends_on(c),
                                versions.fingerprint("noisy_copies")) for c in chosen}
    done = {cid: old[copy_id(cid, name)] for cid, key in keys.items()
            if old.get(copy_id(cid, name), {}).get("key") == key
            and Path(old[copy_id(cid, name)]["path"]).is_file()}
    todo = [c for c in chosen if c.clip_id not in done]
    print(f"[noise@{name}] {len(chosen)} copies: {len(done)} cached, {len(todo)} to make")

    def work(clip_id: str, clip: Clip) -> None:
        recipe, path = render_copy(clip, name, cond, cfg.seed, source, out / VIDEOS)
        sha = clip.sha256 if path == Path(clip.path) else sha256_file(path)
        done[clip_id] = {"key": keys[clip_id], "path": str(path), "sha256": sha,
                         "size": path.stat().st_size, "recipe": asdict(recipe)}
    save = lambda: write_json_atomic(out / COPIES, {"copies": {copy_id(c, name): v for c, v in done.items()}})  # noqa: E731
    for_each_clip(((c.clip_id, c) for c in todo), work, failures, f"noise@{name}", total=len(todo),
                  checkpoint=save, reused=len(done))
    save()
    _drop_stale(out / VIDEOS, {Path(v["path"]).name for v in done.values()})
    failures.write(out / "failures.json")
    return _write_manifests(out, name, chosen, done)


def render_copy(clip: Clip, name: str, cond: ConditionConfig, seed: int, source: NoiseSource,
                folder: Path) -> tuple[Recipe, Path]:
    """One copy: noisy 16 kHz audio and degraded frames muxed into `folder/<copy id>.mp4`.
    Noise `none` (the clean reference condition) is the original file itself."""
    if cond.noise == "none":
        return Recipe(snr_db=float("inf"), blur=1, noise="none"), Path(clip.path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{copy_id(clip.clip_id, name)}.mp4"
    rng = clip_rng(seed, name, clip.clip_id)
    snr, blur = float(draw(rng, cond.snr_db)), int(draw(rng, cond.blur))
    speech = load_audio(clip.path, clip.clip_id, SR)  # ClipError no_audio: recorded, never fatal
    noise, used = source.make(clip, len(speech), rng)
    mix = mix_at_snr(speech, noise, snr, clip.clip_id)
    write_video(clip, mix, path, lambda f: _degrade(f, blur, cond))
    return Recipe(snr_db=snr, blur=blur, noise=cond.noise, sources=used), path


def _degrade(frame: np.ndarray, blur: int, cond: ConditionConfig) -> np.ndarray:
    from features.noise.mixing import degrade_frame

    return degrade_frame(frame, blur, cond.downscale, cond.jpeg_quality)


def write_video(clip: Clip, audio: np.ndarray, path: Path, degrade) -> None:
    """Frames of `clip` through `degrade`, with `audio` (16 kHz mono), as MPEG-4/AAC mp4 (ffmpeg's
    native encoders, in every build; quality 2 so the codec adds little to the degradation).
    Written to a temporary name and renamed, so a killed run never leaves half a file; ffmpeg is
    stopped after MER_DECODE_TIMEOUT_S (the clip then fails with reason `timeout`)."""
    info = probe(clip.path, clip.clip_id)
    tmp = path.with_name(path.stem + ".tmp.mp4")
    with tempfile.TemporaryDirectory() as td:
        wav = Path(td) / "a.wav"
        _write_wav(wav, audio)
        cmd = [ffmpeg_exe(), "-y", "-v", "error"]
        if info.has_video:
            w, h, fps = info.width, info.height, info.fps or 25.0
            cmd += ["-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0"]
        cmd += ["-i", str(wav)]
        if info.has_video:
            cmd += ["-map", "0:v", "-map", "1:a", "-c:v", "mpeg4", "-q:v", "2",
                    "-pix_fmt", "yuv420p", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-threads", "1"]
        cmd += ["-c:a", "aac", "-b:a", "128k", str(tmp)]
        with tempfile.TemporaryFile() as errors:  # a file, not a pipe: stderr can never block ffmpeg
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if info.has_video else None, stderr=errors)
            timed_out = threading.Event()
            killer = threading.Timer(DECODE_TIMEOUT_S, lambda: (timed_out.set(), proc.kill()))
            killer.start()
            try:
                if info.has_video:
                    _pipe_frames(clip, proc, degrade)
                code = proc.wait()
            finally:
                killer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            errors.seek(0)
            err = errors.read().decode("utf-8", "replace").strip()
        if timed_out.is_set() or code != 0:
            tmp.unlink(missing_ok=True)
            why = f"took over {DECODE_TIMEOUT_S:g} s and was stopped (MER_DECODE_TIMEOUT_S)" \
                if timed_out.is_set() else (err.splitlines()[-1] if err else "unknown error")
            raise ClipError(clip.clip_id, "timeout" if timed_out.is_set() else "copy_failed",
                            f"ffmpeg could not write the noisy copy: {why}")
    os.replace(tmp, path)


def _pipe_frames(clip: Clip, proc: subprocess.Popen, degrade) -> None:
    """Each decoded frame, degraded, into ffmpeg's stdin; an ffmpeg that died (or was stopped)
    ends the loop and its exit code tells why."""
    import cv2

    cap = cv2.VideoCapture(str(clip.path))
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            proc.stdin.write(np.ascontiguousarray(degrade(frame)).tobytes())
    except (BrokenPipeError, ValueError):
        pass
    finally:
        cap.release()
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass


def _write_wav(path: Path, audio: np.ndarray) -> None:
    pcm = np.clip(np.round(np.asarray(audio, np.float64) * 32768), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(SR)
        fh.writeframes(pcm.tobytes())


def _drop_stale(folder: Path, keep: set[str]) -> None:
    for p in folder.glob("*.mp4") if folder.is_dir() else []:
        if p.name not in keep:
            p.unlink()


def _write_manifests(out: Path, name: str, chosen: list[Clip], done: dict) -> Path:
    rows, lineage = [], []
    for c in chosen:
        if c.clip_id not in done:
            continue
        entry = done[c.clip_id]
        cid = copy_id(c.clip_id, name)
        rows.append(Clip(clip_id=cid, path=entry["path"], size=entry["size"],
                         sha256=entry["sha256"], duration_s=c.duration_s, label=c.label, fold=c.fold,
                         split=c.split))
        r = entry["recipe"]
        lineage.append({"clip_id": cid, "source_id": c.clip_id, "condition": name, "noise": r["noise"],
                        "snr_db": r["snr_db"], "blur": r["blur"], "noise_sources": ";".join(r["sources"])})
    write_manifest(out / MANIFEST, rows)
    with open(out / LINEAGE, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["clip_id", "source_id", "condition", "noise", "snr_db",
                                                "blur", "noise_sources"])
        writer.writeheader()
        writer.writerows(lineage)
    return out / MANIFEST


def read_lineage(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
