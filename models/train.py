"""Seeded stratified k-fold training of heads on cached pooled features, and model bundles.

Inputs are plain arrays: ``features[name] -> float [N, D]`` (one pooled layer per encoder, see
`select_layer`) and integer labels in ``CLASSES`` order. Every fold trains a fresh head for a fixed
number of epochs (no early stopping: choosing epochs on the held-out fold would leak it), with
standardisation fitted on the fold's train part only.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold
from torch import Tensor, nn
from tqdm.auto import tqdm

from features.config import as_dict
from features.errors import ConfigError, ModelLoadError
from models.config import CLASSES, HeadConfig, TrainConfig
from models.heads import build_head

BUNDLE_FORMAT = "mer-head-bundle/1"
EPS_STD = 1e-6  # constant features get std 1 instead of a division by ~0
EpochCallback = Callable[[int, int, float], None]  # (fold, epoch, mean train loss)
Arrays = Mapping[str, np.ndarray]


def select_layer(pooled: np.ndarray, layer: int | str) -> np.ndarray:
    """[N, L, D] pooled states -> [N, D]: an index, "mean" over all L, or "last4" (MERTools)."""
    pooled = np.asarray(pooled)
    if pooled.ndim == 2:
        pooled = pooled[:, None, :]  # an encoder with a single pooled output
    if pooled.ndim != 3:
        raise ConfigError(f"pooled features must be [N, L, D] or [N, D], got shape {pooled.shape}.")
    n_layers = pooled.shape[1]
    if layer == "mean":
        return pooled.mean(axis=1, dtype=np.float64).astype(np.float32)
    if layer == "last4":
        if n_layers < 4:
            raise ConfigError(
                f"layer 'last4' needs at least 4 stored layers, the features have {n_layers}; "
                f"use 'mean' or an index."
            )
        return pooled[:, -4:].mean(axis=1, dtype=np.float64).astype(np.float32)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ConfigError(f"layer {layer!r} must be an integer index, 'mean' or 'last4'.")
    if not -n_layers <= layer < n_layers:
        raise ConfigError(
            f"layer {layer} is out of range for {n_layers} stored layers; use "
            f"{-n_layers}..{n_layers - 1}, 'mean' or 'last4'."
        )
    return np.ascontiguousarray(pooled[:, layer])


def head_inputs(pooled: Arrays, cfg: HeadConfig) -> dict[str, np.ndarray]:
    """The [N, D] inputs of one head: `cfg.features` picked from pooled arrays at `cfg.layer`."""
    missing = [n for n in cfg.features if n not in pooled]
    if missing:
        raise ConfigError(
            f"features {missing} are not in the feature store (have {sorted(pooled)}); extract "
            f"them or remove them from the head's `features`."
        )
    return {n: select_layer(pooled[n], cfg.layer) for n in cfg.features}


@dataclass
class FoldState:
    """What one fold's model needs at inference: weights and the train-part scaler."""

    state_dict: dict[str, Tensor]
    scaler: dict[str, dict[str, Tensor]]  # name -> {"mean": [D], "std": [D]}


@dataclass
class CVResult:
    oof_probs: np.ndarray  # [N, C] held-out probabilities, each clip from the fold that held it out
    fold_of: np.ndarray  # [N] fold index that held each clip out
    test_probs: np.ndarray | None  # [M, C] mean over fold models, when test features were given
    history: list[list[float]]  # per fold: mean train loss per epoch
    fold_states: list[FoldState] = field(default_factory=list)

    @property
    def n_folds(self) -> int:
        return len(self.history)


def cross_validate(features: Arrays, labels: np.ndarray, cfg: HeadConfig, train_cfg: TrainConfig,
                   test_features: Arrays | None = None,
                   on_epoch: EpochCallback | None = None) -> CVResult:
    """Seeded stratified k-fold training of one head; bit-identical on reruns (CPU)."""
    x = _as_inputs(features, cfg, "features")
    y = _as_labels(labels, len(next(iter(x.values()))))
    x_test = _as_inputs(test_features, cfg, "test_features", _dims(x)) if test_features else None
    device = torch.device(train_cfg.device)
    oof = np.zeros((len(y), len(CLASSES)), dtype=np.float32)
    fold_of = np.full(len(y), -1, dtype=np.int64)
    test_sum = np.zeros((len(next(iter(x_test.values()))), len(CLASSES))) if x_test else None
    history, states = [], []
    with _deterministic(train_cfg.threads, device):
        splits = fold_splits(y, train_cfg.folds, train_cfg.seed)
        bar = tqdm(splits, desc=f"cv {cfg.type}[{'+'.join(cfg.features)}]", unit="fold")
        for fold, (tr, va) in enumerate(bar):
            seeds = fold_seeds(train_cfg.seed, fold)
            state, losses = _train_fold(x, y, tr, cfg, device, seeds, fold, on_epoch)
            bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-")
            model = _model_from_state(cfg, _dims(x), state, device)
            oof[va] = _predict(model, state.scaler, {n: a[va] for n, a in x.items()}, device)
            fold_of[va] = fold
            if x_test is not None:
                test_sum += _predict(model, state.scaler, x_test, device)
            history.append(losses)
            states.append(state)
    test = (test_sum / len(states)).astype(np.float32) if test_sum is not None else None
    return CVResult(oof, fold_of, test, history, states)


