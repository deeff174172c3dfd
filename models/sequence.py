"""Frame-level heads (`agt`, `joint_at`): frame loading, seeded k-fold training, bundles, stage.

Inputs are the frame-level states the embedding stores keep for `layers_frames` (audio frames,
vision per-frame CLS states, text token states), one layer per encoder (`frames_layer`).

Cost control, so that MER2024-size k-fold (5,030 clips) trains in about a minute on two cores:
- `max_frames`: a clip longer than that is mean-pooled into `max_frames` equal contiguous
  segments when it is loaded (HuBERT's ~210 frames of a 4 s clip -> 8 segments of ~0.5 s);
  shorter clips keep their frames, padded and masked. An empty sequence becomes one zero frame.
- `input_dim`: frames are standardised with the statistics of the fold's train part, then
  multiplied by one fixed random Gaussian matrix [D, input_dim] (seeded by `train.seed`; kept
  in the bundle). That shrinks a 5,120-wide LLM state before any learnt layer; the learnt
  projection works on the result. 0, or an encoder narrower than it, skips the projection.
- all folds train side by side as the members of one model (models.blocks), as in
  models.train; the reduced inputs are computed once per fold before training.
Results are a models.train.CVResult (out-of-fold probabilities, test = mean of fold models,
per-fold train losses), bit-identical on CPU for the same seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from features.config import as_dict
from features.errors import ConfigError, ModelLoadError
from features.manifest import read_manifest
from features.reports import FailureReport, write_json_atomic
from features.store import StoreReader
from models.agt import AGTHead
from models.config import CLASSES, FRAME_HEAD_TYPES, HeadConfig, TrainConfig
from models.joint import JointAudioTextHead
from models.train import (EPS_STD, CVResult, EpochCallback, FoldState, _as_labels, _epoch_order,
                          _own_rng, _run_settings, class_weights, fold_splits, given_splits)

SEQUENCE_HEADS: dict[str, type[nn.Module]] = {"agt": AGTHead, "joint_at": JointAudioTextHead}
BUNDLE_FORMAT = "mer-frame-bundle/1"
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


def frame_layer_index(reader: StoreReader, layer: int, name: str) -> int:
    """Position of `layer` among the layers a store keeps frame-level states for."""
    stored = list(reader.meta.get("layers_frames") or [])
    n_layers = reader.pooled_shape[0] if reader.has_pooled else None
    norm = (lambda v: v % n_layers) if n_layers else (lambda v: v)
    if not stored or norm(layer) not in [norm(v) for v in stored]:
        raise ConfigError(
            f"frames_layer {layer} is not kept at frame level in store {name!r} (it keeps "
            f"layers_frames {stored}); set the head's frames_layer to one of those, or add it to "
            f"embed.encoders.{name}.layers_frames and rerun embed."
        )
    return [norm(v) for v in stored].index(norm(layer))


def load_frames(features_dir: str | os.PathLike, names: list[str], ids: list[str], layer: int,
                max_frames: int) -> dict[str, Frames]:
    """Frames of `layer` for `ids` from each encoder's store, segment-pooled and padded."""
    out = {}
    for name in names:
        with StoreReader(Path(features_dir) / name, kind="embedding") as store:
            k = frame_layer_index(store, layer, name)
            clips = [store.get(cid)[k] for cid in ids]
            dim = store.pooled_shape[2] if store.has_pooled else None
            out[name] = pad_frames(clips, max_frames, dim)
    return out


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
        """Inputs [K, n, T, r] (padding zeroed) and masks [K, n, T] for rows of every modality."""
        xs, masks = {}, {}
        for name, fr in frames.items():
            mask = torch.from_numpy(fr.mask[rows]).to(device)
            x = torch.from_numpy(fr.x[rows]).to(device)  # [n, T, D]
            mean, std = self.mean[name].to(device), self.std[name].to(device)
            proj = self.projection[name]
            if proj is None:
                z = (x.unsqueeze(0) - mean[:, None, None]) / std[:, None, None]
            else:  # ((x - mean) / std) @ P == x @ (P / std) - (mean / std) @ P, per fold
                proj = proj.to(device)
                w = proj.unsqueeze(0) / std.unsqueeze(-1)  # [K, D, r]
                shift = (mean / std) @ proj  # [K, r]
                n, t, _ = x.shape
                z = (torch.matmul(x.reshape(1, n * t, -1), w) - shift[:, None]).view(-1, n, t,
                                                                                     w.shape[2])
            k = mean.shape[0]
            xs[name] = z * mask.unsqueeze(-1).to(z.dtype)
            masks[name] = mask.unsqueeze(0).expand(k, -1, -1)
        return xs, masks


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


@dataclass
class FrameCVResult(CVResult):
    projection: dict[str, Tensor | None] = field(default_factory=dict)


