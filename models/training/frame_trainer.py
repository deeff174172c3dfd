"""The trainer of frame-level heads (`agt`, `early_fusion`): frame inputs, seeded k-fold, bundles.

Inputs are the frame-level states the embedding stores keep for `layers_frames` (audio frames,
vision per-frame CLS states, text token states), one layer per encoder (`frames_layer`).

Cost control, so that MER2024-size k-fold (5,030 clips) trains in about a minute on two cores:
- `max_frames`: a clip longer than that is mean-pooled into `max_frames` equal contiguous
  segments when it is loaded (HuBERT's ~210 frames of a 4 s clip -> 8 segments of ~0.5 s);
  shorter clips keep their frames, padded and masked. An empty sequence becomes one zero frame.
- frames are standardised with the statistics of the fold's train part. A head type whose
  config has `input_dim` > 0 (`early_fusion`) then multiplies them by one fixed random Gaussian
  matrix [D, input_dim] (seeded by `train.seed`; kept in the bundle) before its learnt layers;
  heads without it (`agt`) learn their input projections from the full width.
- all folds train side by side as the members of one model (models.heads.blocks), as in
  models.training.pooled_trainer; projected inputs are computed once per fold before training, unprojected ones
  are standardised per batch (K full-width copies of 5,030 clips x 8 frames x 1,024-5,120 dims
  would take gigabytes).
Results are a models.training.cv.CVResult (out-of-fold probabilities, test = mean of fold models,
per-fold train losses), bit-identical on CPU for the same seed. Implements the trainer functions
of models.heads.registry: `cross_validate`, `bundle_state`, `predictor`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from features.storage.dataset import FeatureSet
from features.errors import ConfigError
from models.heads import registry
from models.training.train_config import CLASSES
from models.training.cv import (EPS_STD, CVResult, EpochCallback, ExtraRows, FoldState, as_labels,
                       epoch_order, fold_class_weights, fold_ids, held_out_index, own_rng,
                       run_settings, splits_for, training_parts)

CHUNK = 256  # clips per inference / reduction chunk: bounds memory, not results


# --------------------------------------------------------------------------- frame inputs


@dataclass
class Frames:
    """One modality's frames for N clips: x float32 [N, T, D] zero-padded, lengths [N] >= 1."""

    x: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 3 or self.lengths.shape != (len(self.x),):
            raise ConfigError(f"frames must be x [N, T, D] with lengths [N], got "
                              f"{self.x.shape} and {self.lengths.shape}.")
        if len(self.x) and (self.lengths.min() < 1 or self.lengths.max() > self.x.shape[1]):
            raise ConfigError(f"frame lengths must be in 1..{self.x.shape[1]}.")

    @property
    def dim(self) -> int:
        return int(self.x.shape[2])

    @property
    def mask(self) -> np.ndarray:
        return np.arange(self.x.shape[1])[None, :] < self.lengths[:, None]

    def take(self, rows: np.ndarray) -> "Frames":
        rows = np.asarray(rows)
        lengths = self.lengths[rows]
        t = int(lengths.max()) if len(rows) else 1
        return Frames(self.x[rows, :t], lengths)

    def __len__(self) -> int:
        return len(self.x)


def segment_pool(frames: np.ndarray, max_frames: int) -> np.ndarray:
    """[T, D] -> [min(T, max_frames), D]: means of `max_frames` equal contiguous segments."""
    frames = np.asarray(frames, dtype=np.float32)
    t = len(frames)
    if t <= max_frames:
        return frames
    bounds = np.linspace(0, t, max_frames + 1).round().astype(np.int64)  # every segment non-empty
    sums = np.add.reduceat(frames, bounds[:-1], axis=0, dtype=np.float64)
    return (sums / np.diff(bounds)[:, None]).astype(np.float32)


