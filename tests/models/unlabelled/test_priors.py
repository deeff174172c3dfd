"""EM prior-shift correction (Saerens et al. 2002) against a planted prior shift."""
import json

import numpy as np
import pytest

from features.errors import ConfigError
from models.training.train_config import CLASSES
from models.unlabelled.priors import (PriorsConfig, adjust, em_priors, fit_calibration, read_priors,
                           source_priors)

C = len(CLASSES)


def bayes_posteriors(n, priors, source, seed=0, sep=2.0):
    """Labels drawn with `priors`; exact Bayes posteriors of unit Gaussians around class means,
    computed under the `source` priors (what a classifier trained there would output)."""
    means = np.random.default_rng(100).normal(scale=sep, size=(C, 4))  # one fixed problem
    rng = np.random.default_rng(seed)
    y = rng.choice(C, size=n, p=priors)
    x = means[y] + rng.normal(size=(n, 4))
    loglik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    post = np.exp(loglik - loglik.max(1, keepdims=True)) * source
    return post / post.sum(1, keepdims=True), y


def test_em_recovers_planted_priors_within_002():
    planted = np.array([0.05, 0.35, 0.1, 0.3, 0.15, 0.05])
    probs, y = bayes_posteriors(20_000, planted, source_priors("uniform"))
    est = em_priors(probs, source_priors("uniform"))
    assert est.converged
    # within 0.02 of every planted prior; L1 from the sample's own class shares (the planted
    # priors plus sampling noise of ~0.015 L1 at this size) also under 0.02
    assert np.abs(est.priors - planted).max() < 0.02
    assert np.abs(est.priors - np.bincount(y, minlength=C) / len(y)).sum() < 0.02
    # the naive estimate (mean of the unadjusted posteriors) is visibly worse: EM did the work
    assert np.abs(probs.mean(0) - planted).sum() > 2 * np.abs(est.priors - planted).sum()
    assert np.all(np.diff(est.log_likelihood) >= -1e-9)  # EM never lowers the likelihood


def test_em_on_unshifted_set_keeps_source_priors():
    source = np.array([0.3, 0.1, 0.2, 0.15, 0.15, 0.1])
    probs, _ = bayes_posteriors(20_000, source, source, seed=1)
    est = em_priors(probs, source)
    assert np.abs(est.priors - source).sum() < 0.03


def test_adjust_raises_accuracy_under_shift():
    planted = np.array([0.6, 0.04, 0.04, 0.04, 0.24, 0.04])
    probs, y = bayes_posteriors(10_000, planted, source_priors("uniform"), seed=2, sep=0.8)
    before = (probs.argmax(1) == y).mean()
    after = (adjust(probs, source_priors("uniform"), planted).argmax(1) == y).mean()
    assert after > before + 0.05
    assert np.allclose(adjust(probs, planted, planted), probs)


def test_read_priors_json_and_csv(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({c: 1 / C for c in CLASSES}))
    assert np.allclose(read_priors(p), 1 / C)
    q = tmp_path / "p.csv"
    q.write_text("class,prior\n" + "".join(f"{c},{1 / C}\n" for c in CLASSES))
    assert np.allclose(read_priors(q), 1 / C)


@pytest.mark.parametrize("given, words", [
    ({c: 1 / C for c in CLASSES[:-1]}, "missing ['surprise']"),
    ({**{c: 1 / C for c in CLASSES}, "bored": 0.0}, "unknown ['bored']"),
    ({c: 0.5 for c in CLASSES}, "sum to 1"),
])
def test_read_priors_errors_name_the_problem(tmp_path, given, words):
    p = tmp_path / "p.json"
    p.write_text(json.dumps(given))
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        read_priors(p)
    with pytest.raises(ConfigError, match="does not exist"):
        read_priors(tmp_path / "none.json")


def test_config_and_empty_target_errors():
    with pytest.raises(ConfigError, match="priors.file"):
        PriorsConfig(method="file")
    with pytest.raises(ConfigError, match="priors.method"):
        PriorsConfig(method="guess")
    with pytest.raises(ConfigError, match="target set is empty"):
        em_priors(np.zeros((0, C)), source_priors("uniform"))
    with pytest.raises(ConfigError, match="uniform"):
        source_priors("labels", np.array([0, 1, 2]))