def build_sequence_head(cfg: HeadConfig, input_dims: Mapping[str, int],
                        n_classes: int = len(CLASSES), members: int = 1) -> nn.Module:
    if cfg.type not in SEQUENCE_HEADS:
        raise ConfigError(f"head type {cfg.type!r} is not a frame-level head; those are "
                          f"{sorted(SEQUENCE_HEADS)}.")
    dims = {n: int(input_dims[n]) for n in cfg.features}
    return SEQUENCE_HEADS[cfg.type](dims, cfg.hidden, cfg.dropout, n_classes, members,
                                    attn_heads=cfg.attn_heads, depth=cfg.depth,
                                    max_frames=cfg.max_frames)


def cross_validate_frames(frames: Mapping[str, Frames], labels: np.ndarray, cfg: HeadConfig,
                          train_cfg: TrainConfig, test_frames: Mapping[str, Frames] | None = None,
                          on_epoch: EpochCallback | None = None,
                          folds: np.ndarray | None = None) -> FrameCVResult:
    """Seeded k-fold training of one frame-level head, all folds as members of one model.

    `folds` gives each clip's fold (the manifest's); without it seeded stratified folds are
    drawn. Bit-identical on reruns (CPU). Test probabilities are the mean over fold models.
    """
    x = _checked(frames, cfg, "frames")
    y = _as_labels(labels, len(next(iter(x.values()))))
    x_test = _checked(test_frames, cfg, "test_frames", {n: f.dim for n, f in x.items()}) \
        if test_frames else None
    device = torch.device(train_cfg.device)
    splits = (given_splits(folds, len(y)) if folds is not None
              else fold_splits(y, train_cfg.folds, train_cfg.seed))
    parts = [train for train, _ in splits]
    reduction = fit_reduction(x, parts, cfg.input_dim, train_cfg.seed)
    with _run_settings(train_cfg.threads, device), _own_rng(device):
        torch.manual_seed(train_cfg.seed)
        model = build_sequence_head(cfg, reduction.dims(), members=len(parts)).to(device)
        reduced = _reduce_all(reduction, x, device)
        history = _fit(model, reduced, y, parts, cfg, device, train_cfg.seed, on_epoch)
        fold_of = np.empty(len(y), dtype=np.int64)
        for fold, (_, held) in enumerate(splits):
            fold_of[held] = fold
        oof = _probs(model, [reduced])[fold_of, np.arange(len(y))]
        test = (_probs(model, _reduced_chunks(reduction, x_test, device)).mean(axis=0)
                if x_test else None)
    states = _unstack(model, reduction)
    return FrameCVResult(oof, fold_of, test, history, states, reduction.projection)