def pad_frames(clips: list[np.ndarray], max_frames: int, dim: int | None = None) -> Frames:
    """Per-clip [T_i, D] arrays -> Frames, segment-pooled to <= max_frames and zero-padded."""
    pooled = [segment_pool(c, max_frames) for c in clips]
    dim = dim if dim is not None else (pooled[0].shape[1] if pooled else 0)
    lengths = np.array([max(len(p), 1) for p in pooled], dtype=np.int64)
    x = np.zeros((len(pooled), int(lengths.max()) if len(pooled) else 1, dim), np.float32)
    for i, p in enumerate(pooled):
        x[i, : len(p)] = p
    return Frames(x, lengths)


def concat_frames(parts: list[Frames]) -> Frames:
    """Frames of several clip sets, one after another (padded to the longest)."""
    t = max(p.x.shape[1] for p in parts)
    x = np.concatenate([np.pad(p.x, ((0, 0), (0, t - p.x.shape[1]), (0, 0))) for p in parts])
    return Frames(x, np.concatenate([p.lengths for p in parts]))


def load_frames(features: FeatureSet, names: list[str], ids: list[str], layer: int,
                max_frames: int) -> dict[str, Frames]:
    """Frames of `layer` for `ids` from each encoder's store, segment-pooled and padded."""
    return {name: pad_frames(features.frames(name, ids, layer), max_frames, features.dim(name))
            for name in names}


# --------------------------------------------------------------------------- reduction


