"""Layer probing (paper 000): which hidden layer of an encoder carries the emotion, under the CV.

For one encoder's pooled states ``[N, L, D]`` and the manifest's folds (the split every head uses):

* **a probe per layer**: a class-weighted ridge classifier (least squares on one-hot targets,
  features standardised with each fold's train-part statistics), solved in closed form. It is a
  linear probe like a logistic one, with no epochs, learning rate or seed to tune, so the
  layer-versus-score curve is deterministic and reflects the layers, not the optimiser. It is
  fast because every fold shares the work: per layer, the Gram matrices of each (fold, class)
  block are computed once (one pass over the data), and each fold's weighted, centred,
  standardised normal equations are sums of those blocks minus its own; a Cholesky solve per
  fold follows. MER2024 size (5,030 clips, 25 layers x 1024) takes seconds on two cores.
* **a learnt softmax layer weighting** (s3prl's Featurizer): layer logits initialised at zero,
  softmax over layers, a weighted sum of the standardised layer vectors, then a linear
  classifier, trained jointly with Adam and class-weighted cross entropy. All folds train at
  once as the members of one model: each sees only its train rows (a 0/1 mask on the loss) and
  its own standardisation. The linear classifier is applied to every layer before the
  weighting (``x_l @ (W / std_l)``, one batched matrix product) instead of after, which turns
  an elementwise weighted sum into matrix products.

Outputs of `probe_encoder` (the `probe@<encoder>` stage): ``scores.json`` (one row per layer,
for `dvc plots`), ``layers.png``, ``weights.json`` (the learnt layer weights) and ``best.json``
(``best_layer`` and its score), which heads read with ``layer: best``; ``weights.json`` holds
each fold's learnt weights with the fold ids (``folds``, ``per_fold``), which heads read with
``layer: weighted`` (models.heads.layer_select: fold k of a head uses fold k's weights only).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from features.storage.dataset import FeatureSet
from features.errors import ConfigError
from features.media.manifest import read_manifest
from features.reliability.reports import write_json_atomic
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics, fast_scores
from models.evaluation.plots import plot_layer_curve
from models.training.cv import EPS_STD, fold_class_weights, given_splits, own_rng
from models.heads.layer_select import BEST, WEIGHTS

SCORES, PLOT = "scores.json", "layers.png"


@dataclass
class ProbeConfig:
    """params.yaml `probe`: the same settings for every encoder's `probe@<encoder>`."""

    alpha: float = 1.0  # ridge penalty on standardised features (their covariance has unit diagonal)
    class_weight: bool = True  # "balanced" class weights from each fold's train part
    top: int = 3  # how many best layers best.json lists
    featurizer: bool = True  # also learn the softmax layer weighting
    epochs: int = 20  # featurizer: fixed epochs (no early stopping on the held-out fold)
    lr: float = 1e-2  # featurizer: Adam learning rate
    weight_decay: float = 1e-4  # featurizer: on the linear classifier
    batch_size: int = 256  # featurizer
    seed: int = 0  # featurizer: initialisation and batch order
    threads: int = 0  # torch CPU threads; 0 keeps torch's setting

    def __post_init__(self) -> None:
        bad = {k: v for k, v in dict(alpha=self.alpha, top=self.top, epochs=self.epochs,
                                     lr=self.lr, batch_size=self.batch_size).items() if not v > 0}
        if bad or self.weight_decay < 0 or self.threads < 0:
            raise ConfigError(f"probe: {bad or ''} must be > 0, weight_decay and threads >= 0 "
                              f"(got weight_decay={self.weight_decay}, threads={self.threads}).")


@dataclass
class LayerScores:
    weighted_f1: list[float]  # per layer, out-of-fold
    accuracy: list[float]

    @property
    def best(self) -> int:
        return int(np.argmax(self.weighted_f1))  # ties: the lower layer


@dataclass
class LayerWeights:
    weights: np.ndarray  # [K, L] softmax layer weights of each fold's model
    oof_probs: np.ndarray  # [N, C]
    history: list[list[float]]  # per fold: mean train loss per epoch


