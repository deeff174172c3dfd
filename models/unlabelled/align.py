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

The saved map. The fitted map is kept as `<trained>/map.safetensors` (its float64 arrays) with
`<trained>/map.json`, the *record* of what decides it:

    settings   the `align` params
    stores     the source and target stores' fingerprints (`features.cache.lineage`: what
               decides their values, not where the model folder lies)
    labelled   a digest of the labelled clips both stores hold, by their per-clip keys
    code       code and library versions (`features.cache.versions.fingerprint("align")`)

and beside it what the fit used (clip count and digest, held-out R^2, the map's digest). The map
is refitted only when the record changes. Unlabelled clips (pool and test) are deliberately not
in the record: they join the first fit, and clips added later are mapped with the saved map, so
adding clips computes only them and never moves a stored vector (heads trained on the store stay
valid, and a new clip gets what the store would hold for it). The price: a map fitted before the
pool existed stays fitted on the labelled clips; delete `<trained>` (DVC then reruns `align`) to
refit on the grown pool. `apply_saved_map` maps the clips of any source store (`mer predict`'s
new videos) with the saved map.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from features.errors import ConfigError, MerError

METHODS = ("ridge", "none")
HOLDOUT = 0.1
MAP_FILE, RECORD_FILE = "map.safetensors", "map.json"
FORMAT = "mer-align-map/1"
ARRAYS = ("mean_v", "std_v", "weight", "mean_a", "std_a")


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


# ----------------------------------------------------------------------------- the saved map


@dataclass
class SavedMap:
    record: dict  # what decides the map (module docstring): a change refits
    fit: dict  # what the fit used: clips, their digest, holdout_r2, the map's digest ("map")
    amap: AlignMap | None  # None: method none (the raw visual vectors)

    @property
    def digest(self) -> str:
        return self.fit["map"]

    def __call__(self, visual: np.ndarray) -> np.ndarray:
        return visual.astype(np.float32) if self.amap is None else self.amap(visual)


def default_trained_dir(out_dir: str | os.PathLike) -> Path:
    """artifacts/features/<name> -> artifacts/align/<name>: a store folder holds only shards."""
    out = Path(out_dir)
    return out.parent.parent / "align" / out.name


def fit_record(cfg: AlignConfig, features_dir: str | os.PathLike,
               labelled: Sequence[tuple[str, str, str]]) -> dict:
    """The record of the module docstring; `labelled`: (clip, source key, target key)."""
    from features.cache import lineage, versions

    return _plain({"settings": asdict(cfg),
                   "stores": lineage.record(features_dir, [cfg.source, cfg.target]),
                   "labelled": {"clips": len(labelled), "digest": _digest(sorted(labelled))},
                   "code": versions.fingerprint("align")})


def save_map(folder: str | os.PathLike, saved: SavedMap) -> Path:
    """map.safetensors, then map.json: the record is written last, so a torn save is no map."""
    from safetensors.numpy import save_file

    from features.reliability.reports import write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD_FILE).unlink(missing_ok=True)
    if saved.amap is None:
        (folder / MAP_FILE).unlink(missing_ok=True)
    else:
        tmp = folder / f".tmp-{os.getpid()}-{MAP_FILE}"
        save_file({k: np.ascontiguousarray(getattr(saved.amap, k), np.float64) for k in ARRAYS},
                  str(tmp))
        os.replace(tmp, folder / MAP_FILE)
    write_json_atomic(folder / RECORD_FILE, {"format": FORMAT, "record": saved.record,
                                             "fit": saved.fit})
    return folder


