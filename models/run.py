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
from models.config import CLASSES, HeadConfig, TrainConfig
from models.metrics import compute_metrics
from models.plots import confusion_rows, plot_confusion
from models.train import cross_validate, head_inputs, save_bundle



@dataclass
class EvaluateConfig:
    """params.yaml `evaluate`."""
    main_head: str = "attention"  # the head whose confusion matrix is plotted


PREDICTIONS, BUNDLE, HISTORY = "predictions.csv", "model.pt", "history.json"


def load_pooled(features_dir: str | os.PathLike, names: list[str],
                clips: list[Clip]) -> tuple[dict[str, np.ndarray], list[Clip], list[Clip]]:
    """[N, L, D] pooled arrays per encoder for the clips every store has; and the clips without."""
    stores = [StoreReader(Path(features_dir) / n, kind="embedding") for n in names]
    try:
        have = [c for c in clips if all(c.clip_id in s for s in stores)]
        lacking = [c for c in clips if not all(c.clip_id in s for s in stores)]
        ids = [c.clip_id for c in have]
        pooled = {n: s.pooled(ids=ids).astype(np.float32) for n, s in zip(names, stores)}
    finally:
        for s in stores:
            s.close()
    return pooled, have, lacking


def train_head(name: str, cfg: HeadConfig, train_cfg: TrainConfig, manifest: str | os.PathLike,
               features_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """k-fold train one head; write model.pt, predictions.csv, history.json and failures.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pooled, clips, lacking = load_pooled(features_dir, cfg.features, read_manifest(manifest))
    failures = FailureReport(f"train@{name}")
    for c in lacking:
        failures.add(c.clip_id, "missing_features", f"not in every store of {cfg.features}; "
                     f"see the upstream stages' failures.json.")
    inputs = head_inputs(pooled, cfg)
    lab = np.array([bool(c.label) for c in clips])
    y = np.array([CLASSES.index(c.label) for c in clips if c.label])
    test = {n: a[~lab] for n, a in inputs.items()} if (~lab).any() else None
    folds = np.array([c.fold for c in clips if c.label])  # one split shared by every head
    result = cross_validate({n: a[lab] for n, a in inputs.items()}, y, cfg, train_cfg,
                            test_features=test, folds=folds)
    save_bundle(out / BUNDLE, result, cfg, {n: a.shape[1] for n, a in inputs.items()})
    labelled = [c for c in clips if c.label]
    unlabelled = [c for c in clips if not c.label]
    _write_predictions(out / PREDICTIONS, labelled, result.oof_probs, result.fold_of,
                       unlabelled, result.test_probs)
    write_json_atomic(out / HISTORY, {"train_loss": result.history})
    failures.write(out / "failures.json")
    return out


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


def evaluate(heads_dir: str | os.PathLike, main_head: str, out_dir: str | os.PathLike) -> dict:
    """metrics.json over every trained head (out-of-fold), confusion plot data + PNG of one head."""
    heads_dir, out = Path(heads_dir), Path(out_dir)
    metrics, confusion = {}, None
    for head in sorted(p.name for p in heads_dir.iterdir() if (p / PREDICTIONS).is_file()):
        rows = [r for r in read_predictions(heads_dir / head / PREDICTIONS) if r["split"] == "labelled"]
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
    write_json_atomic(out / "metrics.json", {"main_head": main_head, "heads": metrics})
    write_json_atomic(out / "confusion.json", confusion_rows(confusion[1], confusion[2]))
    plot_confusion(confusion[0], out / "confusion.png",
                   f"{main_head}: out-of-fold confusion ({len(confusion[1])} clips)")
    return metrics


def read_metrics(path: str | os.PathLike) -> dict:
    return read_json(path)
