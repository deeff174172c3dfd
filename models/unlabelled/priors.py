"""Prior-shift correction: class priors of a target set by EM, and posteriors re-weighted to them.

A classifier's posteriors carry the class priors it was trained under (its *source* priors).
When the target set (the unlabelled pool, or the test clips) has other priors, Bayes' rule
gives the corrected posteriors  p'(c|x) ∝ (q_c / π_c) p(c|x)  with π the source and q the
target priors. The target priors are either given by the user (paper 001 found MER2024's by
probing the leaderboard) or estimated with the EM algorithm of Saerens, Latinne and
Decaestecker (2002, "Adjusting the outputs of a classifier to new a priori probabilities"):

    E-step: p_s(c|x_i) ∝ (q_s(c) / π_c) p(c|x_i)      M-step: q_{s+1}(c) = mean_i p_s(c|x_i)

which increases the likelihood of the target clips under the shifted priors at every step.

Source priors: the heads of this project train with class-weighted ("balanced") cross
entropy by default, which makes every class equally likely a priori, so their posteriors carry
*uniform* source priors; a head trained without weights carries the labelled set's class
frequencies (`source: labels`).

EM is only as good as the posteriors are calibrated. With `calibrate: true` (default) the
posteriors are first recalibrated by bias-corrected temperature scaling (BCTS: one temperature
and one bias per class, fitted by maximum likelihood on the head's *out-of-fold* predictions of
the human-labelled clips; Alexandari, Kundaje and Shrikumar, ICML 2020, found EM after BCTS
hard to beat). Calibrated posteriors carry the labelled set's class frequencies as their source
priors. benchmarks/semi.py measures both.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from features.errors import ConfigError
from models.training.train_config import CLASSES

SOURCES = ("uniform", "labels")
METHODS = ("none", "em", "file")
EPS = 1e-12


@dataclass
class PriorsConfig:
    """params.yaml `priors`: prior-shift correction of heads' or ensembles' predictions."""

    method: str = "none"  # none | em (estimate the target priors) | file (user-given priors)
    file: str = ""  # method=file: JSON {class: prior} or CSV class,prior
    heads: list[str] = field(default_factory=list)  # trained heads / ensembles to correct
    source: str = "uniform"  # the priors the heads' posteriors carry: uniform (class-weighted
    #                          training, the default of train.heads) or labels (unweighted)
    target: str = "test"  # which unlabelled rows set the priors: test (videos folder, no label)
    #                       | pool (prepare.unlabelled folder) | all
    calibrate: bool = True  # BCTS on the out-of-fold rows first; the source is then the labels
    max_iter: int = 1000
    tol: float = 1e-8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"priors.method {self.method!r} is unknown; use one of "
                              f"{list(METHODS)}.")
        if self.method == "file" and not self.file:
            raise ConfigError("priors.method is 'file' but priors.file is empty; give a JSON "
                              "{class: prior} or CSV class,prior file, or use method: em.")
        if self.source not in SOURCES:
            raise ConfigError(f"priors.source {self.source!r} is unknown; use one of "
                              f"{list(SOURCES)}.")
        if self.target not in ("test", "pool", "all"):
            raise ConfigError(f"priors.target {self.target!r} must be test, pool or all.")
        if self.max_iter < 1 or not self.tol > 0:
            raise ConfigError(f"priors.max_iter={self.max_iter} must be >= 1 and "
                              f"priors.tol={self.tol} > 0.")


@dataclass
class PriorEstimate:
    priors: np.ndarray  # [C] estimated target priors
    iterations: int
    converged: bool
    log_likelihood: list[float]  # per iteration (non-decreasing: a test checks)


def adjust(probs: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Posteriors [N, C] re-weighted from source to target priors (Bayes' rule, renormalised)."""
    probs = _checked_probs(probs)
    target = np.asarray(target, dtype=np.float64)
    if target.shape != (len(CLASSES),) or (target < 0).any() or not target.sum() > 0:
        raise ConfigError(f"target priors must be {len(CLASSES)} values >= 0 with a positive "
                          f"sum, got {target.tolist()}.")
    ratio = target / target.sum() / _checked_priors(source, "source")  # 0: EM ruled a class out
    out = probs * ratio
    return out / np.maximum(out.sum(axis=1, keepdims=True), EPS)