@dataclass
class Reduction:
    """Per modality: the fixed projection [D, r] (None: none) and per-fold mean/std [K, D]."""

    projection: dict[str, Tensor | None]
    mean: dict[str, Tensor]
    std: dict[str, Tensor]

    def dims(self) -> dict[str, int]:
        return {n: int(p.shape[1]) if p is not None else int(self.mean[n].shape[1])
                for n, p in self.projection.items()}

    def apply(self, frames: Mapping[str, Frames], rows: slice,
              device: torch.device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Inputs and masks [K, n, T] for rows of every modality: a projected modality's inputs
        are standardised per fold, [K, n, T, r] (padding zeroed); an unprojected one's stay raw
        and shared, [1, n, T, D], standardised per batch by `finish` (K full-width copies of
        every clip would not fit in memory at MER2024 size)."""
        xs, masks = {}, {}
        for name, fr in frames.items():
            mask = torch.from_numpy(fr.mask[rows]).to(device)
            x = torch.from_numpy(fr.x[rows]).to(device)  # [n, T, D]
            k = self.mean[name].shape[0]
            masks[name] = mask.unsqueeze(0).expand(k, -1, -1)
            proj = self.projection[name]
            if proj is None:
                xs[name] = x.unsqueeze(0)
                continue
            # ((x - mean) / std) @ P == x @ (P / std) - (mean / std) @ P, per fold
            mean, std = self.mean[name].to(device), self.std[name].to(device)
            proj = proj.to(device)
            w = proj.unsqueeze(0) / std.unsqueeze(-1)  # [K, D, r]
            shift = (mean / std) @ proj  # [K, r]
            n, t, _ = x.shape
            z = (torch.matmul(x.reshape(1, n * t, -1), w) - shift[:, None]).view(-1, n, t,
                                                                                 w.shape[2])
            xs[name] = z * mask.unsqueeze(-1).to(z.dtype)
        return xs, masks

    def finish(self, name: str, x: Tensor, mask: Tensor) -> Tensor:
        """The model input [K, B, T, D]: raw shared frames [1 or K, B, T, D] standardised with
        each fold's statistics and masked; projected inputs as they are."""
        if self.projection[name] is not None:
            return x
        mean = self.mean[name].to(x.device)[:, None, None]
        std = self.std[name].to(x.device)[:, None, None]
        # one [K, B, T, D] allocation, then in place: this runs on every batch of every epoch
        return (x - mean).div_(std).mul_(mask.unsqueeze(-1).to(x.dtype))


def fit_reduction(frames: Mapping[str, Frames], parts: list[np.ndarray], input_dim: int,
                  seed: int) -> Reduction:
    """Fold-wise standardisation statistics over valid frames, and the seeded projections."""
    projection, mean, std = {}, {}, {}
    member = np.zeros((len(parts), len(next(iter(frames.values())))), dtype=np.float64)
    for k, tr in enumerate(parts):
        member[k, tr] = 1.0
    for i, (name, fr) in enumerate(frames.items()):
        sums, squares = np.zeros((len(parts), fr.dim)), np.zeros((len(parts), fr.dim))
        for s in range(0, len(fr), CHUNK):  # float64 in chunks: an LLM's frames are large
            x = fr.x[s:s + CHUNK].astype(np.float64)  # padding is zero: adds nothing
            sums += member[:, s:s + CHUNK] @ x.sum(axis=1)
            squares += member[:, s:s + CHUNK] @ np.einsum("ntd,ntd->nd", x, x)
        count = (member @ fr.lengths)[:, None]
        m = sums / count
        sd = np.sqrt(np.maximum(squares / count - m * m, 0.0))
        sd[sd < EPS_STD] = 1.0
        mean[name] = torch.tensor(m, dtype=torch.float32)
        std[name] = torch.tensor(sd, dtype=torch.float32)
        if input_dim and fr.dim > input_dim:
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            projection[name] = torch.randn(fr.dim, input_dim, generator=gen) / fr.dim ** 0.5
        else:
            projection[name] = None
    return Reduction(projection, mean, std)


# --------------------------------------------------------------------------- training


def build_model(cfg: Any, input_dims: Mapping[str, int], n_classes: int = len(CLASSES),
                members: int = 1) -> nn.Module:
    """The registered frame-level model of `cfg.type` for the (reduced) input sizes."""
    head = registry.get(cfg.type)
    if head.inputs != "frames" or head.build is None:
        raise ConfigError(f"head type {cfg.type!r} is not a frame-level neural head.")
    return head.build(cfg, {n: int(input_dims[n]) for n in cfg.features}, n_classes, members)


def cross_validate(inputs: Mapping[str, Frames], labels: np.ndarray, cfg: Any, train_cfg: Any,
                   folds: np.ndarray | None = None, test: Mapping[str, Frames] | None = None,
                   extra: ExtraRows | None = None,
                   on_epoch: EpochCallback | None = None) -> CVResult:
    """Seeded k-fold training of one frame-level head, all folds as members of one model.

    `folds` gives each clip's fold (the manifest's); without it seeded stratified folds are
    drawn. `extra` rows join the training parts, never held out. Bit-identical on reruns (CPU).
    Test probabilities are the mean over fold models.
    """
    x = _checked(inputs, cfg, "frames")
    n = len(next(iter(x.values())))
    y = as_labels(labels, n)
    splits = splits_for(y, folds, train_cfg.folds, train_cfg.seed)
    parts = training_parts(splits, fold_ids(splits, folds), n, extra)
    dims = {k: f.dim for k, f in x.items()}
    if extra is not None:
        ex = _checked(extra.inputs, cfg, "extra frames", dims)
        x = {k: concat_frames([f, ex[k]]) for k, f in x.items()}
        y = np.concatenate([y, as_labels(extra.labels, len(next(iter(ex.values()))))])
    x_test = _checked(test, cfg, "test frames", dims) if test else None
    device = torch.device(train_cfg.device)
    reduction = fit_reduction(x, parts, getattr(cfg, "input_dim", 0), train_cfg.seed)
    with run_settings(train_cfg.threads, device), own_rng(device):
        torch.manual_seed(train_cfg.seed)
        model = build_model(cfg, reduction.dims(), members=len(parts)).to(device)
        reduced = _reduce_all(reduction, x, device)
        history = _fit(model, reduction, reduced, y, parts, cfg, device, train_cfg.seed,
                       on_epoch)
        fold_of = held_out_index(splits, n)
        labelled = ({k: v[:, :n] for k, v in reduced[0].items()},
                    {k: v[:, :n] for k, v in reduced[1].items()})
        oof = _probs(model, reduction, [labelled])[fold_of, np.arange(n)]
        test_probs = (_probs(model, reduction, _reduced_chunks(reduction, x_test, device))
                      .mean(axis=0) if x_test else None)
    return FrameCVResult(oof, fold_of, test_probs, history, _unstack(model, reduction),
                         reduction.projection)


@dataclass
class FrameCVResult(CVResult):
    projection: dict[str, Tensor | None] = field(default_factory=dict)  # fixed, or None


def _checked(frames: Mapping[str, Frames] | None, cfg: Any, what: str,
             dims: Mapping[str, int] | None = None) -> dict[str, Frames]:
    missing = [n for n in cfg.features if n not in (frames or {})]
    if missing:
        raise ConfigError(f"{what} lack {missing} listed in the head's features (have "
                          f"{sorted(frames or {})}); extract them or fix `features`.")
    x = {n: frames[n] for n in cfg.features}
    if len({len(f) for f in x.values()}) != 1:
        raise ConfigError(f"{what} must hold the same clips for every modality, got "
                          f"{ {n: len(f) for n, f in x.items()} }.")
    if dims is not None and {n: f.dim for n, f in x.items()} != dict(dims):
        raise ConfigError(f"{what} dims { {n: f.dim for n, f in x.items()} } differ from the "
                          f"training frames' {dict(dims)}; use the same encoders and layer.")
    return x


Reduced = tuple[dict[str, Tensor], dict[str, Tensor]]  # inputs (Reduction.apply), masks [K, n, T]


def _reduced_chunks(reduction: Reduction, frames: Mapping[str, Frames], device: torch.device):
    n = len(next(iter(frames.values())))
    for start in range(0, n, CHUNK):
        yield reduction.apply(frames, slice(start, start + CHUNK), device)


def _reduce_all(reduction: Reduction, frames: Mapping[str, Frames],
                device: torch.device) -> Reduced:
    chunks = list(_reduced_chunks(reduction, frames, device))
    return ({n: torch.cat([c[0][n] for c in chunks], dim=1) for n in frames},
            {n: torch.cat([c[1][n] for c in chunks], dim=1) for n in frames})


def _fit(model: nn.Module, reduction: Reduction, reduced: Reduced, y: np.ndarray,
         parts: list[np.ndarray], cfg: Any, device: torch.device, seed: int,
         on_epoch: EpochCallback | None) -> list[list[float]]:
    """Fixed-epoch minibatch Adam; member k draws its batches from fold k's train part."""
    xs, masks = reduced
    k, n_rows = len(parts), len(y)
    shared = {n for n, p in reduction.projection.items() if p is None}  # standardised per batch
    flat_x = {n: v.reshape(v.shape[0] * n_rows, *v.shape[2:]) for n, v in xs.items()}
    mask1 = {n: m[0] for n, m in masks.items()}  # masks do not depend on the fold
    ys = torch.from_numpy(y).to(device)
    weight = fold_class_weights(y, parts, cfg.class_weight).to(device)
    offset = (torch.arange(k, device=device) * n_rows).unsqueeze(1)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True)
    order = torch.Generator().manual_seed(seed)
    n = max(len(tr) for tr in parts)
    history: list[list[float]] = [[] for _ in parts]
    model.train()
    bar = tqdm(range(cfg.epochs), desc=f"cv {cfg.type}[{'+'.join(cfg.features)}] {k} folds",
               unit="epoch")
    for epoch in bar:
        idx = epoch_order(parts, n, order).to(device)
        total = torch.zeros(k, device=device)
        for start in range(0, n, cfg.batch_size):
            batch = idx[:, start:start + cfg.batch_size]  # [K, B]
            b = batch.shape[1]
            rows, flat = batch.reshape(-1), (batch + offset).reshape(-1)
            m = {name: v.index_select(0, rows).view(k, b, -1) for name, v in mask1.items()}
            x = {name: reduction.finish(name, v.index_select(0, rows if name in shared else flat)
                                        .view(k, b, *v.shape[1:]), m[name])
                 for name, v in flat_x.items()}
            logits = model(x, m)  # [K, B, C]
            target = ys.index_select(0, rows).view(k, b)
            nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            w = weight.gather(1, target)
            loss = (w * nll).sum(dim=1) / w.sum(dim=1)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            total += loss.detach() * b
        losses = (total / n).tolist()
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        for fold, loss_value in enumerate(losses):
            history[fold].append(loss_value)
            if on_epoch is not None:
                on_epoch(fold, epoch, loss_value)
    return history


