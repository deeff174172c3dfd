"""`mer submit`: a MER2024 submission CSV from a head's or an ensemble's predictions."""
import csv
import json

import numpy as np
import pytest

from features.errors import MerError
from features.media.manifest import CLASSES, Clip, write_manifest
from models.training.bundles import write_predictions
from stages.common import guard
from stages.submit import main

C = len(CLASSES)


def predictions(folder, n_lab=120, n_unl=40, seed=0):
    """A head folder: out-of-fold rows of labelled clips, fold-mean rows of unlabelled ones
    whose class shares differ from the labelled set's (EM has a shift to find)."""
    rng = np.random.default_rng(seed)
    lab = [Clip(f"l{i}", "v.mp4", 1, "x", 1.0, CLASSES[i % C], i % 4, "labelled")
           for i in range(n_lab)]
    unl = [Clip(f"u{i}", "v.mp4", 1, "x", 1.0, "", -1, "unlabelled") for i in range(n_unl)]
    y = np.array([CLASSES.index(c.label) for c in lab])
    oof = rng.dirichlet(np.ones(C), n_lab) + 2.0 * np.eye(C)[y]
    test = rng.dirichlet(np.ones(C), n_unl) + 2.0 * np.eye(C)[np.zeros(n_unl, int)]
    folder.mkdir(parents=True)
    write_predictions(folder / "predictions.csv", lab, oof / oof.sum(1, keepdims=True),
                      np.array([c.fold for c in lab]), unl,
                      test / test.sum(1, keepdims=True) if n_unl else None)
    return lab, unl


def read(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_submit_writes_the_unlabelled_clips_in_mer2024_layout(tmp_path, capsys):
    lab, unl = predictions(tmp_path / "heads" / "h")
    write_manifest(tmp_path / "manifest.csv", lab + unl + [
        Clip("u_failed", "v.mp4", 1, "x", 1.0, "", -1, "unlabelled")])
    base = ["--heads", str(tmp_path / "heads"), "--ensembles", str(tmp_path / "ens"),
            "--manifest", str(tmp_path / "manifest.csv"), "--head", "h"]
    assert guard(lambda: main([*base, str(tmp_path / "out" / "sub.csv")]), "mer submit") == 0
    rows = read(tmp_path / "out" / "sub.csv")
    assert rows[0] == ["name", "discrete", "neutral", "angry", "happy", "sad", "worried",
                       "surprise"]
    assert [r[0] for r in rows[1:]] == [c.clip_id for c in unl]  # labelled clips left out
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert [r[1] for r in rows[1:]] == [CLASSES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert "1 unlabelled clip(s)" in capsys.readouterr().err  # u_failed: no prediction
    assert main([*base, "--priors", "em", str(tmp_path / "em.csv")]) == 0
    em = np.array([[float(v) for v in r[2:]] for r in read(tmp_path / "em.csv")[1:]])
    np.testing.assert_allclose(em.sum(1), 1, atol=1e-5)
    assert np.abs(em - probs).max() > 0.01  # corrected towards the estimated priors
    assert "priors (em over 40 clips)" in capsys.readouterr().err
    (tmp_path / "p.json").write_text(json.dumps({c: 1 / C for c in CLASSES}))
    assert main([*base, "--priors", str(tmp_path / "p.json"), str(tmp_path / "f.csv")]) == 0
    assert len(read(tmp_path / "f.csv")) == len(unl) + 1


def test_submit_an_ensemble_and_errors(tmp_path, capsys):
    predictions(tmp_path / "ens" / "vote")
    predictions(tmp_path / "heads" / "h")
    base = ["--heads", str(tmp_path / "heads"), "--ensembles", str(tmp_path / "ens"),
            "--manifest", str(tmp_path / "none.csv")]
    assert main([*base, "--head", "vote", str(tmp_path / "v.csv")]) == 0
    assert len(read(tmp_path / "v.csv")) == 41
    with pytest.raises(MerError, match=r"'nope' is not a trained head or ensemble .*: h, vote"):
        main([*base, "--head", "nope", str(tmp_path / "x.csv")])
    assert guard(lambda: main([*base, "--head", "h", "--priors", "no.json",
                               str(tmp_path / "x.csv")]), "mer submit") == 1
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x.csv").exists()


def test_no_unlabelled_clips_writes_the_header_only(tmp_path, capsys):
    predictions(tmp_path / "heads" / "h", n_unl=0)
    argv = ["--heads", str(tmp_path / "heads"), "--ensembles", str(tmp_path / "ens"),
            "--manifest", str(tmp_path / "none.csv"), "--head", "h", "--priors", "em",
            str(tmp_path / "sub.csv")]
    assert guard(lambda: main(argv), "mer submit") == 0
    assert read(tmp_path / "sub.csv") == [["name", "discrete", *CLASSES]]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to submit" in err
