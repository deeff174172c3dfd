"""Heads: the registry, per-type strict configs, forward shapes, the attention head's weights."""
from dataclasses import dataclass

import pytest
import torch

from features.errors import ConfigError
from models.heads import registry
from models.heads.attention import AttentionHead
from models.heads.blocks import Dropout, Linear
from models.training.train_config import CLASSES, PooledConfig, train_config
from models.heads.registry import head_config
from models.training.pooled_trainer import build_model as build_head

DIMS = {"hubert": 12, "clip": 7, "minilm": 5}
POOLED = [n for n in registry.names() if registry.get(n).inputs == "pooled"
          and registry.get(n).build is not None]


def head_cfg(**kw):
    return head_config(kw)


def _batch(n=4, dims=DIMS):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, d, generator=g) for k, d in dims.items()}


def test_registry_lists_every_type_with_its_inputs_and_trainer():
    kinds = {n: (registry.get(n).inputs, registry.get(n).trainer) for n in registry.MODULES}
    assert kinds == {
        "probe": ("pooled", "models.training.pooled_trainer"), "concat": ("pooled", "models.training.pooled_trainer"),
        "attention": ("pooled", "models.training.pooled_trainer"), "token_attention": ("pooled", "models.training.pooled_trainer"),
        "agt": ("frames", "models.training.frame_trainer"), "early_fusion": ("frames", "models.training.frame_trainer"),
        "lightgbm": ("pooled", "models.heads.gbdt")}
    for n in registry.names():  # every trainer implements the protocol
        trainer = registry.get(n).trainer_module()
        assert all(callable(getattr(trainer, f)) for f in ("cross_validate", "bundle_state",
                                                           "predictor"))


def test_keys_of_another_head_type_are_errors_naming_key_and_type():
    with pytest.raises(ConfigError, match=r"\['attn_heads'\].*'attention'"):
        head_cfg(type="attention", features=["a"], attn_heads=4)
    with pytest.raises(ConfigError, match=r"\['input_dim'\].*'agt'"):
        head_cfg(type="agt", features=["a", "b"], input_dim=64)
    with pytest.raises(ConfigError, match=r"\['hidden'\].*'lightgbm'"):
        head_cfg(type="lightgbm", features=["a"], hidden=64)
    with pytest.raises(ConfigError, match="renamed: use early_fusion"):
        head_cfg(type="joint_at", features=["a", "b"])
    with pytest.raises(ConfigError, match="must be > 0"):
        head_cfg(type="attention", features=["a"], hidden=0)  # only `probe` may be linear


def test_a_new_head_type_is_one_registration(tmp_path):
    """The docs' example: a config, a model factory, one register call; then it trains."""
    import numpy as np

    from models.training.train_config import TrainConfig
    from models.training.stage import cross_validate_head

    @dataclass
    class MeanConfig(PooledConfig):
        scale: float = 1.0

    class MeanHead(torch.nn.Module):
        def __init__(self, dims, cfg, n_classes, members):
            super().__init__()
            self.names = list(dims)
            self.out = Linear(sum(dims.values()), n_classes, members)

        def forward(self, feats):
            return self.out(torch.cat([feats[n] for n in self.names], dim=-1))

    registry.register(registry.HeadType(
        "test_mean", MeanConfig, "pooled", "models.training.pooled_trainer",
        build=lambda cfg, dims, n_classes, members: MeanHead(dims, cfg, n_classes, members)))
    rng = np.random.default_rng(0)
    y = np.arange(60) % len(CLASSES)
    x = {"a": rng.normal(size=(60, 4)).astype(np.float32)}
    cfg = head_cfg(type="test_mean", features=["a"], epochs=2, scale=2.0)
    res = cross_validate_head(cfg, TrainConfig(folds=3, threads=1), x, y)
    assert res.oof_probs.shape == (60, len(CLASSES)) and cfg.scale == 2.0
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register(registry.HeadType("test_mean", MeanConfig, "pooled", "models.heads.gbdt"))


@pytest.mark.parametrize("head_type", POOLED)
@pytest.mark.parametrize("features", [["hubert"], ["hubert", "clip", "minilm"]])
def test_forward_shape(head_type, features):
    model = build_head(head_cfg(type=head_type, features=features, hidden=8), DIMS)
    assert model(_batch()).shape == (4, len(CLASSES))


def test_linear_probe_has_one_layer():
    model = build_head(head_cfg(type="probe", features=["hubert", "clip"], hidden=0), DIMS)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(1, 19, len(CLASSES))]
    assert model(_batch()).shape == (4, len(CLASSES))


@pytest.mark.parametrize("head_type", POOLED)
def test_members_are_independent_copies(head_type):
    """A members=3 head equals three members=1 heads loaded with its slices."""
    cfg = head_cfg(type=head_type, features=list(DIMS), hidden=8)
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
    model = build_head(head_cfg(type="attention", features=list(DIMS), hidden=8), DIMS).eval()
    assert isinstance(model, AttentionHead)
    weights = model.modality_weights(_batch(n=6))
    assert weights.shape == (6, 3)
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(6))


def test_attention_fused_vector_is_weighted_sum_of_modality_hiddens():
    model = build_head(head_cfg(type="attention", features=list(DIMS), hidden=8), DIMS).eval()
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


def test_missing_feature_dim_is_a_config_error():
    with pytest.raises(ConfigError, match="clip"):
        build_head(head_cfg(type="attention", features=["hubert", "clip"]), {"hubert": 4})


def test_train_config_parses_heads_and_rejects_typos():
    cfg = train_config({"folds": 3, "seed": 7, "heads": {
        "fusion": {"type": "attention", "features": ["hubert", "clip", "minilm"],
                   "layer": "mean_last4"},
        "hubert_probe": {"type": "probe", "features": ["hubert"], "layer": 18, "hidden": 0},
    }})
    assert cfg.folds == 3 and cfg.seed == 7
    assert cfg.heads["fusion"].layer == "mean_last4" and cfg.heads["fusion"].hidden == 128
    assert cfg.heads["hubert_probe"].layer == 18
    with pytest.raises(ConfigError, match="epoch"):
        train_config({"heads": {"p": {"type": "probe", "features": ["a"], "epoch": 3}}})
    with pytest.raises(ConfigError, match="layer"):
        train_config({"heads": {"p": {"type": "probe", "features": ["a"], "layer": "first"}}})
    with pytest.raises(ConfigError, match="fold"):
        train_config({"fold": 5})
    with pytest.raises(ConfigError, match="renamed: use 'mean_last4'.*'sum_last4'"):
        train_config({"heads": {"p": {"type": "probe", "features": ["a"], "layer": "last4"}}})
    for layer in ([1, 2], "weighted", "sum_last4", "best", -3):
        head_cfg(type="probe", features=["a"], layer=layer)
    for layer in ([], [1, 1], [1.5], True, "first"):
        with pytest.raises(ConfigError, match="layer"):
            head_cfg(type="probe", features=["a"], layer=layer)


def test_docs_list_every_registered_head_type():
    """docs/architecture.md's head table and the README name every type in the registry."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    docs = (root / "docs" / "architecture.md").read_text()
    readme = (root / "README.md").read_text()
    for name in registry.MODULES:
        head = registry.get(name)
        assert f"| `{name}` | `{registry.MODULES[name].replace('.', '/')}.py` | {head.inputs} |" \
            in docs, name
        assert f"`{name}`" in readme, name
