"""`mer predict VIDEO...`: new clips through the same stage functions, then the trained heads.

Each video gets the stages its head needs (audio, denoise, asr, faces, embed@<encoder>) with the
settings of params.yaml, into a work folder (default ``artifacts/predict``) that is a cache like
any store: predicting the same files again computes nothing. A video that cannot be read, or fails
in a stage, gets a per-file error and the others go on.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from features.asr import AsrConfig
from features.config import as_dict, from_section
from features.denoise import DenoiseConfig
from features.embed import embed_store
from features.encoders import EncoderConfig
from features.errors import ClipError, MerError
from features.extract import AudioConfig, crop_faces, denoise_audio, extract_audio, transcribe_audio
from features.faces import FacesConfig
from features.manifest import Clip, describe, write_manifest
from features.reports import read_json
from features.status import MEDIA_STAGES
from models.config import CLASSES
from models.run import BUNDLE, load_pooled
from models.train import head_inputs, load_bundle, select_layer

_STAGE_OF = {out: stage for stage, (out, _, _) in MEDIA_STAGES.items()}
_NEEDS = {"audio": [], "denoise": ["audio"], "asr": ["denoise"], "faces": []}


@dataclass
class Prediction:
    video: str
    clip_id: str = ""
    emotion: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""


def predict_videos(videos: list[str], params: Mapping, heads_dir: str | os.PathLike, head: str,
                   work_dir: str | os.PathLike = "artifacts/predict") -> list[Prediction]:
    """One Prediction per video, in order; stage progress goes to stderr."""
    work = Path(work_dir)
    predictor = load_head(Path(heads_dir) / head)
    preds, clips = _describe_all(videos)
    with contextlib.redirect_stdout(sys.stderr):
        failed = _run_stages(clips, predictor.cfg.features, params, work) if clips else {}
    ok = [c for c in clips if c.clip_id not in failed]
    for pred in preds:
        if pred.clip_id in failed:
            pred.error = failed[pred.clip_id]
    if ok:
        have, probs = predictor.predict(work / "features", ok)
        by_id = {c.clip_id: p for c, p in zip(have, probs)}
        for pred in preds:
            if pred.clip_id in by_id:
                p = by_id[pred.clip_id]
                pred.emotion = CLASSES[int(np.argmax(p))]
                pred.probabilities = {c: round(float(v), 4) for c, v in zip(CLASSES, p)}
            elif not pred.error and pred.clip_id:
                pred.error = "no features were produced; see the stage messages above"
    return preds


class HeadPredictor:
    """Any trained head folder (pooled, frame-level or LightGBM) behind one `predict`."""

    def __init__(self, head_dir: Path, probe_dir: str | os.PathLike = "artifacts/probe"):
        from models.run import GBDT_BUNDLE
        self.probe_dir = Path(probe_dir)
        if (head_dir / GBDT_BUNDLE).is_file():
            from models.gbdt import load_gbdt_bundle
            self.kind, self.model = "pooled", load_gbdt_bundle(head_dir / GBDT_BUNDLE)
        elif _bundle_format(head_dir / BUNDLE).startswith("mer-frame-bundle"):
            from models.sequence import load_frame_bundle
            self.kind, self.model = "frames", load_frame_bundle(head_dir / BUNDLE)
        else:
            self.kind, self.model = "pooled", load_bundle(head_dir / BUNDLE)
        self.cfg = self.model.cfg

    def predict(self, features_dir: Path, clips: list[Clip]) -> tuple[list[Clip], np.ndarray]:
        """The clips every needed store has, and their [N, C] probabilities."""
        pooled, have, _ = load_pooled(features_dir, self.cfg.features, clips)
        if not have:
            return [], np.zeros((0, len(CLASSES)), np.float32)
        if self.kind == "frames":
            from models.sequence import load_frames
            frames = load_frames(features_dir, self.cfg.features, [c.clip_id for c in have],
                                 self.cfg.frames_layer, self.cfg.max_frames)
            return have, self.model.predict_proba(frames)
        if self.cfg.layer == "best":  # chosen by the probe stage when the head was trained
            from models.probing import best_layer
            x = {n: select_layer(pooled[n], best_layer(self.probe_dir, n)) for n in self.cfg.features}
        else:
            x = head_inputs(pooled, self.cfg)
        return have, self.model.predict_proba(x)


def load_head(head_dir: str | os.PathLike) -> HeadPredictor:
    head_dir = Path(head_dir)
    if not head_dir.is_dir():
        raise MerError(f"no trained head at {head_dir}; run `dvc repro` first or pick one with "
                       f"--head (trained: {sorted(p.name for p in head_dir.parent.glob('*/'))}).")
    return HeadPredictor(head_dir)


def _bundle_format(path: Path) -> str:
    import torch
    try:
        return str(torch.load(path, map_location="cpu", weights_only=True).get("format", ""))
    except Exception:  # noqa: BLE001 - load_bundle below gives the clear error
        return ""


def _describe_all(videos: list[str]) -> tuple[list[Prediction], list[Clip]]:
    preds, clips, seen = [], [], set()
    for video in videos:
        path = Path(video)
        cid = path.stem
        while cid in seen:  # two files with one name in different folders
            cid += "_"
        pred = Prediction(video)
        preds.append(pred)
        if not path.is_file():
            pred.error = f"{video}: no such file"
            continue
        try:
            clips.append(describe(cid, path, "", "unlabelled"))
            pred.clip_id = cid
            seen.add(cid)
        except ClipError as err:
            pred.error = f"{video}: {err.detail}"
    return preds, clips


def _run_stages(clips: list[Clip], encoders: list[str], params: Mapping, work: Path) -> dict[str, str]:
    """Run what the encoders need; return clip id -> error for clips that failed somewhere."""
    manifest = work / "manifest.csv"
    write_manifest(manifest, clips)
    cfgs = {n: from_section(EncoderConfig, params["embed"]["encoders"][n], f"embed.encoders.{n}")
            for n in encoders}
    inputs = {n: _STAGE_OF.get(c.input.rstrip("/")) for n, c in cfgs.items()}
    stages = _with_upstream([s for s in inputs.values() if s])
    runs = {
        "audio": lambda: extract_audio(manifest, from_section(AudioConfig, params["audio"], "audio"),
                                       work / "audio"),
        "denoise": lambda: denoise_audio(work / "audio/audio",
                                         from_section(DenoiseConfig, params["denoise"], "denoise"),
                                         work / "denoise"),
        "asr": lambda: transcribe_audio(work / "denoise/denoised", _asr_config(params), work / "asr"),
        "faces": lambda: crop_faces(manifest, from_section(FacesConfig, params["faces"], "faces"),
                                    work / "faces"),
    }
    failed: dict[str, str] = {}
    for stage in stages:
        _guarded(runs[stage], stage, clips, failed, work / stage / "failures.json")
    for name, cfg in cfgs.items():
        src = work / MEDIA_STAGES[inputs[name]][0].split("/", 1)[1] if inputs[name] else cfg.input
        out = work / "features" / name
        _guarded(lambda: embed_store(name, cfg, src, out), f"embed@{name}", clips, failed,
                 out.parent / f"{name}.failures.json")
    return failed


def _with_upstream(stages: list[str]) -> list[str]:
    order = ["audio", "denoise", "asr", "faces"]
    need = set(stages)
    for s in stages:
        need.update(_NEEDS[s])
        if s == "asr":
            need.add("audio")
    return [s for s in order if s in need]


def _asr_config(params: Mapping) -> AsrConfig:
    cfg = from_section(AsrConfig, params["asr"], "asr")
    return AsrConfig(**{**as_dict(cfg), "transcripts_csv": ""})  # new clips are not in the CSV


def _guarded(run, stage: str, clips: list[Clip], failed: dict[str, str], report: Path) -> None:
    """Run a stage; its per-clip failures (or, if it stopped, every clip) become errors."""
    try:
        run()
    except MerError as err:
        for c in clips:
            failed.setdefault(c.clip_id, f"{stage}: {err}")
        return
    if report.is_file():
        for f in read_json(report)["failures"]:
            failed.setdefault(f["clip_id"], f"{stage}: {f['reason']}: {f['message']}")
