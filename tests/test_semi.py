"""Pseudo-label selection, thresholds, caps, voting, self-training rounds and their leakage rules."""
import numpy as np
import pytest

from features.errors import ConfigError
from models.config import CLASSES
from models.metrics import fast_scores
from models.semi import (NO_CAP, RoundConfig, base_round, run_round, select_confident,
                         select_votes)

C = len(CLASSES)
NONE = np.full(C, NO_CAP)


def onehotish(labels, conf):
    p = np.full((len(labels), C), (1 - np.asarray(conf))[:, None] / (C - 1))
    p[np.arange(len(labels)), labels] = conf
    return p


def test_confidence_per_class_thresholds():
    probs = onehotish([0, 0, 1, 1], [0.995, 0.95, 0.95, 0.85])
    thr = np.array([0.99, 0.9, 0.9, 0.9, 0.9, 0.9])  # frequent class 0 strict, others lower
    sel = select_confident(probs, thr, NONE)
    assert sel.index.tolist() == [0, 2] and sel.label.tolist() == [0, 1]
    assert sel.gain()["neutral"] == 1 and sel.gain()["angry"] == 1


def test_caps_keep_the_most_confident_per_class():
    probs = onehotish([2, 2, 2, 3], [0.91, 0.99, 0.95, 0.92])
    caps = NONE.copy()
    caps[2] = 2
    sel = select_confident(probs, np.full(C, 0.9), caps)
    assert sel.index.tolist() == [1, 2, 3]  # the 0.91 'happy' clip is over the cap
    caps[2] = 0
    assert select_confident(probs, np.full(C, 0.9), caps).index.tolist() == [3]


def test_candidates_mask_and_nothing_selected():
    probs = onehotish([0, 1], [0.999, 0.999])
    sel = select_confident(probs, np.full(C, 0.9), NONE, candidates=np.array([False, True]))
    assert sel.index.tolist() == [1]
    assert len(select_confident(probs, np.full(C, 1.0), NONE)) == 0


def test_vote_k_of_n_with_optional_thresholds():
    a = onehotish([0, 1, 2, 3], [0.9, 0.6, 0.9, 0.9])
    b = onehotish([0, 1, 4, 3], [0.9, 0.9, 0.9, 0.5])
    c = onehotish([5, 1, 5, 3], [0.9, 0.9, 0.9, 0.9])
    probs = np.stack([a, b, c])
    sel = select_votes(probs, 2, NONE)
    assert sel.index.tolist() == [0, 1, 3] and sel.label.tolist() == [0, 1, 3]
    assert select_votes(probs, 3, NONE).index.tolist() == [1, 3]
    # with thresholds 0.8, only heads above it vote: clip 1 keeps 2 votes, clip 3 keeps 2
    sel = select_votes(probs, 3, NONE, thresholds=np.full(C, 0.8))
    assert sel.index.tolist() == []
    assert select_votes(probs, 2, NONE, thresholds=np.full(C, 0.8)).index.tolist() == [0, 1, 3]


@pytest.mark.parametrize("kwargs, key", [
    ({"thresholds": 0.0}, "r1.thresholds"),
    ({"thresholds": {"happy": 1.5}}, "r1.thresholds"),
    ({"thresholds": {"bored": 0.9}}, "r1.thresholds: unknown class"),
    ({"default_threshold": -1}, "r1.default_threshold"),
    ({"caps": {"sad": -3}}, "r1.caps"),
    ({"rule": "vote", "k": 4}, "r1.k=4 must be a whole number in 1..3"),
])
def test_bad_round_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RoundConfig(after="base", **kwargs).validate("r1", n_heads=3)


# ------------------------------------------------------------------ rounds and leakage


