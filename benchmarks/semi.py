"""Unlabelled-pool methods on synthetic features of MER2024's size: what each one is worth.

    python benchmarks/semi.py [--pool 20000] [--rounds 3] [--turns 3]

Synthetic data (planted, so the truth is known; seed 0):
* 6 classes; 5,030 labelled clips in MER2024's class proportions (`COUNTS`); an unlabelled pool of 20,000 with the same balance; two test sets of
  3,000: one with that balance ("unshifted"), one with the deliberately shifted `SHIFTED`.
* A 16-d latent per clip: a class mean plus Gaussian noise whose scale depends on the class
  (`NOISE`: the rarer classes are noisier); acoustic features (64-d) = a fixed random
  projection of the latent + noise; visual features (96-d) = a projection of a noisier copy of
  the latent + more noise (the weaker modality, as in MER).
* Heads: class-balanced multinomial logistic regressions (sklearn, lbfgs) on acoustic, visual
  and both concatenated (the base head), under 5 seeded stratified folds. They stand in for the
  project's heads so that the benchmark needs no feature stores; the selection, voting, rounds,
  EM and alignment code is the project's own (models/unlabelled/selection.py, models/unlabelled/priors.py, models/unlabelled/align.py).

Measured: out-of-fold weighted F1 on human labels (base; after each pseudo-label round; after
each voting turn), test weighted F1 before/after prior correction (BCTS calibration on the
out-of-fold rows, then EM; EM alone as the ablation) on both test sets, the L1 error of the
EM priors against the planted ones, and the base head on acoustic + *aligned*
visual features (ridge map fitted on pool + labelled clips, no labels). Whatever the numbers
are, they are reported. The last output line is the JSON summary.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timer  # noqa: E402

import numpy as np  # noqa: E402

from features.media.manifest import stratified_folds  # noqa: E402
from models.unlabelled.align import fit_with_holdout  # noqa: E402
from models.training.train_config import CLASSES  # noqa: E402
from models.evaluation.metrics import fast_scores  # noqa: E402
from models.unlabelled.priors import adjust, em_priors, fit_calibration, source_priors  # noqa: E402
from models.unlabelled.selection import RoundConfig, base_round, run_round  # noqa: E402

C = len(CLASSES)
# MER2024's labelled class counts, as in benchmarks/heads.py (not imported: that script pulls in
# the whole head stack at import time)
COUNTS = {"neutral": 1248, "angry": 1208, "happy": 1038, "sad": 730, "worried": 616,
          "surprise": 190}
SHIFTED = np.array([0.10, 0.08, 0.35, 0.22, 0.15, 0.10])  # planted test priors (CLASSES order)
NOISE = np.array([1.0, 1.0, 1.1, 1.3, 1.4, 1.6])  # latent noise scale per class
LATENT, D_AUDIO, D_VISUAL = 16, 64, 96
HEADS = ("audio", "visual", "concat")  # concat is the base head
# paper 001's recipe: very high thresholds for frequent classes, lower for rare ones
THRESHOLDS = {"neutral": 0.99, "angry": 0.99, "happy": 0.98, "sad": 0.95, "worried": 0.95,
              "surprise": 0.9}
CAP = 1500  # clips each class may gain per round


class World:
    """The planted generator: fixed class means and projections; draws clips of given classes."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.means = rng.normal(scale=0.55, size=(C, LATENT))
        self.pa = rng.normal(size=(LATENT, D_AUDIO)) / np.sqrt(LATENT)
        self.pv = rng.normal(size=(LATENT, D_VISUAL)) / np.sqrt(LATENT)

    def draw(self, y: np.ndarray) -> dict[str, np.ndarray]:
        n, rng = len(y), self.rng
        z = self.means[y] + NOISE[y, None] * rng.normal(size=(n, LATENT))
        audio = z @ self.pa + 0.5 * rng.normal(size=(n, D_AUDIO))
        zv = z + 0.8 * rng.normal(size=(n, LATENT))
        visual = zv @ self.pv + 1.0 * rng.normal(size=(n, D_VISUAL))
        return {"audio": audio.astype(np.float32), "visual": visual.astype(np.float32)}

    def posteriors(self, x: dict[str, np.ndarray], source: np.ndarray) -> np.ndarray:
        """Exact p(c | audio, visual) under `source` priors: given its class a clip's features are
        Gaussian (the latent, its noisy copy and the noise are), with these means/covariances."""
        pa, pv, x = self.pa, self.pv, np.concatenate([x["audio"], x["visual"]], 1).astype(float)
        logp = np.zeros((len(x), C))
        for c in range(C):
            s2 = NOISE[c] ** 2
            cov = np.block([[s2 * pa.T @ pa + 0.25 * np.eye(D_AUDIO), s2 * pa.T @ pv],
                            [s2 * pv.T @ pa, (s2 + 0.64) * pv.T @ pv + np.eye(D_VISUAL)]])
            d = x - np.r_[self.means[c] @ pa, self.means[c] @ pv]
            sign, logdet = np.linalg.slogdet(cov)
            logp[:, c] = -0.5 * (np.einsum("ij,ij->i", d @ np.linalg.inv(cov), d) + logdet)
        logp += np.log(source)
        post = np.exp(logp - logp.max(1, keepdims=True))
        return post / post.sum(1, keepdims=True)

    def labels(self, n: int, priors: np.ndarray) -> np.ndarray:
        return self.rng.choice(C, size=n, p=priors)


