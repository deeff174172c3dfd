"""Ensembles over predictions.csv: voting, OOF-tuned weights, honest stacking; the stages' outputs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from features.errors import ConfigError
from models.training.train_config import CLASSES
from models.training.bundles import PREDICTIONS, write_predictions
from models.ensemble import (EnsembleConfig, hard_vote, run_ensemble, stack, tune_weights,
                             weighted_vote)
from models.evaluation.metrics import compute_metrics
from models.training.stage import evaluate, log_training

ROOT = Path(__file__).resolve().parents[2]


def noisy_heads(y, qualities, seed=0):
    """[H, N, C] probabilities: head h puts `quality` extra mass on the true class, else noise."""
    rng = np.random.default_rng(seed)
    out = []
    for q in qualities:
        logits = rng.normal(size=(len(y), len(CLASSES))) + q * np.eye(len(CLASSES))[y]
        p = np.exp(logits)
        out.append(p / p.sum(1, keepdims=True))
    return np.array(out)


def labels(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    folds = np.arange(n) % 5
    rng.shuffle(folds)
    return y, folds


def write_head(folder, name, y, folds, oof, test):
    clips = [SimpleNamespace(clip_id=f"c{i:03d}", label=CLASSES[t]) for i, t in enumerate(y)]
    others = [SimpleNamespace(clip_id=f"u{i:02d}", label="") for i in range(len(test))]
    (folder / name).mkdir(parents=True, exist_ok=True)
    write_predictions(folder / name / PREDICTIONS, clips, oof, folds, others, test)
    (folder / name / "history.json").write_text(json.dumps({"train_loss": [[1.0, 0.5]] * 5}))


def test_weights_sum_to_one_and_favour_the_good_head():
    y, folds = labels()
    oof = noisy_heads(y, [3.0, 0.5, 0.0])
    w = tune_weights(oof, y, rounds=20)
    assert abs(w.sum() - 1) < 1e-9 and (w >= 0).all() and w[0] == w.max()
    res = weighted_vote(oof, y, folds, oof[:, :7], rounds=20)
    assert abs(sum(res.info["weights"]) - 1) < 1e-6
    for fw in res.info["weights_per_fold"].values():
        assert abs(sum(fw) - 1) < 1e-3
    assert res.info["nested_weighted_f1"] <= res.info["oof_tuned_weighted_f1"] + 1e-9


def test_hard_vote_majority_and_documented_tie_break():
    def onehot(*classes, mass=0.6):  # one head: most probability on each row's class
        p = np.full((len(classes), len(CLASSES)), (1 - mass) / (len(CLASSES) - 1))
        p[np.arange(len(classes)), classes] = mass
        return p

    # rows: 2-1 majority; 1-1-1 tie broken by the mean probability; exact tie -> earlier class
    a, b, c = onehot(1, 2, 3, mass=0.9), onehot(1, 3, 4), onehot(2, 4, 3)
    c[1] = np.full(len(CLASSES), 1 / 6)  # row 1: head c votes class 0 (argmax of a flat row)
    votes = hard_vote(np.stack([a, b, c]))
    assert votes.argmax(1).tolist() == [1, 2, 3]
    np.testing.assert_allclose(votes.sum(1), 1.0)
    # row 1: classes 2 (a, 0.9), 3 (b, 0.6) and 0 (c) have a vote each: 2 has the highest mean
    exact = hard_vote(np.stack([onehot(4), onehot(2)]))  # 1-1, equal mean probability
    assert exact.argmax(1).tolist() == [2]  # the earlier class in CLASSES order
    soft_would = np.stack([onehot(5, mass=0.99), onehot(1, mass=0.4), onehot(1, mass=0.4)])
    assert hard_vote(soft_would).argmax(1).tolist() == [1]  # votes win over confidence


def test_stacking_is_honest_on_noise_and_learns_on_signal():
    y, folds = labels(n=360)
    noise = noisy_heads(y, [0.0, 0.0, 0.0, 0.0], seed=1)
    res = stack(noise, y, folds, noise[:, :5], c=1.0, class_weight=True)
    assert compute_metrics(y, res.oof)["weighted_f1"] < 0.3  # chance ~1/6: no leakage
    good = noisy_heads(y, [2.0, 2.0, 0.0], seed=2)
    res = stack(good, y, folds, good[:, :5], c=1.0, class_weight=True)
    best_single = max(compute_metrics(y, p)["weighted_f1"] for p in good)
    assert compute_metrics(y, res.oof)["weighted_f1"] >= best_single - 0.02
    assert res.test.shape == (5, 6) and np.allclose(res.test.sum(1), 1)


@pytest.mark.parametrize("method", ["hard", "soft", "weighted", "stacking"])
def test_new_clips_are_combined_as_the_stage_combined_its_unlabelled_rows(tmp_path, method):
    """`mer predict --head <ensemble>`: members' probabilities of clips the stage never saw,
    through ensemble.json alone, equal the stage's own unlabelled rows for the same inputs."""
    from models.ensemble import INFO, predict_new
    from models.training.bundles import read_predictions

    y, folds = labels(n=150)
    oof, test = noisy_heads(y, [2.0, 1.0, 0.5]), noisy_heads(np.arange(7) % 6, [1.5, 0.5, 0.0], seed=3)
    for name, o, t in zip(["a", "b", "c"], oof, test):
        write_head(tmp_path / "heads", name, y, folds, o, t)
    run_ensemble("ens", EnsembleConfig(method=method, heads=["a", "b", "c"]), tmp_path / "heads",
                 tmp_path / "ens")
    info = json.loads((tmp_path / "ens" / INFO).read_text())
    rows = [r for r in read_predictions(tmp_path / "ens" / PREDICTIONS) if r["split"] != "labelled"]
    stage = np.array([[float(r[c]) for c in CLASSES] for r in sorted(rows, key=lambda r: r["clip_id"])])
    np.testing.assert_allclose(predict_new(info, test), stage, atol=1e-4)  # csv rounding


