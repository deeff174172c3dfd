"""Stage functions of the self-training rounds: `semi_base`, `semi@<round>`, `semi_report`.

    artifacts/semi/<round>/
        heads/<head>/           a trained head folder (bundle, predictions.csv: out-of-fold on
                                human labels + fold-mean for the unlabelled clips)
        state.npz               per fold: every target clip's probabilities from that fold's
                                models, and the clips (with pseudo-labels) that fold trained on
        round.json              settings, clips gained per class (per fold and mean), metrics
        selected.csv            fold, clip, pseudo-label, round it was added in

`semi_base` trains the `semi.heads` on the labelled clips alone; each `semi@<r>` reads the round
named by its `after`, selects per fold (models.unlabelled.selection), retrains the heads with the selected clips
appended to that fold's training part only, and predicts again. Every check that can fail
(unknown heads, thresholds, k, the round chain) runs before training.

With no clip to select from (no unlabelled pool; test clips count only in transductive mode)
every round, `semi_base` included, has nothing to do: it says so in one line and writes an
empty round (round.json with a `note` and no metrics, a state with no clips, selected.csv with
its header only) without training; `semi_report` then reports no rounds' scores.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from features.params import from_section
from features.errors import ConfigError
from features.media.manifest import Clip, read_manifest
from features.reliability.reports import read_json, write_json_atomic
from models.training.train_config import CLASSES
from models.unlabelled.selection import FoldPool, RoundConfig, next_selection, target_groups

BASE = "base"
STATE, INFO, SELECTED, HEADS = "state.npz", "round.json", "selected.csv", "heads"


@dataclass
class SemiConfig:
    """params.yaml `semi`."""

    heads: list[str]  # train.heads entries retrained every round (vote rules count these)
    rounds: dict[str, RoundConfig] = field(default_factory=dict)
    enabled: bool = True  # false: every round selects nothing (the ablation switch)
    transductive: bool = False  # true: the test clips are selectable too (named in outputs)


def semi_config(section: Mapping[str, Any] | None) -> SemiConfig:
    section = dict(section or {})
    rounds = section.pop("rounds", None) or {}
    if not isinstance(rounds, Mapping):
        raise ConfigError("semi.rounds must map a round name to its settings, e.g. "
                          "{r1: {after: base, thresholds: 0.99}}.")
    cfg = from_section(SemiConfig, section, "semi")
    cfg.rounds = {k: from_section(RoundConfig, v, f"semi.rounds.{k}") for k, v in rounds.items()}
    return cfg


def check(cfg: SemiConfig, train_cfg: Any) -> None:
    """Every settings error of the whole `semi` section, before any training."""
    if isinstance(cfg.heads, str) or not cfg.heads or len(set(cfg.heads)) != len(cfg.heads):
        raise ConfigError(f"semi.heads={cfg.heads!r} must list one or more distinct heads "
                          f"from train.heads.")
    unknown = [h for h in cfg.heads if h not in train_cfg.heads]
    if unknown:
        raise ConfigError(f"semi.heads: {unknown} are not trained heads (train.heads has "
                          f"{sorted(train_cfg.heads)}); fix the names or add the heads.")
    weighted = [h for h in cfg.heads if getattr(train_cfg.heads[h], "layer", None) == "weighted"]
    if weighted:
        raise ConfigError(f"semi.heads: {weighted} use layer: weighted (per-fold inputs), which "
                          f"rounds do not support; give them a layer index, mean or best.")
    if BASE in cfg.rounds:
        raise ConfigError(f"semi.rounds: {BASE!r} is the heads before any round; rename it.")
    for key, rnd in cfg.rounds.items():
        rnd.validate(f"semi.rounds.{key}", len(cfg.heads))
    chain(cfg)


def chain(cfg: SemiConfig) -> list[str]:
    """The rounds in an order where each follows its `after` (a cycle or unknown name fails)."""
    order, placed = [], {BASE}
    while len(order) < len(cfg.rounds):
        ready = [k for k, r in cfg.rounds.items() if k not in placed and r.after in placed]
        if not ready:
            left = {k: r.after for k, r in cfg.rounds.items() if k not in placed}
            raise ConfigError(f"semi.rounds: {left} (round: after) name rounds that do not exist "
                              f"or form a cycle; each `after` must be {BASE!r} or another round.")
        order += ready
        placed.update(ready)
    return order


# ----------------------------------------------------------------------------- stages


def run_round(key: str, cfg: SemiConfig, train_cfg: Any, manifest: str | os.PathLike,
              features_dir: str | os.PathLike, probe_dir: str | os.PathLike,
              out_dir: str | os.PathLike, after_dir: str | os.PathLike | None = None,
              unlabelled_dir: str = "") -> dict:
    """`semi_base` (key == "base") or one `semi@<key>` round; returns its round.json."""
    clips = read_manifest(manifest)
    targets, selectable = _targets(clips, unlabelled_dir, cfg.transductive)
    check(cfg, train_cfg)
    out = Path(out_dir)
    folds = sorted({c.fold for c in clips if c.label})
    info: dict = {"round": key, "heads": cfg.heads, "transductive": cfg.transductive,
                  "mode": "transductive (test clips selectable)" if cfg.transductive else
                  "inductive (test clips never selected)", "enabled": cfg.enabled}
    rnd = None if key == BASE else _round(cfg, key)
    if rnd is not None:
        info.update(after=rnd.after, settings=dataclasses.asdict(rnd))
    if not selectable.any():
        return _empty_round(key, cfg, out, folds, info)
    if rnd is None:
        previous = None
        extras = [(np.zeros(0, np.int64), np.zeros(0, np.int64))] * len(folds)
        gains = [{c: 0 for c in CLASSES}] * len(folds)
    else:
        previous = _load_state(Path(after_dir), cfg.heads, [c.clip_id for c in targets], folds)
        if cfg.enabled:
            extras, gains = next_selection(rnd, f"semi.rounds.{key}", previous, selectable)
        else:
            extras = [(p.taken, p.label) for p in previous] if rnd.accumulate else \
                [(np.zeros(0, np.int64), np.zeros(0, np.int64))] * len(folds)
            gains = [{c: 0 for c in CLASSES}] * len(folds)
    info["gain_per_fold"] = gains
    info["gain"] = {c: round(float(np.mean([g[c] for g in gains])), 2) for c in CLASSES}
    info["trained_on_pseudo"] = [len(t) for t, _ in extras]
    if key != BASE and sum(sum(g.values()) for g in gains) == 0:
        info["note"] = ("no clip was selected in this round (semi.enabled is false)" if not
                        cfg.enabled else "no clip passed this round's thresholds/votes; the "
                        "heads retrain on what earlier rounds selected")
        print(f"semi@{key}: {info['note']}.", file=sys.stderr)
    probs, info["metrics"] = _train_heads(cfg, train_cfg, manifest, features_dir, probe_dir,
                                          out, targets, extras, folds)
    pools = [FoldPool(probs[:, i], t, lab) for i, (t, lab) in enumerate(extras)]
    _save_state(out, cfg.heads, [c.clip_id for c in targets], folds, pools)
    _write_selected(out / SELECTED, key, targets, folds, extras, previous)
    write_json_atomic(out / INFO, info)
    return info


def _empty_round(key: str, cfg: SemiConfig, out: Path, folds: list[int], info: dict) -> dict:
    """A round with no clip to select from: its outputs, empty, and one line saying so."""
    where = "no unlabelled pool or test clips" if cfg.transductive else \
        "no unlabelled pool clips (prepare.unlabelled is empty)"
    info.update(note=f"nothing to do: {where}", metrics={}, trained_on_pseudo=[0] * len(folds),
                gain_per_fold=[{c: 0 for c in CLASSES} for _ in folds],
                gain={c: 0.0 for c in CLASSES})
    print(f"{'semi_base' if key == BASE else f'semi@{key}'}: {info['note']}; wrote an empty "
          f"round, nothing was trained.", file=sys.stderr)
    empty = np.zeros(0, np.int64)
    _save_state(out, cfg.heads, [], folds,
                [FoldPool(np.zeros((len(cfg.heads), 0, len(CLASSES))), empty, empty)
                 for _ in folds])
    _write_selected(out / SELECTED, key, [], folds, [(empty, empty)] * len(folds), None)
    write_json_atomic(out / INFO, info)
    return info


def _round(cfg: SemiConfig, key: str) -> RoundConfig:
    if key not in cfg.rounds:
        raise ConfigError(f"round {key!r} is not under semi.rounds (have {sorted(cfg.rounds)}).")
    return cfg.rounds[key]


def _targets(clips: list[Clip], unlabelled_dir: str, transductive: bool
             ) -> tuple[list[Clip], np.ndarray]:
    """The unlabelled clips every round predicts, and which of them may be selected."""
    pool, test = target_groups(clips, unlabelled_dir)
    targets = [c for c, p, t in zip(clips, pool, test) if p or t]
    selectable = np.array([p or (transductive and t) for p, t in zip(pool, test) if p or t],
                          dtype=bool)
    return targets, selectable


def _train_heads(cfg: SemiConfig, train_cfg: Any, manifest, features_dir, probe_dir, out: Path,
                 targets: list[Clip], extras, folds: list[int]) -> tuple[np.ndarray, dict]:
    """Train every semi head with the per-fold extra clips; ([H, K, M, C] per-fold target
    probabilities, out-of-fold metrics per head on the human labels)."""
    from models.training.stage import ExtraClips, train_head

    ids = [c.clip_id for c in targets]
    extra = ExtraClips([ids[i] for t, _ in extras for i in t],
                       [CLASSES[int(v)] for _, lab in extras for v in lab],
                       [f for f, (t, _) in zip(folds, extras) for _ in t])
    probs, metrics = [], {}
    for name in cfg.heads:
        head_dir = out / HEADS / name
        train_head(name, train_cfg.heads[name], train_cfg, manifest, features_dir, head_dir,
                   probe_dir, extra=extra if extra.ids else None)
        probs.append(fold_probs(head_dir, features_dir, ids, len(folds)))
        metrics[name] = oof_metrics(head_dir)
    return np.stack(probs), metrics


def fold_probs(head_dir: Path, features_dir, ids: list[str], n_folds: int) -> np.ndarray:
    """[K, M, C]: each fold model's own probabilities for the clips `ids` (per-fold selection
    needs them; predictions.csv holds only their mean)."""
    from features.storage.dataset import FeatureSet
    from models.training.bundles import HeadPredictor, load_bundle

    bundle = load_bundle(head_dir)
    members = bundle.state["folds"]
    if len(members) != n_folds:
        raise ConfigError(f"{head_dir} has {len(members)} fold models, the manifest {n_folds} "
                          f"folds; rerun the rounds from semi_base.")
    if not ids:
        return np.zeros((n_folds, 0, len(CLASSES)))
    with FeatureSet(features_dir) as features:
        return HeadPredictor(bundle).predict_folds(features, ids)


def oof_metrics(head_dir: Path) -> dict:
    """Out-of-fold weighted F1 / accuracy / per-class F1 on the human-labelled clips."""
    from models.training.bundles import labelled_probs
    from models.evaluation.metrics import compute_metrics

    y, probs = labelled_probs(head_dir / "predictions.csv")
    m = compute_metrics(y, probs)
    return {k: m[k] for k in ("weighted_f1", "accuracy", "macro_f1", "per_class_f1")}


def _save_state(out: Path, heads: list[str], ids: list[str], folds: list[int],
                pools: list[FoldPool]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (STATE + ".tmp.npz")
    np.savez(tmp, heads=np.array(heads), ids=np.array(ids, dtype=str), folds=np.array(folds),
             probs=np.stack([p.probs for p in pools]),  # [K, H, M, C]
             taken_fold=np.concatenate([[k] * len(p.taken) for k, p in enumerate(pools)] + [[]])
             .astype(np.int64),
             taken=np.concatenate([p.taken for p in pools]).astype(np.int64),
             label=np.concatenate([p.label for p in pools]).astype(np.int64))
    os.replace(tmp, out / STATE)


def _load_state(after: Path, heads: list[str], ids: list[str], folds: list[int]
                ) -> list[FoldPool]:
    path = after / STATE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run the round it names first "
                          f"(`dvc repro` runs them in order).")
    with np.load(path) as st:
        if st["heads"].tolist() != list(heads) or st["ids"].tolist() != list(ids) or \
                st["folds"].tolist() != list(folds):
            raise ConfigError(f"{after} was made for other heads, clips or folds; rerun the "
                              f"rounds from semi_base (`dvc repro semi_base` and after).")
        return [FoldPool(st["probs"][k], st["taken"][st["taken_fold"] == k],
                         st["label"][st["taken_fold"] == k]) for k in range(len(folds))]


def _write_selected(path: Path, key: str, targets: list[Clip], folds: list[int], extras,
                    previous: list[FoldPool] | None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fold", "clip_id", "label", "new"])
        for k, (taken, label) in enumerate(extras):
            old = set(previous[k].taken.tolist()) if previous else set()
            for i, lab in zip(taken.tolist(), label.tolist()):
                w.writerow([folds[k], targets[i].clip_id, CLASSES[lab], int(i not in old)])
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- report


def report(cfg: SemiConfig, rounds_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Per-round metrics and gains in chain order: metrics.json, plots/<head>.json, gain.json."""
    rounds_dir, out = Path(rounds_dir), Path(out_dir)
    order = [BASE] + chain(cfg)
    infos = [read_json(rounds_dir / r / INFO) for r in order]
    trained = [r for r in infos if r["metrics"]]  # an empty round (nothing to do) has none
    summary = {"transductive": cfg.transductive, "rounds": order,
               "heads": {h: {r["round"]: r["metrics"][h]["weighted_f1"] for r in trained}
                         for h in cfg.heads},
               "gain": {r["round"]: r["gain"] for r in infos}}
    if len(trained) < len(infos):
        summary["note"] = infos[0].get("note") or "some rounds had nothing to do"
        print(f"semi_report: {len(infos) - len(trained)} of {len(infos)} rounds had nothing to "
              f"do ({summary['note']}); their scores are left out.", file=sys.stderr)
    for head in cfg.heads:
        write_json_atomic(out / "plots" / f"{head}.json", [
            {"step": i, "round": r["round"], "weighted_f1": r["metrics"][head]["weighted_f1"],
             "accuracy": r["metrics"][head]["accuracy"],
             "pseudo_clips": float(np.mean(r["trained_on_pseudo"]))}
            for i, r in enumerate(infos) if r["metrics"]])
    write_json_atomic(out / "gain.json", [{"step": i, "round": r["round"], **r["gain"]}
                                          for i, r in enumerate(infos)])
    write_json_atomic(out / "metrics.json", summary)
    return summary