@torch.inference_mode()
def _probs(model: nn.Module, reduction: Reduction, chunks) -> np.ndarray:
    """[K, N, C] probabilities of every member over reduced chunks (or one reduced block)."""
    model.eval()
    out = []
    for xs, masks in chunks:
        n = next(iter(xs.values())).shape[1]
        for s in range(0, n, CHUNK):
            m = {name: v[:, s:s + CHUNK] for name, v in masks.items()}
            x = {name: reduction.finish(name, v[:, s:s + CHUNK], m[name])
                 for name, v in xs.items()}
            out.append(torch.softmax(model(x, m).float(), dim=-1).cpu().numpy())
    return np.concatenate(out, axis=1)


def _unstack(model: nn.Module, reduction: Reduction) -> list[FoldState]:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    folds = next(iter(reduction.mean.values())).shape[0]
    return [FoldState({n: t[f:f + 1].clone() for n, t in state.items()},
                      {n: {"mean": reduction.mean[n][f].clone(), "std": reduction.std[n][f].clone()}
                       for n in reduction.mean})
            for f in range(folds)]


# --------------------------------------------------------------------------- bundles


def bundle_state(result: CVResult, cfg: Any) -> dict:
    """Every fold model with its standardisation, and the fixed projections (if any)."""
    return {"projection": {n: p for n, p in result.projection.items() if p is not None},
            "folds": [{"state_dict": s.state_dict, "scaler": s.scaler}
                      for s in result.fold_states]}