@pytest.mark.parametrize("method", ["hard", "soft", "weighted", "stacking"])
def test_stage_outputs_are_deterministic_and_evaluated(tmp_path, method):
    y, folds = labels(n=120)
    oof, test = noisy_heads(y, [2.0, 1.0]), noisy_heads(np.zeros(4, int), [0.0, 0.0])
    for name, o, t in zip(["a", "b"], oof, test):
        write_head(tmp_path / "heads", name, y, folds, o, t)
    cfg = EnsembleConfig(method=method, heads=["a", "b"])
    info = run_ensemble("ens", cfg, tmp_path / "heads", tmp_path / "ens" / "ens")
    first = (tmp_path / "ens" / "ens" / PREDICTIONS).read_text()
    run_ensemble("ens", cfg, tmp_path / "heads", tmp_path / "ens" / "ens")
    assert (tmp_path / "ens" / "ens" / PREDICTIONS).read_text() == first
    assert first.splitlines()[0] == "clip_id,split,label,fold,predicted," + ",".join(CLASSES)
    assert len(first.splitlines()) == 1 + 120 + 4
    metrics = evaluate(tmp_path / "heads", "ens", tmp_path / "results", tmp_path / "ens")
    assert set(metrics) == {"a", "b", "ens"} and metrics["ens"]["weighted_f1"] == info["weighted_f1"]
    assert metrics["ens"]["type"] == f"ensemble:{method}" and metrics["a"]["type"] == "?"
    saved = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert saved["ensembles"] == ["ens"] and saved["main_head"] == "ens"


def test_bad_ensembles_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        EnsembleConfig(method="median", heads=["a", "b"])
    with pytest.raises(ConfigError, match="two or more"):
        EnsembleConfig(method="soft", heads=["a"])
    with pytest.raises(ConfigError, match="no .*predictions.csv"):
        run_ensemble("e", EnsembleConfig(method="soft", heads=["a", "b"]), tmp_path, tmp_path / "o")


