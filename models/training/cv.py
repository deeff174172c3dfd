"""What every trainer shares: folds, extra training rows, class weights, results, run settings.

The folds are the manifest's (one split shared by every head) or, through the API, seeded
stratified folds. `ExtraRows` (e.g. pseudo-labelled clips) join the training part of folds and
are never held out, so the out-of-fold scores stay on human labels only.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

from features.errors import ConfigError
from models.training.train_config import CLASSES

EPS_STD = 1e-6  # constant features get std 1 instead of a division by ~0
EpochCallback = Callable[[int, int, float], None]  # (fold, epoch, mean train loss)
Splits = list[tuple[np.ndarray, np.ndarray]]  # (train rows, held-out rows) per fold


@dataclass
class ExtraRows:
    """Labelled rows that only ever train: added to the training part of folds, never held out.

    `inputs` has the layout of the labelled inputs (pooled ``{encoder: [M, D]}``, per-fold
    ``[K, M, D]`` for `layer: weighted`, or ``{encoder: Frames}``); `labels` are class ids.
    `folds` [M]: -1 = every fold's training part; a fold id = only that fold's (e.g. pseudo-labels
    made by the model of that fold, which never saw the fold's held-out clips). None = all -1.
    """

    inputs: Mapping[str, Any]
    labels: np.ndarray
    folds: np.ndarray | None = None

    def fold_ids(self) -> np.ndarray:
        m = len(self.labels)
        folds = np.full(m, -1) if self.folds is None else np.asarray(self.folds)
        if folds.shape != (m,) or (folds < -1).any():
            raise ConfigError(f"extra rows: folds must give -1 or a fold id for each of the {m} "
                              f"rows, got shape {folds.shape}.")
        return folds.astype(np.int64)


@dataclass
class FoldState:
    """What one fold's model needs at inference: weights (members=1) and the train-part scaler."""

    state_dict: dict[str, Tensor]
    scaler: dict[str, dict[str, Tensor]]  # name -> {"mean": [D], "std": [D]}


@dataclass
class CVResult:
    oof_probs: np.ndarray  # [N, C] held-out probabilities, each clip from the fold that held it out
    fold_of: np.ndarray  # [N] fold index that held each clip out
    test_probs: np.ndarray | None  # [M, C] mean over fold models, when test inputs were given
    history: list[list[float]]  # per fold: mean train loss per epoch (boosting round)
    fold_states: list[Any] = field(default_factory=list)  # what trainer.bundle_state stores

    @property
    def n_folds(self) -> int:
        return len(self.fold_states)


def splits_for(labels: np.ndarray, folds: np.ndarray | None, n_folds: int, seed: int) -> Splits:
    """The manifest's folds when given, else seeded stratified ones."""
    return given_splits(folds, len(labels)) if folds is not None \
        else fold_splits(labels, n_folds, seed)


def given_splits(folds: np.ndarray, n: int) -> Splits:
    """(train, held-out) index pairs from per-row fold ids (sorted ids: member k = k-th id)."""
    folds = np.asarray(folds)
    if folds.shape != (n,) or (folds < 0).any():
        raise ConfigError(f"folds must give a fold id >= 0 for each of the {n} labelled rows, "
                          f"got shape {folds.shape}; rerun `prepare` to refresh the manifest.")
    ids = np.unique(folds)
    if len(ids) < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, the manifest has {len(ids)}.")
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in ids]


