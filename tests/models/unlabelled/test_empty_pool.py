"""With no unlabelled clips (`prepare.unlabelled: data/no_unlabelled`, an empty folder) the
unlabelled-clip stages say in one line there is nothing to do, write their outputs and exit 0."""
import json

import numpy as np
import pytest
import yaml

from features.media.manifest import CLASSES, Clip, write_manifest
from features.storage.store import StoreReader, StoreUpdate
from stages.common import guard

C = len(CLASSES)
N = 24  # labelled clips, 4 folds


@pytest.fixture
def project(tmp_path, monkeypatch):
    """Labelled clips only, three encoder stores, params.yaml naming an empty unlabelled folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_unlabelled").mkdir()
    clips = [Clip(f"c{i:02d}", str(tmp_path / "videos" / f"c{i:02d}.mp4"), 1, "x", 1.0,
                  CLASSES[i % C], i % 4, "labelled") for i in range(N)]
    write_manifest(tmp_path / "manifest.csv", clips)
    rng = np.random.default_rng(0)
    for name, dim in (("clip", 10), ("hubert", 6), ("enc", 8)):
        meta = {"encoder": name, "fingerprint": {"weights": name}, "store_dtype": "float32"}
        with StoreUpdate(tmp_path / "features" / name, "embedding", meta,
                         {c.clip_id: c.clip_id for c in clips}) as up:
            for c in clips:
                up.add(c.clip_id, pooled=rng.normal(size=(2, dim)).astype(np.float32))
    probe = {"type": "probe", "features": ["enc"], "epochs": 2}
    params = {"prepare": {"unlabelled": str(tmp_path / "no_unlabelled")},
              "align": {"alpha": 0.1},
              "priors": {"method": "em", "heads": ["h"], "target": "pool"},
              "train": {"seed": 0, "heads": {"p1": {**probe, "layer": -1},
                                             "p2": {**probe, "layer": "mean"}}},
              "semi": {"heads": ["p1", "p2"], "rounds": {
                  "r1": {"after": "base", "default_threshold": 0.5},
                  "r2": {"after": "r1", "rule": "vote", "k": 2}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path, clips


def one_line(capsys, words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err
    return err


def test_priors_has_nothing_to_correct(project, capsys):
    from models.training.bundles import write_predictions
    from stages.priors import main

    root, clips = project
    probs = np.random.default_rng(1).dirichlet(np.ones(C), size=N)
    (root / "heads" / "h").mkdir(parents=True)
    write_predictions(root / "heads" / "h" / "predictions.csv", clips, probs,
                      np.array([c.fold for c in clips]), [], None)
    argv = ["--manifest", "manifest.csv", "--heads", "heads", "--ensembles", "ensembles",
            "--out", "priors", "--report", "results/priors.json"]
    assert guard(lambda: main(argv), "priors") == 0
    one_line(capsys, "priors: nothing to correct for h: no pool clips")
    report = json.loads((root / "results" / "priors.json").read_text())
    assert report == {"method": "em", "target": "pool", "h": {"clips": 0}}
    assert (root / "priors").is_dir() and not (root / "priors" / "h").exists()


def test_semi_rounds_and_report_write_empty_outputs_without_training(project, capsys, monkeypatch):
    import models.training.stage as training
    from stages import semi, semi_report

    root, _ = project
    monkeypatch.setattr(training, "train_head", lambda *a, **k: pytest.fail("trained"))
    common = ["--manifest", "manifest.csv", "--features", "features", "--probe", "probe"]
    for key, after in (("base", ""), ("r1", "semi/base"), ("r2", "semi/r1")):
        argv = [key, *common, "--out", f"semi/{key}"] + (["--after", after] if after else [])
        assert guard(lambda: semi.main(argv), "semi") == 0
        one_line(capsys, "nothing to do: no unlabelled pool clips")
        info = json.loads((root / "semi" / key / "round.json").read_text())
        assert info["metrics"] == {} and sum(info["gain"].values()) == 0
        assert (root / "semi" / key / "selected.csv").read_text().strip() == "fold,clip_id,label,new"
        with np.load(root / "semi" / key / "state.npz") as st:
            assert st["ids"].size == 0 and st["folds"].tolist() == [0, 1, 2, 3]
    argv = ["--rounds", "semi", "--out", "results/semi"]
    assert guard(lambda: semi_report.main(argv), "semi_report") == 0
    one_line(capsys, "3 of 3 rounds had nothing to do")
    metrics = json.loads((root / "results" / "semi" / "metrics.json").read_text())
    assert metrics["rounds"] == ["base", "r1", "r2"] and metrics["heads"] == {"p1": {}, "p2": {}}
    gain = json.loads((root / "results" / "semi" / "gain.json").read_text())
    assert [g["round"] for g in gain] == ["base", "r1", "r2"] and gain[2]["happy"] == 0
    assert json.loads((root / "results" / "semi" / "plots" / "p1.json").read_text()) == []


def test_align_fits_on_the_labelled_clips(project, capsys):
    """align has work to do without a pool: the heads that name its store read labelled clips."""
    from stages.align import main

    root, clips = project
    argv = ["--manifest", "manifest.csv", "--features", "features", "--out",
            "features/clip_aligned", "--trained", "align/clip_aligned"]
    assert guard(lambda: main(argv), "align") == 0
    one_line(capsys, "align: no unlabelled pool clips: the map is fitted on the 24 labelled")
    with StoreReader(root / "features" / "clip_aligned", kind="embedding") as st:
        assert st.pooled(0, ids=[c.clip_id for c in clips]).shape == (N, 6)
    assert (root / "align" / "clip_aligned" / "map.json").is_file()
    assert json.loads((root / "features" / "clip_aligned.align.json").read_text())["fit_clips"] == N
