"""Which pooled layers a head reads and how they become one vector per clip (`layer` in params).

| `layer` | reads | input |
|---|---|---|
| an index (negative from the end) | that layer's slice only | the layer's vector |
| a list of indices (s3prl's `layer_selections`) | those layers | their mean |
| `mean` | every layer | the mean over layers |
| `mean_last4` / `sum_last4` | the last four | their mean / their sum (MERTools sums) |
| `best` | `best_layer` of probe@<encoder> | that layer's vector |
| `weighted` | every layer | fold k: sum_l w_kl * standardised layer l (below) |

`weighted` is s3prl's Featurizer as the probe stage learnt it: fold k of the head uses the
softmax layer weights of the probe's fold-k model (``weights.json``, ``per_fold``), which was
trained on fold k's training part only, and standardises each layer with statistics of that
same training part, so no held-out label or feature reaches fold k's input. The head then gets
per-fold inputs ``[K, N, D]``. Heads standardise their inputs, so mean vs sum changes nothing in
training; it matters only where features leave the project.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from features.storage.dataset import FeatureSet
from features.errors import ConfigError
from features.reliability.reports import read_json
from models.training.train_config import check_layer
from models.training.cv import EPS_STD

BEST, WEIGHTS = "best.json", "weights.json"  # written by models.training.layer_probing (probe@<encoder>)
LAST4 = {"mean_last4": "mean", "sum_last4": "sum"}


@dataclass
class LayerPlan:
    """How one encoder's stored pooled layers become a head's input (stored in the bundle)."""

    layers: list[int]  # stored layer indices to read (non-negative)
    reduce: str  # "one" | "mean" | "sum" | "weighted"
    weights: np.ndarray | None = None  # weighted: [K, L] softmax layer weights per fold
    mean: np.ndarray | None = None  # weighted: [K, L, D] training-part statistics per fold
    std: np.ndarray | None = None

    def read(self, features: FeatureSet, encoder: str, ids: Sequence[str]) -> np.ndarray:
        """[N, D] for one layer (its slice only), else [N, len(layers), D]."""
        if self.reduce == "one":
            return features.pooled(encoder, self.layers[0], ids)
        if self.layers == list(range(features.n_layers(encoder))):
            return features.pooled(encoder, None, ids)
        return np.stack([features.pooled(encoder, i, ids) for i in self.layers], axis=1)

    def fit(self, raw: np.ndarray, parts: list[np.ndarray]) -> "LayerPlan":
        """`weighted`: per-fold, per-layer statistics of each fold's training rows of raw."""
        if self.reduce != "weighted":
            return self
        if len(parts) != len(self.weights):
            raise ConfigError(f"layer: weighted has probe weights for {len(self.weights)} folds, "
                              f"the head trains {len(parts)}; rerun the probe stage.")
        mean = np.stack([raw[tr].mean(axis=0, dtype=np.float64) for tr in parts])
        std = np.stack([raw[tr].std(axis=0, dtype=np.float64) for tr in parts])
        std[std < EPS_STD] = 1.0
        return LayerPlan(self.layers, self.reduce, self.weights, mean.astype(np.float32),
                         std.astype(np.float32))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """The head's input: [N, D], or [K, N, D] for `weighted`."""
        if self.reduce == "one":
            return raw
        if self.reduce in ("mean", "sum"):
            out = raw.sum(axis=1, dtype=np.float64)
            return (out / raw.shape[1] if self.reduce == "mean" else out).astype(np.float32)
        if self.mean is None:
            raise ConfigError("layer: weighted needs the training-part statistics (fit) first.")
        out = np.zeros((len(self.weights), len(raw), raw.shape[2]), np.float64)
        for k, w in enumerate(self.weights):
            coef = w[:, None] / self.std[k]  # [L, D]
            for l_ in range(raw.shape[1]):
                out[k] += raw[:, l_] * coef[l_]
            out[k] -= (coef * self.mean[k]).sum(axis=0)
        return out.astype(np.float32)

    def state(self) -> dict[str, Any]:
        arrays = {k: getattr(self, k).tolist() for k in ("weights", "mean", "std")
                  if getattr(self, k) is not None}
        return {"layers": list(self.layers), "reduce": self.reduce, **arrays}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "LayerPlan":
        arrays = {k: np.asarray(state[k], np.float32) for k in ("weights", "mean", "std")
                  if k in state}
        return cls(list(state["layers"]), state["reduce"], **arrays)


def plan_layer(layer: Any, encoder: str, n_layers: int, probe_dir: str | os.PathLike = "",
               folds: Sequence[int] = ()) -> LayerPlan:
    """The plan of one encoder for a head's `layer`; `folds` (the head's fold ids, member order)
    pick the probe's per-fold weights for `weighted`."""
    check_layer(layer)
    if isinstance(layer, (list, tuple)):
        return LayerPlan([_index(v, n_layers, encoder) for v in layer], "mean")
    if layer == "best":
        return LayerPlan([_index(best_layer(probe_dir, encoder), n_layers, encoder)], "one")
    if layer == "mean":
        return LayerPlan(list(range(n_layers)), "mean")
    if layer in LAST4:
        if n_layers < 4:
            raise ConfigError(f"layer {layer!r} needs at least 4 stored layers, {encoder!r} has "
                              f"{n_layers}; use 'mean' or an index.")
        return LayerPlan(list(range(n_layers - 4, n_layers)), LAST4[layer])
    if layer == "weighted":
        return LayerPlan(list(range(n_layers)), "weighted",
                         weights=probe_weights(probe_dir, encoder, n_layers, folds))
    return LayerPlan([_index(layer, n_layers, encoder)], "one")


