"""Confusion-matrix figure and rows for DVC's `confusion` plot template."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.config import CLASSES


def plot_confusion(confusion: Sequence[Sequence[int]], path_png: str | Path, title: str) -> Path:
    """PNG with counts in the cells and colours normalised per true class (row).

    Row normalisation keeps the small classes (surprise is ~4 %) readable next to the big ones.
    Built on a bare Agg canvas, so the process-wide pyplot backend is left alone.
    """
    counts = np.asarray(confusion, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = Figure(figsize=(6.4, 5.6), dpi=120)
    FigureCanvasAgg(fig)
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