def test_dvclive_files_of_a_head(tmp_path):
    y, folds = labels(n=60)
    write_head(tmp_path, "a", y, folds, noisy_heads(y, [2.0])[0], noisy_heads(y[:2], [0.0])[0])
    live = log_training(tmp_path / "a", tmp_path / "live" / "a")
    summary = json.loads((live / "metrics.json").read_text())
    assert {"weighted_f1", "accuracy", "step"} <= set(summary) and summary["step"] == 1
    curve = (live / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()
    assert curve[0].split("\t") == ["step", "train_loss"] and len(curve) == 3
    assert (live / "plots" / "metrics" / "fold0" / "train_loss.tsv").is_file()


def test_dvc_yaml_declares_the_new_stages_outputs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train = stages["train"]["do"]
    assert "results/train/${key}/metrics.json" in train["metrics"]
    assert "--live results/train/${key}" in train["cmd"]
    probe = stages["probe"]["do"]
    assert any("scores.json" in next(iter(p)) for p in probe["plots"] if isinstance(p, dict))
    assert "artifacts/ensembles" in stages["evaluate"]["deps"]
    assert stages["ensemble"]["foreach"] == "${ensemble}"
    assert not any(str(o).startswith("artifacts/heads") for o in stages["ensemble"]["do"]["outs"])


def _tiny_project(proj: Path) -> None:
    """The probe/train/ensemble/evaluate stages of dvc.yaml over two synthetic stores."""
    from features.media.manifest import Clip, write_manifest
    from features.storage.store import write_store
    for name in ("features", "models", "stages"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".gitignore", proj / ".gitignore")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    keep = {k: stages[k] for k in ("probe", "train", "ensemble", "evaluate")}
    (proj / "dvc.yaml").write_text(yaml.safe_dump({"stages": keep}, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {"embed": {"encoders": {"hubert": {}, "minilm": {}}},
              "probe": {**params["probe"], "epochs": 3},
              "train": {"seed": 0, "device": "cpu", "heads": {
                  "probe_hubert": {"type": "probe", "features": ["hubert"], "layer": "best",
                                   "epochs": 3},
                  "lgbm_minilm": {"type": "lightgbm", "features": ["minilm"], "n_estimators": 5,
                                  "min_child_samples": 2, "num_threads": 1}}},
              "ensemble": {"vote": {"method": "soft", "heads": ["probe_hubert", "lgbm_minilm"]}},
              "evaluate": {"main_head": "vote"}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rng = np.random.default_rng(0)
    clips = [Clip(f"c{i:02d}", "v", 1, "0", 1.0, CLASSES[i % 6], (i // 6) % 2, "labelled")
             for i in range(24)] + [Clip("u0", "v", 1, "0", 1.0, "", -1, "unlabelled")]
    write_manifest(proj / "artifacts/prepare/manifest.csv", clips)
    for enc, (n_layers, dim) in {"hubert": (4, 8), "minilm": (3, 6)}.items():
        write_store(proj / "artifacts/features" / enc, "embedding", {},
                    [(c.clip_id, None, None, rng.normal(size=(n_layers, dim)).astype(np.float32))
                     for c in clips])


@pytest.mark.slow
def test_dvc_exp_run_sweeps_a_head_and_metrics_diff_shows_it(tmp_path):
    """`dvc exp run -S` reruns only the changed head and what reads it; exp show/metrics diff see it."""
    proj = tmp_path / "proj"
    proj.mkdir()
    _tiny_project(proj)
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])

    def run(*args: str) -> str:
        done = subprocess.run(list(args), cwd=proj, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"]):
        run(*cmd)
    run("dvc", "repro")
    assert json.loads((proj / "artifacts/probe/hubert/best.json").read_text())["layers"] == 4
    assert (proj / "results/train/probe_hubert/plots/metrics/train_loss.tsv").is_file()
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    log = run("dvc", "exp", "run", "-S", "train.heads.probe_hubert.epochs=5")
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    assert ran == {"train@probe_hubert", "ensemble@vote", "evaluate"}
    assert "train.heads.probe_hubert.epochs" in run("dvc", "exp", "show", "--no-pager", "--csv")
    diff = run("dvc", "metrics", "diff", "--md")
    assert "results/train/probe_hubert/metrics.json" in diff and "step" in diff
