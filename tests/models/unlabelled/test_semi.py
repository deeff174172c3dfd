"""Pseudo-label selection, thresholds, caps, voting, self-training rounds and their leakage rules."""
import json
from pathlib import Path

import numpy as np
import pytest

from features.errors import ConfigError
from models.training.train_config import CLASSES
from models.evaluation.metrics import fast_scores
from models.unlabelled.selection import (NO_CAP, RoundConfig, base_round, run_round, select_confident,
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


# ------------------------------------------------------------------ the round stages


def tiny_project(tmp_path, n_lab=72, n_pool=60, n_test=12, seed=0):
    """One encoder store with a planted class signal, a manifest with labelled clips (4 folds),
    a pool under pool/ and test clips beside the labelled videos."""
    import csv

    from features.storage.store import StoreUpdate

    rng = np.random.default_rng(seed)
    n = n_lab + n_pool + n_test
    y = np.arange(n) % C
    ids = [f"c{i:03d}" for i in range(n)]
    pooled = rng.normal(size=(n, 2, 8)).astype(np.float32)
    pooled[:, 1] += 2.5 * rng.normal(size=(C, 8))[y]
    with StoreUpdate(tmp_path / "features" / "enc", "embedding", {"encoder": "enc"},
                     {c: f"k{c}" for c in ids}) as up:
        for i, cid in enumerate(ids):
            up.add(cid, None, pooled=pooled[i])
    (tmp_path / "pool").mkdir()
    with open(tmp_path / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "path", "size", "sha256", "duration_s", "label", "fold", "split"])
        for i, cid in enumerate(ids):
            lab = i < n_lab
            where = "videos" if lab or i >= n_lab + n_pool else "pool"
            w.writerow([cid, str(tmp_path / where / f"{cid}.mp4"), 1, "0" * 64, 1.0,
                        CLASSES[y[i]] if lab else "", i % 4 if lab else -1,
                        "labelled" if lab else "unlabelled"])
    return ids, y


def semi_setup(tmp_path, **rounds):
    from models.training.train_config import TrainConfig
    from models.heads.registry import head_config
    from models.unlabelled.rounds import semi_config

    fast = dict(hidden=16, epochs=20, batch_size=32, dropout=0.1, lr=1e-2)
    train = TrainConfig(seed=0, threads=1, heads={
        "p1": head_config({"type": "probe", "features": ["enc"], "layer": -1, **fast}),
        "p2": head_config({"type": "probe", "features": ["enc"], "layer": "mean", **fast})})
    cfg = semi_config({"heads": ["p1", "p2"], "rounds": rounds})
    return cfg, train


def do_round(tmp_path, key, cfg, train, after=None):
    from models.unlabelled.rounds import run_round
    return run_round(key, cfg, train, tmp_path / "manifest.csv", tmp_path / "features",
                     tmp_path / "probe", tmp_path / "semi" / key,
                     tmp_path / "semi" / after if after else None, str(tmp_path / "pool"))


@pytest.mark.slow
def test_round_stages_select_from_the_pool_only_and_report(tmp_path, capsys):
    from models.training.bundles import read_predictions
    from models.unlabelled.rounds import report

    ids, y = tiny_project(tmp_path)
    cfg, train = semi_setup(tmp_path, r1={"after": "base", "default_threshold": 0.3, "caps": 5},
                            r2={"after": "r1", "rule": "vote", "k": 2, "default_threshold": 0.3},
                            r3={"after": "r2", "default_threshold": 1.0})
    base = do_round(tmp_path, "base", cfg, train)
    assert base["mode"].startswith("inductive") and base["metrics"]["p1"]["weighted_f1"] > 0.5
    r1 = do_round(tmp_path, "r1", cfg, train, "base")
    assert 0 < sum(r1["gain"].values()) and max(r1["gain"].values()) <= 5  # capped per class
    r2 = do_round(tmp_path, "r2", cfg, train, "r1")
    r3 = do_round(tmp_path, "r3", cfg, train, "r2")  # selects nothing: says so, trains anyway
    assert "no clip passed" in r3["note"] and "no clip passed" in capsys.readouterr().err
    assert r3["trained_on_pseudo"] == r2["trained_on_pseudo"]  # earlier clips kept
    import csv
    rows = list(csv.DictReader(open(tmp_path / "semi" / "r2" / "selected.csv")))
    assert rows and {r["clip_id"] for r in rows} <= set(ids[72:132])  # pool only, never test
    for head in ("p1", "p2"):  # scored rows: exactly the human-labelled clips, own folds
        pred = read_predictions(tmp_path / "semi" / "r2" / "heads" / head / "predictions.csv")
        lab = [r for r in pred if r["split"] == "labelled"]
        assert [r["clip_id"] for r in lab] == ids[:72]
        assert all(int(r["fold"]) == int(r["clip_id"][1:]) % 4 for r in lab)
    summary = report(cfg, tmp_path / "semi", tmp_path / "results")
    assert summary["rounds"] == ["base", "r1", "r2", "r3"]
    plot = json.loads((tmp_path / "results" / "plots" / "p1.json").read_text())
    assert [p["round"] for p in plot] == ["base", "r1", "r2", "r3"]
    gain = json.loads((tmp_path / "results" / "gain.json").read_text())
    assert gain[1]["round"] == "r1" and set(CLASSES) <= set(gain[1])