def probe_layers(pooled: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                 cfg: ProbeConfig) -> LayerScores:
    """Out-of-fold weighted F1 and accuracy of a ridge probe on each layer of [N, L, D]."""
    pooled, y, splits = _checked(pooled, labels, folds)
    fold_of = np.asarray(folds)
    f1s, accs = [], []
    with _threads(cfg.threads):
        weights = _fold_class_weights(y, splits, cfg.class_weight)
        for layer in range(pooled.shape[1]):
            x = torch.from_numpy(np.ascontiguousarray(pooled[:, layer], dtype=np.float32))
            scores = _ridge_oof(x, y, fold_of, splits, weights, cfg.alpha)
            f1, acc = fast_scores(y, scores.argmax(-1).numpy())
            f1s.append(f1)
            accs.append(acc)
    return LayerScores(f1s, accs)


@contextlib.contextmanager
def _threads(threads: int):
    """A fixed torch CPU thread count inside (restored after).

    Not models.training.pooled_trainer._run_settings: torch.use_deterministic_algorithms imports torch._dynamo on
    first use (seconds), and nothing here needs it: CPU matrix products, Cholesky and the
    featurizer's ops are deterministic for a fixed thread count.
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _fold_class_weights(y: np.ndarray, splits, balanced: bool) -> Tensor:
    """[K, C] per-class sample weights of each fold's train part."""
    return fold_class_weights(y, [tr for tr, _ in splits], balanced).double()


def _ridge_oof(x: Tensor, y: np.ndarray, fold_of: np.ndarray, splits, weights: Tensor,
               alpha: float) -> Tensor:
    """[N, C] held-out ridge scores of one layer x [N, D], every fold from shared block Grams."""
    n_classes, dim = len(CLASSES), x.shape[1]
    x = x - x.mean(0, dtype=torch.float64).float()  # global centring: keeps float32 Grams exact
    folds = [int(np.unique(fold_of[held])[0]) for _, held in splits]
    blocks = {(k, c): np.flatnonzero((fold_of == f) & (y == c))
              for k, f in enumerate(folds) for c in range(n_classes)}
    gram = torch.zeros(len(folds), n_classes, dim, dim)
    sums = torch.zeros(len(folds), n_classes, dim, dtype=torch.float64)
    count = torch.zeros(len(folds), n_classes, dtype=torch.float64)
    for (k, c), rows in blocks.items():
        if len(rows):
            xb = x[torch.from_numpy(rows)]
            gram[k, c] = xb.T @ xb
            sums[k, c] = xb.sum(0, dtype=torch.float64)
            count[k, c] = len(rows)
    s_all, n_all = sums.sum(0), count.sum(0)  # per class, over folds
    # coef[k, (j, c)] = weight of class c in fold k's train part if j != k: one matrix product
    # gives every fold's weighted train Gram from the (fold, class) blocks
    coef = weights[:, None, :] * (1.0 - torch.eye(len(folds), dtype=torch.float64))[:, :, None]
    train_grams = (coef.reshape(len(folds), -1).float() @ gram.view(-1, dim * dim)).view(-1, dim, dim)
    eye = torch.eye(dim)
    systems, rhs, shifts = [], [], []
    for k in range(len(folds)):
        w = weights[k]  # [C]
        n_tr = (n_all - count[k]) * w  # weighted train rows per class
        total = n_tr.sum()
        mean = ((s_all - sums[k]) * w[:, None]).sum(0) / total  # [D]
        cov = train_grams[k] / float(total) - torch.outer(mean, mean).float()
        std = cov.diagonal().clamp_min(0).sqrt()
        std = torch.where(std < EPS_STD, torch.ones_like(std), std)
        systems.append(cov / torch.outer(std, std) + alpha * eye)
        ybar = n_tr / total  # weighted class shares [C]
        cross = ((s_all - sums[k]) * w[:, None]).T / total - torch.outer(mean, ybar)  # [D, C]
        rhs.append((cross / std.double()[:, None]).float())
        shifts.append((mean.float(), std, ybar.float()))
    # float64 solve: near-constant features (e.g. identical transcripts) leave float32
    # correlation matrices a rounding error away from indefinite
    beta = torch.cholesky_solve(torch.stack(rhs).double(),
                                torch.linalg.cholesky(torch.stack(systems).double())).float()
    out = torch.zeros(len(y), n_classes)
    for k, (_, held) in enumerate(splits):
        mean, std, ybar = shifts[k]
        held_t = torch.from_numpy(held)
        out[held_t] = ((x[held_t] - mean) / std) @ beta[k] + ybar
    return out


