"""Classification heads on pooled features, registered by `type` name.

Every head takes ``dict[str, Tensor[B, D_m]]`` (one entry per listed feature, in `cfg.features`
order) and returns logits ``[B, C]``. A head built with ``members=K`` holds K independent copies
of its weights and maps ``[K, B, D_m]`` inputs to ``[K, B, C]``: cross-validation trains all
folds as one such head, which makes each small matrix product K times bigger and spends the
per-step Python and optimizer overhead once instead of K times.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from features.errors import ConfigError
from models.config import CLASSES, HeadConfig


class Linear(nn.Module):
    """nn.Linear for `members` independent copies: weight [K, in, out], bias [K, 1, out].

    Initialised like nn.Linear (uniform in +-1/sqrt(in)). Input [K, B, in], or [B, in]: with
    K == 1 the output is [B, out], otherwise every member sees it and the output is [K, B, out].
    """

    def __init__(self, in_dim: int, out_dim: int, members: int = 1):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        members = self.weight.shape[0]
        if x.dim() == 2 and members == 1:
            return torch.addmm(self.bias[0], x, self.weight[0])
        return torch.baddbmm(self.bias, x.expand(members, -1, -1), self.weight)


class Dropout(nn.Dropout):
    """nn.Dropout made cheap on CPU, where it cost more than a training step's matrix products.

    torch's Bernoulli sampling spends one Mersenne-Twister draw per element, and bool masks
    convert to float slowly. Here each 64-bit draw gives eight random bytes, and the 0/1 mask is
    built with float arithmetic alone: about 3x faster. The price: p is rounded to a multiple of
    1/256 (0.3 acts as 77/256 = 0.3008).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        dropped = min(round(self.p * 256), 255)
        words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64, device=x.device)
        words.random_(-2**63, None)  # all 64 bits random
        byte = words.view(torch.int8)[: x.numel()].view(x.shape).to(x.dtype)  # uniform -128..127
        # byte >= dropped - 128 keeps the unit: (byte - dropped + 129) clamped to [0, 1] is 0 or 1
        keep = byte.sub_(dropped - 129).clamp_(0, 1).mul_(256 / (256 - dropped))
        return x * keep


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


HeadFactory = Callable[..., nn.Module]
HEADS: dict[str, HeadFactory] = {"probe": ProbeHead, "attention": AttentionHead}


def build_head(cfg: HeadConfig, feature_dims: Mapping[str, int],
               n_classes: int = len(CLASSES), members: int = 1) -> nn.Module:
    """The head named by `cfg.type` for `feature_dims` (name -> D), in `cfg.features` order."""
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
    return HEADS[cfg.type](dims, cfg.hidden, cfg.dropout, n_classes, members)