def _checked(frames: Mapping[str, Frames] | None, cfg: HeadConfig, what: str,
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


Reduced = tuple[dict[str, Tensor], dict[str, Tensor]]  # inputs [K, n, T, r], masks [K, n, T]


def _reduced_chunks(reduction: Reduction, frames: Mapping[str, Frames], device: torch.device):
    n = len(next(iter(frames.values())))
    for start in range(0, n, CHUNK):
        yield reduction.apply(frames, slice(start, start + CHUNK), device)


def _reduce_all(reduction: Reduction, frames: Mapping[str, Frames],
                device: torch.device) -> Reduced:
    chunks = list(_reduced_chunks(reduction, frames, device))
    return ({n: torch.cat([c[0][n] for c in chunks], dim=1) for n in frames},
            {n: torch.cat([c[1][n] for c in chunks], dim=1) for n in frames})


def _fit(model: nn.Module, reduced: Reduced, y: np.ndarray, parts: list[np.ndarray],
         cfg: HeadConfig, device: torch.device, seed: int,
         on_epoch: EpochCallback | None) -> list[list[float]]:
    """Fixed-epoch minibatch Adam; member k draws its batches from fold k's train part."""
    xs, masks = reduced
    k, n_rows = len(parts), len(y)
    flat_x = {n: v.reshape(k * n_rows, *v.shape[2:]) for n, v in xs.items()}  # member-major
    mask1 = {n: m[0] for n, m in masks.items()}  # masks do not depend on the fold
    ys = torch.from_numpy(y).to(device)
    weight = torch.stack([class_weights(y[tr]) if cfg.class_weight else torch.ones(len(CLASSES))
                          for tr in parts]).to(device)
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
        idx = _epoch_order(parts, n, order).to(device)
        total = torch.zeros(k, device=device)
        for start in range(0, n, cfg.batch_size):
            batch = idx[:, start:start + cfg.batch_size]  # [K, B]
            b = batch.shape[1]
            rows, flat = batch.reshape(-1), (batch + offset).reshape(-1)
            x = {name: v.index_select(0, flat).view(k, b, *v.shape[1:])
                 for name, v in flat_x.items()}
            m = {name: v.index_select(0, rows).view(k, b, -1) for name, v in mask1.items()}
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
def _probs(model: nn.Module, chunks) -> np.ndarray:
    """[K, N, C] probabilities of every member over reduced chunks (or one reduced block)."""
    model.eval()
    out = []
    for xs, masks in chunks:
        n = next(iter(xs.values())).shape[1]
        for s in range(0, n, CHUNK):
            x = {name: v[:, s:s + CHUNK] for name, v in xs.items()}
            m = {name: v[:, s:s + CHUNK] for name, v in masks.items()}
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


def save_frame_bundle(path: str | os.PathLike, result: FrameCVResult, cfg: HeadConfig,
                      feature_dims: Mapping[str, int]) -> Path:
    """Every fold model with its standardisation, and the projections (weights_only-loadable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bundle = {
        "format": BUNDLE_FORMAT,
        "config": as_dict(cfg),
        "feature_dims": {n: int(feature_dims[n]) for n in cfg.features},
        "classes": list(CLASSES),
        "projection": {n: p for n, p in result.projection.items() if p is not None},
        "folds": [{"state_dict": s.state_dict, "scaler": s.scaler} for s in result.fold_states],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(bundle, tmp)
    os.replace(tmp, path)
    return path


class FramePredictor:
    """The fold models of a frame-level bundle; `predict_proba` averages their probabilities."""

    def __init__(self, cfg: HeadConfig, feature_dims: Mapping[str, int],
                 projection: Mapping[str, Tensor], folds: list[FoldState], device: str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.feature_dims = {n: int(feature_dims[n]) for n in cfg.features}
        self.reduction = Reduction(
            {n: projection.get(n) for n in cfg.features},
            {n: torch.stack([f.scaler[n]["mean"] for f in folds]) for n in cfg.features},
            {n: torch.stack([f.scaler[n]["std"] for f in folds]) for n in cfg.features})
        state = {n: torch.cat([f.state_dict[n] for f in folds]) for n in folds[0].state_dict}
        with _own_rng(torch.device("cpu")):
            self.model = build_sequence_head(cfg, self.reduction.dims(), members=len(folds))
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()

    def predict_proba(self, frames: Mapping[str, Frames]) -> np.ndarray:
        """[M, C] class probabilities in CLASSES order, mean over the fold models."""
        x = _checked(frames, self.cfg, "frames", self.feature_dims)
        return _probs(self.model, _reduced_chunks(self.reduction, x, self.device)).mean(axis=0)


def load_frame_bundle(path: str | os.PathLike, device: str = "cpu") -> FramePredictor:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model bundle {path} does not exist; run the train stage first.")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
        if bundle.get("format") != BUNDLE_FORMAT:
            raise ModelLoadError(f"{path} has format {bundle.get('format')!r}, expected "
                                 f"{BUNDLE_FORMAT!r}; pooled-feature bundles load with "
                                 f"models.train.load_bundle.")
        if list(bundle["classes"]) != list(CLASSES):
            raise ModelLoadError(f"{path} was trained for classes {bundle['classes']}, this "
                                 f"code uses {list(CLASSES)}; retrain.")
        cfg = HeadConfig(**bundle["config"])
        folds = [FoldState(f["state_dict"], f["scaler"]) for f in bundle["folds"]]
        return FramePredictor(cfg, bundle["feature_dims"], bundle["projection"], folds, device)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"model bundle {path} did not load: {err}. Retrain it.") from err


# --------------------------------------------------------------------------- stage


def train_frame_head(name: str, cfg: HeadConfig, train_cfg: TrainConfig,
                     manifest: str | os.PathLike, features_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, on_epoch: EpochCallback | None = None) -> Path:
    """`train@<name>` for a frame-level head: the same outputs as models.run.train_head."""
    from models.run import BUNDLE, HISTORY, PREDICTIONS, _write_predictions

    if cfg.type not in FRAME_HEAD_TYPES:
        raise ConfigError(f"{name}: type {cfg.type!r} is not a frame-level head.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = read_manifest(manifest)
    stores = [StoreReader(Path(features_dir) / n, kind="embedding") for n in cfg.features]
    try:
        have = [c for c in clips if all(c.clip_id in s for s in stores)]
    finally:
        for s in stores:
            s.close()
    failures = FailureReport(f"train@{name}")
    kept = {c.clip_id for c in have}
    for c in clips:
        if c.clip_id not in kept:
            failures.add(c.clip_id, "missing_features", f"not in every store of {cfg.features}; "
                         f"see the upstream stages' failures.json.")
    labelled = [c for c in have if c.label]
    unlabelled = [c for c in have if not c.label]
    frames = load_frames(features_dir, cfg.features, [c.clip_id for c in labelled + unlabelled],
                         cfg.frames_layer, cfg.max_frames)
    n_lab = len(labelled)
    lab = {n: f.take(np.arange(n_lab)) for n, f in frames.items()}
    test = ({n: f.take(np.arange(n_lab, len(f))) for n, f in frames.items()}
            if unlabelled else None)
    y = np.array([CLASSES.index(c.label) for c in labelled])
    folds = np.array([c.fold for c in labelled])  # the manifest's split, shared by every head
    result = cross_validate_frames(lab, y, cfg, train_cfg, test_frames=test, on_epoch=on_epoch,
                                   folds=folds)
    save_frame_bundle(out / BUNDLE, result, cfg, {n: f.dim for n, f in frames.items()})
    _write_predictions(out / PREDICTIONS, labelled, result.oof_probs, result.fold_of,
                       unlabelled, result.test_probs)
    write_json_atomic(out / HISTORY, {"train_loss": result.history})
    failures.write(out / "failures.json")
    return out