def learn_layer_weights(pooled: np.ndarray, labels: np.ndarray, folds: np.ndarray,
                        cfg: ProbeConfig) -> LayerWeights:
    """The s3prl Featurizer (softmax layer weights + linear probe) under the folds, all at once."""
    pooled, y, splits = _checked(pooled, labels, folds)
    n_layers = pooled.shape[1]
    n_classes, k = len(CLASSES), len(splits)
    with _threads(cfg.threads), own_rng(torch.device("cpu")):
        torch.manual_seed(cfg.seed)
        x = torch.from_numpy(np.ascontiguousarray(pooled.transpose(1, 0, 2), dtype=np.float32))
        shift, factor = _layer_scalers(x, splits)  # [K, L, D] each
        train = torch.zeros(k, len(y))
        for f, (tr, _) in enumerate(splits):
            train[f, torch.from_numpy(tr)] = 1.0
        cw = _fold_class_weights(y, splits, cfg.class_weight).float()  # [K, C]
        logits = torch.zeros(k, n_layers, requires_grad=True)  # s3prl: zero init = plain mean
        lin = torch.empty(k, x.shape[2], n_classes).uniform_(-1, 1).div_(x.shape[2] ** 0.5)
        lin.requires_grad_(True)
        bias = torch.zeros(k, n_classes, requires_grad=True)
        opt = torch.optim.Adam([{"params": [lin], "weight_decay": cfg.weight_decay},
                                {"params": [logits, bias], "weight_decay": 0.0}], lr=cfg.lr)
        ys = torch.from_numpy(y)
        order = torch.Generator().manual_seed(cfg.seed)
        history: list[list[float]] = [[] for _ in range(k)]
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(y), generator=order)
            total, seen = torch.zeros(k), torch.zeros(k)
            for s in range(0, len(y), cfg.batch_size):
                idx = perm[s:s + cfg.batch_size]
                out = _featurizer_logits(x, idx, shift, factor, logits, lin, bias)  # [K, B, C]
                target = ys[idx]
                w = cw[:, target] * train[:, idx]  # held-out rows weigh 0 for their fold
                nll = F.cross_entropy(out.transpose(1, 2), target.expand(k, -1), reduction="none")
                loss = (w * nll).sum(1) / w.sum(1).clamp_min(1e-12)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                total += loss.detach() * len(idx)
                seen += len(idx)
            for f, v in enumerate((total / seen).tolist()):
                history[f].append(v)
        with torch.no_grad():
            probs, member = torch.zeros(len(y), n_classes), _fold_index(len(y), splits)
            for s in range(0, len(y), 1024):
                idx = torch.arange(s, min(s + 1024, len(y)))
                p = torch.softmax(_featurizer_logits(x, idx, shift, factor, logits, lin, bias), -1)
                probs[idx] = p[member[idx], torch.arange(len(idx))]  # each row from its fold
            weights = torch.softmax(logits, -1).detach().numpy()
    return LayerWeights(weights, probs.numpy(), history)


def _fold_index(n: int, splits) -> Tensor:
    """[N] the member (0..K-1) that holds each row out."""
    member = np.empty(n, dtype=np.int64)
    for f, (_, held) in enumerate(splits):
        member[held] = f
    return torch.from_numpy(member)


def _featurizer_logits(x: Tensor, idx: Tensor, shift: Tensor, factor: Tensor, logits: Tensor,
                       lin: Tensor, bias: Tensor) -> Tensor:
    """[K, B, C] = sum_l softmax(logits)_kl * (standardised x_l @ lin_k) + bias_k."""
    n_layers, k, n_classes = x.shape[0], lin.shape[0], lin.shape[2]
    xb = x.index_select(1, idx)  # [L, B, D]
    per_layer = (factor.unsqueeze(-1) * lin.unsqueeze(1))  # [K, L, D, C]: W_k / std_kl
    per_layer = per_layer.permute(1, 2, 0, 3).reshape(n_layers, x.shape[2], k * n_classes)
    scores = torch.bmm(xb, per_layer).view(n_layers, len(idx), k, n_classes)  # [L, B, K, C]
    offset = torch.einsum("kld,kdc->klc", shift, lin)  # the standardisation's shift term
    a = torch.softmax(logits, -1)  # [K, L]
    return torch.einsum("lbkc,kl->kbc", scores, a) + torch.einsum("klc,kl->kc", offset, a)[:, None] \
        + bias[:, None]


