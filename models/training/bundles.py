"""Head folders: the bundle (what predicts) and the prediction files (what was predicted).

A trained head folder (``artifacts/heads/<name>/``) holds:

* ``head.json``: format, head type, its config (the params entry), feature dims, classes: read
  without torch (evaluate, `mer metrics`), parsed by the type's config class on load (strict);
* ``model.pt``: the trainer's state (fold models, scalers; LightGBM model texts) and the input
  plans (models.heads.layer_select: which layers, the `weighted` statistics), all tensors/dicts/strings,
  loadable with ``torch.load(weights_only=True)``;
* ``predictions.csv``: one row per clip: split, label, fold, predicted class, probabilities;
* ``history.json`` (train loss per fold and epoch) and ``failures.json``.

Ensembles write the same ``predictions.csv``. `load_head` turns a folder back into a predictor
through the head registry, whatever the head type.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from features.params import as_dict
from features.storage.dataset import FeatureSet
from features.errors import ModelLoadError
from features.reliability.reports import read_json, write_json_atomic
from models.heads import registry
from models.training.train_config import CLASSES

FORMAT = "mer-head/2"
META, BUNDLE, PREDICTIONS, HISTORY = "head.json", "model.pt", "predictions.csv", "history.json"


@dataclass
class Bundle:
    """A trained head as saved: its type, config, input sizes, input plans and trainer state."""

    head: registry.HeadType
    cfg: Any
    feature_dims: dict[str, int]
    inputs: dict[str, dict]  # encoder -> models.heads.layer_select.LayerPlan state (pooled heads)
    state: dict  # what the type's trainer `bundle_state` returned


def save_bundle(head_dir: str | os.PathLike, cfg: Any, feature_dims: Mapping[str, int],
                state: dict, inputs: Mapping[str, dict] | None = None,
                lineage: Mapping[str, dict] | None = None) -> Path:
    """Write head.json and model.pt into `head_dir` (each atomically); `lineage` is what
    decided the features it trained on (`features.cache.lineage.record`), checked by `mer predict`."""
    import torch

    head_dir = Path(head_dir)
    head_dir.mkdir(parents=True, exist_ok=True)
    head = registry.get(cfg.type)
    tmp = head_dir / (BUNDLE + ".tmp")
    torch.save({"format": FORMAT, "inputs": _tensors(dict(inputs or {})), "state": state}, tmp)
    os.replace(tmp, head_dir / BUNDLE)  # never leave a half-written bundle behind
    write_json_atomic(head_dir / META, {
        "format": FORMAT, "type": head.name, "summary": head.summary, "config": as_dict(cfg),
        "feature_dims": {n: int(feature_dims[n]) for n in cfg.features},
        "classes": list(CLASSES), "lineage": dict(lineage or {})})
    return head_dir


def read_meta(head_dir: str | os.PathLike) -> dict:
    """head.json of a trained head (no torch)."""
    path = Path(head_dir) / META
    if not path.is_file():
        raise ModelLoadError(f"{path} does not exist; run the train stage (`dvc repro "
                             f"train@{Path(head_dir).name}`) first.")
    try:
        meta = read_json(path)
    except ValueError as err:
        raise ModelLoadError(f"{path} is not JSON ({err}); retrain the head.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise ModelLoadError(f"{path} has format {got!r}, this code reads {FORMAT!r}; retrain "
                             f"the head.")
    if list(meta.get("classes", [])) != list(CLASSES):
        raise ModelLoadError(f"{path} was trained for classes {meta.get('classes')}, this code "
                             f"uses {list(CLASSES)}; retrain.")
    return meta


def load_bundle(head_dir: str | os.PathLike) -> Bundle:
    """The bundle of a trained head folder; any problem is a ModelLoadError saying to retrain."""
    import torch

    head_dir = Path(head_dir)
    meta = read_meta(head_dir)
    try:
        head = registry.get(meta["type"])
        cfg = registry.head_config(meta["config"], f"{head_dir / META} config")
        saved = torch.load(head_dir / BUNDLE, map_location="cpu", weights_only=True)
        if saved.get("format") != FORMAT:
            raise ModelLoadError(f"{head_dir / BUNDLE} has format {saved.get('format')!r}, "
                                 f"expected {FORMAT!r}; retrain.")
        return Bundle(head, cfg, dict(meta["feature_dims"]), _arrays(saved["inputs"]),
                      saved["state"])
    except ModelLoadError:
        raise
    except Exception as err:  # corrupt file, missing key, unknown type
        raise ModelLoadError(f"head {head_dir} did not load: {err}. Retrain it.") from err


class HeadPredictor:
    """Any trained head folder behind one `predict(features, ids)` (fold-mean) and
    `predict_folds(features, ids)` (each fold model's own)."""

    def __init__(self, bundle: Bundle, device: str = "cpu"):
        self.bundle, self.cfg = bundle, bundle.cfg
        try:
            self.model = bundle.head.trainer_module().predictor(
                bundle.cfg, bundle.feature_dims, bundle.state, device)
        except Exception as err:  # mismatched weights
            raise ModelLoadError(f"the {bundle.head.name!r} bundle did not load: {err}. "
                                 f"Retrain it.") from err

    def predict(self, features: FeatureSet, ids: Sequence[str]) -> np.ndarray:
        """[N, C] probabilities (mean of the fold models) for clips every store holds."""
        return self.model.predict_proba(self._inputs(features, ids))

    def predict_folds(self, features: FeatureSet, ids: Sequence[str]) -> np.ndarray:
        """[F, N, C] each fold model's probabilities; fold f is the one that held out the
        labelled clips with `fold` f in predictions.csv, so it alone may score them."""
        return self.model.fold_proba(self._inputs(features, ids))

    def _inputs(self, features: FeatureSet, ids: Sequence[str]):
        from models.heads.layer_select import LayerPlan, read_inputs

        plans = {n: LayerPlan.from_state(s) for n, s in self.bundle.inputs.items()}
        return read_inputs(self.bundle.head, self.cfg, features, list(ids), plans)[0]


def load_head(head_dir: str | os.PathLike, device: str = "cpu") -> HeadPredictor:
    return HeadPredictor(load_bundle(head_dir), device)


def _tensors(value: Any) -> Any:
    """numpy arrays -> tensors, recursively (torch.load's weights_only reads tensors, not numpy)."""
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    return value


def _arrays(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- predictions


def write_predictions(path: str | os.PathLike, labelled: Sequence[Any], oof: np.ndarray,
                      fold_of: np.ndarray, unlabelled: Sequence[Any],
                      test: np.ndarray | None) -> Path:
    """predictions.csv: labelled clips (objects with clip_id, label) with their held-out fold and
    out-of-fold probabilities, then the other clips (fold -1) with fold-mean probabilities."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "split", "label", "fold", "predicted", *CLASSES])
        rows = [(c, "labelled", int(f), p) for c, f, p in zip(labelled, fold_of, oof)]
        if test is not None:
            rows += [(c, "unlabelled", -1, p) for c, p in zip(unlabelled, test)]
        for clip, split, fold, probs in rows:
            w.writerow([clip.clip_id, split, clip.label, fold, CLASSES[int(np.argmax(probs))],
                        *(f"{p:.6f}" for p in probs)])
    os.replace(tmp, path)
    return path


def read_predictions(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def labelled_probs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(class ids [N], out-of-fold probabilities [N, C]) of the labelled rows of a file."""
    rows = [r for r in read_predictions(path) if r["split"] == "labelled"]
    y = np.array([CLASSES.index(r["label"]) for r in rows], dtype=np.int64)
    return y, np.array([[float(r[c]) for c in CLASSES] for r in rows]).reshape(-1, len(CLASSES))


def scored(*folders: str | os.PathLike | None) -> dict[str, Path]:
    """name -> predictions.csv of every trained head / ensemble under the given folders."""
    found: dict[str, Path] = {}
    for folder in (Path(f) for f in folders if f is not None):
        for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
            if (sub / PREDICTIONS).is_file():
                if sub.name in found:
                    raise KeyError(f"{sub.name!r} names both a head and an ensemble; rename one "
                                   f"in params.yaml (train.heads / ensemble).")
                found[sub.name] = sub / PREDICTIONS
    return found