def em_priors(probs: np.ndarray, source: np.ndarray, max_iter: int = 1000,
              tol: float = 1e-8) -> PriorEstimate:
    """Saerens et al. (2002): the target priors that maximise the likelihood of `probs`' rows."""
    probs = _checked_probs(probs)
    if len(probs) == 0:
        raise ConfigError("EM prior estimation needs at least one target clip; the target set "
                          "is empty (check priors.target and the unlabelled clips).")
    source = _checked_priors(source, "source")
    q = source.copy()
    history: list[float] = []
    for it in range(1, max_iter + 1):
        weighted = probs * (q / source)
        norm = np.maximum(weighted.sum(axis=1, keepdims=True), EPS)
        history.append(float(np.log(norm).sum()))  # log-likelihood ratio of q against source
        new = (weighted / norm).mean(axis=0)
        if np.abs(new - q).sum() < tol:
            return PriorEstimate(new, it, True, history)
        q = new
    return PriorEstimate(q, max_iter, False, history)


@dataclass
class Calibration:
    """Bias-corrected temperature scaling: softmax(log p / temperature + bias)."""

    temperature: float
    bias: np.ndarray  # [C], bias[0] = 0

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return _bcts(_checked_probs(probs), np.r_[self.temperature, self.bias[1:]])

    def apply_folds(self, fold_probs: np.ndarray) -> np.ndarray:
        """The rule for clips outside the labelled set: BCTS is fitted on out-of-fold rows, each
        the probabilities of ONE fold model, so it is applied to each fold model's probabilities
        [K, M, C] of a target clip and the calibrated probabilities are then averaged over the K
        folds. Applying it to the fold mean instead (probabilities of another kind: averaging K
        models already softens them) left benchmarks/semi.py's EM priors 0.068 (L1) from the
        planted ones; this rule, 0.053 (docs/methods.md, prior-shift correction)."""
        fold_probs = np.asarray(fold_probs, dtype=np.float64)
        if fold_probs.ndim != 3:
            raise ConfigError(f"per-fold posteriors must be [K, N, {len(CLASSES)}], got "
                              f"{fold_probs.shape}.")
        return np.mean([self.apply(p) for p in fold_probs], axis=0)


def fit_calibration(oof_probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """BCTS by maximum likelihood on held-out (out-of-fold) probabilities and their labels."""
    from scipy.optimize import minimize

    probs, y = _checked_probs(oof_probs), np.asarray(labels, dtype=np.int64)
    if len(y) != len(probs) or len(y) < len(CLASSES):
        raise ConfigError(f"calibration needs out-of-fold probabilities of the labelled clips "
                          f"(got {len(probs)} rows, {len(y)} labels); use priors.calibrate: "
                          f"false to skip it.")
    rows = np.arange(len(y))

    def nll(params: np.ndarray) -> float:
        return -float(np.log(np.maximum(_bcts(probs, params)[rows, y], EPS)).mean())

    start = np.r_[1.0, np.zeros(len(CLASSES) - 1)]
    bounds = [(0.05, 20.0)] + [(-10.0, 10.0)] * (len(CLASSES) - 1)
    best = minimize(nll, start, method="L-BFGS-B", bounds=bounds).x
    return Calibration(float(best[0]), np.r_[0.0, best[1:]])


def _bcts(probs: np.ndarray, params: np.ndarray) -> np.ndarray:
    logits = np.log(np.maximum(probs, EPS)) / params[0]
    logits[:, 1:] += params[1:]
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def source_priors(kind: str, labels: np.ndarray | None = None) -> np.ndarray:
    """uniform, or the class frequencies of integer `labels` (every class must occur)."""
    if kind == "uniform":
        return np.full(len(CLASSES), 1.0 / len(CLASSES))
    if kind != "labels":
        raise ConfigError(f"source priors {kind!r} must be one of {list(SOURCES)}.")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(CLASSES))
    if (counts == 0).any():
        missing = [c for c, n in zip(CLASSES, counts) if n == 0]
        raise ConfigError(f"source: labels needs every class in the labelled set; {missing} have "
                          f"no clip. Use priors.source: uniform.")
    return counts / counts.sum()


