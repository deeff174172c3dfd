"""Confusion-matrix figure and rows for DVC's `confusion` plot template."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from models.training.train_config import CLASSES


def plot_confusion(confusion: Sequence[Sequence[int]], path_png: str | Path, title: str) -> Path:
    """PNG with counts in the cells and colours normalised per true class (row).

    Row normalisation keeps the small classes (surprise is ~4 %) readable next to the big ones.
    Built on a bare Agg canvas, so the process-wide pyplot backend is left alone.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of true class")
    for i, j in np.ndindex(counts.shape):
        ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                color="white" if share[i, j] > 0.5 else "black", fontsize=9)
    names = list(CLASSES)[: counts.shape[0]]
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def confusion_rows(y_true: Sequence[int], y_pred: Sequence[int]) -> list[dict[str, str]]:
    """One {"actual", "predicted"} record per clip, class names in CLASSES order."""
    return [{"actual": CLASSES[int(t)], "predicted": CLASSES[int(p)]}
            for t, p in zip(y_true, y_pred, strict=True)]


def plot_layer_curve(weighted_f1: Sequence[float], accuracy: Sequence[float],
                     layer_weights: Sequence[float] | None, path_png: str | Path, title: str,
                     featurizer_f1: float | None = None) -> Path:
    """Layer-versus-score curve of a probe per layer, the best layer marked; below it, the learnt
    softmax layer weights as bars (with the weighted probe's score as a dashed line above)."""
    layers = np.arange(len(weighted_f1))
    rows = 2 if layer_weights is not None else 1
    fig = _figure(7.2, 3.4 * rows)
    ax = fig.add_subplot(rows, 1, 1)
    ax.plot(layers, weighted_f1, marker="o", ms=3, label="weighted F1")
    ax.plot(layers, accuracy, marker=".", ms=3, alpha=0.6, label="accuracy")
    best = int(np.argmax(weighted_f1))
    ax.axvline(best, color="tab:red", ls=":", lw=1)
    ax.annotate(f"best layer {best}: {weighted_f1[best]:.3f}", (best, weighted_f1[best]),
                textcoords="offset points", xytext=(6, 6), fontsize=8, color="tab:red")
    if featurizer_f1 is not None:
        ax.axhline(featurizer_f1, color="tab:green", ls="--", lw=1,
                   label=f"learnt layer weighting: {featurizer_f1:.3f}")
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("out-of-fold score")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    if layer_weights is not None:
        bx = fig.add_subplot(rows, 1, 2, sharex=ax)
        bx.bar(layers, layer_weights, color="tab:green", alpha=0.7)
        bx.axhline(1 / len(layers), color="grey", ls=":", lw=1, label="uniform")
        bx.set_xlabel("layer")
        bx.set_ylabel("softmax weight (mean of folds)")
        bx.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _figure(width: float, height: float):
    """A figure on the Agg canvas; matplotlib is imported here, not at module import, because
    every train/evaluate stage imports this module and most never plot (0.4 s each)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig
