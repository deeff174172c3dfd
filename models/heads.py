"""Classification heads on pooled features, registered by `type` name.

`probe` (one modality, layer probing), `concat` (the MLP baseline on all features), `attention`
(MERTools' fusion) and `token_attention` (paper 000's attention fusion). Frame-level heads
(`agt`, `joint_at`) live in models/agt.py and models/joint.py and train through models.sequence.

Every head takes ``dict[str, Tensor[B, D_m]]`` (one entry per listed feature, in `cfg.features`
order) and returns logits ``[B, C]``. A head built with ``members=K`` holds K independent copies
of its weights and maps ``[K, B, D_m]`` inputs to ``[K, B, C]``: cross-validation trains all
folds as one such head, which makes each small matrix product K times bigger and spends the
per-step Python and optimizer overhead once instead of K times.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from features.errors import ConfigError
from models.attention import AttentionHead, MLPEncoder
from models.blocks import Dropout, Linear
from models.concat import ConcatHead
from models.config import CLASSES, HeadConfig
from models.token_attention import TokenAttentionHead

__all__ = ["HEADS", "AttentionHead", "ConcatHead", "Dropout", "Linear", "MLPEncoder", "ProbeHead",
           "TokenAttentionHead", "build_head"]


class ProbeHead(nn.Module):
    """An MLP (or, with hidden=0, a linear layer) on the concatenation of the listed features."""

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1):
        super().__init__()
        self.names = list(feature_dims)
        in_dim = sum(feature_dims.values())
        if hidden == 0:
            self.net = nn.Sequential(Dropout(dropout), Linear(in_dim, n_classes, members))
        else:
            self.net = nn.Sequential(
                Dropout(dropout), Linear(in_dim, hidden, members), nn.ReLU(),
                Dropout(dropout), Linear(hidden, n_classes, members),
            )

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.net(torch.cat([feats[n] for n in self.names], dim=-1))


HeadFactory = Callable[..., nn.Module]
HEADS: dict[str, HeadFactory] = {
    "probe": ProbeHead,
    "attention": AttentionHead,
    "concat": ConcatHead,
    "token_attention": TokenAttentionHead,
}


def build_head(cfg: HeadConfig, feature_dims: Mapping[str, int],
               n_classes: int = len(CLASSES), members: int = 1) -> nn.Module:
    """The head named by `cfg.type` for `feature_dims` (name -> D), in `cfg.features` order."""
    if cfg.type not in HEADS:
        raise ConfigError(
            f"head type {cfg.type!r} is not a pooled-feature head; registered heads are "
            f"{sorted(HEADS)} (frame-level heads train through models.sequence). "
            f"Fix `type` in params.yaml train.heads."
        )
    missing = [n for n in cfg.features if n not in feature_dims]
    if missing:
        raise ConfigError(
            f"head needs features {missing} but only {sorted(feature_dims)} were given; "
            f"extract them first or remove them from the head's `features`."
        )
    dims = {n: int(feature_dims[n]) for n in cfg.features}
    factory = HEADS[cfg.type]
    extra = factory.config_kwargs(cfg) if hasattr(factory, "config_kwargs") else {}
    return factory(dims, cfg.hidden, cfg.dropout, n_classes, members, **extra)
