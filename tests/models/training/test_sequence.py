"""Frame-level heads (agt, early_fusion): inputs, masks, learning, determinism, bundles, the stage."""
import csv

import numpy as np
import pytest
import torch

from features.errors import ConfigError
from features.storage.store import StoreUpdate
from models.heads import registry
from models.heads.agt import AGTHead
from models.training.bundles import HeadPredictor, load_bundle, read_predictions, save_bundle
from models.training.train_config import CLASSES, TrainConfig, train_config
from models.training.cv import ExtraRows
from models.evaluation.metrics import compute_metrics
from models.heads.registry import head_config
from models.training.stage import train_head
from models.training.frame_trainer import (Frames, build_model, bundle_state, cross_validate, pad_frames,
                             segment_pool)

DIMS = {"hubert": 12, "clip": 6, "minilm": 20}
T_MAX = {"hubert": 30, "clip": 5, "minilm": 9}
FAST = dict(hidden=16, attn_heads=2, epochs=12, batch_size=32, dropout=0.1, lr=3e-3,
            max_frames=6)
SEQUENCE_HEADS = ["agt", "early_fusion"]


def head_cfg(**kw):
    return head_config(kw)


def synthetic(n=180, seed=0, informative="hubert"):
    """Per-clip frame lists; only the `informative` frames carry the class (centroid + noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    centroids = rng.normal(scale=1.5, size=(len(CLASSES), DIMS[informative]))
    clips = {}
    for name, d in DIMS.items():
        clips[name] = []
        for i in range(n):
            x = rng.normal(size=(int(rng.integers(1, T_MAX[name] + 1)), d))
            if name == informative:
                x += centroids[y[i]]
            clips[name].append((x * 4 + 2).astype(np.float32))  # unstandardised on purpose
    return clips, y


def frames_of(clips, max_frames=FAST["max_frames"]):
    return {n: pad_frames(c, max_frames) for n, c in clips.items()}


def cfg_for(head, **kw):
    feats = ["hubert", "clip", "minilm"] if head == "agt" else ["hubert", "minilm", "clip"]
    extra = {"input_dim": 8} if head == "early_fusion" else {}
    return head_cfg(type=head, features=feats, **{**FAST, **extra, **kw})


def test_registry_lists_the_frame_heads():
    assert sorted(n for n in registry.MODULES if registry.get(n).inputs == "frames") == \
        SEQUENCE_HEADS


@pytest.mark.parametrize("informative", ["clip", "minilm"])
def test_agt_learns_a_class_planted_only_in_video_frames_or_text_tokens(informative):
    """The audio frames are pure noise: the class reaches the output only through the audio-
    guided cross-attention over the video (or text) channel, so an AGT that ignored it would
    score chance (~0.17)."""
    clips, y = synthetic(n=180, informative=informative)
    res = cross_validate(frames_of(clips), y, cfg_for("agt", epochs=15),
                         TrainConfig(folds=3, seed=0, threads=1))
    assert compute_metrics(y, res.oof_probs)["weighted_f1"] > 0.7  # measured 0.96 / 1.0


@pytest.mark.slow
def test_agt_without_its_guided_attention_cannot_see_the_video(monkeypatch):
    """The same planted-video problem with the cross-attention cut (the audio stream passed on
    unchanged): chance. So the test above depends on the audio-guided attention."""
    from models.heads import agt
    monkeypatch.setattr(agt.GuidedAttention, "forward", lambda self, audio, channel, mask: audio)
    clips, y = synthetic(n=180, informative="clip")
    res = cross_validate(frames_of(clips), y, cfg_for("agt", epochs=15),
                         TrainConfig(folds=3, seed=0, threads=1))
    assert compute_metrics(y, res.oof_probs)["weighted_f1"] < 0.3  # measured 0.13


def test_agt_has_intra_channel_attention_in_every_channel_and_no_fixed_projection():
    model = build_model(cfg_for("agt", depth=2), DIMS)
    assert isinstance(model, AGTHead) and len(model.blocks) == 2
    for block in model.blocks:
        assert sorted(block.intra) == sorted(DIMS) and sorted(block.inter) == ["clip", "minilm"]
    # learnt projections from each encoder's full width (no random input_dim reduction)
    assert {n: tuple(m.proj.weight.shape[1:]) for n, m in model.inputs.items()} == \
        {n: (d, 16) for n, d in DIMS.items()}
    clips, y = synthetic(n=30)
    res = cross_validate(frames_of(clips), y, cfg_for("agt", epochs=1),
                         TrainConfig(folds=2, seed=0, threads=1))
    assert res.projection == {n: None for n in DIMS}


def test_segment_pool_means_equal_segments_and_keeps_short_clips():
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    np.testing.assert_array_equal(segment_pool(x[:4], 4), x[:4])
    pooled = segment_pool(x, 4)  # bounds 0, 2, 5, 8, 10 (rounded linspace)
    np.testing.assert_allclose(pooled, [x[0:2].mean(0), x[2:5].mean(0), x[5:8].mean(0),
                                        x[8:10].mean(0)])


def test_pad_frames_lengths_mask_and_empty_clip():
    fr = pad_frames([np.ones((3, 2)), np.ones((9, 2)), np.zeros((0, 2))], max_frames=4, dim=2)
    assert fr.x.shape == (3, 4, 2)
    np.testing.assert_array_equal(fr.lengths, [3, 4, 1])  # the empty clip: one zero frame
    assert fr.mask.sum() == 8 and not fr.x[0, 3].any()
    sub = fr.take(np.array([0, 2]))
    assert sub.x.shape == (2, 3, 2)  # trimmed to the longest kept clip
    with pytest.raises(ConfigError, match="lengths"):
        Frames(np.zeros((2, 3, 1), np.float32), np.array([0, 2]))


@pytest.mark.parametrize("head", SEQUENCE_HEADS)
def test_forward_shapes_and_padding_does_not_change_outputs(head):
    cfg = cfg_for(head, max_frames=8)
    model = build_model(cfg, DIMS, members=2).eval()
    g = torch.Generator().manual_seed(0)
    lengths = {"hubert": [6, 2, 4], "clip": [1, 5, 3], "minilm": [4, 4, 1]}
    x, mask, x_pad, mask_pad = {}, {}, {}, {}
    for n, d in DIMS.items():
        t = max(lengths[n])
        m = torch.arange(t)[None, :] < torch.tensor(lengths[n])[:, None]
        x[n] = torch.randn(2, 3, t, d, generator=g) * m[None, :, :, None]
        mask[n] = m.expand(2, -1, -1)
        # two more padded positions full of garbage: masked, they must not matter
        x_pad[n] = torch.cat([x[n], torch.randn(2, 3, 2, d, generator=g) * 100], dim=2)
        x_pad[n][:, :, :t][~mask[n]] = 7.0
        mask_pad[n] = torch.cat([mask[n], torch.zeros(2, 3, 2, dtype=torch.bool)], dim=2)
    with torch.no_grad():
        out = model(x, mask)
        assert out.shape == (2, 3, len(CLASSES))
        torch.testing.assert_close(model(x_pad, mask_pad), out)


@pytest.mark.parametrize("head", SEQUENCE_HEADS)
def test_members_are_independent_copies(head):
    cfg = cfg_for(head)
    stacked = build_model(cfg, DIMS, members=3).eval()
    x = {n: torch.randn(3, 4, 5, d) for n, d in DIMS.items()}
    mask = {n: torch.ones(3, 4, 5, dtype=torch.bool) for n in DIMS}
    with torch.no_grad():
        out = stacked(x, mask)
        for m in range(3):
            single = build_model(cfg, DIMS).eval()
            single.load_state_dict({k: v[m:m + 1] for k, v in stacked.state_dict().items()})
            torch.testing.assert_close(
                single({n: v[m:m + 1] for n, v in x.items()},
                       {n: v[m:m + 1] for n, v in mask.items()})[0], out[m])


@pytest.mark.parametrize("head", SEQUENCE_HEADS)
def test_separable_problem_is_learnt_and_shuffled_labels_are_not(head):
    clips, y_all = synthetic(n=216)
    fr = frames_of(clips)
    train = {n: f.take(np.arange(180)) for n, f in fr.items()}
    test = {n: f.take(np.arange(180, 216)) for n, f in fr.items()}
    y = y_all[:180]
    res = cross_validate(train, y, cfg_for(head), TrainConfig(folds=3, seed=0, threads=1),
                         test=test)
    assert res.oof_probs.shape == (180, len(CLASSES)) and res.test_probs.shape == (36, 6)
    np.testing.assert_allclose(res.oof_probs.sum(axis=1), 1.0, rtol=1e-5)
    assert compute_metrics(y, res.oof_probs)["weighted_f1"] > 0.85
    assert compute_metrics(y_all[180:], res.test_probs)["weighted_f1"] > 0.85

    shuffled = np.random.default_rng(5).permutation(y)
    chance = cross_validate(train, shuffled, cfg_for(head),
                            TrainConfig(folds=3, seed=0, threads=1))
    assert compute_metrics(shuffled, chance.oof_probs)["weighted_f1"] < 0.4  # chance ~1/6


def test_reruns_are_bit_identical_and_leave_the_callers_rng_alone():
    clips, y = synthetic(n=90)
    fr = frames_of(clips)
    cfg, tc = cfg_for("agt", epochs=3), TrainConfig(folds=3, seed=0, threads=1)
    before = torch.get_rng_state()
    a, b = cross_validate(fr, y, cfg, tc), cross_validate(fr, y, cfg, tc)
    assert torch.equal(torch.get_rng_state(), before)
    np.testing.assert_array_equal(a.oof_probs, b.oof_probs)
    assert a.history == b.history and len(a.history) == 3 and len(a.history[0]) == 3
    c = cross_validate(fr, y, cfg, TrainConfig(folds=3, seed=1, threads=1))
    assert not np.array_equal(a.oof_probs, c.oof_probs)


def test_given_folds_are_used(tmp_path):
    clips, y = synthetic(n=60)
    folds = np.arange(60) % 3
    res = cross_validate(frames_of(clips), y, cfg_for("early_fusion", epochs=1),
                         TrainConfig(seed=0, threads=1), folds=folds)
    np.testing.assert_array_equal(res.fold_of, folds)


@pytest.mark.parametrize("head", SEQUENCE_HEADS)
def test_bundle_round_trips_predictions(tmp_path, head):
    clips, y = synthetic(n=72)
    fr = frames_of(clips)
    test = {n: f.take(np.arange(10)) for n, f in fr.items()}
    cfg = cfg_for(head, epochs=2)
    res = cross_validate(fr, y, cfg, TrainConfig(folds=3, seed=0, threads=1), test=test)
    dims = {n: f.dim for n, f in fr.items()}
    loaded = load_bundle(save_bundle(tmp_path, cfg, dims, bundle_state(res, cfg)))
    model = HeadPredictor(loaded).model
    np.testing.assert_allclose(model.predict_proba(test), res.test_probs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="dims"):
        model.predict_proba({**test, "clip": pad_frames([np.ones((2, 3))] * 10, 6)})


def test_extra_frames_join_training_only():
    clips, y = synthetic(n=60)
    fr = frames_of(clips)
    extra = {n: f.take(np.arange(10)) for n, f in fr.items()}
    cfg, folds = cfg_for("early_fusion", epochs=1), np.arange(60) % 3
    res = cross_validate(fr, y, cfg, TrainConfig(seed=0, threads=1), folds=folds,
                         extra=ExtraRows(extra, y[:10], np.full(10, 2)))
    base = cross_validate(fr, y, cfg, TrainConfig(seed=0, threads=1), folds=folds)
    assert res.oof_probs.shape == (60, len(CLASSES)) and (res.fold_of == folds).all()
    for k in range(3):  # only fold 2's train-part standardisation saw the extra frames
        same = torch.equal(res.fold_states[k].scaler["hubert"]["mean"],
                           base.fold_states[k].scaler["hubert"]["mean"])
        assert same == (k != 2)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="at least two features"):
        head_cfg(type="agt", features=["hubert"])
    with pytest.raises(ConfigError, match="multiple of attn_heads"):
        head_cfg(type="early_fusion", features=["hubert", "smollm"], hidden=30, attn_heads=4)
    with pytest.raises(ConfigError, match="max_frames"):
        head_cfg(type="agt", features=["a", "b"], max_frames=0)
    with pytest.raises(ConfigError, match="input_dim"):
        head_cfg(type="early_fusion", features=["a", "b"], input_dim=-1)
    with pytest.raises(ConfigError, match="input_dim"):
        head_cfg(type="agt", features=["a", "b"], input_dim=8)  # AGT's projections are learnt
    with pytest.raises(ConfigError, match="frames_layer"):
        head_cfg(type="agt", features=["a", "b"], frames_layer="last")
    with pytest.raises(ConfigError, match="train.heads.x"):
        train_config({"heads": {"x": {"type": "agt", "features": ["a", "b"], "depth": 0}}})
    with pytest.raises(ConfigError, match="lack"):
        clips, y = synthetic(n=12)
        cross_validate({"hubert": frames_of(clips)["hubert"]}, y, cfg_for("agt"),
                       TrainConfig(folds=2))


# --------------------------------------------------------------------------- the stage


def _write_store(path, name, clips, layers_frames=(-1,), n_layers=3):
    wanted = {cid: f"k-{cid}" for cid in clips}
    meta = {"encoder": name, "layers_frames": list(layers_frames)}
    with StoreUpdate(path, "embedding", meta, wanted) as up:
        for cid, x in clips.items():
            frames = np.stack([x] * len(layers_frames)).astype(np.float16)
            pooled = np.repeat(x.mean(axis=0, keepdims=True), n_layers, axis=0).astype(np.float16)
            up.add(cid, frames, pooled=pooled,
                   attrs={"layers": np.asarray(layers_frames, dtype=np.int64)})


def _write_manifest(path, ids, y, folds, unlabelled):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "path", "size", "sha256", "duration_s", "label", "fold", "split"])
        for cid, label, fold in zip(ids, y, folds):
            w.writerow([cid, f"v/{cid}.mp4", 1, "0" * 64, 1.0, CLASSES[label], fold, "labelled"])
        for cid in unlabelled:
            w.writerow([cid, f"v/{cid}.mp4", 1, "0" * 64, 1.0, "", -1, "unlabelled"])


def test_train_head_dispatches_frame_heads_end_to_end(tmp_path):
    clips, y = synthetic(n=48)
    ids = [f"c{i:03d}" for i in range(48)]
    for name in ("hubert", "minilm"):
        _write_store(tmp_path / "features" / name, name, dict(zip(ids, clips[name])))
    _write_manifest(tmp_path / "manifest.csv", ids[:40], y[:40], np.arange(40) % 3,
                    ids[40:] + ["gone"])
    cfg = head_cfg(type="early_fusion", features=["hubert", "minilm"],
                   **{**FAST, "epochs": 2, "input_dim": 8})
    out = train_head("joint", cfg, TrainConfig(seed=0, threads=1), tmp_path / "manifest.csv",
                     tmp_path / "features", tmp_path / "out")
    rows = read_predictions(out / "predictions.csv")
    assert [r["split"] for r in rows].count("labelled") == 40 and len(rows) == 48
    assert {r["fold"] for r in rows if r["split"] == "labelled"} == {"0", "1", "2"}
    assert "gone" in (out / "failures.json").read_text()
    model = HeadPredictor(load_bundle(out)).model
    assert model.reduction.dims() == {"hubert": 8, "minilm": 8}

    bad = head_cfg(type="agt", features=["hubert", "minilm"], **{**FAST, "frames_layer": 1})
    with pytest.raises(ConfigError, match="layers_frames"):
        train_head("agt", bad, TrainConfig(seed=0), tmp_path / "manifest.csv",
                   tmp_path / "features", tmp_path / "out2")