class FramePredictor:
    """The fold models of a frame-level head; `fold_proba` gives each one's probabilities,
    `predict_proba` their mean."""

    def __init__(self, cfg: Any, feature_dims: Mapping[str, int],
                 projection: Mapping[str, Tensor], folds: list[FoldState], device: str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.feature_dims = {n: int(feature_dims[n]) for n in cfg.features}
        self.reduction = Reduction(
            {n: projection.get(n) for n in cfg.features},
            {n: torch.stack([f.scaler[n]["mean"] for f in folds]) for n in cfg.features},
            {n: torch.stack([f.scaler[n]["std"] for f in folds]) for n in cfg.features})
        state = {n: torch.cat([f.state_dict[n] for f in folds]) for n in folds[0].state_dict}
        with own_rng(torch.device("cpu")):
            self.model = build_model(cfg, self.reduction.dims(), members=len(folds))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()

    def fold_proba(self, frames: Mapping[str, Frames]) -> np.ndarray:
        """[F, M, C] class probabilities in CLASSES order of each fold model."""
        x = _checked(frames, self.cfg, "frames", self.feature_dims)
        chunks = _reduced_chunks(self.reduction, x, self.device)
        return _probs(self.model, self.reduction, chunks)

    def predict_proba(self, frames: Mapping[str, Frames]) -> np.ndarray:
        """[M, C] class probabilities in CLASSES order, mean over the fold models."""
        return self.fold_proba(frames).mean(axis=0)


def predictor(cfg: Any, feature_dims: Mapping[str, int], state: dict,
              device: str = "cpu") -> FramePredictor:
    folds = [FoldState(f["state_dict"], f["scaler"]) for f in state["folds"]]
    return FramePredictor(cfg, feature_dims, state["projection"], folds, device)