def test_calibration_then_em_beats_em_on_miscalibrated_posteriors():
    """Over-confident posteriors (temperature 0.5) with class biases: EM alone is off; BCTS
    fitted on labelled held-out rows (labelled priors) repairs them before EM."""
    planted = np.array([0.05, 0.35, 0.1, 0.3, 0.15, 0.05])
    labelled = np.array([0.25, 0.2, 0.2, 0.15, 0.1, 0.1])
    def distort(p):
        logit = np.log(p) / 0.5 + np.array([0.0, 1.5, 0, 0, 0, -1.0])
        e = np.exp(logit - logit.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    oof, y = bayes_posteriors(10_000, labelled, labelled, seed=3, sep=2.0)
    test, _ = bayes_posteriors(20_000, planted, labelled, seed=4, sep=2.0)
    plain = em_priors(distort(test), labelled).priors
    cal = fit_calibration(distort(oof), y)
    fixed = em_priors(cal.apply(distort(test)), labelled).priors
    assert abs(cal.temperature - 2.0) < 0.2  # undoes the 0.5 temperature
    assert np.abs(fixed - planted).max() < 0.01  # 0.002 measured; EM alone: 0.019
    assert np.abs(fixed - planted).sum() < 0.5 * np.abs(plain - planted).sum()


def test_priors_stage_corrects_only_the_target_rows(tmp_path):
    from features.media.manifest import Clip
    from models.training.bundles import read_predictions, write_predictions
    from models.unlabelled.priors import correct_predictions

    labelled_p = np.full(C, 1 / C)
    planted = np.array([0.05, 0.5, 0.05, 0.3, 0.05, 0.05])
    oof, y = bayes_posteriors(3000, labelled_p, labelled_p, seed=5, sep=1.0)
    test, yt = bayes_posteriors(3000, planted, labelled_p, seed=6, sep=1.0)
    (tmp_path / "pool").mkdir()
    mk = lambda i, lab, where: Clip(f"c{i}", str(tmp_path / where / f"c{i}.mp4"), 1, "x", 1.0,
                                    lab, i % 5 if lab else -1, "labelled" if lab else "unlabelled")
    lab = [mk(i, CLASSES[v], "videos") for i, v in enumerate(y)]
    tst = [mk(3000 + i, "", "videos") for i in range(len(yt))]
    pool = [mk(9000 + i, "", "pool") for i in range(5)]
    (tmp_path / "h").mkdir()
    write_predictions(tmp_path / "h" / "predictions.csv", lab, oof, np.array([c.fold for c in lab]),
                      tst + pool, np.concatenate([test, np.full((5, C), 1 / C)]))
    cfg = PriorsConfig(method="em", heads=["h"], target="test")
    info = correct_predictions(cfg, {"h": tmp_path / "h" / "predictions.csv"}, lab + tst + pool,
                               str(tmp_path / "pool"), tmp_path / "out")
    est = np.array([info["h"]["priors"][c] for c in CLASSES])
    assert np.abs(est - planted).max() < 0.03 and info["h"]["clips"] == 3000
    rows = read_predictions(tmp_path / "out" / "h" / "predictions.csv")
    probs = np.array([[float(r[c]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(probs[:3000], oof, atol=1e-6)  # out-of-fold rows unchanged
    np.testing.assert_allclose(probs[-5:], 1 / C, atol=1e-6)  # pool rows: not the target
    assert (probs[3000:6000].argmax(1) == yt).mean() > (test.argmax(1) == yt).mean() + 0.03
    assert json.loads((tmp_path / "out" / "priors.json").read_text())["method"] == "em"
    with pytest.raises(ConfigError, match="priors.heads"):
        correct_predictions(PriorsConfig(method="em", heads=["x"]), {}, [], "", tmp_path / "o2")
    none = correct_predictions(PriorsConfig(heads=["h"]), {"h": tmp_path / "h" / "predictions.csv"},
                               lab, "", tmp_path / "o3")
    assert none == {"method": "none", "target": "test"} and not (tmp_path / "o3" / "h").exists()


def test_reweight_for_mer_predict_em_and_file(tmp_path):
    """`mer predict --priors em|FILE`: BCTS from the head's predictions.csv, then EM or FILE."""
    from features.media.manifest import Clip
    from models.training.bundles import write_predictions
    from models.unlabelled.priors import reweight

    flat = np.full(C, 1 / C)
    planted = np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1])
    oof, y = bayes_posteriors(3000, flat, flat, seed=7)
    new, y_new = bayes_posteriors(2000, planted, flat, seed=8)
    lab = [Clip(f"c{i}", "v.mp4", 1, "x", 1.0, CLASSES[v], i % 5, "labelled")
           for i, v in enumerate(y)]
    write_predictions(tmp_path / "predictions.csv", lab, oof, np.array([c.fold for c in lab]),
                      [], None)
    fixed, info = reweight(new, "em", tmp_path / "predictions.csv")
    est = np.array([info["priors"][c] for c in CLASSES])
    assert info["method"] == "em" and np.abs(est - planted).max() < 0.03
    assert (fixed.argmax(1) == y_new).mean() > (new.argmax(1) == y_new).mean()
    (tmp_path / "p.json").write_text(json.dumps(dict(zip(CLASSES, planted.tolist()))))
    fixed, info = reweight(new, str(tmp_path / "p.json"), tmp_path / "predictions.csv")
    assert info["method"] == "file" and info["priors"]["neutral"] == 0.5
    with pytest.raises(ConfigError, match="does not exist"):
        reweight(new, "nofile.json", tmp_path / "predictions.csv")


def test_adjust_accepts_a_class_that_em_rules_out():
    probs, _ = bayes_posteriors(100, np.full(C, 1 / C), np.full(C, 1 / C), seed=9)
    out = adjust(probs, np.full(C, 1 / C), np.array([0.5, 0.5, 0, 0, 0, 0]))
    assert np.allclose(out[:, 2:], 0) and np.allclose(out.sum(1), 1)
    with pytest.raises(ConfigError, match="positive sum"):
        adjust(probs, np.full(C, 1 / C), np.zeros(C))


def test_bcts_is_applied_per_fold_then_averaged():
    """BCTS is fitted on out-of-fold rows, each ONE fold model's posteriors; a target clip's
    posteriors are calibrated fold by fold and then averaged (`apply_folds`). Here every fold
    model is over-confident (temperature 0.5) and adds its own logit noise (as K models trained
    on different clips do): calibrating the fold mean instead (the old rule) treats averaged,
    already softer posteriors as single-fold ones and biases EM (0.039 L1 against 0.025)."""
    from models.unlabelled.priors import _correct

    k, planted = 5, np.array([0.05, 0.35, 0.1, 0.3, 0.15, 0.05])
    labelled = np.array([0.25, 0.2, 0.2, 0.15, 0.1, 0.1])
    rng = np.random.default_rng(11)

    def folds_of(p):  # [K, N, C]: each fold model's noisy view of the posteriors
        logit = (np.log(p)[None] + 0.5 * rng.normal(size=(k, *p.shape))) / 0.5
        e = np.exp(logit - logit.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    oof_all, y = bayes_posteriors(10_000, labelled, labelled, seed=12, sep=2.0)
    oof = folds_of(oof_all)[np.arange(len(y)) % k, np.arange(len(y))]  # one fold per row
    test, _ = bayes_posteriors(20_000, planted, labelled, seed=13, sep=2.0)
    per_fold = folds_of(test)
    cal = fit_calibration(oof, y)
    new = em_priors(cal.apply_folds(per_fold), labelled).priors
    old = em_priors(cal.apply(per_fold.mean(0)), labelled).priors
    err_new, err_old = np.abs(new - planted).sum(), np.abs(old - planted).sum()
    assert err_new < 0.03 and err_old > 1.4 * err_new, (err_new, err_old)
    # the stage's rule: per-fold posteriors [K, M, C] are calibrated per fold
    fixed, info = _correct(PriorsConfig(method="em"), oof, y, per_fold, None)
    assert info["calibration_rule"] == "per_fold" and fixed.shape == test.shape
    assert np.abs(np.array(list(info["priors"].values())) - planted).sum() < 0.03
    _, old_info = _correct(PriorsConfig(method="em"), oof, y, per_fold.mean(0), None)
    assert old_info["calibration_rule"] == "fold_mean"
    with pytest.raises(ConfigError, match="per-fold"):
        cal.apply_folds(test)
