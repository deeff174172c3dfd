"""Layer probing: the layer that carries the signal is found, noise is not learnt, reruns agree."""
import json

import numpy as np
import pytest

from features.errors import ConfigError
from features.media.manifest import Clip, write_manifest
from features.storage.store import write_store
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics, fast_scores
from models.heads.layer_select import best_layer
from models.training.layer_probing import (ProbeConfig, learn_layer_weights, probe_encoder,
                            probe_layers)

FAST = ProbeConfig(epochs=15, batch_size=64, lr=0.02)


def synthetic(n=240, layers=6, dim=24, signal=3, strength=1.0, seed=0):
    """[N, L, D] noise in every layer; layer `signal` also holds a class centroid."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    x = rng.normal(size=(n, layers, dim)).astype(np.float32) * 4 + 10  # unstandardised
    x[:, signal] += strength * 4 * rng.normal(size=(len(CLASSES), dim)).astype(np.float32)[y]
    folds = np.arange(n) % 4
    rng.shuffle(folds)
    return x, y, folds


def test_best_layer_is_the_one_with_the_signal_and_noise_is_not_learnt():
    x, y, folds = synthetic()
    scores = probe_layers(x, y, folds, FAST)
    assert scores.best == 3 and scores.weighted_f1[3] > 0.9
    assert max(f for i, f in enumerate(scores.weighted_f1) if i != 3) < 0.35  # chance ~1/6
    shuffled = np.random.default_rng(1).permutation(y)
    assert max(probe_layers(x, shuffled, folds, FAST).weighted_f1) < 0.35


def test_layer_weights_put_mass_on_the_signal_layer_and_reruns_are_identical():
    x, y, folds = synthetic(strength=0.6)
    a = learn_layer_weights(x, y, folds, FAST)
    b = learn_layer_weights(x, y, folds, FAST)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.oof_probs, b.oof_probs)
    assert a.weights.shape == (4, 6)
    np.testing.assert_allclose(a.weights.sum(1), 1.0, rtol=1e-5)
    assert (a.weights.argmax(1) == 3).all() and a.weights[:, 3].min() > 0.3
    assert compute_metrics(y, a.oof_probs)["weighted_f1"] > 0.8
    assert all(h[-1] < h[0] for h in a.history)
    assert probe_layers(x, y, folds, FAST) == probe_layers(x, y, folds, FAST)


def test_held_out_rows_do_not_leak_into_a_fold():
    """Changing the labels of fold 0 leaves the other folds' held-out scores unchanged."""
    x, y, folds = synthetic(n=120)
    from models.training.layer_probing import _fold_class_weights, _ridge_oof
    from models.training.cv import given_splits
    import torch
    y2 = y.copy()
    y2[folds == 0] = (y2[folds == 0] + 1) % len(CLASSES)
    out = []
    for labels in (y, y2):
        splits = given_splits(folds, len(labels))
        out.append(_ridge_oof(torch.from_numpy(np.ascontiguousarray(x[:, 3])), labels, folds,
                              splits, _fold_class_weights(labels, splits, False), 1.0))
    # fold 0's rows are predicted by a model that never saw them: its scores do not move
    np.testing.assert_allclose(out[0][folds == 0].numpy(), out[1][folds == 0].numpy(),
                               rtol=1e-4, atol=1e-4)
    assert not np.allclose(out[0][folds == 1].numpy(), out[1][folds == 1].numpy())


def test_fast_scores_match_sklearn():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 6, 200), rng.integers(0, 5, 200)
    probs = np.eye(6)[pred]
    m = compute_metrics(y, probs)
    assert fast_scores(y, pred) == (m["weighted_f1"], m["accuracy"])


def test_stage_writes_outputs_and_best_resolves(tmp_path):
    x, y, folds = synthetic(n=96, layers=5, signal=2)
    clips = [Clip(f"c{i:03d}", f"v/c{i}.mp4", 1, "0", 1.0, CLASSES[y[i]], int(folds[i]), "labelled")
             for i in range(len(y))]
    clips.append(Clip("u0", "v/u0.mp4", 1, "0", 1.0, "", -1, "unlabelled"))
    write_manifest(tmp_path / "manifest.csv", clips)
    pooled = np.concatenate([x, x[:1]])
    write_store(tmp_path / "hubert", "embedding", {},
                [(c.clip_id, None, None, pooled[i]) for i, c in enumerate(clips)])
    best = probe_encoder("hubert", tmp_path / "manifest.csv", tmp_path / "hubert",
                         tmp_path / "probe" / "hubert", FAST)
    assert best["best_layer"] == 2 and best["clips"] == 96 and best["top_layers"][0] == 2
    out = tmp_path / "probe" / "hubert"
    scores = json.loads((out / "scores.json").read_text())
    assert [r["layer"] for r in scores] == list(range(5)) and scores[2]["weighted_f1"] > 0.8
    weights = json.loads((out / "weights.json").read_text())
    assert len(weights["layer_weights"]) == 5 and abs(sum(weights["layer_weights"]) - 1) < 1e-3
    assert weights["folds"] == sorted(set(folds.tolist())) and len(weights["per_fold"]) == \
        len(weights["folds"])  # fold k's weights, learnt on fold k's training part
    assert (out / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert best_layer(tmp_path / "probe", "hubert") == 2
    with pytest.raises(ConfigError, match="probe@clip"):
        best_layer(tmp_path / "probe", "clip")


def test_config_is_checked():
    with pytest.raises(ConfigError):
        ProbeConfig(alpha=0)
    with pytest.raises(ConfigError, match="fold id"):
        probe_layers(np.zeros((10, 2, 3)), np.zeros(10, int), np.zeros(9, int), FAST)
