"""MERTools' `attention` fusion head (toolkit/models/attention.py) and its MLPEncoder."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from models.heads.blocks import Dropout, Linear
from models.training.train_config import PooledConfig
from models.heads.registry import HeadType, register


@dataclass
class AttentionConfig(PooledConfig):
    """`type: attention`: the neural head settings and `layer`."""


class MLPEncoder(nn.Module):
    """MERTools' MLPEncoder: dropout on the input, then three Linear+ReLU layers."""

    def __init__(self, in_dim: int, hidden: int, dropout: float, members: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            Dropout(dropout),
            Linear(in_dim, hidden, members), nn.ReLU(),
            Linear(hidden, hidden, members), nn.ReLU(),
            Linear(hidden, hidden, members), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AttentionHead(nn.Module):
    """MERTools' `attention` fusion (toolkit/models/attention.py), for any number of modalities.

    Per-modality MLPEncoders map to a common hidden size; an MLPEncoder on their concatenation
    and a linear layer emit one score per modality; the fused vector is the weighted sum of the
    modality hiddens and a linear layer gives the logits. One change from the original: the
    scores go through a softmax (MERTools uses them raw), so the weights are a distribution
    over modalities that can be read and compared across clips. MERTools' second output layer
    (valence regression) is left out: only the six discrete classes are labelled here.
    """

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1):
        super().__init__()
        self.names = list(feature_dims)
        self.encoders = nn.ModuleDict(
            {n: MLPEncoder(d, hidden, dropout, members) for n, d in feature_dims.items()}
        )
        self.attention_mlp = MLPEncoder(hidden * len(self.names), hidden, dropout, members)
        self.fc_att = Linear(hidden, len(self.names), members)
        self.fc_out = Linear(hidden, n_classes, members)

    def fuse(self, feats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Fused hidden [..., B, H] and modality weights [..., B, M] (they sum to 1)."""
        hiddens = [self.encoders[n](feats[n]) for n in self.names]
        weights = torch.softmax(self.fc_att(self.attention_mlp(torch.cat(hiddens, dim=-1))), -1)
        fused = (torch.stack(hiddens, dim=-2) * weights.unsqueeze(-1)).sum(dim=-2)
        return fused, weights

    def modality_weights(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.fuse(feats)[1]

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.fc_out(self.fuse(feats)[0])


register(HeadType(
    "attention", AttentionConfig, "pooled", "models.training.pooled_trainer",
    build=lambda cfg, dims, n_classes, members: AttentionHead(dims, cfg.hidden, cfg.dropout,
                                                              n_classes, members),
    summary="MERTools' attention fusion: per-modality MLPs, softmax modality weights"))