def select_layer(pooled: np.ndarray, layer: Any) -> np.ndarray:
    """[N, L, D] (or [N, D]) pooled states -> [N, D] for a `layer` that needs no probe."""
    pooled = np.asarray(pooled, dtype=np.float32)
    if pooled.ndim == 2:
        pooled = pooled[:, None, :]  # an encoder with a single pooled output
    if pooled.ndim != 3:
        raise ConfigError(f"pooled features must be [N, L, D] or [N, D], got shape {pooled.shape}.")
    if isinstance(layer, str) and layer in ("best", "weighted"):
        raise ConfigError(f"layer {layer!r} needs the probe stage's outputs: use plan_layer.")
    plan = plan_layer(layer, "features", pooled.shape[1])
    return np.ascontiguousarray(plan.apply(pooled[:, plan.layers[0]] if plan.reduce == "one"
                                           else pooled[:, plan.layers]))


def best_layer(probe_dir: str | os.PathLike, encoder: str) -> int:
    """The `best_layer` that probe@<encoder> wrote (what `layer: best` resolves to)."""
    return int(_probe_file(probe_dir, encoder, BEST, "best")["best_layer"])


def probe_weights(probe_dir: str | os.PathLike, encoder: str, n_layers: int,
                  folds: Sequence[int]) -> np.ndarray:
    """[K, L] the probe's softmax layer weights of the folds `folds` (each learnt on that
    fold's training part only)."""
    info = _probe_file(probe_dir, encoder, WEIGHTS, "weighted")
    if "per_fold" not in info or "folds" not in info:
        raise ConfigError(f"layer: weighted needs per-fold layer weights in "
                          f"{Path(probe_dir) / encoder / WEIGHTS}; set probe.featurizer: true "
                          f"and rerun `dvc repro probe@{encoder}`.")
    by_fold = dict(zip(info["folds"], info["per_fold"]))
    missing = [f for f in folds if f not in by_fold]
    if missing:
        raise ConfigError(f"the probe of {encoder!r} has no layer weights for folds {missing} "
                          f"(it has {sorted(by_fold)}); rerun `dvc repro probe@{encoder}`.")
    weights = np.array([by_fold[f] for f in folds], np.float32)
    if weights.shape[1:] != (n_layers,):
        raise ConfigError(f"the probe of {encoder!r} weighs {weights.shape[1]} layers, the store "
                          f"has {n_layers}; rerun `dvc repro probe@{encoder}`.")
    return weights


def _probe_file(probe_dir: str | os.PathLike, encoder: str, name: str, layer: str) -> dict:
    path = Path(probe_dir) / encoder / name
    if not path.is_file():
        raise ConfigError(f"layer: {layer} needs {path}; run `dvc repro probe@{encoder}` (or "
                          f"`mer probe {encoder} ...`) first, or give the layer as an index.")
    return read_json(path)


def _index(layer: int, n_layers: int, encoder: str) -> int:
    if not -n_layers <= layer < n_layers:
        raise ConfigError(f"layer {layer} is out of range for the {n_layers} stored layers of "
                          f"{encoder!r}; use {-n_layers}..{n_layers - 1}, 'mean' or a name.")
    return layer % n_layers


def plan_head(cfg: Any, features: FeatureSet, probe_dir: str | os.PathLike = "",
              folds: Sequence[int] = ()) -> dict[str, LayerPlan]:
    """The layer plan of every encoder a pooled head reads (`folds`: its fold ids, in order)."""
    return {n: plan_layer(cfg.layer, n, features.n_layers(n), probe_dir, folds)
            for n in cfg.features}


def read_inputs(head: Any, cfg: Any, features: FeatureSet, ids: Sequence[str],
                plans: dict[str, LayerPlan] | None = None,
                parts: list[np.ndarray] | None = None
                ) -> tuple[dict[str, Any], dict[str, LayerPlan]]:
    """A head's inputs for `ids`: frames (frame-level heads), or pooled vectors through the
    plans; `weighted` plans are fitted first on `parts` (each fold's training rows of ids)."""
    if head.inputs == "frames":
        from models.training.frame_trainer import load_frames
        return load_frames(features, cfg.features, list(ids), cfg.frames_layer,
                           cfg.max_frames), {}
    plans = dict(plans or {})
    x = {}
    for n in cfg.features:
        raw = plans[n].read(features, n, ids)
        if parts is not None:
            plans[n] = plans[n].fit(raw, parts)
        x[n] = plans[n].apply(raw)
    return x, plans
