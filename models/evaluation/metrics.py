"""Evaluation of class probabilities against labels (weighted F1 is the MER main metric)."""
from __future__ import annotations

import numpy as np

from features.errors import ConfigError
from models.training.train_config import CLASSES

DIGITS = 4


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    """Weighted/macro F1, accuracy, per-class F1 and support, confusion (rows true, cols pred).

    Weighted and macro F1 follow sklearn's default label set (classes seen in labels or
    predictions), as MERTools reports them; per-class entries cover every class in CLASSES.
    Computed from the confusion counts with numpy (the same numbers as sklearn's `f1_score`,
    `accuracy_score`, `confusion_matrix` with zero_division=0; tests/models/evaluation/test_metrics.py checks it):
    importing sklearn.metrics costs every train and evaluate stage ~1.3 s of start-up.
    """
    y_true, y_pred = _checked(y_true, probs)
    conf = _confusion(y_true, y_pred)
    f1 = _f1_per_class(conf)
    support, seen = conf.sum(1), (conf.sum(1) + conf.sum(0)) > 0
    return {
        "weighted_f1": _r((f1 * support).sum() / support.sum()),
        "accuracy": _r(np.trace(conf) / len(y_true)),
        "macro_f1": _r(f1[seen].mean()),
        "per_class_f1": {c: _r(f) for c, f in zip(CLASSES, f1)},
        "support": {c: int(n) for c, n in zip(CLASSES, support)},
        "confusion": conf.astype(np.int64).tolist(),
    }


def _confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    k = len(CLASSES)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k).astype(np.float64)


def _f1_per_class(conf: np.ndarray) -> np.ndarray:
    """F1 per class, 0 where a class is neither true nor predicted (zero_division=0)."""
    tp, denom = np.diag(conf), conf.sum(1) + conf.sum(0)
    return np.divide(2 * tp, denom, out=np.zeros(len(tp)), where=denom > 0)


def fast_scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    """(weighted F1, accuracy) from a confusion count, the same numbers as `compute_metrics`
    (sklearn's default label set) without sklearn's per-call checks: probing scores many."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    conf = _confusion(y_true, y_pred)
    support = conf.sum(1)
    weighted = float((_f1_per_class(conf) * support).sum() / support.sum()) if support.sum() else 0.0
    return _r(weighted), _r(np.trace(conf) / max(len(y_true), 1))


def _checked(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(CLASSES)):
        raise ConfigError(
            f"probs must be [N, {len(CLASSES)}] for {len(y_true)} labels, got {probs.shape}."
        )
    if len(y_true) == 0:
        raise ConfigError("cannot compute metrics on zero labelled clips.")
    if y_true.min() < 0 or y_true.max() >= len(CLASSES):
        raise ConfigError(f"labels must be class ids 0..{len(CLASSES) - 1}, "
                          f"got {y_true.min()}..{y_true.max()}.")
    return y_true.astype(np.int64), probs.argmax(axis=1)


def _r(x: float) -> float:
    return round(float(x), DIGITS)