def read_priors(path: str | os.PathLike) -> np.ndarray:
    """User priors from JSON {class: p} or CSV lines `class,prior`; all classes, sum 1 (±1e-3)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"priors file {path} does not exist; set priors.file (or --priors) to "
                          f"a JSON {{class: prior}} or CSV class,prior file.")
    text = path.read_text()
    try:
        given = json.loads(text) if path.suffix == ".json" else _csv_priors(text)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"priors file {path} is not readable: {err}. Write JSON "
                          f"{{class: prior}} or CSV lines class,prior.") from err
    return priors_from_mapping(given, str(path))


def priors_from_mapping(given: Mapping[str, float], where: str) -> np.ndarray:
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where}: priors must map each class to a probability.")
    unknown = sorted(set(given) - set(CLASSES))
    missing = [c for c in CLASSES if c not in given]
    if unknown or missing:
        raise ConfigError(f"{where}: priors need exactly the classes {list(CLASSES)}; unknown "
                          f"{unknown}, missing {missing}.")
    p = np.array([float(given[c]) for c in CLASSES])
    if (p <= 0).any() or abs(p.sum() - 1.0) > 1e-3:
        raise ConfigError(f"{where}: priors must be > 0 and sum to 1, got {p.tolist()} "
                          f"(sum {p.sum():.4f}).")
    return p / p.sum()


def as_mapping(priors: np.ndarray) -> dict[str, float]:
    return {c: round(float(p), 6) for c, p in zip(CLASSES, priors)}


def _csv_priors(text: str) -> dict[str, float]:
    rows = [line.split(",") for line in text.splitlines() if line.strip()]
    if rows and rows[0][0].strip().lower() in ("class", "name"):
        rows = rows[1:]  # header
    if any(len(r) != 2 for r in rows):
        raise ValueError("every line must be class,prior")
    return {r[0].strip().lower(): float(r[1]) for r in rows}


def _checked_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(CLASSES):
        raise ConfigError(f"posteriors must be [N, {len(CLASSES)}], got {probs.shape}.")
    if (probs < 0).any() or not np.isfinite(probs).all():
        raise ConfigError("posteriors must be finite and >= 0.")
    return probs


def _checked_priors(p: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.shape != (len(CLASSES),) or (p <= 0).any():
        raise ConfigError(f"{what} priors must be {len(CLASSES)} values > 0, got {p.tolist()}.")
    return p / p.sum()


# ----------------------------------------------------------------------------- stage


def correct_predictions(cfg: PriorsConfig, scored: Mapping[str, Path], clips: list,
                        unlabelled_dir: str, out_dir: str | os.PathLike,
                        report_path: str | os.PathLike | None = None) -> dict:
    """`priors` stage: for each of `cfg.heads` (a name -> predictions.csv of heads and
    ensembles), estimate or read the target priors and write the corrected
    `<out_dir>/<name>/predictions.csv` (labelled rows unchanged: they are the out-of-fold
    scores) and the report (estimated priors; default `<out_dir>/priors.json`). A head with no
    target clips (no unlabelled clips at all, say) has nothing to correct: one line says so, the
    report gives it `clips: 0` and no predictions.csv is written for it."""
    from features.reliability.reports import write_json_atomic
    from models.training.bundles import read_predictions, write_predictions
    from models.unlabelled.selection import target_groups

    out = Path(out_dir)
    missing = [h for h in cfg.heads if h not in scored]
    if missing:
        raise ConfigError(f"priors.heads: {missing} are not trained heads or ensembles (have "
                          f"{sorted(scored)}); fix priors.heads.")
    pool, test = target_groups(clips, unlabelled_dir)
    group = {c.clip_id: ("pool" if p else "test" if t else "")
             for c, p, t in zip(clips, pool, test)}
    report: dict = {"method": cfg.method, "target": cfg.target}
    given = read_priors(cfg.file) if cfg.method == "file" else None
    idle = []
    for name in cfg.heads if cfg.method != "none" else []:
        rows = read_predictions(scored[name])
        probs = np.array([[float(r[c]) for c in CLASSES] for r in rows]).reshape(-1, len(CLASSES))
        lab = [i for i, r in enumerate(rows) if r["split"] == "labelled"]
        other = [i for i, r in enumerate(rows) if r["split"] != "labelled"]
        tgt = [i for i in other if cfg.target == "all" or group.get(rows[i]["clip_id"]) ==
               cfg.target]
        if not tgt:
            idle.append(name)
            report[name] = {"clips": 0}
            (out / name / "predictions.csv").unlink(missing_ok=True)  # no stale correction
            continue
        y = np.array([CLASSES.index(rows[i]["label"]) for i in lab], dtype=np.int64)
        probs[tgt], info = _correct(cfg, probs[lab], y, probs[tgt], given)
        (out / name).mkdir(parents=True, exist_ok=True)
        write_predictions(out / name / "predictions.csv", [_Row(rows[i]) for i in lab],
                          probs[lab], np.array([int(rows[i]["fold"]) for i in lab]),
                          [_Row(rows[i]) for i in other], probs[other])
        report[name] = {**info, "clips": len(tgt)}
    if idle:
        print(nothing_to_correct(cfg.target, idle, list(group.values())), file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(report_path) if report_path else out / "priors.json", report)
    return report


def nothing_to_correct(target: str, heads: list[str], groups: list[str]) -> str:
    """The one line of a `priors` run whose heads have no target clips; `groups`: each manifest
    clip's group (pool, test or "" for labelled), to name the target that would have some."""
    why = {"pool": "no pool clips (prepare.unlabelled has none)",
           "test": "no test clips (no unlabelled videos beside the labelled ones)",
           "all": "no unlabelled clips"}[target]
    have = {g: groups.count(g) for g in ("pool", "test") if groups.count(g) and g != target}
    hint = "".join(f"; priors.target: {g} would correct {n} clips" for g, n in have.items())
    return f"priors: nothing to correct for {', '.join(heads)}: {why}{hint}."


