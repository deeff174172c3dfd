"""`mer predict VIDEO...`: new clips through the same stage functions, then the trained heads.

Each video gets the stages its head needs (audio, denoise, asr, faces, embed@<encoder>) with the
settings of params.yaml, run in process by `features.runner` (the DVC stages' code), into a work
folder (default ``artifacts/predict``) that is a cache like any store: predicting the same files
again computes nothing. A video that cannot be read, or fails in a stage, gets a per-file error
and the others go on.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from features.cache import lineage
from features.errors import ClipError, MerError
from features.media.manifest import Clip, describe
from features.runner import run_stages
from features.storage.dataset import FeatureSet
from models.training.bundles import HeadPredictor, load_head, read_meta
from models.training.train_config import CLASSES

NEW_CLIPS_ASR = {"transcripts_csv": ""}  # new clips are not in the user's transcripts CSV


@dataclass
class Prediction:
    video: str
    clip_id: str = ""
    emotion: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str = ""


def predict_videos(videos: list[str], params: Mapping, heads_dir: str | os.PathLike, head: str,
                   work_dir: str | os.PathLike = "artifacts/predict", priors: str = "",
                   ensembles_dir: str | os.PathLike = "artifacts/ensembles") -> list[Prediction]:
    """One Prediction per video, in order; stage progress goes to stderr. `head` is a trained
    head or an ensemble (its member heads predict, combined as the ensemble stage did).
    `priors`: "em" or a priors file: prior-shift correction of the probabilities
    (models.unlabelled.priors.reweight)."""
    work = Path(work_dir)
    model = trained_model(Path(heads_dir), Path(ensembles_dir), head)
    derived = {n: d for n, d in derived_features(params, Path(heads_dir).parent).items()
               if n in model.features}
    bases = sorted({b for f in model.features for b in (derived[f].bases if f in derived else (f,))})
    preds, clips = _describe_all(videos)
    with contextlib.redirect_stdout(sys.stderr):
        failed = run_stages(clips, params, work, encoders=bases, keep_going=True,
                            overrides={"asr": NEW_CLIPS_ASR}).failed if clips else {}
        ok = [c for c in clips if c.clip_id not in failed]
        for name, d in derived.items() if ok else ():  # trained transforms: saved weights only
            d.apply(work / "features", [c.clip_id for c in ok], work / "features" / name)
    for pred in preds:
        if pred.clip_id in failed:
            pred.error = failed[pred.clip_id]
    if ok:
        have, probs = model.predict(work / "features", [c.clip_id for c in ok])
        if priors and have:
            from models.unlabelled.priors import reweight
            probs, info = reweight(probs, priors, model.folder / "predictions.csv")
            print(f"priors ({info['method']} over {len(have)} clips): {info['priors']}",
                  file=sys.stderr)
        by_id = dict(zip(have, probs))
        for pred in preds:
            if pred.clip_id in by_id:
                p = by_id[pred.clip_id]
                pred.emotion = CLASSES[int(np.argmax(p))]
                pred.probabilities = {c: round(float(v), 4) for c, v in zip(CLASSES, p)}
            elif not pred.error and pred.clip_id:
                pred.error = "no features were produced; see the stage messages above"
    return preds


def trained_head(head_dir: Path) -> HeadPredictor:
    """The trained head in `head_dir` (any registered type), or an error listing the trained."""
    if not head_dir.is_dir():
        raise MerError(f"no trained head at {head_dir}; run `dvc repro` first or pick one with "
                       f"--head (trained: {sorted(p.name for p in head_dir.parent.glob('*/'))}).")
    return load_head(head_dir)


@dataclass
class Derived:
    """A feature store a trained transform makes from encoder stores (adapt@, joint@, align)."""
    bases: tuple[str, ...]  # the encoder stores it reads
    apply: Callable[[Path, list[str], Path], object]  # (features dir, clip ids, out store)


def derived_features(params: Mapping, artifacts: Path) -> dict[str, Derived]:
    """Every derived store params.yaml trains, by name: new clips go through the saved weights
    (artifacts/adapt|joint/<name>/trained, artifacts/align/<name>) exactly as the stage's would."""
    from features.params import from_section
    from models.adapt import joint_stage, lora_stage
    from models.adapt.joint_llm import JointConfig
    from models.adapt.lora import AdaptConfig
    from models.unlabelled.align import AlignConfig, apply_saved_map

    out: dict[str, Derived] = {}
    for name, entry in (params.get("adapt") or {}).items():
        cfg = from_section(AdaptConfig, entry, f"adapt.{name}")
        out[name] = Derived((cfg.encoder,), functools.partial(
            lora_stage.apply_saved, name, cfg, artifacts / "adapt" / name / "trained"))
    for name, entry in (params.get("joint") or {}).items():
        cfg = from_section(JointConfig, entry, f"joint.{name}")
        out[name] = Derived((cfg.speech, cfg.llm), functools.partial(
            joint_stage.apply_saved, name, cfg, artifacts / "joint" / name / "trained"))
    if params.get("align"):
        cfg = from_section(AlignConfig, params["align"], "align")
        out[cfg.name] = Derived((cfg.source,), lambda fdir, ids, store: apply_saved_map(
            cfg, artifacts / "align" / cfg.name, fdir, ids, store))
    return out


@dataclass
class TrainedModel:
    """A head, or an ensemble of heads, ready to predict clips of a features folder."""
    name: str
    folder: Path  # holds its predictions.csv (the source priors of `--priors`)
    heads: dict[str, HeadPredictor]  # member name -> predictor (one entry for a head)
    head_dirs: dict[str, Path]
    ensemble: dict | None = None  # ensemble.json of an ensemble

    @property
    def features(self) -> list[str]:
        return sorted({f for p in self.heads.values() for f in p.cfg.features})

    def predict(self, features_dir: Path, ids: list[str]) -> tuple[list[str], np.ndarray]:
        """(clips every member has features for, their probabilities [N, C])."""
        for name, predictor in self.heads.items():  # features computed as the head's were
            lineage.check(read_meta(self.head_dirs[name]).get("lineage"), features_dir,
                          predictor.cfg.features, f"head {name!r}")
        with FeatureSet(features_dir) as feats:
            have = feats.common_ids(self.features, ids)
            if not have:
                return [], np.zeros((0, len(CLASSES)))
            probs = np.stack([np.asarray(p.predict(feats, have)) for p in self.heads.values()])
        if self.ensemble is None:
            return have, probs[0]
        from models.ensemble import predict_new
        return have, predict_new(self.ensemble, probs)


def trained_model(heads_dir: Path, ensembles_dir: Path, name: str) -> TrainedModel:
    """The trained head `name`, or the ensemble `name` with its member heads."""
    ens = ensembles_dir / name
    if not (heads_dir / name).is_dir() and (ens / "ensemble.json").is_file():
        from features.reliability.reports import read_json
        info = read_json(ens / "ensemble.json")
        dirs = {h: heads_dir / h for h in info["heads"]}
        return TrainedModel(name, ens, {h: trained_head(d) for h, d in dirs.items()}, dirs, info)
    if not (heads_dir / name).is_dir():
        trained = sorted(p.name for p in heads_dir.glob("*/")) + sorted(
            p.parent.name for p in ensembles_dir.glob("*/ensemble.json"))
        raise MerError(f"no trained head or ensemble {name!r}; run `dvc repro` first or pick one "
                       f"with --head (trained: {trained}).")
    return TrainedModel(name, heads_dir / name, {name: trained_head(heads_dir / name)},
                        {name: heads_dir / name})


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
