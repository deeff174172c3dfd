"""Pooled fusion heads `concat` and `token_attention` (paper 000) and the member-stacked blocks."""
import numpy as np
import pytest
import torch

from models.training.bundles import load_bundle, save_bundle
from features.errors import ConfigError
from models.heads.blocks import LayerNorm, MultiHeadAttention, masked_mean
from models.heads.concat import ConcatHead
from models.training.train_config import CLASSES, TrainConfig
from models.evaluation.metrics import compute_metrics
from models.heads.registry import head_config
from models.heads.token_attention import TokenAttentionHead
from models.training.pooled_trainer import build_model as build_head
from models.training.pooled_trainer import bundle_state, cross_validate, predictor

DIMS = {"hubert": 16, "clip": 8, "minilm": 8}
FAST = dict(hidden=16, attn_heads=2, epochs=15, batch_size=32, dropout=0.1, lr=3e-3)
FUSION = ["concat", "token_attention"]


def head_cfg(**kw):
    if kw["type"] != "token_attention" and kw.get("attn_heads") == FAST["attn_heads"]:
        del kw["attn_heads"]  # FAST's setting, for the one type that has it
    return head_config(kw)


def synthetic(n=240, seed=0, informative="clip"):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    feats = {k: rng.normal(size=(n, d)).astype(np.float32) for k, d in DIMS.items()}
    feats[informative] += rng.normal(scale=3.0, size=(len(CLASSES), DIMS[informative]))[y]
    feats[informative] *= 5.0
    return feats, y


def test_types_build_their_classes():
    assert isinstance(build_head(head_cfg(type="concat", features=list(DIMS)), DIMS), ConcatHead)
    head = build_head(head_cfg(type="token_attention", features=list(DIMS), hidden=8,
                                 attn_heads=2), DIMS)
    assert isinstance(head, TokenAttentionHead) and head.layer.attn.heads == 2


def test_token_attention_weights_and_unstacked_shapes():
    cfg = head_cfg(type="token_attention", features=list(DIMS), hidden=8, attn_heads=2)
    model = build_head(cfg, DIMS).eval()
    x = {k: torch.randn(5, d) for k, d in DIMS.items()}
    w = model.modality_weights(x)
    assert w.shape == (5, 3) and torch.all(w > 0)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(5))
    assert model(x).shape == (5, len(CLASSES))
    stacked = build_head(cfg, DIMS, members=2).eval()
    assert stacked(x).shape == (2, 5, len(CLASSES))  # [B, D] inputs are seen by every member


@pytest.mark.parametrize("head", FUSION)
def test_separable_problem_is_learnt_and_shuffled_labels_are_not(head):
    feats, y = synthetic()
    cfg = head_cfg(type=head, features=list(DIMS), **FAST)
    res = cross_validate(feats, y, cfg, TrainConfig(folds=4, seed=0, threads=1))
    assert compute_metrics(y, res.oof_probs)["weighted_f1"] > 0.9
    shuffled = np.random.default_rng(5).permutation(y)
    chance = cross_validate(feats, shuffled, cfg, TrainConfig(folds=4, seed=0, threads=1))
    assert compute_metrics(shuffled, chance.oof_probs)["weighted_f1"] < 0.35


@pytest.mark.parametrize("head", FUSION)
def test_reruns_are_bit_identical_and_bundle_round_trips(tmp_path, head):
    feats, y = synthetic(n=120)
    test = {k: v[:20] for k, v in feats.items()}
    cfg = head_cfg(type=head, features=list(DIMS), **{**FAST, "epochs": 3})
    tc = TrainConfig(folds=3, seed=0, threads=1)
    a = cross_validate(feats, y, cfg, tc, test=test)
    b = cross_validate(feats, y, cfg, tc, test=test)
    np.testing.assert_array_equal(a.oof_probs, b.oof_probs)
    assert a.history == b.history
    dims = {k: v.shape[1] for k, v in feats.items()}
    save_bundle(tmp_path, cfg, dims, bundle_state(a, cfg))
    np.testing.assert_allclose(load_bundle(tmp_path).state["folds"][0]["scaler"]["clip"]["std"],
                               a.fold_states[0].scaler["clip"]["std"].numpy())
    np.testing.assert_allclose(predictor(cfg, dims, bundle_state(a, cfg)).predict_proba(test),
                               a.test_probs, rtol=1e-5, atol=1e-6)


def test_token_attention_needs_hidden_divisible_by_heads():
    with pytest.raises(ConfigError, match="multiple of attn_heads"):
        head_cfg(type="token_attention", features=["a", "b"], hidden=10, attn_heads=4)
    with pytest.raises(ConfigError, match="do not apply to a head of type 'concat'"):
        head_cfg(type="concat", features=["a"], hidden=10, attn_heads=4)
    with pytest.raises(ConfigError, match="attn_heads"):
        head_cfg(type="token_attention", features=["a", "b"], attn_heads=0)


def test_blocks_mask_and_member_layernorm():
    attn = MultiHeadAttention(8, 2, members=2).eval()
    x = torch.randn(2, 3, 4, 8)
    ctx = torch.randn(2, 3, 5, 8)
    mask = torch.tensor([True, True, False, True, False]).expand(2, 3, 5)
    out = attn(x, ctx, mask)
    kept = torch.tensor([0, 1, 3])
    torch.testing.assert_close(out, attn(x, ctx[:, :, kept], mask[:, :, kept]))
    norm = LayerNorm(8, members=2)
    with torch.no_grad():
        norm.weight[1] = 2.0
    y = norm(x[:1].expand(2, -1, -1, -1))  # the same input for both members
    torch.testing.assert_close(y[1], 2 * y[0])
    m = torch.tensor([[True, False, True, False]]).expand(2, 3, 4)
    torch.testing.assert_close(masked_mean(x, m), x[:, :, [0, 2]].mean(dim=2))