def inputs(x: dict[str, np.ndarray], head: str, visual: str = "visual") -> np.ndarray:
    if head == "audio":
        return x["audio"]
    return x[visual] if head == "visual" else np.concatenate([x["audio"], x[visual]], axis=1)


def fit_logreg(train_x: np.ndarray, train_y: np.ndarray, l2: float = 1e-2, iters: int = 60):
    """A class-balanced multinomial logistic regression (so: uniform source priors),
    standardised on its training rows, fitted by full-batch L-BFGS for a fixed number of steps
    (torch, one thread: ~20x faster than sklearn's lbfgs here); returns x -> probabilities."""
    import torch

    torch.set_num_threads(1)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    y = torch.from_numpy(train_y)
    counts = np.bincount(train_y, minlength=C)
    weight = torch.tensor(len(train_y) / (C * np.maximum(counts, 1)), dtype=torch.float32)
    w = torch.zeros(x.shape[1], C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y, weight=weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)

    def predict(e: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(torch.from_numpy(((e - mean) / std).astype(np.float32)) @ w + b,
                                 dim=1).double().numpy()
    return predict


def logreg(train_x: np.ndarray, train_y: np.ndarray, evals: list[np.ndarray],
           l2: float = 1e-2, iters: int = 60) -> list[np.ndarray]:
    """`fit_logreg`'s probabilities for each array of `evals`."""
    predict = fit_logreg(train_x, train_y, l2, iters)
    return [predict(e) for e in evals]


def make_fit_fold(lab: dict, y: np.ndarray, folds: np.ndarray, target: dict, heads: tuple,
                  visual: str = "visual"):
    """fit_fold for models.unlabelled.selection: every head trained on fold k's train part + the extra rows."""
    def fit_fold(k: int, extra: np.ndarray, extra_y: np.ndarray):
        tr, held = folds != k, folds == k
        held_p, target_p = [], []
        for h in heads:
            xl, xt = inputs(lab, h, visual), inputs(target, h, visual)
            tx = np.concatenate([xl[tr], xt[extra]])
            ty = np.concatenate([y[tr], extra_y]).astype(np.int64)
            ph, pt = logreg(tx, ty, [xl[held], xt])
            held_p.append(ph)
            target_p.append(pt)
        return np.stack(held_p), np.stack(target_p)
    return fit_fold


def wf1(y: np.ndarray, probs: np.ndarray) -> float:
    return fast_scores(y, probs.argmax(1))[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=int, default=20_000)
    p.add_argument("--test", type=int, default=3_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--only-priors", action="store_true",
                   help="the base head and the prior-shift correction only (~30 s)")
    args = p.parse_args()
    world = World(0)
    y = np.repeat(np.arange(C), [COUNTS[c] for c in CLASSES])
    base_priors = np.bincount(y, minlength=C) / len(y)
    folds = stratified_folds(y, 5, 0)
    lab = world.draw(y)
    y_pool = world.labels(args.pool, base_priors)
    y_shift, y_same = world.labels(args.test, SHIFTED), world.labels(args.test, base_priors)
    parts = [world.draw(v) for v in (y_pool, y_shift, y_same)]
    target = {m: np.concatenate([q[m] for q in parts]) for m in ("audio", "visual")}
    n_pool = args.pool
    selectable = np.arange(len(y_pool) + 2 * args.test) < n_pool  # never the test clips
    shift_rows = slice(n_pool, n_pool + args.test)
    same_rows = slice(n_pool + args.test, None)
    results: dict = {"sizes": {"labelled": len(y), "pool": n_pool, "test_shifted": args.test,
                               "test_unshifted": args.test},
                     "planted": {"labelled_priors": base_priors.round(4).tolist(),
                                 "shifted_priors": SHIFTED.tolist(), "noise": NOISE.tolist()}}
    timings = {}

    def score(res, head=len(HEADS) - 1) -> dict:
        return {"oof_wf1": wf1(y, res.oof[head]),
                "test_unshifted_wf1": wf1(y_same, res.target[head][same_rows]),
                "test_shifted_wf1": wf1(y_shift, res.target[head][shift_rows])}

    with timer() as t:
        base = base_round(folds, make_fit_fold(lab, y, folds, target, ("concat",)))
    timings["base_s"] = t["s"]
    results["base"] = score(base, 0)
    print(f"base: {results['base']} ({t['s']:.1f} s)", file=sys.stderr)

    # pseudo-label rounds (paper 001): per-class thresholds and caps, per-fold selection
    fit = make_fit_fold(lab, y, folds, target, ("concat",))
    rounds, res = [], base
    cfg = RoundConfig(after="base", thresholds=THRESHOLDS, caps=CAP)
    with timer() as t:
        for r in range(0 if args.only_priors else args.rounds):
            res = run_round(cfg, f"round{r + 1}", res.pools, folds, selectable, fit)
            rounds.append({**score(res, 0), "gain": res.mean_gain, "selected": res.selected,
                           "pseudo_label_accuracy": _pseudo_acc(res, y_pool)})
            print(f"round {r + 1}: {rounds[-1]}", file=sys.stderr)
    timings["rounds_s"] = t["s"]
    results["pseudo_rounds"] = rounds

    # multi-model voting mining (paper 002): >= 2 of 3 heads agree, several turns
    fit3 = make_fit_fold(lab, y, folds, target, HEADS)
    vote = RoundConfig(after="base", rule="vote", k=2, vote_thresholds=True, thresholds=0.9,
                       caps=CAP)
    with timer() as t:
        res = base_round(folds, fit3) if not args.only_priors else base
        turns = []
        for r in range(0 if args.only_priors else args.turns):
            res = run_round(vote, f"turn{r + 1}", res.pools, folds, selectable, fit3)
            turns.append({**score(res), "per_head_oof_wf1": {h: wf1(y, res.oof[i])
                                                             for i, h in enumerate(HEADS)},
                          "gain": res.mean_gain, "selected": res.selected,
                          "pseudo_label_accuracy": _pseudo_acc(res, y_pool)})
            print(f"voting turn {r + 1}: {turns[-1]}", file=sys.stderr)
    timings["voting_s"] = t["s"]
    results["voting_turns"] = turns

    # prior-shift correction of the base head's test predictions: BCTS calibration fitted on its
    # out-of-fold rows (each one fold model's probabilities) and applied the same way: to each
    # fold model's probabilities of a test clip, then averaged over the folds
    # (Calibration.apply_folds); then EM (source priors = the labelled class shares). Ablations:
    # BCTS applied to the fold-mean probabilities (the rule before), EM alone (uniform source
    # priors: class-balanced training), and EM on the exact Bayes posteriors of the planted
    # generator (perfect calibration: the error this test set allows at all)
    uniform, cal = source_priors("uniform"), fit_calibration(base.oof[0], y)
    per_fold = np.stack([p.probs[0] for p in base.pools])  # [K, M, C]
    prior = {}
    for name, rows, truth, part in (("shifted", shift_rows, y_shift, 1),
                                    ("unshifted", same_rows, y_same, 2)):
        planted = SHIFTED if name == "shifted" else base_priors
        prior[name] = _prior_result(per_fold[:, rows], truth, planted, cal, base_priors)
        prior[name]["fold_mean_rule"] = _prior_result(base.target[0][rows], truth, planted, cal,
                                                      base_priors)
        prior[name]["em_only"] = _prior_result(base.target[0][rows], truth, planted, None,
                                               uniform)
        bayes = world.posteriors(parts[part], base_priors)
        prior[name]["bayes_posteriors"] = _prior_result(bayes, truth, planted, None, base_priors)
        prior[name]["sample_vs_planted_l1"] = round(float(np.abs(
            np.bincount(truth, minlength=C) / len(truth) - planted).sum()), 4)
        print(f"priors {name}: {prior[name]}", file=sys.stderr)
    results["priors"] = {**prior, "rule": "per_fold",
                         "calibration": {"temperature": cal.temperature,
                                         "bias": cal.bias.round(4).tolist()}}
    if args.only_priors:
        save("semi-priors", results, {
            "prior_l1_error": prior["shifted"]["l1_error"],
            "prior_l1_error_fold_mean_rule": prior["shifted"]["fold_mean_rule"]["l1_error"],
            "prior_l1_error_bayes": prior["shifted"]["bayes_posteriors"]["l1_error"],
            "prior_l1_error_unshifted": prior["unshifted"]["l1_error"],
            "prior_l1_error_unshifted_fold_mean_rule":
                prior["unshifted"]["fold_mean_rule"]["l1_error"]})
        return

    # visual-to-acoustic alignment: ridge map on pool + labelled clips (features only)
    with timer() as t:
        fit_v = np.concatenate([lab["visual"], target["visual"][:n_pool]])
        fit_a = np.concatenate([lab["audio"], target["audio"][:n_pool]])
        amap, held_r2 = fit_with_holdout(fit_v, fit_a, alpha=1e-3, seed=0)
        lab["aligned"], target["aligned"] = amap(lab["visual"]), amap(target["visual"])
        aligned = base_round(folds, make_fit_fold(lab, y, folds, target, ("concat",), "aligned"))
        vis_aligned = base_round(folds, make_fit_fold(lab, y, folds, target, ("visual",),
                                                      "aligned"))
        vis_raw = base_round(folds, make_fit_fold(lab, y, folds, target, ("visual",)))
    timings["align_s"] = t["s"]
    results["align"] = {"holdout_r2": held_r2, "concat_aligned": score(aligned, 0),
                        "visual_only_raw_oof_wf1": wf1(y, vis_raw.oof[0]),
                        "visual_only_aligned_oof_wf1": wf1(y, vis_aligned.oof[0])}
    print(f"align: {results['align']}", file=sys.stderr)
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}

    summary = {"wf1_base": results["base"]["oof_wf1"],
               "wf1_pseudo_rounds": [r["oof_wf1"] for r in rounds],
               "wf1_voting": turns[-1]["oof_wf1"] if turns else None,
               "wf1_prior_shifted_before": prior["shifted"]["before"],
               "wf1_prior_shifted_after": prior["shifted"]["after"],
               "wf1_prior_unshifted_before": prior["unshifted"]["before"],
               "wf1_prior_unshifted_after": prior["unshifted"]["after"],
               "prior_l1_error": prior["shifted"]["l1_error"],
               "wf1_aligned": results["align"]["concat_aligned"]["oof_wf1"],
               "total_s": round(sum(timings.values()), 1)}
    save("semi", results, summary)


