"""Per-fold predictions of every predictor kind, and the out-of-fold scoring noise_eval uses."""
import csv

import numpy as np
import pytest

from features.storage.dataset import FeatureSet
from features.storage.store import StoreUpdate
from models.training.bundles import HeadPredictor, load_bundle, save_bundle
from models.training.train_config import CLASSES, TrainConfig
from models.heads import registry
from models.evaluation.metrics import compute_metrics
from models.noise.evaluation import held_out_by, out_of_fold
from models.heads.registry import head_config
from models.training.stage import cross_validate_head, train_head
from models.training.frame_trainer import pad_frames


def _pooled(n, rng):
    y = np.arange(n) % len(CLASSES)
    x = {"a": rng.normal(size=(n, 6)).astype(np.float32), "b": rng.normal(size=(n, 4)).astype(np.float32)}
    x["a"][:, :len(CLASSES)] += 2 * np.eye(len(CLASSES), dtype=np.float32)[y]
    return x, y


def _frames(n, rng):
    y = np.arange(n) % len(CLASSES)
    x = {k: pad_frames([rng.normal(size=(int(rng.integers(1, 7)), d)) + (y[i] if k == "a" else 0)
                        for i in range(n)], 4) for k, d in (("a", 6), ("b", 4))}
    return x, y


KINDS = {  # kind -> (config, inputs); each trains in well under a second
    "probe": (dict(type="probe", features=["a", "b"], hidden=8, epochs=3), _pooled),
    "early_fusion": (dict(type="early_fusion", features=["a", "b"], hidden=8, attn_heads=2, epochs=2,
                          max_frames=4, input_dim=4), _frames),
    "lightgbm": (dict(type="lightgbm", features=["a", "b"], n_estimators=5, num_leaves=4,
                      min_child_samples=3, num_threads=1), _pooled),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_fold_models_mean_is_predict_proba_and_fold_f_holds_out_fold_f(kind, tmp_path):
    """Through a saved bundle: the mean of `fold_proba` is `predict_proba` (bitwise), and fold
    f's row of a labelled clip is its out-of-fold probability (CVResult.fold_of = f)."""
    spec, make = KINDS[kind]
    cfg = head_config(spec)
    x, y = make(36, np.random.default_rng(0))
    folds = np.arange(36) % 3
    res = cross_validate_head(cfg, TrainConfig(seed=0, threads=1), x, y, folds)
    dims = {n: (v.dim if hasattr(v, "dim") else v.shape[1]) for n, v in x.items()}
    state = registry.get(cfg.type).trainer_module().bundle_state(res, cfg)
    model = HeadPredictor(load_bundle(save_bundle(tmp_path, cfg, dims, state))).model
    per_fold = model.fold_proba(x)
    assert per_fold.shape == (3, 36, len(CLASSES))
    np.testing.assert_array_equal(per_fold.mean(axis=0).astype(model.predict_proba(x).dtype),
                                  model.predict_proba(x))
    np.testing.assert_allclose(per_fold[res.fold_of, np.arange(36)], res.oof_probs, rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_fold[0], per_fold[1])  # three different models


def _write_head_inputs(root, ids, pooled, labels, folds):
    with StoreUpdate(root / "features" / "enc", "embedding", {"encoder": "enc"},
                     {c: f"k{c}" for c in ids}) as up:
        for cid, v in zip(ids, pooled):
            up.add(cid, None, pooled=v[None].astype(np.float16))
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "path", "size", "sha256", "duration_s", "label", "fold", "split"])
        for cid, label, fold in zip(ids, labels, folds):
            w.writerow([cid, f"v/{cid}.mp4", 1, "0" * 64, 1.0, CLASSES[label], fold, "labelled"])


def test_a_memorising_head_scores_its_clips_at_chance_out_of_fold(tmp_path):
    """Unique random features with random labels: a head can only memorise them. The fold mean
    scores its own training clips near 1.0 (leak); noise_eval's out-of-fold selection, on copies
    `<clip>__clean` with the same features, is near chance (~0.17). Manifest folds are 1, 3, 5:
    the models are chosen by predictions.csv's fold (the member index), not by the id itself."""
    rng = np.random.default_rng(1)
    n = 90
    ids = [f"c{i:03d}" for i in range(n)]
    x = rng.normal(size=(n, 48)).astype(np.float32)
    y = rng.integers(0, len(CLASSES), size=n)
    _write_head_inputs(tmp_path, ids, x, y, (np.arange(n) % 3) * 2 + 1)
    cfg = head_config(dict(type="probe", features=["enc"], hidden=64, dropout=0.0, weight_decay=0.0,
                           lr=1e-2, epochs=60, class_weight=False))
    head = train_head("memo", cfg, TrainConfig(seed=0, threads=1), tmp_path / "manifest.csv",
                      tmp_path / "features", tmp_path / "memo", probe_dir=tmp_path / "probe")
    copies = [f"{c}__clean" for c in ids]
    with StoreUpdate(tmp_path / "copies" / "enc", "embedding", {"encoder": "enc"},
                     {c: f"k{c}" for c in copies}) as up:
        for cid, v in zip(copies, x):
            up.add(cid, None, pooled=v[None].astype(np.float16))
    predictor = HeadPredictor(load_bundle(head))
    held = held_out_by(head)
    assert sorted(set(held.values())) == [0, 1, 2]
    source = dict(zip(copies, ids)) | {"stray__clean": "stray"}  # a source no fold held out
    with FeatureSet(tmp_path / "copies") as features:
        mean = predictor.predict(features, copies)
        scored, oof = out_of_fold(predictor, features, copies + ["stray__clean"], source, held)
    assert scored == copies  # the stray copy is not scored
    leak, fair = compute_metrics(y, mean)["weighted_f1"], compute_metrics(y, oof)["weighted_f1"]
    assert leak > 0.9 and fair < 0.35, (leak, fair)
