"""Stage functions for `train@<head>` and `evaluate`, and the public training entry points.

    from models.heads import registry
    from models.training.stage import ExtraClips, ExtraRows, cross_validate_head, train_head
    cfg = registry.head_config({"type": "agt", "features": ["hubert", "clip", "minilm"]}, "x")
    result = cross_validate_head(cfg, train_cfg, inputs, labels, folds, test=None, extra=None)
    train_head(name, cfg, train_cfg, manifest, features_dir, out_dir, probe_dir, extra=None)

A head trains on the labelled clips that have every feature it uses (clips that failed upstream are
listed in its failures.json); its fold models also predict the unlabelled/test clips (mean of folds).
Predictions go to ``predictions.csv`` (models.training.bundles): one row per clip with its split, fold and
class probabilities.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from features.cache import lineage
from features.storage.dataset import FeatureSet
from features.errors import MerError
from features.media.manifest import read_manifest
from features.reliability.reports import FailureReport, read_json, write_json_atomic
from models.heads import registry
from models.training.bundles import (HISTORY, PREDICTIONS, labelled_probs, read_meta, save_bundle,
                            scored, write_predictions)
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics
from models.evaluation.plots import confusion_rows, plot_confusion


@dataclass
class ExtraClips:
    """Clips (e.g. pseudo-labelled unlabelled ones) that join the training part of folds and are
    never held out or scored; `folds` as in models.training.cv.ExtraRows (-1: every fold)."""

    ids: list[str]
    labels: list[str]  # class names
    folds: list[int] | None = None


def cross_validate_head(cfg: Any, train_cfg: Any, inputs: Mapping[str, Any], labels: np.ndarray,
                        folds: np.ndarray | None = None, test: Mapping[str, Any] | None = None,
                        extra: Any = None, on_epoch=None):
    """k-fold train any registered head type on in-memory inputs; a models.training.cv.CVResult.

    `inputs`: ``{encoder: [N, D]}`` pooled arrays (or per-fold ``[K, N, D]``) for a pooled head,
    ``{encoder: models.training.frame_trainer.Frames}`` for a frame-level one; `labels` class ids; `folds`
    each row's fold id (None: seeded stratified folds); `extra` a models.training.cv.ExtraRows.
    """
    trainer = registry.get(cfg.type).trainer_module()
    return trainer.cross_validate(inputs, labels, cfg, train_cfg, folds=folds, test=test,
                                  extra=extra, on_epoch=on_epoch)


def train_head(name: str, cfg: Any, train_cfg: Any, manifest: str | os.PathLike,
               features_dir: str | os.PathLike, out_dir: str | os.PathLike,
               probe_dir: str | os.PathLike = "artifacts/probe",
               extra: ExtraClips | None = None) -> Path:
    """k-fold train one head; write head.json, model.pt, predictions.csv, history.json and
    failures.json. `probe_dir` is read for `layer: best` and `layer: weighted`."""
    from models.training.cv import ExtraRows, given_splits
    from models.heads.layer_select import plan_head, read_inputs

    head = registry.get(cfg.type)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = read_manifest(manifest)
    with FeatureSet(features_dir) as features:
        kept = set(features.common_ids(cfg.features, [c.clip_id for c in clips]))
        failures = FailureReport(f"train@{name}")
        for c in clips:
            if c.clip_id not in kept:
                failures.add(c.clip_id, "missing_features", f"not in every store of "
                             f"{cfg.features}; see the upstream stages' failures.json.")
        labelled = [c for c in clips if c.clip_id in kept and c.label]
        unlabelled = [c for c in clips if c.clip_id in kept and not c.label]
        folds = np.array([c.fold for c in labelled])  # one split shared by every head
        splits = given_splits(folds, len(labelled))
        plans = plan_head(cfg, features, probe_dir, sorted(set(folds.tolist()))) \
            if head.inputs == "pooled" else {}
        ids = [c.clip_id for c in labelled + unlabelled]
        x, plans = read_inputs(head, cfg, features, ids, plans, [tr for tr, _ in splits])
        rows = _extra_rows(head, cfg, features, plans, extra)
    n = len(labelled)
    inputs = {k: _take(v, slice(0, n)) for k, v in x.items()}
    test = {k: _take(v, slice(n, None)) for k, v in x.items()} if unlabelled else None
    y = np.array([CLASSES.index(c.label) for c in labelled])
    result = cross_validate_head(cfg, train_cfg, inputs, y, folds, test,
                                 ExtraRows(*rows) if rows else None)
    save_bundle(out, cfg, _dims(x), head.trainer_module().bundle_state(result, cfg),
                {k: p.state() for k, p in plans.items()}, lineage.record(features_dir, cfg.features))
    write_predictions(out / PREDICTIONS, labelled, result.oof_probs, result.fold_of,
                      unlabelled, result.test_probs)
    write_json_atomic(out / HISTORY, {"train_loss": result.history})
    failures.write(out / "failures.json")
    return out


def _extra_rows(head, cfg, features: FeatureSet, plans, extra: ExtraClips | None):
    if extra is None or not extra.ids:
        return None
    from models.heads.layer_select import read_inputs

    common = set(features.common_ids(cfg.features, extra.ids))  # once: not once per clip
    missing = [c for c in extra.ids if c not in common]
    if missing:
        raise KeyError(f"extra clips {missing[:3]} are not in every store of {cfg.features}.")
    x, _ = read_inputs(head, cfg, features, extra.ids, plans)
    labels = np.array([CLASSES.index(label) for label in extra.labels])
    return x, labels, None if extra.folds is None else np.asarray(extra.folds)


def _take(v: Any, rows: slice) -> Any:
    """Rows of a pooled array ([N, D] or per-fold [K, N, D]) or of Frames."""
    if isinstance(v, np.ndarray):
        return v[..., rows, :]
    return v.take(np.arange(len(v))[rows])


def _dims(x: Mapping[str, Any]) -> dict[str, int]:
    return {k: int(v.shape[-1]) if isinstance(v, np.ndarray) else int(v.dim)
            for k, v in x.items()}


def evaluate(heads_dir: str | os.PathLike, main_head: str, out_dir: str | os.PathLike,
             ensembles_dir: str | os.PathLike | None = None) -> dict:
    """metrics.json over every trained head and ensemble (out-of-fold), confusion of one of them."""
    heads_dir, out = Path(heads_dir), Path(out_dir)
    metrics, confusion = {}, None
    found = scored(heads_dir, ensembles_dir)
    for head, path in found.items():
        y, probs = labelled_probs(path)
        m = compute_metrics(y, probs)
        metrics[head] = {k: m[k] for k in ("weighted_f1", "accuracy", "macro_f1", "per_class_f1")}
        metrics[head]["clips"] = len(y)
        metrics[head]["type"] = _kind(path.parent)
        if head == main_head:
            confusion = (m["confusion"], y, probs.argmax(1))
    if not metrics:
        raise FileNotFoundError(f"no trained head with {PREDICTIONS} under {heads_dir}; run train.")
    if confusion is None:
        raise KeyError(f"evaluate.main_head {main_head!r} was not trained; trained heads: "
                       f"{sorted(metrics)}. Fix evaluate.main_head in params.yaml.")
    ensembles = sorted(h for h, p in found.items() if p.parent.parent != heads_dir)
    write_json_atomic(out / "metrics.json", {"main_head": main_head, "heads": metrics,
                                             "ensembles": ensembles})
    write_json_atomic(out / "confusion.json", confusion_rows(confusion[1], confusion[2]))
    plot_confusion(confusion[0], out / "confusion.png",
                   f"{main_head}: out-of-fold confusion ({len(confusion[1])} clips)")
    return metrics


def _kind(folder: Path) -> str:
    """A head's registered type (head.json), or `ensemble:<method>` (ensemble.json)."""
    if (folder / "ensemble.json").is_file():
        return f"ensemble:{read_json(folder / 'ensemble.json').get('method', '?')}"
    try:
        return str(read_meta(folder)["type"])
    except MerError:  # an old or foreign folder still gets scored
        return "?"


