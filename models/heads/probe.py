"""The `probe` head (an MLP or linear layer on the concatenated pooled features), registered.

Every pooled head takes ``dict[str, Tensor[B, D_m]]`` (one entry per listed feature, in
`cfg.features` order) and returns logits ``[B, C]``. A head built with ``members=K`` holds K
independent copies of its weights and maps ``[K, B, D_m]`` inputs to ``[K, B, C]``:
cross-validation trains all folds as one such head, which makes each small matrix product K times
bigger and spends the per-step Python and optimizer overhead once instead of K times. The other
pooled heads live one per module (models/heads/concat.py, attention.py, token_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from models.heads.blocks import Dropout, Linear
from models.training.train_config import PooledConfig
from models.heads.registry import HeadType, register


@dataclass
class ProbeHeadConfig(PooledConfig):
    """`type: probe`: hidden=0 makes it a linear probe."""

    LINEAR_OK: ClassVar[bool] = True


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


register(HeadType(
    "probe", ProbeHeadConfig, "pooled", "models.training.pooled_trainer",
    build=lambda cfg, dims, n_classes, members: ProbeHead(dims, cfg.hidden, cfg.dropout,
                                                          n_classes, members),
    summary="MLP (hidden > 0) or linear probe on the concatenated pooled features"))
