"""Heads: registry, forward shapes, and the attention head's modality weights."""
import pytest
import torch

from features.errors import ConfigError
from models.config import CLASSES, FRAME_HEAD_TYPES, HEAD_TYPES, HeadConfig, train_config
from models.heads import HEADS, AttentionHead, Dropout, Linear, build_head

DIMS = {"hubert": 12, "clip": 7, "minilm": 5}


def _batch(n=4, dims=DIMS):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, d, generator=g) for k, d in dims.items()}


def test_registry_matches_config_types():
    """Pooled heads are in HEADS, frame-level ones in models.sequence (tests/test_sequence.py)."""
    assert not set(HEADS) & set(FRAME_HEAD_TYPES)
    assert set(HEADS) | set(FRAME_HEAD_TYPES) <= set(HEAD_TYPES)
    assert {"probe", "attention", "concat", "token_attention"} <= set(HEADS)


@pytest.mark.parametrize("head_type", sorted(HEADS))
@pytest.mark.parametrize("features", [["hubert"], ["hubert", "clip", "minilm"]])
def test_forward_shape(head_type, features):
    model = build_head(HeadConfig(type=head_type, features=features, hidden=8), DIMS)
    assert model(_batch()).shape == (4, len(CLASSES))


def test_linear_probe_has_one_layer():
    model = build_head(HeadConfig(type="probe", features=["hubert", "clip"], hidden=0), DIMS)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(1, 19, len(CLASSES))]
    assert model(_batch()).shape == (4, len(CLASSES))


@pytest.mark.parametrize("head_type", sorted(HEADS))
def test_members_are_independent_copies(head_type):
    """A members=3 head equals three members=1 heads loaded with its slices."""
    cfg = HeadConfig(type=head_type, features=list(DIMS), hidden=8)
    stacked = build_head(cfg, DIMS, members=3).eval()
    x = {k: torch.randn(3, 5, d) for k, d in DIMS.items()}
    out = stacked(x)
    assert out.shape == (3, 5, len(CLASSES))
    for m in range(3):
        single = build_head(cfg, DIMS).eval()
        single.load_state_dict({k: v[m:m + 1] for k, v in stacked.state_dict().items()})
        torch.testing.assert_close(single({k: v[m] for k, v in x.items()}), out[m])


def test_dropout_keeps_expectation_and_is_identity_in_eval():
    drop = Dropout(0.3)
    x = torch.ones(200, 1000)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(3)
    a = Dropout(0.3)(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.3)(x), a)  # seeded by torch's global generator


def test_attention_weights_are_a_distribution_over_modalities():
    model = build_head(HeadConfig(type="attention", features=list(DIMS), hidden=8), DIMS).eval()
    assert isinstance(model, AttentionHead)
    weights = model.modality_weights(_batch(n=6))
    assert weights.shape == (6, 3)
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6))


def test_attention_fused_vector_is_weighted_sum_of_modality_hiddens():
    model = build_head(HeadConfig(type="attention", features=list(DIMS), hidden=8), DIMS).eval()
    x = _batch(n=3)
    fused, weights = model.fuse(x)
    hiddens = torch.stack([model.encoders[n](x[n]) for n in DIMS], dim=1)  # [B, M, H]
    torch.testing.assert_close(fused, (hiddens * weights.unsqueeze(2)).sum(dim=1))
    torch.testing.assert_close(model(x), model.fc_out(fused))


def test_unknown_head_type_lists_known_names():
    with pytest.raises(ConfigError, match="probe"):
        train_config({"heads": {"x": {"type": "transformer", "features": ["hubert"]}}})
    with pytest.raises(ConfigError, match="train.heads.x"):
        train_config({"heads": {"x": {"type": "transformer", "features": ["hubert"]}}})


def test_frame_head_types_are_not_built_here():
    with pytest.raises(ConfigError, match="frame-level"):
        build_head(HeadConfig(type="agt", features=["hubert", "clip"]), {"hubert": 4, "clip": 4})


def test_missing_feature_dim_is_a_config_error():
    with pytest.raises(ConfigError, match="clip"):
        build_head(HeadConfig(type="attention", features=["hubert", "clip"]), {"hubert": 4})


def test_train_config_parses_heads_and_rejects_typos():
    cfg = train_config({"folds": 3, "seed": 7, "heads": {
        "fusion": {"type": "attention", "features": ["hubert", "clip", "minilm"], "layer": "last4"},
        "hubert_probe": {"type": "probe", "features": ["hubert"], "layer": 18, "hidden": 0},
    }})
    assert cfg.folds == 3 and cfg.seed == 7
    assert cfg.heads["fusion"].layer == "last4" and cfg.heads["fusion"].hidden == 128
    assert cfg.heads["hubert_probe"].layer == 18
    with pytest.raises(ConfigError, match="epoch"):
        train_config({"heads": {"p": {"type": "probe", "features": ["a"], "epoch": 3}}})
    with pytest.raises(ConfigError, match="layer"):
        train_config({"heads": {"p": {"type": "probe", "features": ["a"], "layer": "first"}}})
    with pytest.raises(ConfigError, match="fold"):
        train_config({"fold": 5})