def load_map(folder: str | os.PathLike) -> SavedMap | None:
    """The map saved in `folder`; None when there is none, or it is unreadable or damaged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        info = json.loads((folder / RECORD_FILE).read_text())
        if info.get("format") != FORMAT:
            return None
        if info["fit"]["map"] == "none":
            return SavedMap(info["record"], info["fit"], None)
        arrays = load_file(str(folder / MAP_FILE))
        amap = AlignMap(**{k: arrays[k] for k in ARRAYS})
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return SavedMap(info["record"], info["fit"], amap) if amap.digest() == info["fit"]["map"] \
        else None


# ----------------------------------------------------------------------------- the stage


@dataclass
class _Plan:
    """What the manifest and the two stores give `align_store`."""

    ids: list[str]  # manifest clips with source features: every one is mapped
    fit: list[str]  # clips with both features the map is fitted on (test: only transductive)
    labelled: list[tuple[str, str, str]]  # labelled fit clips: (id, source key, target key)
    pool: int  # pool clips among the fit clips


def align_store(cfg: AlignConfig, manifest: str | os.PathLike, features_dir: str | os.PathLike,
                unlabelled_dir: str, out_dir: str | os.PathLike,
                trained_dir: str | os.PathLike | None = None) -> dict:
    """Fit the map on pool + labelled (+ test if transductive) clips unless the map saved in
    `trained_dir` (default `default_trained_dir(out_dir)`) has the same record; write the
    aligned store, computing only the clips it lacks. Returns the `<out>.align.json` info plus
    `refitted` and `mapped` (clips computed in this run)."""
    from features.media.manifest import read_manifest
    from features.reliability.reports import write_json_atomic
    from features.storage.store import StoreReader

    clips = read_manifest(manifest)
    trained = Path(trained_dir) if trained_dir else default_trained_dir(out_dir)
    src, tgt = (Path(features_dir) / n for n in (cfg.source, cfg.target))
    with StoreReader(src, kind="embedding") as vs, StoreReader(tgt, kind="embedding") as acs:
        plan = _plan(cfg, clips, vs, acs, unlabelled_dir)
        record = fit_record(cfg, features_dir, plan.labelled)
        saved = load_map(trained)
        refit = saved is None or saved.record != record
        if refit:
            _say_refit(saved, record, trained)
            saved = _fit(cfg, vs, acs, plan, record)
            save_map(trained, saved)
            if not plan.pool:
                print(f"align: no unlabelled pool clips: the map is fitted on the "
                      f"{len(plan.fit)} labelled{' and test' if cfg.transductive else ''} clips; "
                      f"pool clips added later are mapped with it (delete {trained} to refit "
                      f"on them).", file=sys.stderr)
        mapped = write_aligned(cfg, saved, vs, plan.ids, out_dir)
    info = {"config": asdict(cfg), "fit_clips": saved.fit["clips"], "clips": len(plan.ids),
            "transductive": cfg.transductive}
    if "holdout_r2" in saved.fit:
        info["holdout_r2"] = saved.fit["holdout_r2"]
    write_json_atomic(Path(str(out_dir) + ".align.json"), info)
    return {**info, "refitted": refit, "mapped": mapped}


def apply_saved_map(cfg: AlignConfig, trained_dir: str | os.PathLike,
                    features_dir: str | os.PathLike, ids: Sequence[str],
                    out_dir: str | os.PathLike) -> dict:
    """`mer predict`: the clips `ids` of the source store under `features_dir` mapped with the
    map `align` saved in `trained_dir`, into the store `out_dir` (only the clips it lacks are
    computed; the same keys and meta as the `align` stage's store, so heads' lineage checks
    pass). A missing map, other settings or other source features are a MerError."""
    from features.cache import lineage
    from features.storage.store import StoreReader

    saved = load_map(trained_dir)
    if saved is None:
        raise MerError(f"no saved alignment map in {trained_dir} (or it is damaged); run "
                       f"`dvc repro align` (or `mer align`) first.")
    changed = _changed(saved.record["settings"], _plain(asdict(cfg)))
    if changed:
        raise MerError(f"the align settings differ from those the map in {trained_dir} was "
                       f"fitted with ({', '.join(changed)}); restore them or refit with "
                       f"`dvc repro align`.")
    lineage.check({cfg.source: saved.record["stores"][cfg.source]}, features_dir, [cfg.source],
                  f"the alignment map in {trained_dir}")
    with StoreReader(Path(features_dir) / cfg.source, kind="embedding") as vs:
        missing = [c for c in ids if c not in vs]
        if missing:
            raise MerError(f"{len(missing)} clip(s) have no {cfg.source} features under "
                           f"{features_dir} (e.g. {missing[:3]}); compute them first "
                           f"(embed@{cfg.source}).")
        mapped = write_aligned(cfg, saved, vs, list(ids), out_dir)
    return {"clips": len(ids), "mapped": mapped, "map": saved.digest}


def write_aligned(cfg: AlignConfig, saved: SavedMap, vs, ids: list[str],
                  out_dir: str | os.PathLike) -> int:
    """Bring the aligned store to `ids`, mapping only the clips it lacks; returns how many."""
    from features.cache import versions
    from features.storage.record import StoreRecord
    from features.storage.store import StoreUpdate, clip_key

    dim = vs.pooled_shape[2] if saved.amap is None else saved.amap.weight.shape[1]
    # One pooled row that is no model layer (row 0).
    meta = StoreRecord(producer="transform", name=cfg.name, family="align", layers_pooled=(0,),
                       layers_frames=(), hidden_size=int(dim), store_dtype="float32",
                       fingerprint={"align": asdict(cfg), "map": saved.digest},
                       code_version=versions.code_version("align")).to_meta()
    code = versions.fingerprint("align")  # the map's digest covers its inputs, not this code
    # a clip's key follows its source features (vs.keys: per-clip keys), the map and the code
    wanted = {cid: clip_key("align", vs.keys[cid], saved.digest, code) for cid in ids}
    with StoreUpdate(Path(out_dir), "embedding", meta, wanted) as up:
        todo = list(up.todo)
        if todo:
            for cid, row in zip(todo, saved(_read(vs, todo, cfg.source_layer))):
                up.add(cid, pooled=row[None])
    return len(todo)


def _plan(cfg: AlignConfig, clips: list, vs, acs, unlabelled_dir: str) -> _Plan:
    from models.unlabelled.selection import target_groups

    have = [c for c in clips if c.clip_id in vs]
    pool, test = target_groups(have, unlabelled_dir)
    fit = [i for i, c in enumerate(have) if c.clip_id in acs and (cfg.transductive or not test[i])]
    labelled = [(have[i].clip_id, vs.keys[have[i].clip_id], acs.keys[have[i].clip_id])
                for i in fit if have[i].label]
    return _Plan([c.clip_id for c in have], [have[i].clip_id for i in fit], labelled,
                 int(pool[fit].sum()) if fit else 0)


def _fit(cfg: AlignConfig, vs, acs, plan: _Plan, record: dict) -> SavedMap:
    if len(plan.fit) < 2:
        raise ConfigError(f"align: {len(plan.fit)} clips have both {cfg.source} and "
                          f"{cfg.target} features; extract both encoders for the labelled "
                          f"clips and the unlabelled pool (prepare.unlabelled).")
    fit: dict[str, Any] = {"clips": len(plan.fit), "digest": _digest(plan.fit)}
    if cfg.method == "none":
        return SavedMap(record, {**fit, "map": "none"}, None)
    amap, score = fit_with_holdout(_read(vs, plan.fit, cfg.source_layer),
                                   _read(acs, plan.fit, cfg.target_layer), cfg.alpha, cfg.seed)
    return SavedMap(record, {**fit, "holdout_r2": score, "map": amap.digest()}, amap)


def _say_refit(saved: SavedMap | None, record: dict, trained: Path) -> None:
    if saved is not None:
        print(f"align: refitting the map in {trained} (changed since its fit: "
              f"{', '.join(_changed(saved.record, record))}).", file=sys.stderr)


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read(store, ids: list[str], layer: int | str) -> np.ndarray:
    """[N, D] float32: one stored layer, or the mean over layers."""
    if layer == "mean":
        return store.pooled(None, ids=ids).astype(np.float32).mean(axis=1)
    return store.pooled(layer, ids=ids).astype(np.float32)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    std = x.std(axis=0)
    std[std < 1e-6] = 1.0
    return x.mean(axis=0), std


def _plain(value: Any) -> Any:
    """JSON-equal form (tuples as lists, sorted keys): how the record compares after a reload."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, default=str).encode()).hexdigest()[:32]
