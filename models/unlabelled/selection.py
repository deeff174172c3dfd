"""Using the unlabelled pool: pseudo-label selection, multi-head voting, and self-training rounds.

Selection rules (both return a `Selection`):

* ``confidence`` (paper 001): a clip is taken when its predicted class c has probability
  >= ``thresholds[c]`` (very high for frequent classes, lower for rare ones).
* ``vote`` (paper 002's multi-model voting data mining): a clip is taken when at least ``k`` of
  the n named heads predict the same class c (and, with thresholds, each of those k heads gives
  c a probability >= ``thresholds[c]``).

Then each class gains at most ``caps[c]`` clips (the most confident first).

Leakage rules, enforced by `run_rounds` (tests in tests/models/unlabelled/test_semi.py):

* Pseudo-labelled clips are only ever appended to a fold's *training* part; validation parts
  hold human-labelled clips only, so every reported score is out-of-fold on human labels.
* Selection is **per fold**: the clips fold k trains on in round r were chosen from the pool
  predictions of fold k's own round r-1 model, which never saw fold k's labels. (Choosing from
  the fold-mean prediction would feed every fold's held-out labels back into its training set
  through the pseudo-labels.)
* The clips a user is scored on (the test clips) are selectable only in transductive mode
  (off by default; the output names it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from features.errors import ConfigError
from models.training.train_config import CLASSES

RULES = ("confidence", "vote")
POOL, TEST = "pool", "test"
NO_CAP = -1


def target_groups(clips: list, unlabelled_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test) masks over manifest clips: unlabelled clips under `prepare.unlabelled` are
    the pool; unlabelled clips beside the labelled videos are the test clips users are scored
    on (selectable only in transductive mode). Labelled clips are in neither."""
    root = Path(unlabelled_dir).resolve() if unlabelled_dir else None
    unl = np.array([not c.label for c in clips], dtype=bool)
    pool = np.array([root is not None and Path(c.path).resolve().is_relative_to(root)
                     for c in clips], dtype=bool) & unl
    return pool, unl & ~pool


@dataclass
class Selection:
    index: np.ndarray  # [S] rows of the candidate set that were taken
    label: np.ndarray  # [S] their pseudo-labels (class ids)
    score: np.ndarray  # [S] confidence of the pseudo-label (mean probability over heads)

    def gain(self) -> dict[str, int]:
        counts = np.bincount(self.label, minlength=len(CLASSES))
        return {c: int(n) for c, n in zip(CLASSES, counts)}

    def __len__(self) -> int:
        return len(self.index)


def class_vector(value: float | Mapping[str, float] | None, key: str, default: float) -> np.ndarray:
    """A scalar or a {class: value} mapping (missing classes take `default`) -> [C] values."""
    if value is None:
        return np.full(len(CLASSES), float(default))
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(CLASSES))
        if unknown:
            raise ConfigError(f"{key}: unknown class(es) {unknown}; use {list(CLASSES)}.")
        return np.array([float(value.get(c, default)) for c in CLASSES])
    return np.full(len(CLASSES), float(value))


def check_thresholds(thresholds: np.ndarray, key: str) -> np.ndarray:
    bad = {c: float(t) for c, t in zip(CLASSES, thresholds) if not 0.0 < t <= 1.0}
    if bad:
        raise ConfigError(f"{key}: thresholds {bad} are outside (0, 1]; a clip is taken when "
                          f"its class probability is >= the threshold, so use e.g. 0.99 for "
                          f"frequent classes and 0.9 for rare ones.")
    return thresholds


def check_caps(caps: np.ndarray, key: str) -> np.ndarray:
    bad = {c: float(n) for c, n in zip(CLASSES, caps) if n != NO_CAP and (n < 0 or n != int(n))}
    if bad:
        raise ConfigError(f"{key}: caps {bad} must be whole numbers >= 0 (-1 = no cap).")
    return caps.astype(np.int64)