def _correct(cfg: PriorsConfig, oof: np.ndarray, y: np.ndarray, target: np.ndarray,
             given: np.ndarray | None) -> tuple[np.ndarray, dict]:
    """`target`: fold-mean posteriors [M, C] (what predictions.csv holds today) or each fold
    model's posteriors [K, M, C]; with the latter BCTS follows the per-fold rule
    (`Calibration.apply_folds`), and the result is the fold mean either way."""
    info: dict = {}
    target = np.asarray(target, dtype=np.float64)
    per_fold = target.ndim == 3
    if cfg.calibrate:
        cal = fit_calibration(oof, y)
        target = cal.apply_folds(target) if per_fold else cal.apply(target)
        source = source_priors("labels", y)
        info["calibration_rule"] = "per_fold" if per_fold else "fold_mean"
        info["calibration"] = {"temperature": round(cal.temperature, 4),
                               "bias": cal.bias.round(4).tolist()}
    else:
        target = target.mean(axis=0) if per_fold else target
        source = source_priors(cfg.source, y)
    if given is None:
        est = em_priors(target, source, cfg.max_iter, cfg.tol)
        given = est.priors
        info.update(iterations=est.iterations, converged=est.converged)
    info.update(source=as_mapping(source), priors=as_mapping(given))
    return adjust(target, source, given), info


@dataclass
class _Row:
    """A predictions.csv row as the object write_predictions expects."""

    clip_id: str
    label: str

    def __init__(self, row: Mapping[str, str]):
        self.clip_id, self.label = row["clip_id"], row["label"]


def reweight(probs: np.ndarray, spec: str, head_predictions: str | os.PathLike,
             calibrate: bool = True) -> tuple[np.ndarray, dict]:
    """`mer predict --priors em|FILE`: posteriors of new clips corrected to the priors EM
    estimates on them (`em`) or to the priors in FILE; BCTS is fitted on the head's own
    out-of-fold predictions (its predictions.csv) first."""
    from models.training.bundles import labelled_probs

    cfg = PriorsConfig(method="em" if spec == "em" else "file", file="" if spec == "em" else spec,
                       calibrate=calibrate)
    y, oof = labelled_probs(head_predictions)
    given = read_priors(cfg.file) if cfg.method == "file" else None
    fixed, info = _correct(cfg, oof, y, np.asarray(probs, dtype=np.float64), given)
    return fixed, {"method": cfg.method, **info}
