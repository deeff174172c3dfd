"""Seeded stratified k-fold training of heads on cached pooled features, and model bundles.

Inputs are plain arrays: ``features[name] -> float [N, D]`` (one pooled layer per encoder, see
`select_layer`) and integer labels in ``CLASSES`` order. Every fold gets a fresh head, trained for
a fixed number of epochs (no early stopping: choosing epochs on the held-out fold would leak it)
on its train part, standardised with statistics of that part only. The folds train side by side
as the members of one stacked head, which is several times faster on CPU than one after another.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
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
    """What one fold's model needs at inference: weights (members=1) and the train-part scaler."""

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
        return len(self.fold_states)


def cross_validate(features: Arrays, labels: np.ndarray, cfg: HeadConfig, train_cfg: TrainConfig,
                   test_features: Arrays | None = None,
                   on_epoch: EpochCallback | None = None,
                   folds: np.ndarray | None = None) -> CVResult:
    """Seeded stratified k-fold training of one head; bit-identical on reruns (CPU).

    `folds` gives each row's fold id (the manifest's, so every head shares one split); without
    it, seeded stratified folds are drawn from `train_cfg.folds` and `train_cfg.seed`.

    All folds train together as one head with a member per fold (see models.heads); each
    member sees only its fold's train part, standardised with that part's statistics.
    `on_epoch(fold, epoch, loss)` is called for every fold after each epoch (epochs outer).
    """
    x = _as_inputs(features, cfg, "features")
    y = _as_labels(labels, _rows(x))
    x_test = _as_inputs(test_features, cfg, "test_features", _dims(x)) if test_features else None
    device = torch.device(train_cfg.device)
    splits = (given_splits(folds, len(y)) if folds is not None
              else fold_splits(y, train_cfg.folds, train_cfg.seed))
    parts = [train for train, _ in splits]
    scaler = _stack_scalers([fit_scaler({n: a[tr] for n, a in x.items()}) for tr in parts])
    with _run_settings(train_cfg.threads, device), _own_rng(device):
        torch.manual_seed(train_cfg.seed)  # weights and dropout masks
        model = build_head(cfg, _dims(x), members=len(parts)).to(device)
        history = _fit(model, x, y, parts, scaler, cfg, device, train_cfg.seed, on_epoch)
        fold_of = np.empty(len(y), dtype=np.int64)
        for fold, (_, held) in enumerate(splits):
            fold_of[held] = fold
        oof = _stacked_probs(model, scaler, x, device)[fold_of, np.arange(len(y))]
        test = _stacked_probs(model, scaler, x_test, device).mean(axis=0) if x_test else None
    return CVResult(oof, fold_of, test, history, _unstack(model, scaler))


def given_splits(folds: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, held-out) index pairs from per-row fold ids 0..k-1."""
    folds = np.asarray(folds)
    if folds.shape != (n,) or (folds < 0).any():
        raise ConfigError(f"folds must give a fold id >= 0 for each of the {n} labelled rows, "
                          f"got shape {folds.shape}; rerun `prepare` to refresh the manifest.")
    ids = np.unique(folds)
    if len(ids) < 2:
        raise ConfigError(f"cross-validation needs at least 2 folds, the manifest has {len(ids)}.")
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in ids]


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


def _fit(model: nn.Module, x: dict[str, np.ndarray], y: np.ndarray, parts: list[np.ndarray],
         scaler: Scaler, cfg: HeadConfig, device: torch.device, seed: int,
         on_epoch: EpochCallback | None) -> list[list[float]]:
    """Fixed-epoch minibatch Adam over tensors held in memory (no DataLoader), all folds at once."""
    xs = {n: torch.from_numpy(a).to(device) for n, a in x.items()}  # raw; standardised per batch
    norm = {n: _affine(s, device) for n, s in scaler.items()}
    ys = torch.from_numpy(y).to(device)
    weight = torch.stack([class_weights(y[tr]) if cfg.class_weight else torch.ones(len(CLASSES))
                          for tr in parts]).to(device)
    # fused: one kernel for all parameters instead of ~8 small ops per tensor per step
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)
    order = torch.Generator().manual_seed(seed)
    n = max(len(tr) for tr in parts)
    history: list[list[float]] = [[] for _ in parts]
    model.train()
    bar = tqdm(range(cfg.epochs), desc=f"cv {cfg.type}[{'+'.join(cfg.features)}] "
                                       f"{len(parts)} folds", unit="epoch")
    for epoch in bar:
        idx = _epoch_order(parts, n, order).to(device)
        losses = _epoch(model, opt, xs, norm, ys, weight, idx, cfg.batch_size)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        for fold, loss in enumerate(losses):
            history[fold].append(loss)
            if on_epoch is not None:
                on_epoch(fold, epoch, loss)
    return history


def _epoch(model: nn.Module, opt: torch.optim.Optimizer, xs: dict[str, Tensor],
           norm: dict[str, tuple[Tensor, Tensor]], ys: Tensor, weight: Tensor, idx: Tensor,
           batch_size: int) -> list[float]:
    """One pass over idx [K, n]; returns each fold's mean train loss."""
    total = torch.zeros(idx.shape[0], device=idx.device)
    for start in range(0, idx.shape[1], batch_size):
        batch = idx[:, start:start + batch_size]
        loss = _batch_loss(model, xs, norm, ys, weight, batch)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # members share no weights: each gets its own fold's gradient
        opt.step()
        total += loss.detach() * batch.shape[1]
    return (total / idx.shape[1]).tolist()  # one host sync per epoch


