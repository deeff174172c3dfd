"""Layer plans of pooled heads: lists, mean/sum of the last four, and `weighted` without leakage."""
import json

import numpy as np
import pytest

from features.storage.dataset import FeatureSet
from features.errors import ConfigError
from features.media.manifest import Clip, write_manifest
from features.storage.store import write_store
from models.training.bundles import load_head, read_predictions
from models.training.train_config import CLASSES, TrainConfig
from models.heads.layer_select import LayerPlan, plan_layer
from models.evaluation.metrics import compute_metrics
from models.training.layer_probing import ProbeConfig, probe_encoder
from models.heads.registry import head_config
from models.training.stage import train_head


def _probe_weights(folder, folds, per_fold):
    (folder / "enc").mkdir(parents=True, exist_ok=True)
    (folder / "enc" / "weights.json").write_text(json.dumps({"folds": folds, "per_fold": per_fold}))


def test_weighted_takes_each_folds_own_probe_weights_by_fold_id(tmp_path):
    _probe_weights(tmp_path, [0, 1, 2], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    plan = plan_layer("weighted", "enc", 3, tmp_path, folds=[2, 0])  # member order: folds 2, 0
    np.testing.assert_array_equal(plan.weights, [[0, 0, 1], [1, 0, 0]])
    with pytest.raises(ConfigError, match=r"folds \[5\]"):
        plan_layer("weighted", "enc", 3, tmp_path, folds=[5])
    with pytest.raises(ConfigError, match="weighs 3 layers, the store has 4"):
        plan_layer("weighted", "enc", 4, tmp_path, folds=[0])
    with pytest.raises(ConfigError, match="probe@other"):
        plan_layer("weighted", "other", 3, tmp_path, folds=[0])
    (tmp_path / "enc" / "weights.json").write_text(json.dumps({"method": "x"}))  # featurizer off
    with pytest.raises(ConfigError, match="probe.featurizer"):
        plan_layer("weighted", "enc", 3, tmp_path, folds=[0])


def test_weighted_statistics_come_from_each_folds_training_rows_only():
    """Fold k's input is sum_l w_kl (x_l - mean_kl) / std_kl with train-part statistics: the
    held-out rows can be anything without changing fold k's statistics or any other row."""
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(30, 3, 4)).astype(np.float32) * 3 + 1
    parts = [np.arange(10, 30), np.r_[0:10, 20:30], np.arange(0, 20)]  # fold k holds out 10k..
    plan = LayerPlan([0, 1, 2], "weighted", np.array([[0.5, 0.5, 0], [0, 0, 1], [0.2, 0.3, 0.5]],
                                                     np.float32)).fit(raw, parts)
    x = plan.apply(raw)
    assert x.shape == (3, 30, 4)
    mean = raw[parts[1]].mean(axis=0)
    std = raw[parts[1]].std(axis=0)
    np.testing.assert_allclose(x[1], (raw[:, 2] - mean[2]) / std[2], rtol=1e-4, atol=1e-5)
    poisoned = raw.copy()
    poisoned[0:10] = 1e3  # fold 0's held-out rows
    again = LayerPlan(plan.layers, "weighted", plan.weights).fit(poisoned, parts)
    np.testing.assert_array_equal(again.mean[0], plan.mean[0])
    np.testing.assert_array_equal(again.apply(poisoned)[0, 10:], x[0, 10:])
    assert not np.array_equal(again.mean[1], plan.mean[1])  # fold 1 trains on those rows
    state = LayerPlan.from_state(plan.state())
    np.testing.assert_array_equal(state.apply(raw), x)


def _project(tmp_path, n=96, layers=5, signal=2):
    rng = np.random.default_rng(0)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    folds = np.arange(n) % 3
    x = rng.normal(size=(n + 4, layers, 8)).astype(np.float32) * 4 + 10
    x[:n, signal] += 6 * rng.normal(size=(len(CLASSES), 8)).astype(np.float32)[y]
    clips = [Clip(f"c{i:03d}", "v", 1, "0", 1.0, CLASSES[y[i]], int(folds[i]), "labelled")
             for i in range(n)] + [Clip(f"u{i}", "v", 1, "0", 1.0, "", -1, "unlabelled")
                                   for i in range(4)]
    write_manifest(tmp_path / "manifest.csv", clips)
    write_store(tmp_path / "features" / "enc", "embedding", {},
                [(c.clip_id, None, None, x[i]) for i, c in enumerate(clips)])
    return clips


@pytest.mark.slow
def test_weighted_head_end_to_end_learns_and_predicts_like_training(tmp_path):
    """probe@enc learns per-fold layer weights; a `layer: weighted` head trains on them, and the
    saved plan reproduces the unlabelled clips' probabilities from the store alone."""
    clips = _project(tmp_path)
    probe_encoder("enc", tmp_path / "manifest.csv", tmp_path / "features" / "enc",
                  tmp_path / "probe" / "enc", ProbeConfig(epochs=15, batch_size=64, lr=0.05))
    weights = json.loads((tmp_path / "probe" / "enc" / "weights.json").read_text())
    assert weights["folds"] == [0, 1, 2]
    assert all(np.argmax(w) == 2 for w in weights["per_fold"])  # the signal layer
    cfg = head_config({"type": "probe", "features": ["enc"], "layer": "weighted", "hidden": 16,
                       "epochs": 20, "dropout": 0.1, "lr": 3e-3})
    out = train_head("w", cfg, TrainConfig(threads=1), tmp_path / "manifest.csv",
                     tmp_path / "features", tmp_path / "heads" / "w", tmp_path / "probe")
    rows = read_predictions(out / "predictions.csv")
    lab = [r for r in rows if r["split"] == "labelled"]
    y = np.array([CLASSES.index(r["label"]) for r in lab])
    probs = np.array([[float(r[c]) for c in CLASSES] for r in lab])
    # measured: weighted 0.68, the signal layer alone 0.62, `mean` of all layers 0.36, chance 0.17
    assert compute_metrics(y, probs)["weighted_f1"] > 0.55
    head = load_head(out)
    np.testing.assert_allclose(head.bundle.inputs["enc"]["weights"],
                               np.array(weights["per_fold"], np.float32), atol=1e-5)
    with FeatureSet(tmp_path / "features") as features:
        again = head.predict(features, [c.clip_id for c in clips if not c.label])
    test = np.array([[float(r[c]) for c in CLASSES] for r in rows if r["split"] != "labelled"])
    np.testing.assert_allclose(again, test, atol=2e-6)


def test_list_of_layers_reads_those_layers_only(tmp_path):
    _project(tmp_path)
    with FeatureSet(tmp_path / "features") as features:
        plan = plan_layer([2, -1], "enc", features.n_layers("enc"))
        assert plan.layers == [2, 4] and plan.reduce == "mean"
        ids = ["c000", "c001"]
        every = features.pooled("enc", None, ids)
        np.testing.assert_allclose(plan.apply(plan.read(features, "enc", ids)),
                                   every[:, [2, 4]].mean(axis=1), rtol=1e-6)
    with pytest.raises(ConfigError, match="out of range"):
        plan_layer([2, 7], "enc", 5)