def fold_splits(labels: np.ndarray, folds: int, seed: int) -> Splits:
    """Stratified shuffled splits; fewer folds (with a warning) when a class is too small."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min())
    if smallest < folds:
        used = max(2, smallest)
        warnings.warn(
            f"the smallest class has {smallest} clip(s), fewer than folds={folds}; using "
            f"{used} folds instead. Label more clips of that class or lower train.folds.",
            stacklevel=3,
        )
        folds = used
    if len(labels) < folds:
        raise ConfigError(f"{len(labels)} labelled clips cannot be split into {folds} folds.")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(labels)), labels))


def fold_ids(splits: Splits, folds: np.ndarray | None) -> list[int]:
    """The fold id of each split (the manifest's ids, or 0..K-1 for drawn folds)."""
    if folds is None:
        return list(range(len(splits)))
    return [int(np.asarray(folds)[held[0]]) for _, held in splits]


def training_parts(splits: Splits, ids: list[int], n: int, extra: ExtraRows | None
                   ) -> list[np.ndarray]:
    """Each fold's training rows: its labelled train part, then the extra rows it may use
    (extra row i is row n + i of the concatenated inputs)."""
    if extra is None:
        return [tr for tr, _ in splits]
    ef = extra.fold_ids()
    unknown = sorted(set(ef[ef >= 0].tolist()) - set(ids))
    if unknown:
        raise ConfigError(f"extra rows name folds {unknown}; the folds are {ids}.")
    return [np.concatenate([tr, n + np.flatnonzero((ef == -1) | (ef == k))])
            for (tr, _), k in zip(splits, ids)]


def held_out_index(splits: Splits, n: int) -> np.ndarray:
    """[N] the member (0..K-1) that holds each labelled row out."""
    fold_of = np.empty(n, dtype=np.int64)
    for k, (_, held) in enumerate(splits):
        fold_of[held] = k
    return fold_of


def class_weights(y: np.ndarray, n_classes: int = len(CLASSES)) -> Tensor:
    """[n_classes] weights n / (present * count): scikit-learn's "balanced" weighting, the one
    definition for every trainer (neural heads, ridge probes, LightGBM, LoRA adaptation).

    Chosen because `present` counts only the classes that occur in `y`, so the weights average
    1 over the training rows whatever classes a fold lacks; dividing by all C classes would
    shrink them when one is missing, which matters where weights act unnormalised (LightGBM
    sample weights, the ridge probes' penalty balance). A mean-reduced weighted cross entropy
    (the neural heads, LoRA) divides by the weights' sum, so a common factor cancels there. An
    absent class gets weight 0: it has no rows. With every class present this is n / (C * count).
    """
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = len(y) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def fold_class_weights(y: np.ndarray, parts: list[np.ndarray], balanced: bool) -> Tensor:
    """[K, C] class weights of each fold's training part (ones when not balanced)."""
    return torch.stack([class_weights(y[tr]) if balanced else torch.ones(len(CLASSES))
                        for tr in parts])


def as_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integers of shape ({n},), got {y.dtype} {y.shape}.")
    if n and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise ConfigError(
            f"labels must be class ids 0..{len(CLASSES) - 1} ({', '.join(CLASSES)}), "
            f"got range {y.min()}..{y.max()}."
        )
    return y.astype(np.int64)


def epoch_order(parts: list[np.ndarray], n: int, gen: torch.Generator) -> Tensor:
    """[K, n] row indices: each fold's train part shuffled, smaller parts topped up to n.

    Stratified train parts differ by a few clips; a smaller one repeats that many randomly
    drawn clips so that all folds take the same steps.
    """
    rows = []
    for tr in parts:
        tr = torch.from_numpy(tr)
        extra = torch.randperm(len(tr), generator=gen)[: n - len(tr)]
        rows.append(tr[torch.cat([torch.randperm(len(tr), generator=gen), extra])])
    return torch.stack(rows)


def own_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Seed freely inside; the caller's torch RNG state is restored on exit."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def run_settings(threads: int, device: torch.device) -> Iterator[None]:
    """Deterministic kernels, a fixed CPU thread count, subnormals flushed; restored afterwards."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    fill = torch.utils.deterministic
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
           fill.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill.fill_uninitialized_memory = False  # a NaN fill of every new tensor costs time, no safety
    if threads:
        torch.set_num_threads(threads)
    _flush_subnormals(True)
    try:
        yield
    finally:
        _flush_subnormals(False)
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.set_num_threads(old[2])
        fill.fill_uninitialized_memory = old[3]


def _flush_subnormals(on: bool) -> None:
    """Flush-to-zero on the calling thread and on every thread of torch's OpenMP pool.

    When the attention softmax all but ignores a modality, the gradients into that modality's
    encoder fall to ~1e-40 (subnormal floats), and x86 matrix products on subnormals ran ~100x
    slower: a whole cross-validation several times slower. The FTZ/DAZ flags are per thread and
    torch.set_flush_denormal sets only the calling one, so it is also run once on each OpenMP
    worker through libgomp's entry point. Without libgomp only the calling thread is set.
    """
    torch.set_flush_denormal(on)
    gomp = _openmp_runtime()
    if gomp is None or torch.get_num_threads() < 2:
        return
    each = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: torch.set_flush_denormal(on))
    gomp.GOMP_parallel(each, None, ctypes.c_uint(torch.get_num_threads()), ctypes.c_uint(0))


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """torch's OpenMP runtime (Linux), else None.

    Other wheels ship their own copies (scikit-learn has one), so the one inside torch's folder
    comes first; then the plain sonames, which dlopen resolves to the copy already loaded.
    """
    torch_dir = os.path.dirname(torch.__file__)
    try:
        with open("/proc/self/maps") as maps:
            ours = sorted({line.split()[-1] for line in maps if torch_dir in line})
    except OSError:
        ours = []
    names = [p for p in ours if os.path.basename(p).startswith(("libgomp", "libiomp5"))]
    for name in names + ["libgomp.so.1", "libiomp5.so"]:
        try:
            lib = ctypes.CDLL(name)
            lib.GOMP_parallel.restype = None
            return lib
        except (OSError, AttributeError):
            continue
    return None