def nn_fit(x, y, folds, pool):
    """fit_fold of a 1-nearest-neighbour head: memorises its training rows (the worst case for
    leakage: any held-out label that reaches its training set is copied straight back)."""
    def predict(train_x, train_y, q):
        d = ((q[:, None, :] - train_x[None]) ** 2).sum(-1)
        return np.eye(C)[train_y[d.argmin(1)]] * 0.999 + 0.001 / C

    def fit_fold(k, extra, extra_y):
        tr = folds != k
        tx = np.concatenate([x[tr], pool[extra]])
        ty = np.concatenate([y[tr], extra_y]).astype(int)
        return predict(tx, ty, x[folds == k])[None], predict(tx, ty, pool)[None]
    return fit_fold


def noise_problem(seed=0, n=240, m=1200, d=3):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), n // C)
    folds = np.tile(np.arange(4), n // 4)
    return rng.normal(size=(n, d)), y, folds, rng.normal(size=(m, d))


def wf1(y, oof):
    return fast_scores(y, oof[0].argmax(1))[0]


def test_rounds_on_pure_noise_stay_at_chance():
    x, y, folds, pool = noise_problem()
    fit = nn_fit(x, y, folds, pool)
    res = base_round(folds, fit)
    cfg = RoundConfig(after="base", thresholds=0.7)
    scores = [wf1(y, res.oof)]
    for r in range(2):
        res = run_round(cfg, f"r{r + 1}", res.pools, folds, np.ones(len(pool), bool), fit)
        assert min(res.selected) > 500  # it did train on many pseudo-labelled clips
        scores.append(wf1(y, res.oof))
    assert max(scores) < 0.25, scores  # chance is 1/6 for six balanced classes


def test_the_noise_test_catches_fold_mean_selection():
    """The same rounds, but pseudo-labels from the fold-MEAN pool predictions (what a naive
    implementation does): held-out labels leak back through the pool, far above chance."""
    x, y, folds, pool = noise_problem()
    fit = nn_fit(x, y, folds, pool)
    res = base_round(folds, fit)
    leaky = [type(p)(res.target, p.taken, p.label) for p in res.pools]
    res = run_round(RoundConfig(after="base", thresholds=0.7), "r1", leaky, folds,
                    np.ones(len(pool), bool), fit)
    assert wf1(y, res.oof) > 0.5  # 0.79 measured; the per-fold rounds above stay near 0.17


def test_pseudo_rows_only_in_training_parts_and_test_clips_need_transductive():
    x, y, folds, pool = noise_problem(n=48, m=60)
    seen = []

    def fit_fold(k, extra, extra_y):
        seen.append((k, extra.copy()))
        held = np.full((1, int((folds == k).sum()), C), 1 / C)
        target = np.zeros((1, len(pool), C))
        target[0, :, 2] = 1.0  # every target row confidently 'happy'
        return held, target

    selectable = np.arange(len(pool)) < 40  # rows 40.. are the user's test clips
    res = base_round(folds, fit_fold)
    res = run_round(RoundConfig(after="base", thresholds=0.9, caps=25), "r1", res.pools, folds,
                    selectable, fit_fold)
    for k, extra in seen[4:]:
        assert len(extra) == 25 and extra.max() < 40  # capped; never a test clip
    assert res.oof.shape == (1, len(y), C)  # scored rows = the human-labelled rows only
    assert res.mean_gain["happy"] == 25
    res = run_round(RoundConfig(after="r1", thresholds=0.9), "r2", res.pools, folds,
                    selectable, fit_fold)
    assert res.mean_gain["happy"] == 15 and min(res.selected) == 40  # accumulated


def test_round_that_selects_nothing_still_trains():
    x, y, folds, pool = noise_problem(n=48, m=30)
    fit = nn_fit(x, y, folds, pool)
    res = base_round(folds, fit)
    res = run_round(RoundConfig(after="base", thresholds=1.0), "r1", res.pools, folds,
                    np.ones(len(pool), bool), lambda k, e, ey: (fit(k, e, ey)))
    assert res.selected == [0, 0, 0, 0] and sum(res.mean_gain.values()) == 0