def test_transductive_mode_selects_test_clips_and_says_so(tmp_path):
    from models.unlabelled.rounds import _targets
    from features.media.manifest import read_manifest

    tiny_project(tmp_path, n_lab=12, n_pool=6, n_test=6)
    clips = read_manifest(tmp_path / "manifest.csv")
    targets, sel = _targets(clips, str(tmp_path / "pool"), transductive=False)
    assert len(targets) == 12 and sel.sum() == 6
    _, sel = _targets(clips, str(tmp_path / "pool"), transductive=True)
    assert sel.sum() == 12


@pytest.mark.parametrize("change, words", [
    (dict(heads=["p1", "nope"]), r"semi.heads: \['nope'\] are not trained heads"),
    (dict(rounds={"r1": {"after": "base", "rule": "vote", "k": 3}}), r"semi.rounds.r1.k=3"),
    (dict(rounds={"r1": {"after": "base", "thresholds": {"sad": 0}}}),
     r"semi.rounds.r1.thresholds"),
    (dict(rounds={"r1": {"after": "r9"}}), r"\{'r1': 'r9'\}"),
    (dict(pool=False, heads=["p1", "nope"]), r"semi.heads: \['nope'\]"),  # checked with no pool too
])
def test_bad_settings_fail_before_any_training(tmp_path, change, words):
    from models.unlabelled.rounds import semi_config

    tiny_project(tmp_path, n_lab=12, n_pool=0 if change.get("pool") is False else 6, n_test=0)
    _, train = semi_setup(tmp_path)
    section = {"heads": change.get("heads", ["p1", "p2"]),
               "rounds": change.get("rounds", {"r1": {"after": "base"}})}
    with pytest.raises(ConfigError, match=words):
        do_round(tmp_path, "base", semi_config(section), train)
    assert not (tmp_path / "semi").exists()  # nothing trained, nothing written


# ------------------------------------------------------------------ the DAG in dvc.yaml

FAKE_ROUND = '''
import argparse, json, pathlib, yaml
p = argparse.ArgumentParser()
p.add_argument("round")
for a in ("--after", "--manifest", "--features", "--probe", "--out"):
    p.add_argument(a, default="")
a = p.parse_args()
semi = yaml.safe_load(open("params.yaml"))["semi"]
prev = json.loads((pathlib.Path(a.after) / "round.json").read_text()) if a.after else None
out = pathlib.Path(a.out)
out.mkdir(parents=True, exist_ok=True)
(out / "round.json").write_text(json.dumps({"round": a.round, "after": prev,
                                            "settings": semi["rounds"].get(a.round)}))
'''
FAKE_REPORT = '''
import json, pathlib
out = pathlib.Path("results/semi")
(out / "plots").mkdir(parents=True, exist_ok=True)
rounds = sorted(p.name for p in pathlib.Path("artifacts/semi").iterdir())
(out / "metrics.json").write_text(json.dumps({"rounds": rounds}))
(out / "plots" / "h.json").write_text(json.dumps([{"step": i, "weighted_f1": 0.5}
                                                  for i, _ in enumerate(rounds)]))
(out / "gain.json").write_text(json.dumps([{"step": i, "neutral": 1, "angry": 0, "happy": 0,
    "sad": 0, "worried": 0, "surprise": 0} for i, _ in enumerate(rounds)]))
'''


def _dvc(project, *args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(project)}
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _ran(project) -> set[str]:
    import re
    return set(re.findall(r"Running stage '([^']+)'", _dvc(project, "repro")))


@pytest.mark.slow
def test_adding_or_changing_a_round_reruns_only_it_and_what_follows(tmp_path):
    """The semi stages of the real dvc.yaml, on fake stage modules in a tiny DVC project."""
    import yaml

    root = Path(__file__).resolve().parents[3]
    real = yaml.safe_load((root / "dvc.yaml").read_text())
    stages = {k: real["stages"][k] for k in ("semi_base", "semi", "semi_report")}
    for spec in stages.values():  # every dependency except the rounds' own outputs exists
        for dep in (spec.get("do", spec))["deps"]:
            if "${" in dep or dep.startswith("artifacts/semi"):
                continue
            path = tmp_path / dep
            path.parent.mkdir(parents=True, exist_ok=True)
            if "." in path.name:
                path.write_text("x")
            else:
                path.mkdir(exist_ok=True)
                (path / "x").write_text("x")
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "semi.py").write_text(FAKE_ROUND)
    (tmp_path / "stages" / "semi_report.py").write_text(FAKE_REPORT)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages,
                                                      "plots": real["plots"]}))
    params = {"prepare": {"unlabelled": "pool"},
              "train": {"seed": 0, "device": "cpu", "heads": {"h": {"type": "probe"}}},
              "semi": {"enabled": True, "heads": ["h"], "transductive": False,
                       "rounds": {"r1": {"after": "base", "default_threshold": 0.9},
                                  "r2": {"after": "r1", "rule": "vote", "k": 1}}}}
    write = lambda: (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write()
    _dvc(tmp_path, "init", "--no-scm", "-q")
    assert _ran(tmp_path) == {"semi_base", "semi@r1", "semi@r2", "semi_report"}
    params["semi"]["rounds"]["r3"] = {"after": "r2", "default_threshold": 0.95}  # a new round
    write()
    assert _ran(tmp_path) == {"semi@r3", "semi_report"}
    params["semi"]["rounds"]["r2"]["k"] = 2  # change round 2: it and round 3 rerun
    write()
    assert _ran(tmp_path) == {"semi@r2", "semi@r3", "semi_report"}
    shown = json.loads(_dvc(tmp_path, "plots", "show", "--json"))["data"]
    assert "results/semi/gain.json" in shown and "results/semi/plots/h.json" in shown