def select_confident(probs: np.ndarray, thresholds: np.ndarray, caps: np.ndarray,
                     candidates: np.ndarray | None = None) -> Selection:
    """Rows of probs [N, C] whose top class passes its threshold, capped per class.

    probs may also be [H, N, C] (several heads): their mean is used.
    """
    mean = _mean_over_heads(probs)
    label = mean.argmax(axis=1)
    score = mean[np.arange(len(mean)), label]
    ok = score >= thresholds[label]
    return _capped(ok, label, score, caps, candidates)


def select_votes(probs: np.ndarray, k: int, caps: np.ndarray,
                 thresholds: np.ndarray | None = None,
                 candidates: np.ndarray | None = None) -> Selection:
    """Rows where >= k of the H heads in probs [H, N, C] predict one class (each above its
    threshold when thresholds are given); ties between classes go to the higher mean score."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3:
        raise ConfigError(f"voting needs probabilities of several heads [H, N, C], got "
                          f"{probs.shape}.")
    check_k(k, probs.shape[0], "k")
    top = probs.argmax(axis=2)  # [H, N]
    agree = np.zeros(probs.shape[1:], dtype=np.int64)  # [N, C] heads voting for each class
    rows = np.arange(probs.shape[1])
    for h in range(probs.shape[0]):
        vote = np.ones(len(rows), bool) if thresholds is None else \
            probs[h, rows, top[h]] >= thresholds[top[h]]
        np.add.at(agree, (rows[vote], top[h][vote]), 1)
    mean = probs.mean(axis=0)
    label = np.lexsort((mean, agree), axis=1)[:, -1]  # most votes, then highest mean
    score = mean[rows, label]
    ok = agree[rows, label] >= k
    return _capped(ok, label, score, caps, candidates)


def check_k(k: int, n_heads: int, key: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_heads:
        raise ConfigError(f"{key}={k!r} must be a whole number in 1..{n_heads} (the number of "
                          f"voting heads); lower it or name more heads.")


def _capped(ok: np.ndarray, label: np.ndarray, score: np.ndarray, caps: np.ndarray,
            candidates: np.ndarray | None) -> Selection:
    if candidates is not None:
        ok = ok & candidates
    keep = []
    for c in range(len(CLASSES)):
        rows = np.flatnonzero(ok & (label == c))
        rows = rows[np.argsort(-score[rows], kind="stable")]  # most confident first
        keep.append(rows if caps[c] == NO_CAP else rows[: caps[c]])
    index = np.sort(np.concatenate(keep)).astype(np.int64)
    return Selection(index, label[index].astype(np.int64), score[index])


def _mean_over_heads(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 3:
        probs = probs.mean(axis=0)
    if probs.ndim != 2 or probs.shape[1] != len(CLASSES):
        raise ConfigError(f"probabilities must be [N, {len(CLASSES)}] or [H, N, "
                          f"{len(CLASSES)}], got {probs.shape}.")
    return probs


# ----------------------------------------------------------------------------- rounds


@dataclass
class RoundConfig:
    """One round of self-training (one `semi.rounds.<name>` entry)."""

    after: str  # the round whose predictions select this round's clips ("base": none)
    rule: str = "confidence"  # confidence | vote
    thresholds: float | dict[str, float] = 0.99  # per class (missing classes: `default_threshold`)
    default_threshold: float = 0.99
    caps: int | dict[str, int] = NO_CAP  # most clips each class may gain in this round (-1: any)
    k: int = 2  # vote: heads that must agree
    vote_thresholds: bool = False  # vote: each agreeing head must also pass the threshold
    accumulate: bool = True  # keep earlier rounds' clips (their pseudo-labels fixed)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule {self.rule!r} is unknown; use one of {list(RULES)}.")

    def threshold_vector(self, key: str) -> np.ndarray:
        check_thresholds(np.array([self.default_threshold]), f"{key}.default_threshold")
        return check_thresholds(class_vector(self.thresholds, f"{key}.thresholds",
                                             self.default_threshold), f"{key}.thresholds")

    def cap_vector(self, key: str) -> np.ndarray:
        return check_caps(class_vector(self.caps, f"{key}.caps", NO_CAP), f"{key}.caps")

    def validate(self, key: str, n_heads: int) -> None:
        """Every check that can fail, before any training starts."""
        self.threshold_vector(key)
        self.cap_vector(key)
        if self.rule == "vote":
            check_k(self.k, n_heads, f"{key}.k")


def select(cfg: RoundConfig, key: str, probs: np.ndarray, candidates: np.ndarray) -> Selection:
    """Apply one round's rule to probs [H, M, C] of the selectable rows."""
    thr, caps = cfg.threshold_vector(key), cfg.cap_vector(key)
    if cfg.rule == "vote":
        return select_votes(probs, cfg.k, caps, thr if cfg.vote_thresholds else None, candidates)
    return select_confident(probs, thr, caps, candidates)