def fold_splits(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified shuffled splits; fewer folds (with a warning) when a class is too small."""
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


def fold_seeds(seed: int, fold: int) -> tuple[int, int]:
    """Independent (weights+dropout, batch order) seeds per fold: a fold never depends on others."""
    init, order = np.random.SeedSequence([seed, fold]).generate_state(2)
    return int(init), int(order)


def _train_fold(x: dict[str, np.ndarray], y: np.ndarray, train_idx: np.ndarray, cfg: HeadConfig,
                device: torch.device, seeds: tuple[int, int], fold: int,
                on_epoch: EpochCallback | None) -> tuple[FoldState, list[float]]:
    scaler = fit_scaler({n: a[train_idx] for n, a in x.items()})
    xs = {n: torch.from_numpy(standardise(a[train_idx], scaler[n])).to(device) for n, a in x.items()}
    ys = torch.from_numpy(y[train_idx]).to(device)
    with _own_rng(device):
        torch.manual_seed(seeds[0])  # weights and dropout masks
        model = build_head(cfg, _dims(x)).to(device)
        losses = _fit(model, xs, ys, cfg, seeds[1], fold, on_epoch)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return FoldState(state, scaler), losses


def _fit(model: nn.Module, xs: dict[str, Tensor], ys: Tensor, cfg: HeadConfig, seed: int,
         fold: int, on_epoch: EpochCallback | None) -> list[float]:
    """Fixed-epoch minibatch Adam on tensors already in memory (no DataLoader)."""
    weight = class_weights(ys.cpu().numpy()).to(ys.device) if cfg.class_weight else None
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    # fused: one kernel for all parameters instead of ~8 small ops per tensor per step
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)
    order = torch.Generator().manual_seed(seed)
    n, losses = len(ys), []
    model.train()
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=order).to(ys.device)
        total = torch.zeros((), device=ys.device)
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            loss = loss_fn(model({k: v[idx] for k, v in xs.items()}), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        losses.append(float(total) / n)  # one host sync per epoch
        if on_epoch is not None:
            on_epoch(fold, epoch, losses[-1])
    return losses


def class_weights(y: np.ndarray) -> Tensor:
    """sklearn's "balanced" weights n / (k * count) over present classes; absent classes get 0."""
    counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = len(y) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def fit_scaler(x: Arrays) -> dict[str, dict[str, Tensor]]:
    """Per-feature mean and std of each modality (float64 sums, float32 stored)."""
    scaler = {}
    for name, a in x.items():
        mean = a.mean(axis=0, dtype=np.float64)
        std = a.std(axis=0, dtype=np.float64)
        std[std < EPS_STD] = 1.0
        scaler[name] = {"mean": torch.tensor(mean, dtype=torch.float32),
                        "std": torch.tensor(std, dtype=torch.float32)}
    return scaler


def standardise(a: np.ndarray, scale: Mapping[str, Tensor]) -> np.ndarray:
    return ((a - scale["mean"].numpy()) / scale["std"].numpy()).astype(np.float32)


@torch.inference_mode()
def _predict(model: nn.Module, scaler: Mapping[str, Mapping[str, Tensor]], x: Arrays,
             device: torch.device, chunk: int = 8192) -> np.ndarray:
    model.eval()
    n = len(next(iter(x.values())))
    out = []
    for s in range(0, n, chunk):
        batch = {k: torch.from_numpy(standardise(a[s:s + chunk], scaler[k])).to(device)
                 for k, a in x.items()}
        out.append(torch.softmax(model(batch).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), dtype=np.float32)


def _model_from_state(cfg: HeadConfig, dims: Mapping[str, int], state: FoldState,
                      device: torch.device) -> nn.Module:
    with _own_rng(torch.device("cpu")):  # the throwaway init must not move the caller's RNG
        model = build_head(cfg, dims)
    model.load_state_dict(state.state_dict)
    return model.to(device).eval()


def _own_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Seed freely inside; the caller's torch RNG state is restored on exit."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def _deterministic(threads: int, device: torch.device) -> Iterator[None]:
    """Deterministic kernels and a fixed CPU thread count for the run; restored afterwards."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    fill = torch.utils.deterministic
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
           fill.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    fill.fill_uninitialized_memory = False  # a NaN fill of every new tensor, ~2x slower steps
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.set_num_threads(old[2])
        fill.fill_uninitialized_memory = old[3]


def _as_inputs(features: Arrays, cfg: HeadConfig, what: str,
               dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """The head's features as C-contiguous float32 [N, D], checked for names and shapes."""
    missing = [n for n in cfg.features if n not in features]
    if missing:
        raise ConfigError(
            f"{what} lack {missing} listed in the head's features (have {sorted(features)}); "
            f"extract them or remove them from `features`."
        )
    x = {n: np.ascontiguousarray(features[n], dtype=np.float32) for n in cfg.features}
    shapes = {n: a.shape for n, a in x.items()}
    if any(a.ndim != 2 for a in x.values()) or len({s[0] for s in shapes.values()}) != 1:
        raise ConfigError(
            f"{what} must be [N, D] arrays with the same N, got {shapes}; pick one layer with "
            f"select_layer first."
        )
    if dims is not None and _dims(x) != dict(dims):
        raise ConfigError(f"{what} dims {_dims(x)} differ from the training features' {dict(dims)}.")
    return x


def _as_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"labels must be integers of shape ({n},), got {y.dtype} {y.shape}.")
    if n and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise ConfigError(
            f"labels must be class ids 0..{len(CLASSES) - 1} ({', '.join(CLASSES)}), "
            f"got range {y.min()}..{y.max()}."
        )
    return y.astype(np.int64)


