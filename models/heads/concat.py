"""The concatenation MLP baseline: the head every fusion head must beat."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from models.heads.blocks import Dropout, Linear
from models.training.train_config import PooledConfig
from models.heads.registry import HeadType, register


@dataclass
class ConcatConfig(PooledConfig):
    """`type: concat`: the neural head settings and `layer`."""


class ConcatHead(nn.Module):
    """The plain multimodal baseline: an MLP with two hidden layers on the concatenated features.

    Unlike `probe` (one hidden layer, or linear; meant for one modality and layer probing), this
    is the reference every fusion head must beat: same inputs, no modality structure.
    """

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1):
        super().__init__()
        self.names = list(feature_dims)
        self.net = nn.Sequential(
            Dropout(dropout), Linear(sum(feature_dims.values()), hidden, members), nn.ReLU(),
            Dropout(dropout), Linear(hidden, hidden, members), nn.ReLU(),
            Dropout(dropout), Linear(hidden, n_classes, members),
        )

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.net(torch.cat([feats[n] for n in self.names], dim=-1))


register(HeadType(
    "concat", ConcatConfig, "pooled", "models.training.pooled_trainer",
    build=lambda cfg, dims, n_classes, members: ConcatHead(dims, cfg.hidden, cfg.dropout,
                                                           n_classes, members),
    summary="concatenation MLP baseline (two hidden layers)"))
