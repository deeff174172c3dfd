"""Ensembles over trained heads' predictions.csv: hard and soft voting, OOF-tuned weights, stacking.

Every head (neural or LightGBM) writes out-of-fold probabilities for the labelled clips (each
from the fold model that did not see it) and fold-mean probabilities for the other clips, on the
manifest's folds. An ensemble reads only those files:

* ``hard``: majority voting: each head votes for its most probable class; the class with the
  most votes wins. Ties between classes with equally many votes go to the one with the higher
  mean probability over the heads (the soft vote), then to the earlier class in CLASSES order.
  The written probabilities are the vote counts plus 0.01 x the mean probability (less than one
  vote, so it only orders tied classes), renormalised to sum to 1: their argmax is the decision.
* ``soft``: the mean of the heads' probabilities.
* ``weighted``: a weighted mean, weights found by greedy forward selection with replacement
  (Caruana et al. 2004) maximising weighted F1 of the OOF probabilities; weights are
  multiples of 1/rounds and sum to 1. A score measured on the rows the weights were tuned on is
  **optimistic** (reported as ``oof_tuned_weighted_f1`` in ensemble.json). The labelled rows of
  its predictions.csv hold a **nested** estimate instead: each fold's rows are combined with
  weights tuned on the other folds only, so `evaluate` scores it honestly. Unlabelled rows use
  the weights tuned on all labelled rows.
* ``stacking``: a multinomial logistic regression on the heads' log-probabilities. Its own
  out-of-fold predictions come from the same folds (fit on the other folds' OOF rows), so the
  reported score is honest; test rows use a model fit on every labelled row. (Second-order
  caveat shared by all stacking on OOF predictions: a base head's OOF row of fold j came from a
  model that saw fold k's labels.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from features.errors import ConfigError
from features.reliability.reports import write_json_atomic
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics, fast_scores
from models.training.bundles import PREDICTIONS, read_predictions, write_predictions

METHODS = ("hard", "soft", "weighted", "stacking")
TIE_BREAK = 0.01  # hard voting: weight of the mean probability (< one vote) that orders ties
INFO = "ensemble.json"
EPS = 1e-6


@dataclass
class EnsembleConfig:
    """One entry of params.yaml `ensemble.<name>`."""

    method: str  # hard | soft | weighted | stacking
    heads: list[str] = field(default_factory=list)  # names under train.heads (>= 2)
    rounds: int = 40  # weighted: greedy selection steps; weights are multiples of 1/rounds
    c: float = 1.0  # stacking: inverse L2 strength of the logistic regression
    class_weight: bool = True  # stacking: "balanced" class weights

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is unknown; use one of {list(METHODS)}.")
        if isinstance(self.heads, str) or len(self.heads) < 2 or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"heads {self.heads!r} must list two or more distinct trained heads.")
        if self.rounds < 1 or not self.c > 0:
            raise ConfigError(f"rounds={self.rounds} must be >= 1 and c={self.c} > 0.")


@dataclass
class HeadPredictions:
    """The heads' probabilities aligned on the clips every one of them predicted."""

    ids: list[str]  # labelled clips first, then the others
    labels: list[str]  # "" for unlabelled
    folds: np.ndarray  # [N] fold of labelled clips, -1 otherwise
    probs: np.ndarray  # [H, N, C]
    names: list[str]

    @property
    def labelled(self) -> np.ndarray:
        return np.array([bool(lab) for lab in self.labels])


@dataclass
class EnsembleResult:
    oof: np.ndarray  # [n_labelled, C] honest held-out probabilities
    test: np.ndarray  # [n_other, C]
    info: dict