def read_metrics(path: str | os.PathLike) -> dict:
    return read_json(path)


def log_training(head_dir: str | os.PathLike, live_dir: str | os.PathLike) -> Path:
    """dvclive files of one trained head (any type) from its history.json and predictions.csv.

    Step = epoch (boosting round for LightGBM): ``train_loss`` is the mean over folds, and
    ``fold<k>/train_loss`` each fold's; the summary holds the out-of-fold weighted F1 and
    accuracy. ``dvcyaml=False``: dvc.yaml declares the files (metrics.json, plots/metrics).
    """
    head_dir = Path(head_dir)
    history = read_json(head_dir / HISTORY).get("train_loss", []) \
        if (head_dir / HISTORY).is_file() else []
    y, probs = labelled_probs(head_dir / PREDICTIONS)
    m = compute_metrics(y, probs)
    with _live(live_dir) as live:
        for epoch in range(min((len(h) for h in history), default=0)):
            live.log_metric("train_loss", float(np.mean([h[epoch] for h in history])))
            for fold, h in enumerate(history):
                live.log_metric(f"fold{fold}/train_loss", float(h[epoch]))
            live.next_step()
        for key in ("weighted_f1", "accuracy", "macro_f1"):
            live.summary[key] = m[key]
        live.summary["clips"] = len(y)
    return Path(live_dir)


def _live(live_dir: str | os.PathLike):
    """dvclive.Live writing only files (dvc.yaml declares them; no experiment is saved).

    dvclive 3.x raises SCMError from `git rev-parse HEAD` in a git repo without commits (a fresh
    `git init`); the files do not need git, so retry without the repo lookup.
    """
    from unittest import mock

    from dvclive import Live
    from dvclive import live as live_module

    kwargs = dict(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    try:
        return Live(**kwargs)
    except Exception as err:  # noqa: BLE001 - only the empty-repo case is retried
        if type(err).__name__ != "SCMError":
            raise
        with mock.patch.object(live_module, "get_dvc_repo", lambda: None):
            return Live(**kwargs)
