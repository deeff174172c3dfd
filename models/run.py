"""Stage functions for `train@<head>` and `evaluate`: feature stores in, predictions and metrics out.

A head trains on the labelled clips that have every feature it uses (clips that failed upstream are
listed in its failures.json); its fold models also predict the unlabelled/test clips (mean of folds).
Predictions go to ``predictions.csv``: one row per clip with its split, fold and class probabilities.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.manifest import Clip, read_manifest
from features.reports import FailureReport, read_json, write_json_atomic
from features.store import StoreReader
from models.config import CLASSES, FRAME_HEAD_TYPES, GBDT_TYPES, HeadConfig, TrainConfig
from models.metrics import compute_metrics
from models.plots import confusion_rows, plot_confusion



@dataclass
class EvaluateConfig:
    """params.yaml `evaluate`."""
    main_head: str = "attention"  # the head whose confusion matrix is plotted


PREDICTIONS, BUNDLE, HISTORY = "predictions.csv", "model.pt", "history.json"
GBDT_BUNDLE = "model.lgbm.json"  # LightGBM heads (models.gbdt)


def load_pooled(features_dir: str | os.PathLike, names: list[str], clips: list[Clip],
                layers: dict[str, int] | None = None
                ) -> tuple[dict[str, np.ndarray], list[Clip], list[Clip]]:
    """Pooled arrays per encoder for the clips every store has; and the clips without.

    [N, D] for an encoder with an index in `layers` (one contiguous slice of the store: a
    head on one layer never reads the other 24), else [N, L, D].
    """
    layers = layers or {}
    stores = [StoreReader(Path(features_dir) / n, kind="embedding") for n in names]
    try:
        have = [c for c in clips if all(c.clip_id in s for s in stores)]
        lacking = [c for c in clips if not all(c.clip_id in s for s in stores)]
        ids = [c.clip_id for c in have]
        pooled = {n: s.pooled(layers.get(n), ids=ids).astype(np.float32)
                  for n, s in zip(names, stores)}
    finally:
        for s in stores:
            s.close()
    return pooled, have, lacking


def train_head(name: str, cfg: HeadConfig, train_cfg: TrainConfig, manifest: str | os.PathLike,
               features_dir: str | os.PathLike, out_dir: str | os.PathLike,
               probe_dir: str | os.PathLike = "artifacts/probe") -> Path:
    """k-fold train one head; write model.pt, predictions.csv, history.json and failures.json.

    `probe_dir` is read only for `layer: best` (each encoder's probe best.json).
    """
    # torch is imported here, not at module level: evaluate and ensembles import this module
    # and need none of it (each DVC stage is a fresh process; imports are its fixed cost).
    from models.probing import best_layer
    from models.train import cross_validate, head_inputs, save_bundle

    if cfg.type in FRAME_HEAD_TYPES:  # agt, joint_at: frame-level inputs (models/sequence.py)
        from models.sequence import train_frame_head
        return train_frame_head(name, cfg, train_cfg, manifest, features_dir, out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = ({n: best_layer(probe_dir, n) for n in cfg.features} if cfg.layer == "best" else
              {n: cfg.layer for n in cfg.features} if _is_index(cfg.layer) else {})
    pooled, clips, lacking = load_pooled(features_dir, cfg.features, read_manifest(manifest),
                                         layers)
    failures = FailureReport(f"train@{name}")
    for c in lacking:
        failures.add(c.clip_id, "missing_features", f"not in every store of {cfg.features}; "
                     f"see the upstream stages' failures.json.")
    inputs = pooled if layers else head_inputs(pooled, cfg)  # one layer read, or mean/last4
    lab = np.array([bool(c.label) for c in clips])
    y = np.array([CLASSES.index(c.label) for c in clips if c.label])
    test = {n: a[~lab] for n, a in inputs.items()} if (~lab).any() else None
    folds = np.array([c.fold for c in clips if c.label])  # one split shared by every head
    dims = {n: a.shape[1] for n, a in inputs.items()}
    if cfg.type in GBDT_TYPES:  # LightGBM (models/gbdt.py): same folds, same outputs
        from models.gbdt import cross_validate_gbdt, save_gbdt_bundle
        result, models = cross_validate_gbdt({n: a[lab] for n, a in inputs.items()}, y, cfg,
                                             folds, train_cfg.seed, test_features=test)
        save_gbdt_bundle(out / GBDT_BUNDLE, models, cfg, dims)
    else:
        result = cross_validate({n: a[lab] for n, a in inputs.items()}, y, cfg, train_cfg,
                                test_features=test, folds=folds)
        save_bundle(out / BUNDLE, result, cfg, dims)
    labelled = [c for c in clips if c.label]
    unlabelled = [c for c in clips if not c.label]
    _write_predictions(out / PREDICTIONS, labelled, result.oof_probs, result.fold_of,
                       unlabelled, result.test_probs)
    write_json_atomic(out / HISTORY, {"train_loss": result.history})
    failures.write(out / "failures.json")
    return out


def _is_index(layer) -> bool:
    return isinstance(layer, (int, np.integer)) and not isinstance(layer, bool)


def _write_predictions(path: Path, labelled: list[Clip], oof: np.ndarray, fold_of: np.ndarray,
                       unlabelled: list[Clip], test: np.ndarray | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "split", "label", "fold", "predicted", *CLASSES])
        rows = [(c, "labelled", int(f), p) for c, f, p in zip(labelled, fold_of, oof)]
        if test is not None:
            rows += [(c, "unlabelled", -1, p) for c, p in zip(unlabelled, test)]
        for clip, split, fold, probs in rows:
            w.writerow([clip.clip_id, split, clip.label, fold, CLASSES[int(np.argmax(probs))],
                        *(f"{p:.6f}" for p in probs)])
    os.replace(tmp, path)


def read_predictions(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _scored(*folders: str | os.PathLike | None) -> dict[str, Path]:
    """name -> predictions.csv of every trained head / ensemble under the given folders."""
    found: dict[str, Path] = {}
    for folder in (Path(f) for f in folders if f is not None):
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (sub / PREDICTIONS).is_file():
                if sub.name in found:
                    raise KeyError(f"{sub.name!r} names both a head and an ensemble; rename one "
                                   f"in params.yaml (train.heads / ensemble).")
                found[sub.name] = sub / PREDICTIONS
    return found


def evaluate(heads_dir: str | os.PathLike, main_head: str, out_dir: str | os.PathLike,
             ensembles_dir: str | os.PathLike | None = None) -> dict:
    """metrics.json over every trained head and ensemble (out-of-fold), confusion of one of them."""
    heads_dir, out = Path(heads_dir), Path(out_dir)
    metrics, confusion = {}, None
    scored = _scored(heads_dir, ensembles_dir)
    for head, path in scored.items():
        rows = [r for r in read_predictions(path) if r["split"] == "labelled"]
        y = np.array([CLASSES.index(r["label"]) for r in rows])
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        m = compute_metrics(y, probs)
        metrics[head] = {k: m[k] for k in ("weighted_f1", "accuracy", "macro_f1", "per_class_f1")}
        metrics[head]["clips"] = len(rows)
        if head == main_head:
            confusion = (m["confusion"], y, probs.argmax(1))
    if not metrics:
        raise FileNotFoundError(f"no trained head with {PREDICTIONS} under {heads_dir}; run train.")
    if confusion is None:
        raise KeyError(f"evaluate.main_head {main_head!r} was not trained; trained heads: "
                       f"{sorted(metrics)}. Fix evaluate.main_head in params.yaml.")
    ensembles = sorted(h for h, p in scored.items() if p.parent.parent != heads_dir)
    write_json_atomic(out / "metrics.json", {"main_head": main_head, "heads": metrics,
                                             "ensembles": ensembles})
    write_json_atomic(out / "confusion.json", confusion_rows(confusion[1], confusion[2]))
    plot_confusion(confusion[0], out / "confusion.png",
                   f"{main_head}: out-of-fold confusion ({len(confusion[1])} clips)")
    return metrics


def read_metrics(path: str | os.PathLike) -> dict:
    return read_json(path)


def log_training(head_dir: str | os.PathLike, live_dir: str | os.PathLike) -> Path:
    """dvclive files of one trained head (any type) from its history.json and predictions.csv.

    Step = epoch (boosting round for LightGBM): ``train_loss`` is the mean over folds, and
    ``fold<k>/train_loss`` each fold's; the summary holds the out-of-fold weighted F1 and
    accuracy. ``dvcyaml=False``: dvc.yaml declares the files (metrics.json, plots/metrics).
    """
    from dvclive import Live

    head_dir = Path(head_dir)
    history = read_json(head_dir / HISTORY).get("train_loss", []) \
        if (head_dir / HISTORY).is_file() else []
    rows = [r for r in read_predictions(head_dir / PREDICTIONS) if r["split"] == "labelled"]
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    m = compute_metrics(y, np.array([[float(r[c]) for c in CLASSES] for r in rows]))
    with _live(live_dir) as live:
        for epoch in range(min((len(h) for h in history), default=0)):
            live.log_metric("train_loss", float(np.mean([h[epoch] for h in history])))
            for fold, h in enumerate(history):
                live.log_metric(f"fold{fold}/train_loss", float(h[epoch]))
            live.next_step()
        for key in ("weighted_f1", "accuracy", "macro_f1"):
            live.summary[key] = m[key]
        live.summary["clips"] = len(rows)
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