def _epoch_order(parts: list[np.ndarray], n: int, gen: torch.Generator) -> Tensor:
    """[K, n] clip indices: each fold's train part shuffled, smaller parts topped up to n.

    Stratified train parts differ by a few clips; a smaller one repeats that many randomly
    drawn clips so that all folds take the same steps.
    """
    rows = []
    for tr in parts:
        tr = torch.from_numpy(tr)
        extra = torch.randperm(len(tr), generator=gen)[: n - len(tr)]
        rows.append(tr[torch.cat([torch.randperm(len(tr), generator=gen), extra])])
    return torch.stack(rows)


def _batch_loss(model: nn.Module, xs: dict[str, Tensor], norm: dict[str, tuple[Tensor, Tensor]],
                ys: Tensor, weight: Tensor, idx: Tensor) -> Tensor:
    """Per-fold class-weighted mean cross entropy [K] of one minibatch idx [K, B]."""
    flat = idx.reshape(-1)  # index_select: ~5x faster than advanced indexing for row gathers
    feats = {n: _standardise(a.index_select(0, flat).view(*idx.shape, -1), norm[n])
             for n, a in xs.items()}
    logits = model(feats)  # [K, B, C]
    target = ys.index_select(0, flat).view(idx.shape)
    nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # [K, B]
    w = weight.gather(1, target)
    return (w * nll).sum(dim=1) / w.sum(dim=1)  # = CrossEntropyLoss(weight=...) per fold


def class_weights(y: np.ndarray) -> Tensor:
    """sklearn's "balanced" weights n / (k * count) over present classes; absent classes get 0."""
    counts = np.bincount(y, minlength=len(CLASSES)).astype(np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = len(y) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


Scaler = dict[str, dict[str, Tensor]]  # name -> {"mean": [..., D], "std": [..., D]}


def fit_scaler(x: Arrays) -> Scaler:
    """Per-feature mean and std of each modality (float64 sums, float32 stored)."""
    scaler = {}
    for name, a in x.items():
        mean = a.mean(axis=0, dtype=np.float64)
        std = a.std(axis=0, dtype=np.float64)
        std[std < EPS_STD] = 1.0
        scaler[name] = {"mean": torch.tensor(mean, dtype=torch.float32),
                        "std": torch.tensor(std, dtype=torch.float32)}
    return scaler


def _stack_scalers(scalers: list[Scaler]) -> Scaler:
    return {n: {k: torch.stack([s[n][k] for s in scalers]) for k in ("mean", "std")}
            for n in scalers[0]}


def _affine(scale: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(shift, factor) [K, 1, D] with (x - mean) / std == shift + x * factor."""
    factor = 1.0 / scale["std"]
    return (-scale["mean"] * factor).unsqueeze(1).to(device), factor.unsqueeze(1).to(device)


def _standardise(x: Tensor, affine: tuple[Tensor, Tensor]) -> Tensor:
    """x [K, B, D] (or [B, D], shared by all folds) -> [K, B, D], one fused op."""
    return torch.addcmul(affine[0], x, affine[1])


@torch.inference_mode()
def _stacked_probs(model: nn.Module, scaler: Scaler, x: Arrays, device: torch.device,
                   chunk: int = 1024) -> np.ndarray:
    """[K, N, C] probabilities of every fold member for every row of x."""
    model.eval()
    norm = {n: _affine(s, device) for n, s in scaler.items()}
    n_rows, out = _rows(x), []
    for s in range(0, n_rows, chunk):
        feats = {n: _standardise(torch.from_numpy(a[s:s + chunk]).to(device), norm[n])
                 for n, a in x.items()}
        out.append(torch.softmax(model(feats).float(), dim=-1).cpu().numpy())
    k = next(iter(scaler.values()))["mean"].shape[0]
    return np.concatenate(out, axis=1) if out else np.zeros((k, 0, len(CLASSES)), np.float32)


def _unstack(model: nn.Module, scaler: Scaler) -> list[FoldState]:
    """One members=1 state dict and scaler per fold (every state tensor leads with the fold)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    k = next(iter(scaler.values()))["mean"].shape[0]
    return [FoldState({n: t[f:f + 1].clone() for n, t in state.items()},
                      {n: {s: v[f].clone() for s, v in sc.items()} for n, sc in scaler.items()})
            for f in range(k)]


def _stack_folds(folds: list[FoldState]) -> tuple[dict[str, Tensor], Scaler]:
    state = {n: torch.cat([f.state_dict[n] for f in folds]) for n in folds[0].state_dict}
    return state, _stack_scalers([f.scaler for f in folds])


def _own_rng(device: torch.device) -> contextlib.AbstractContextManager:
    """Seed freely inside; the caller's torch RNG state is restored on exit."""
    cuda = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


@contextlib.contextmanager
def _run_settings(threads: int, device: torch.device) -> Iterator[None]:
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
        raise ConfigError(
            f"{what} dims {_dims(x)} differ from the training features' {dict(dims)}; use the "
            f"same encoders and layer as in training."
        )
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


def _rows(x: Arrays) -> int:
    return len(next(iter(x.values())))


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
        self.cfg, self.feature_dims = cfg, {n: int(feature_dims[n]) for n in cfg.features}
        self.device = torch.device(device)
        state, self.scaler = _stack_folds(folds)
        with _own_rng(torch.device("cpu")):  # the throwaway init must not move the caller's RNG
            self.model = build_head(cfg, self.feature_dims, members=len(folds))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()

    @property
    def n_folds(self) -> int:
        return int(next(iter(self.scaler.values()))["mean"].shape[0])

    def predict_proba(self, features: Arrays) -> np.ndarray:
        """[M, C] class probabilities in CLASSES order, mean over the fold models."""
        x = _as_inputs(features, self.cfg, "features", self.feature_dims)
        return _stacked_probs(self.model, self.scaler, x, self.device).mean(axis=0)


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
