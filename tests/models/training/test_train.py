"""Cross-validation on small synthetic problems: quality, leakage, determinism, bundles."""
import numpy as np
import pytest
import torch

from features.errors import ConfigError, ModelLoadError
from models.training.bundles import HeadPredictor, load_bundle, save_bundle
from models.training.train_config import CLASSES, TrainConfig
from models.training.cv import ExtraRows, class_weights, fold_splits
from models.heads.layer_select import select_layer
from models.evaluation.metrics import compute_metrics
from models.heads.registry import head_config
from models.training.pooled_trainer import bundle_state, cross_validate

DIMS = {"hubert": 16, "clip": 8, "minilm": 8}
FAST = dict(hidden=16, epochs=15, batch_size=32, dropout=0.1, lr=3e-3)


def head_cfg(**kw):
    return head_config(kw)


def synthetic(n=240, seed=0, informative="hubert"):
    """Three modalities; only `informative` carries the class (a shifted centroid + noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    feats = {k: rng.normal(size=(n, d)).astype(np.float32) for k, d in DIMS.items()}
    centroids = rng.normal(scale=3.0, size=(len(CLASSES), DIMS[informative]))
    feats[informative] += centroids[y].astype(np.float32)
    feats[informative] *= 5.0  # unstandardised scale: the per-fold scaler must cope
    return feats, y


def run(feats, y, head="attention", seed=0, folds=4, **kw):
    cfg = head_cfg(type=head, features=list(DIMS), **{**FAST, **kw})
    return cross_validate(feats, y, cfg, TrainConfig(folds=folds, seed=seed, threads=1))


def test_select_layer_variants():
    pooled = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
    np.testing.assert_array_equal(select_layer(pooled, 0), pooled[:, 0])
    np.testing.assert_array_equal(select_layer(pooled, -1), pooled[:, 4])
    np.testing.assert_allclose(select_layer(pooled, "mean"), pooled.mean(axis=1))
    np.testing.assert_allclose(select_layer(pooled, "mean_last4"), pooled[:, 1:].mean(axis=1))
    np.testing.assert_allclose(select_layer(pooled, "sum_last4"), pooled[:, 1:].sum(axis=1))
    np.testing.assert_allclose(select_layer(pooled, [0, -1]), pooled[:, [0, 4]].mean(axis=1))
    np.testing.assert_array_equal(select_layer(pooled[:, 2], -1), pooled[:, 2])  # [N, D] input
    with pytest.raises(ConfigError, match="out of range"):
        select_layer(pooled, 5)
    with pytest.raises(ConfigError, match="mean_last4"):
        select_layer(pooled[:, :3], "mean_last4")
    with pytest.raises(ConfigError, match="renamed"):
        select_layer(pooled, "last4")


@pytest.mark.parametrize("head", ["attention", "probe"])
def test_separable_problem_is_learnt_and_shuffled_labels_are_not(head):
    feats_all, y_all = synthetic(n=300)  # the test part shares the training centroids
    feats, y = {k: v[:240] for k, v in feats_all.items()}, y_all[:240]
    test_feats, y_test = {k: v[240:] for k, v in feats_all.items()}, y_all[240:]
    cfg = head_cfg(type=head, features=list(DIMS), **FAST)
    res = cross_validate(feats, y, cfg, TrainConfig(folds=4, seed=0, threads=1), test=test_feats)
    assert res.oof_probs.shape == (240, len(CLASSES)) and res.test_probs.shape == (60, len(CLASSES))
    np.testing.assert_allclose(res.oof_probs.sum(axis=1), 1.0, rtol=1e-5)
    assert compute_metrics(y, res.oof_probs)["weighted_f1"] > 0.9
    assert compute_metrics(y_test, res.test_probs)["weighted_f1"] > 0.9

    shuffled = np.random.default_rng(5).permutation(y)
    chance = run(feats, shuffled, head)
    assert compute_metrics(shuffled, chance.oof_probs)["weighted_f1"] < 0.35  # chance is ~1/6


def test_reruns_are_bit_identical_and_seeds_differ():
    feats, y = synthetic(n=120)
    rng_before = torch.get_rng_state()
    a, b = run(feats, y, epochs=4), run(feats, y, epochs=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    np.testing.assert_array_equal(a.oof_probs, b.oof_probs)
    np.testing.assert_array_equal(a.fold_of, b.fold_of)
    assert a.history == b.history
    c = run(feats, y, seed=1, epochs=4)
    assert not np.array_equal(a.oof_probs, c.oof_probs)
    assert not np.array_equal(a.fold_of, c.fold_of)


def test_folds_are_stratified_and_scalers_fit_on_train_part():
    feats, y = synthetic(n=240)
    y = np.where(np.arange(240) < 40, 5, y)  # unbalanced: surprise is over-represented
    res = run(feats, y, head="probe", epochs=1)
    assert res.n_folds == 4 and set(res.fold_of) == {0, 1, 2, 3}
    overall = np.bincount(y, minlength=6) / len(y)
    for fold in range(4):
        held = y[res.fold_of == fold]
        assert np.abs(np.bincount(held, minlength=6) / len(held) - overall).max() < 0.03
        train_mean = feats["hubert"][res.fold_of != fold].mean(axis=0)
        np.testing.assert_allclose(res.fold_states[fold].scaler["hubert"]["mean"].numpy(),
                                   train_mean, rtol=1e-4, atol=1e-4)


def test_given_folds_are_used_as_is_and_checked():
    feats, y = synthetic(n=60)
    folds = np.arange(60) % 3  # e.g. the manifest's fold column
    cfg = head_cfg(type="probe", features=list(DIMS), **{**FAST, "epochs": 1})
    res = cross_validate(feats, y, cfg, TrainConfig(folds=7, threads=1), folds=folds)
    assert res.n_folds == 3 and (res.fold_of == folds).all()
    with pytest.raises(ConfigError, match="fold id"):
        cross_validate(feats, y, cfg, TrainConfig(threads=1), folds=folds[:-1])
    with pytest.raises(ConfigError, match="at least 2 folds"):
        cross_validate(feats, y, cfg, TrainConfig(threads=1), folds=np.zeros(60, int))


def test_too_small_class_falls_back_to_fewer_folds_with_warning():
    y = np.array([0] * 10 + [1] * 10 + [2] * 3)
    with pytest.warns(UserWarning, match="using 3 folds"):
        splits = fold_splits(y, folds=5, seed=0)
    assert len(splits) == 3
    for _, held in splits:
        assert (y[held] == 2).sum() == 1


def test_history_and_epoch_callback():
    feats, y = synthetic(n=120)
    calls = []
    cfg = head_cfg(type="probe", features=["hubert"], **{**FAST, "epochs": 3})
    res = cross_validate(feats, y, cfg, TrainConfig(folds=3, threads=1),
                         on_epoch=lambda f, e, loss: calls.append((f, e, loss)))
    assert [(f, e) for f, e, _ in calls] == [(f, e) for e in range(3) for f in range(3)]
    assert [loss for _, _, loss in calls] == [res.history[f][e] for e in range(3) for f in range(3)]
    assert all(h[-1] < h[0] for h in res.history)


def test_class_weights_are_balanced():
    w = class_weights(np.array([0, 0, 0, 1]))  # 2 present classes, n=4
    np.testing.assert_allclose(w.numpy(), [4 / 6, 2.0, 0, 0, 0, 0])


def test_bad_inputs_are_config_errors():
    feats, y = synthetic(n=60)
    cfg = head_cfg(type="probe", features=["hubert", "clip"], epochs=1)
    with pytest.raises(ConfigError, match="clip"):
        cross_validate({"hubert": feats["hubert"]}, y, cfg, TrainConfig())
    with pytest.raises(ConfigError, match="class ids"):
        cross_validate(feats, y + 1, cfg, TrainConfig())
    with pytest.raises(ConfigError, match="dims"):
        cross_validate(feats, y, cfg, TrainConfig(), test={"hubert": feats["hubert"],
                                                           "clip": feats["clip"][:, :3]})


def test_bundle_round_trips_predictions(tmp_path):
    feats, y = synthetic(n=120)
    test = {k: v[:20] + 0.5 for k, v in feats.items()}
    cfg = head_cfg(type="attention", features=list(DIMS), **{**FAST, "epochs": 3})
    res = cross_validate(feats, y, cfg, TrainConfig(folds=3, threads=1), test=test)
    path = save_bundle(tmp_path / "fusion", cfg, DIMS, bundle_state(res, cfg))
    torch.load(path / "model.pt", weights_only=True)  # plain tensors and dicts only
    bundle = load_bundle(path)
    assert bundle.cfg == cfg and bundle.head.name == "attention"
    predictor = HeadPredictor(bundle).model
    np.testing.assert_allclose(predictor.predict_proba(test), res.test_probs, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="dims"):
        predictor.predict_proba({k: v[:, :4] for k, v in test.items()})


def test_load_bundle_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_bundle(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "head.json").write_text('{"format": "mer-head/2", "type": "agt", '
                                                 '"classes": %s}' % list(CLASSES).__repr__()
                                                 .replace("'", '"'))
    (tmp_path / "junk" / "model.pt").write_bytes(b"not a bundle")
    with pytest.raises(ModelLoadError, match="did not load"):
        load_bundle(tmp_path / "junk")
    (tmp_path / "junk" / "head.json").write_text('{"format": "mer-head-bundle/1"}')
    with pytest.raises(ModelLoadError, match="retrain"):
        load_bundle(tmp_path / "junk")


def test_extra_rows_only_train_and_are_never_held_out():
    """Extra rows whose labels contradict the features: they must move the fold models (they
    train) without adding held-out rows; rows restricted to one fold train only that fold."""
    feats, y = synthetic(n=120)
    extra_x = {k: v[:60] for k, v in feats.items()}
    wrong = (y[:60] + 3) % len(CLASSES)
    cfg = head_cfg(type="probe", features=list(DIMS), **{**FAST, "epochs": 8})
    folds = np.arange(120) % 3
    tc = TrainConfig(threads=1)
    base = cross_validate(feats, y, cfg, tc, folds=folds)
    every = cross_validate(feats, y, cfg, tc, folds=folds, extra=ExtraRows(extra_x, wrong))
    assert every.oof_probs.shape == base.oof_probs.shape and (every.fold_of == folds).all()
    f1 = [compute_metrics(y, r.oof_probs)["weighted_f1"] for r in (base, every)]
    assert f1[1] < f1[0] - 0.1  # the poisoned extra rows trained every fold
    # rows restricted to fold 1 enter fold 1's training part only: its train-part scaler moves,
    # folds 0 and 2 keep exactly the statistics of their labelled train parts
    far = {k: v + 100.0 for k, v in extra_x.items()}
    only1 = cross_validate(feats, y, cfg, tc, folds=folds,
                           extra=ExtraRows(far, wrong, np.full(60, 1)))
    for k in range(3):
        mean = only1.fold_states[k].scaler["hubert"]["mean"].numpy()
        same = np.allclose(mean, base.fold_states[k].scaler["hubert"]["mean"].numpy())
        assert same == (k != 1), k
    with pytest.raises(ConfigError, match="folds"):
        cross_validate(feats, y, cfg, tc, folds=folds,
                       extra=ExtraRows(extra_x, wrong, np.full(60, 7)))


def test_run_flushes_subnormals_inside_and_restores_torch_settings():
    feats, y = synthetic(n=60)
    threads = torch.get_num_threads()
    subnormal = torch.full((1 << 20,), 1e-39)  # big enough to be split over both threads
    seen = []
    cfg = head_cfg(type="probe", features=["hubert"], **{**FAST, "epochs": 1})
    cross_validate(feats, y, cfg, TrainConfig(folds=2, threads=2),
                   on_epoch=lambda *_: seen.append(int(subnormal.mul(1.0).count_nonzero())))
    assert seen == [0, 0]  # flushed on every OpenMP thread (subnormals slow CPU math ~100x)
    assert int(subnormal.mul(1.0).count_nonzero()) == subnormal.numel()
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_train_head_reads_only_the_chosen_layer_of_the_store(tmp_path):
    """A head on one layer (an index or `best`) reads that layer's slice; only layer 2 of the
    store carries the class, so layer 2 learns, layer 0 does not, and `best` -> 2 equals 2."""
    import csv
    import json

    from features.storage.store import StoreUpdate
    from features.storage.dataset import FeatureSet
    from models.training.bundles import read_predictions
    from models.training.stage import train_head

    rng = np.random.default_rng(0)
    n, layers, dim = 120, 3, 8
    y = np.arange(n) % len(CLASSES)
    ids = [f"c{i:03d}" for i in range(n)]
    pooled = rng.normal(size=(n, layers, dim)).astype(np.float32)
    pooled[:, 2] += rng.normal(scale=3.0, size=(len(CLASSES), dim))[y]
    with StoreUpdate(tmp_path / "features" / "enc", "embedding", {"encoder": "enc"},
                     {c: f"k{c}" for c in ids}) as up:
        for i, cid in enumerate(ids):
            up.add(cid, None, pooled=pooled[i].astype(np.float16))
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "path", "size", "sha256", "duration_s", "label", "fold", "split"])
        for i, cid in enumerate(ids):
            w.writerow([cid, f"v/{cid}.mp4", 1, "0" * 64, 1.0, CLASSES[y[i]], i % 4, "labelled"])
    with FeatureSet(tmp_path / "features") as features:
        one, every = features.pooled("enc", 2, ids), features.pooled("enc", None, ids)
    assert one.shape == (n, dim) and every.shape == (n, layers, dim)
    np.testing.assert_array_equal(one, every[:, 2])
    (tmp_path / "probe" / "enc").mkdir(parents=True)
    (tmp_path / "probe" / "enc" / "best.json").write_text(json.dumps({"best_layer": 2}))

    def scores(layer):
        cfg = head_cfg(type="probe", features=["enc"], layer=layer, **FAST)
        out = train_head(f"h{layer}", cfg, TrainConfig(seed=0, threads=1), tmp_path / "manifest.csv",
                         tmp_path / "features", tmp_path / f"out_{layer}", probe_dir=tmp_path / "probe")
        rows = read_predictions(out / "predictions.csv")
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
        return compute_metrics(np.array([CLASSES.index(r["label"]) for r in rows]), probs), probs

    (good, p2), (bad, _), (_, pbest) = scores(2), scores(0), scores("best")
    assert good["weighted_f1"] > 0.8 and bad["weighted_f1"] < 0.4  # chance ~0.17
    np.testing.assert_array_equal(p2, pbest)