def _dims(x: Arrays) -> dict[str, int]:
    return {n: int(a.shape[1]) for n, a in x.items()}


# --------------------------------------------------------------------------- model bundles


def save_bundle(path: str | Path, result: CVResult, cfg: HeadConfig,
                feature_dims: Mapping[str, int]) -> Path:
    """Save every fold model with its scaler; plain tensors and dicts (weights_only-loadable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = {
        "format": BUNDLE_FORMAT,
        "config": as_dict(cfg),
        "feature_dims": {n: int(feature_dims[n]) for n in cfg.features},
        "classes": list(CLASSES),
        "folds": [{"state_dict": s.state_dict, "scaler": s.scaler} for s in result.fold_states],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(bundle, tmp)
    os.replace(tmp, path)  # never leave a half-written bundle behind
    return path


class Predictor:
    """The fold models of one bundle; `predict_proba` averages their probabilities."""

    def __init__(self, cfg: HeadConfig, feature_dims: Mapping[str, int],
                 folds: list[FoldState], device: str = "cpu"):
        self.cfg, self.feature_dims, self.folds = cfg, dict(feature_dims), folds
        self.device = torch.device(device)
        self.models = [_model_from_state(cfg, self.feature_dims, f, self.device) for f in folds]

    def predict_proba(self, features: Arrays) -> np.ndarray:
        """[M, C] class probabilities in CLASSES order, mean over the fold models."""
        x = _as_inputs(features, self.cfg, "features", self.feature_dims)
        probs = [_predict(m, f.scaler, x, self.device) for m, f in zip(self.models, self.folds)]
        return np.mean(probs, axis=0, dtype=np.float64).astype(np.float32)


def load_bundle(path: str | Path, device: str = "cpu") -> Predictor:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model bundle {path} does not exist; run the train stage first.")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
        if bundle.get("format") != BUNDLE_FORMAT:
            raise ModelLoadError(
                f"{path} has format {bundle.get('format')!r}, expected {BUNDLE_FORMAT!r}; "
                f"retrain to rewrite it."
            )
        if list(bundle["classes"]) != list(CLASSES):
            raise ModelLoadError(
                f"{path} was trained for classes {bundle['classes']}, this code uses "
                f"{list(CLASSES)}; retrain."
            )
        cfg = HeadConfig(**bundle["config"])
        folds = [FoldState(f["state_dict"], f["scaler"]) for f in bundle["folds"]]
        return Predictor(cfg, bundle["feature_dims"], folds, device)
    except ModelLoadError:
        raise
    except Exception as err:  # corrupt file, missing key, mismatched weights
        raise ModelLoadError(f"model bundle {path} did not load: {err}. Retrain it.") from err