def load_heads(heads_dir: str | os.PathLike, names: list[str]) -> HeadPredictions:
    """Read each head's predictions.csv; keep the clips all heads have (same labels and folds)."""
    tables = []
    for name in names:
        path = Path(heads_dir) / name / PREDICTIONS
        if not path.is_file():
            raise ConfigError(f"ensemble member {name!r} has no {path}; train it (add it under "
                              f"train.heads) or remove it from the ensemble's heads.")
        tables.append({r["clip_id"]: r for r in read_predictions(path)})
    common = set(tables[0]).intersection(*tables[1:])
    ref = tables[0]
    ids = sorted(common, key=lambda c: (ref[c]["split"] != "labelled", c))
    for name, table in zip(names, tables):
        bad = [c for c in ids if (table[c]["label"], table[c]["fold"]) != (ref[c]["label"], ref[c]["fold"])]
        if bad:
            raise ConfigError(f"head {name!r} disagrees with {names[0]!r} on labels/folds of "
                              f"{len(bad)} clips (e.g. {bad[0]}); retrain both on one manifest.")
    probs = np.array([[[float(t[c][k]) for k in CLASSES] for c in ids] for t in tables])
    return HeadPredictions(ids, [ref[c]["label"] for c in ids],
                           np.array([int(ref[c]["fold"]) for c in ids]), probs, list(names))


def soft_vote(probs: np.ndarray) -> np.ndarray:
    """[H, N, C] -> [N, C]: the mean."""
    return probs.mean(axis=0)


def hard_vote(probs: np.ndarray) -> np.ndarray:
    """[H, N, C] -> [N, C] whose argmax is the majority class (ties: see the module docstring)."""
    h, n, c = probs.shape
    votes = np.zeros((n, c))
    np.add.at(votes, (np.tile(np.arange(n), h), probs.argmax(axis=2).reshape(-1)), 1.0)
    score = votes + TIE_BREAK * probs.mean(axis=0)
    return score / score.sum(axis=1, keepdims=True)


def tune_weights(oof: np.ndarray, y: np.ndarray, rounds: int) -> np.ndarray:
    """[H] weights summing to 1 that maximise weighted F1 of sum_h w_h oof_h (greedy, replacement).

    Each round adds the head whose addition scores best (ties: the lower index); the weights are
    the selection counts / rounds. Deterministic.
    """
    counts = np.zeros(len(oof))
    total = np.zeros(oof.shape[1:])
    for r in range(rounds):
        scores = [fast_scores(y, (total + oof[h]).argmax(1))[0] for h in range(len(oof))]
        best = int(np.argmax(scores))
        counts[best] += 1
        total += oof[best]
    return counts / rounds


def weighted_vote(oof: np.ndarray, y: np.ndarray, folds: np.ndarray, test: np.ndarray,
                  rounds: int) -> EnsembleResult:
    """Weights tuned on all OOF rows (optimistic score) and per held-out fold (nested score)."""
    weights = tune_weights(oof, y, rounds)
    tuned = np.tensordot(weights, oof, axes=1)
    nested = np.zeros_like(tuned)
    per_fold = {}
    for k in np.unique(folds):
        held = folds == k
        w = tune_weights(oof[:, ~held], y[~held], rounds)
        nested[held] = np.tensordot(w, oof[:, held], axes=1)
        per_fold[int(k)] = w.round(4).tolist()
    info = {"weights": weights.round(4).tolist(), "weights_per_fold": per_fold,
            "oof_tuned_weighted_f1": fast_scores(y, tuned.argmax(1))[0],
            "nested_weighted_f1": fast_scores(y, nested.argmax(1))[0]}
    return EnsembleResult(nested, np.tensordot(weights, test, axes=1), info)


def stack(oof: np.ndarray, y: np.ndarray, folds: np.ndarray, test: np.ndarray, c: float,
          class_weight: bool) -> EnsembleResult:
    """Logistic regression on [N, H*C] log-probabilities, cross-validated on the same folds."""
    from sklearn.linear_model import LogisticRegression

    def fit(x: np.ndarray, t: np.ndarray) -> LogisticRegression:
        model = LogisticRegression(C=c, class_weight="balanced" if class_weight else None,
                                   max_iter=2000)
        return model.fit(x, t)

    def proba(model: LogisticRegression, x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), len(CLASSES)))
        out[:, model.classes_] = model.predict_proba(x)  # a class absent from a train part: 0
        return out

    x, x_test = _stack_features(oof), _stack_features(test)
    out = np.zeros((len(y), len(CLASSES)))
    for k in np.unique(folds):
        held = folds == k
        out[held] = proba(fit(x[~held], y[~held]), x[held])
    full = fit(x, y)
    test_probs = proba(full, x_test) if len(x_test) else np.zeros((0, len(CLASSES)))
    info = {"coef_norm_per_head": np.linalg.norm(
        full.coef_.reshape(len(full.coef_), len(oof), len(CLASSES)), axis=(0, 2)).round(4).tolist(),
            # the model fit on every labelled row: what predicts new clips (`predict_new`)
            "model": {"coef": full.coef_.tolist(), "intercept": full.intercept_.tolist(),
                      "classes": full.classes_.tolist()}}
    return EnsembleResult(out, test_probs, info)


