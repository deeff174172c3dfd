"""Classification heads on pooled features, registered by `type` name.

Every head takes ``dict[str, Tensor[B, D_m]]`` (one entry per listed feature, in `cfg.features`
order) and returns logits ``[B, C]``.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from features.errors import ConfigError
from models.config import CLASSES, HeadConfig


class MLPEncoder(nn.Module):
    """MERTools' modality encoder: dropout on the input, then three Linear+ReLU layers."""

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ProbeHead(nn.Module):
    """An MLP (or, with hidden=0, a linear layer) on the concatenation of the listed features."""

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float, n_classes: int):
        super().__init__()
        self.names = list(feature_dims)
        in_dim = sum(feature_dims.values())
        if hidden == 0:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))
        else:
            self.net = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(),
                nn.Dropout(dropout), nn.Linear(hidden, n_classes),
            )

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.net(torch.cat([feats[n] for n in self.names], dim=1))


class AttentionHead(nn.Module):
    """MERTools' `attention` fusion (toolkit/models/attention.py), for any number of modalities.

    Per-modality MLPEncoders map to a common hidden size; an MLPEncoder on their concatenation
    and a linear layer emit one score per modality; the fused vector is the weighted sum of the
    modality hiddens and a linear layer gives the logits. One change from the original: the
    scores go through a softmax (MERTools uses them raw), so the weights are a distribution
    over modalities that can be read and compared across clips.
    """

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float, n_classes: int):
        super().__init__()
        self.names = list(feature_dims)
        self.encoders = nn.ModuleDict(
            {n: MLPEncoder(d, hidden, dropout) for n, d in feature_dims.items()}
        )
        self.attention_mlp = MLPEncoder(hidden * len(self.names), hidden, dropout)
        self.fc_att = nn.Linear(hidden, len(self.names))
        self.fc_out = nn.Linear(hidden, n_classes)

    def fuse(self, feats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Fused hidden [B, H] and modality weights [B, M] (rows sum to 1)."""
        hiddens = [self.encoders[n](feats[n]) for n in self.names]
        weights = torch.softmax(self.fc_att(self.attention_mlp(torch.cat(hiddens, dim=1))), dim=1)
        fused = torch.bmm(torch.stack(hiddens, dim=2), weights.unsqueeze(2)).squeeze(2)
        return fused, weights

    def modality_weights(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.fuse(feats)[1]

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.fc_out(self.fuse(feats)[0])


HeadFactory = Callable[[Mapping[str, int], int, float, int], nn.Module]
HEADS: dict[str, HeadFactory] = {"probe": ProbeHead, "attention": AttentionHead}


def build_head(cfg: HeadConfig, feature_dims: Mapping[str, int],
               n_classes: int = len(CLASSES)) -> nn.Module:
    """The head named by `cfg.type`, sized for `feature_dims` (name -> D) in `cfg.features` order."""
    if cfg.type not in HEADS:
        raise ConfigError(
            f"head type {cfg.type!r} is unknown; registered heads are {sorted(HEADS)}. "
            f"Fix `type` in params.yaml train.heads."
        )
    missing = [n for n in cfg.features if n not in feature_dims]
    if missing:
        raise ConfigError(
            f"head needs features {missing} but only {sorted(feature_dims)} were given; "
            f"extract them first or remove them from the head's `features`."
        )
    dims = {n: int(feature_dims[n]) for n in cfg.features}
    return HEADS[cfg.type](dims, cfg.hidden, cfg.dropout, n_classes)