def _layer_scalers(x: Tensor, splits) -> tuple[Tensor, Tensor]:
    """(shift, factor) [K, L, D] with (x - mean) / std == shift + x * factor, train parts only.

    One pass per layer: sums over each held-out part, a fold's train sums are total minus its own.
    """
    n_layers, n, dim = x.shape
    member = _fold_index(n, splits)
    shifts, factors = torch.zeros(len(splits), n_layers, dim), torch.zeros(len(splits), n_layers, dim)
    for layer in range(n_layers):
        xl = x[layer].double()
        s1 = torch.zeros(len(splits), dim, dtype=torch.float64).index_add_(0, member, xl)
        s2 = torch.zeros(len(splits), dim, dtype=torch.float64).index_add_(0, member, xl * xl)
        count = torch.bincount(member, minlength=len(splits)).double()[:, None]
        n_tr = n - count
        mean = (s1.sum(0) - s1) / n_tr
        std = ((s2.sum(0) - s2) / n_tr - mean * mean).clamp_min(0).sqrt()
        std = torch.where(std < EPS_STD, torch.ones_like(std), std)
        factors[:, layer] = (1.0 / std).float()
        shifts[:, layer] = (-mean / std).float()
    return shifts, factors


def _checked(pooled: np.ndarray, labels: np.ndarray, folds: np.ndarray):
    pooled = np.asarray(pooled)
    if pooled.ndim != 3:
        raise ConfigError(f"pooled features must be [N, L, D], got shape {pooled.shape}.")
    y = np.asarray(labels)
    if y.shape != (len(pooled),) or not np.issubdtype(y.dtype, np.integer) or (
            len(y) and (y.min() < 0 or y.max() >= len(CLASSES))):
        raise ConfigError(f"labels must be {len(pooled)} class ids 0..{len(CLASSES) - 1}.")
    return pooled, y.astype(np.int64), given_splits(folds, len(y))


# --------------------------------------------------------------------------- the stage


def probe_encoder(encoder: str, manifest: str | os.PathLike, store: str | os.PathLike,
                  out_dir: str | os.PathLike, cfg: ProbeConfig) -> dict:
    """Probe every layer of one encoder's store on the labelled clips; write the four outputs."""
    clips = [c for c in read_manifest(manifest) if c.label]
    store = Path(store)
    with FeatureSet(store.parent) as features:
        have = set(features.common_ids([store.name], [c.clip_id for c in clips]))
        clips = [c for c in clips if c.clip_id in have]
        if not clips:
            raise ConfigError(f"no labelled clip of the manifest is in {store}; run embed first.")
        pooled = features.pooled(store.name, ids=[c.clip_id for c in clips])
    y = np.array([CLASSES.index(c.label) for c in clips])
    folds = np.array([c.fold for c in clips])
    scores = probe_layers(pooled, y, folds, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SCORES, [{"layer": i, "weighted_f1": f, "accuracy": a}
                                     for i, (f, a) in enumerate(zip(scores.weighted_f1,
                                                                    scores.accuracy))])
    learnt = learn_layer_weights(pooled, y, folds, cfg) if cfg.featurizer else None
    weights = {"method": "softmax layer weights (s3prl Featurizer) + linear probe"}
    if learnt is not None:
        m = compute_metrics(y, learnt.oof_probs)
        weights.update(layer_weights=[round(float(v), 5) for v in learnt.weights.mean(0)],
                       folds=sorted(int(f) for f in set(folds.tolist())),
                       per_fold=[[round(float(v), 5) for v in row] for row in learnt.weights],
                       weighted_f1=m["weighted_f1"], accuracy=m["accuracy"],
                       train_loss=[round(float(np.mean(e)), 5) for e in zip(*learnt.history)])
    write_json_atomic(out / WEIGHTS, weights)
    ranked = sorted(range(len(scores.weighted_f1)), key=lambda i: (-scores.weighted_f1[i], i))
    best = {"encoder": encoder, "best_layer": scores.best, "layers": len(scores.weighted_f1),
            "weighted_f1": scores.weighted_f1[scores.best],
            "accuracy": scores.accuracy[scores.best], "top_layers": ranked[:cfg.top],
            "featurizer_weighted_f1": weights.get("weighted_f1"), "clips": len(y),
            "probe": f"ridge alpha={cfg.alpha}"}
    write_json_atomic(out / BEST, best)
    plot_layer_curve(scores.weighted_f1, scores.accuracy,
                     None if learnt is None else learnt.weights.mean(0), out / PLOT,
                     f"{encoder}: out-of-fold probe per layer ({len(y)} clips)",
                     featurizer_f1=weights.get("weighted_f1"))
    return best