# fit_fold(fold, extra_rows, extra_labels) -> (held-out probs [H, n_fold, C], target probs
# [H, M, C]) for every chosen head: train fold `fold` on its labelled train part plus the
# extra target rows (pseudo-labelled), predict its held-out part and every target row.
FitFold = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class FoldPool:
    """What fold k knows about the target rows after a round."""

    probs: np.ndarray  # [H, M, C] fold k's models' probabilities for every target row
    taken: np.ndarray  # [S] target rows fold k trains on (pseudo-labelled)
    label: np.ndarray  # [S] their pseudo-labels


@dataclass
class RoundResult:
    oof: np.ndarray  # [H, N, C] out-of-fold probabilities of the labelled rows (human labels)
    target: np.ndarray  # [H, M, C] fold-mean probabilities of the target rows
    pools: list[FoldPool]
    gain: list[dict[str, int]] = field(default_factory=list)  # per fold: clips added per class
    selected: list[int] = field(default_factory=list)  # per fold: clips trained on

    @property
    def mean_gain(self) -> dict[str, float]:
        return {c: round(float(np.mean([g[c] for g in self.gain])), 2) for c in CLASSES}


Extras = list[tuple[np.ndarray, np.ndarray]]  # per fold: (target rows, pseudo-labels)


def next_selection(cfg: RoundConfig, key: str, previous: list[FoldPool],
                   selectable: np.ndarray) -> tuple[Extras, list[dict[str, int]]]:
    """Per fold: the rows it trains on in this round (selected from that fold's own previous
    predictions), and what each class gained."""
    extras, gains = [], []
    for prev in previous:
        candidates = selectable.copy()
        if cfg.accumulate:
            candidates[prev.taken] = False
        new = select(cfg, key, prev.probs, candidates)
        gains.append(new.gain())
        extras.append((np.concatenate([prev.taken, new.index]), np.concatenate(
            [prev.label, new.label])) if cfg.accumulate else (new.index, new.label))
    return extras, gains


def run_round(cfg: RoundConfig, key: str, previous: list[FoldPool], folds: np.ndarray,
              selectable: np.ndarray, fit_fold: FitFold) -> RoundResult:
    """One self-training round: per fold, select from that fold's previous pool predictions,
    train on its labelled train part + the selection, predict held-out and target rows."""
    if len(previous) != len(np.unique(folds)):
        raise ConfigError(f"{key}: the previous round has {len(previous)} folds, the labels "
                          f"{len(np.unique(folds))}; rerun the rounds from the base.")
    extras, gains = next_selection(cfg, key, previous, selectable)
    return _train_folds(folds, extras, fit_fold, gains)


def base_round(folds: np.ndarray, fit_fold: FitFold) -> RoundResult:
    """Round 0: every fold trained on its labelled train part only."""
    empty = np.zeros(0, np.int64)
    n = len(np.unique(folds))
    return _train_folds(folds, [(empty, empty)] * n, fit_fold, [{c: 0 for c in CLASSES}] * n)


def _train_folds(folds: np.ndarray, extras: Extras,
                 fit_fold: FitFold, gains: list[dict[str, int]]) -> RoundResult:
    oof, pools, target_sum = None, [], 0.0
    for k, (taken, label) in zip(np.unique(folds), extras):
        held, target = fit_fold(int(k), taken, label)
        if oof is None:
            oof = np.zeros((held.shape[0], len(folds), len(CLASSES)))
        oof[:, folds == k] = held
        target_sum = target_sum + target
        pools.append(FoldPool(target, taken, label))
    return RoundResult(oof, target_sum / len(pools), pools, gains, [len(p.taken) for p in pools])