def _prior_result(probs: np.ndarray, truth: np.ndarray, planted: np.ndarray, cal,
                  source: np.ndarray) -> dict:
    """Weighted F1 before/after correction with EM priors (and with the planted priors)."""
    probs_c = cal.apply(probs) if cal is not None and probs.ndim == 2 else probs
    if probs.ndim == 3:  # [K, M, C]: each fold model's probabilities, calibrated per fold
        probs_c = cal.apply_folds(probs) if cal is not None else probs.mean(0)
        probs = probs.mean(0)
    est = em_priors(probs_c, source)
    sample = np.bincount(truth, minlength=C) / len(truth)
    return {"before": wf1(truth, probs), "after": wf1(truth, adjust(probs_c, source, est.priors)),
            "after_planted_priors": wf1(truth, adjust(probs_c, source, planted)),
            "em_priors": est.priors.round(4).tolist(), "iterations": est.iterations,
            "l1_error": round(float(np.abs(est.priors - planted).sum()), 4),
            "sample_l1_error": round(float(np.abs(est.priors - sample).sum()), 4)}


def _pseudo_acc(res, y_pool: np.ndarray) -> float:
    """Share of pseudo-labels that match the planted class (over every fold's selection)."""
    hits = [(p.label == y_pool[p.taken]).sum() for p in res.pools if len(p.taken)]
    total = sum(len(p.taken) for p in res.pools)
    return round(float(sum(hits) / total), 4) if total else None


if __name__ == "__main__":
    main()