def _stack_features(p: np.ndarray) -> np.ndarray:  # [H, N, C] -> [N, H*C]
    return np.log(np.clip(p, EPS, 1.0)).transpose(1, 0, 2).reshape(p.shape[1], -1)


def predict_new(info: dict, probs: np.ndarray) -> np.ndarray:
    """An ensemble's probabilities for new clips from its members' ([H, N, C], in the order of
    `info["heads"]`), as its stage combined the unlabelled rows: the same vote, the weights
    tuned on every labelled row, or the stacking model fit on every labelled row."""
    method = info["method"]
    if method in ("hard", "soft"):
        return (hard_vote if method == "hard" else soft_vote)(probs)
    if method == "weighted":
        return np.tensordot(np.asarray(info["weights"]), probs, axes=1)
    if "model" not in info:
        raise ConfigError(f"ensemble {info['name']!r} was written before stacking models were "
                          "saved; rerun it (`dvc repro ensemble@" + info["name"] + "`).")
    model = info["model"]
    z = _stack_features(probs) @ np.asarray(model["coef"]).T + np.asarray(model["intercept"])
    if z.shape[1] == 1:  # two classes present: scikit-learn's binary (sigmoid) form
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    out = np.zeros((len(z), len(CLASSES)))
    out[:, model["classes"]] = p / p.sum(axis=1, keepdims=True)
    return out


def combine(preds: HeadPredictions, cfg: EnsembleConfig) -> EnsembleResult:
    lab = preds.labelled
    y = np.array([CLASSES.index(label) for label in np.array(preds.labels)[lab]])
    oof, test, folds = preds.probs[:, lab], preds.probs[:, ~lab], preds.folds[lab]
    if cfg.method in ("hard", "soft"):
        vote = hard_vote if cfg.method == "hard" else soft_vote
        return EnsembleResult(vote(oof), vote(test), {})
    if cfg.method == "weighted":
        return weighted_vote(oof, y, folds, test, cfg.rounds)
    return stack(oof, y, folds, test, cfg.c, cfg.class_weight)


def run_ensemble(name: str, cfg: EnsembleConfig, heads_dir: str | os.PathLike,
                 out_dir: str | os.PathLike) -> dict:
    """The `ensemble@<name>` stage: predictions.csv (same format as a head's) and ensemble.json."""
    preds = load_heads(heads_dir, cfg.heads)
    result = combine(preds, cfg)
    lab = preds.labelled
    clips = [SimpleNamespace(clip_id=c, label=label) for c, label in zip(preds.ids, preds.labels)]
    labelled = [c for c, is_lab in zip(clips, lab) if is_lab]
    others = [c for c, is_lab in zip(clips, lab) if not is_lab]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / PREDICTIONS, labelled, result.oof, preds.folds[lab], others,
                       result.test if others else None)
    y = np.array([CLASSES.index(c.label) for c in labelled])
    members = {h: compute_metrics(y, p)["weighted_f1"] for h, p in zip(cfg.heads, preds.probs[:, lab])}
    info = {"name": name, "method": cfg.method, "heads": cfg.heads, "clips": len(labelled),
            "weighted_f1": compute_metrics(y, result.oof)["weighted_f1"],
            "member_weighted_f1": members, **result.info}
    write_json_atomic(out / INFO, info)
    return info
