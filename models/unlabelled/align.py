"""Visual-to-acoustic alignment (paper 000): visual features mapped into the acoustic space.

Objective (ridge regression, closed form). With Zv [N, Dv] the standardised visual vectors
and Za [N, Da] the standardised acoustic vectors of the *fit clips* (same clip, both
modalities), the map is

    W = argmin_W ||Za - Zv W||_F^2 + alpha * N * ||W||_F^2  =  (Zv'Zv + alpha N I)^-1 Zv'Za

and a clip's aligned vector is  mean_a + std_a * (zv W): the acoustic vector its face predicts.
No label enters the fit, so a mapping fitted on labelled clips cannot carry their labels; the
fit clips are the unlabelled pool plus the labelled clips, and the test clips only in
transductive mode. The fit's quality is reported as R^2 on a seeded held-out tenth of the fit
clips, against predicting the other fit clips' mean (measured before the final fit on all).

`align_store` writes the aligned vectors as an embedding store (one pooled layer, no frames)
that any pooled head names like an encoder (`features: [hubert, clip_aligned, minilm]`).
With ``method: none`` the store holds the raw visual vectors instead: the ablation switch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from features.errors import ConfigError

METHODS = ("ridge", "none")
HOLDOUT = 0.1


@dataclass
class AlignConfig:
    """params.yaml `align`: the aligned store `artifacts/features/<name>`."""

    name: str = "clip_aligned"  # the new encoder name heads use in `features`
    source: str = "clip"  # visual encoder (its store under artifacts/features)
    target: str = "hubert"  # acoustic encoder
    source_layer: int | str = "mean"  # pooled layer of each: an index or "mean"
    target_layer: int | str = "mean"
    method: str = "ridge"  # ridge | none (store the raw visual vectors: the ablation)
    alpha: float = 1.0  # ridge strength, per fit clip (standardised features)
    transductive: bool = False  # also fit on the test clips (their features, never labels)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"align.method {self.method!r} is unknown; use one of "
                              f"{list(METHODS)}.")
        if not self.alpha > 0:
            raise ConfigError(f"align.alpha={self.alpha} must be > 0.")
        if self.source == self.target or self.name in (self.source, self.target):
            raise ConfigError(f"align.name/source/target must differ (got {self.name}, "
                              f"{self.source}, {self.target}); source is the visual encoder, "
                              f"target the acoustic one, name the new store.")
        for key in ("source_layer", "target_layer"):
            layer = getattr(self, key)
            if isinstance(layer, bool) or not (isinstance(layer, int) or layer == "mean"):
                raise ConfigError(f"align.{key}={layer!r} must be a layer index or 'mean'.")


@dataclass
class AlignMap:
    mean_v: np.ndarray
    std_v: np.ndarray
    weight: np.ndarray  # [Dv, Da]
    mean_a: np.ndarray
    std_a: np.ndarray

    def __call__(self, visual: np.ndarray) -> np.ndarray:
        z = (np.asarray(visual, np.float64) - self.mean_v) / self.std_v
        return (self.mean_a + self.std_a * (z @ self.weight)).astype(np.float32)

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.mean_v, self.std_v, self.weight, self.mean_a, self.std_a):
            h.update(np.ascontiguousarray(a, np.float64).tobytes())
        return h.hexdigest()[:32]


def fit_ridge(visual: np.ndarray, acoustic: np.ndarray, alpha: float) -> AlignMap:
    """The closed-form ridge map of the module docstring."""
    v, a = np.asarray(visual, np.float64), np.asarray(acoustic, np.float64)
    if len(v) != len(a) or len(v) < 2:
        raise ConfigError(f"alignment needs the same >= 2 clips in both modalities, got "
                          f"{len(v)} visual and {len(a)} acoustic rows; check that the pool has "
                          f"both features.")
    mv, sv = _stats(v)
    ma, sa = _stats(a)
    zv, za = (v - mv) / sv, (a - ma) / sa
    gram = zv.T @ zv + alpha * len(v) * np.eye(v.shape[1])
    return AlignMap(mv, sv, np.linalg.solve(gram, zv.T @ za), ma, sa)


def r2(pred: np.ndarray, true: np.ndarray, baseline: np.ndarray | None = None) -> float:
    """Coefficient of determination over all dimensions: 1 = perfect, 0 = as good as predicting
    `baseline` (default: the mean of `true`; out of sample, the fit clips' mean)."""
    true = np.asarray(true, np.float64)
    resid = ((true - pred) ** 2).sum()
    total = ((true - (true.mean(axis=0) if baseline is None else baseline)) ** 2).sum()
    return float(1.0 - resid / max(total, 1e-12))


def fit_with_holdout(visual: np.ndarray, acoustic: np.ndarray, alpha: float,
                     seed: int) -> tuple[AlignMap, float]:
    """(map fitted on every row, R^2 of a map fitted without a seeded tenth, on that tenth)."""
    n = len(visual)
    order = np.random.default_rng(seed).permutation(n)
    held, fit = order[: max(1, int(n * HOLDOUT))], order[max(1, int(n * HOLDOUT)):]
    if len(fit) < 2:
        raise ConfigError(f"alignment has only {n} fit clips; add unlabelled clips with both "
                          f"features (prepare.unlabelled).")
    probe = fit_ridge(visual[fit], acoustic[fit], alpha)
    score = r2(probe(visual[held]), acoustic[held], probe.mean_a)  # vs the fit clips' mean
    return fit_ridge(visual, acoustic, alpha), score


def align_store(cfg: AlignConfig, manifest: str | os.PathLike, features_dir: str | os.PathLike,
                unlabelled_dir: str, out_dir: str | os.PathLike) -> dict:
    """Fit the map on pool + labelled (+ test if transductive) clips, write the aligned store."""
    from features.cache import versions
    from features.media.manifest import read_manifest
    from features.reliability.reports import write_json_atomic
    from features.storage.record import StoreRecord
    from features.storage.store import StoreReader, StoreUpdate, clip_key
    from models.unlabelled.selection import target_groups

    clips = read_manifest(manifest)
    src, tgt = (Path(features_dir) / n for n in (cfg.source, cfg.target))
    with StoreReader(src, kind="embedding") as vs, StoreReader(tgt, kind="embedding") as acs:
        ids = [c.clip_id for c in clips if c.clip_id in vs]
        visual = _read(vs, ids, cfg.source_layer)
        src_keys = dict(zip(vs.ids, vs.keys))
        _, test = target_groups([c for c in clips if c.clip_id in vs], unlabelled_dir)
        both = [i for i, cid in enumerate(ids) if cid in acs and (cfg.transductive or not test[i])]
        if len(both) < 2:
            raise ConfigError(f"align: {len(both)} clips have both {cfg.source} and "
                              f"{cfg.target} features; extract both encoders for the "
                              f"unlabelled pool (prepare.unlabelled).")
        acoustic = _read(acs, [ids[i] for i in both], cfg.target_layer)
    info = {"config": asdict(cfg), "fit_clips": len(both), "clips": len(ids),
            "transductive": cfg.transductive}
    if cfg.method == "ridge":
        amap, info["holdout_r2"] = fit_with_holdout(visual[both], acoustic, cfg.alpha, cfg.seed)
        out, digest = amap(visual), amap.digest()
    else:
        out, digest = visual.astype(np.float32), "none"
    # One pooled row that is no model layer (row 0). No code version: the keys hold none today.
    meta = StoreRecord(producer="transform", name=cfg.name, family="align", layers_pooled=(0,),
                       layers_frames=(), hidden_size=int(out.shape[1]), store_dtype="float32",
                       fingerprint={"align": asdict(cfg), "map": digest},
                       code_version=versions.code_version("align")).to_meta()
    code = versions.fingerprint("align")  # the map's digest covers its inputs, not this code
    wanted = {cid: clip_key("align", src_keys[cid], digest, code) for cid in ids}
    with StoreUpdate(Path(out_dir), "embedding", meta, wanted) as up:
        todo = set(up.todo)
        for i, cid in enumerate(ids):
            if cid in todo:
                up.add(cid, pooled=out[i:i + 1])
    write_json_atomic(Path(str(out_dir) + ".align.json"), info)
    return info


def _read(store, ids: list[str], layer: int | str) -> np.ndarray:
    """[N, D] float32: one stored layer, or the mean over layers."""
    if layer == "mean":
        return store.pooled(None, ids=ids).astype(np.float32).mean(axis=1)
    return store.pooled(layer, ids=ids).astype(np.float32)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = x.std(axis=0)
    std[std < 1e-6] = 1.0
    return x.mean(axis=0), std
