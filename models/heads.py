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

from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from features.errors import ConfigError
from models.blocks import Dropout, EncoderLayer, LayerNorm, Linear, linear_nd
from models.config import CLASSES, HeadConfig

__all__ = ["HEADS", "AttentionHead", "ConcatHead", "Dropout", "Linear", "MLPEncoder", "ProbeHead",
           "TokenAttentionHead", "build_head"]


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


class TokenAttentionHead(nn.Module):
    """Attention fusion after paper 000 (Zhao et al., MER2024): modalities as attending tokens.

    The paper fuses adapted acoustic, aligned visual and lexical utterance vectors "with an
    attention mechanism"; its abstract gives no more detail, so this is our reading: each
    modality is projected to one token (Linear, LayerNorm, a learnt modality embedding), a
    pre-norm transformer layer lets the tokens attend to each other (multi-head self-attention
    and a feed-forward block), and attention pooling (a learnt score per token, softmax over
    modalities) gives the fused vector for a linear classifier. Compared with MERTools'
    `attention`, modalities exchange information before they are weighted.
    """

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1, attn_heads: int = 4):
        super().__init__()
        self.names = list(feature_dims)
        self.drop_in = Dropout(dropout)
        self.proj = nn.ModuleDict({n: Linear(d, hidden, members) for n, d in feature_dims.items()})
        self.norm_in = LayerNorm(hidden, members)
        self.modality = nn.Parameter(torch.randn(members, len(self.names), hidden) * 0.02)
        self.layer = EncoderLayer(hidden, attn_heads, dropout, members)
        self.norm_out = LayerNorm(hidden, members)
        self.score = Linear(hidden, 1, members)
        self.drop_out = Dropout(dropout)
        self.fc_out = Linear(hidden, n_classes, members)

    @staticmethod
    def config_kwargs(cfg: HeadConfig) -> dict[str, Any]:
        return {"attn_heads": cfg.attn_heads}

    def fuse(self, feats: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Fused hidden [K, B, H] and modality weights [K, B, M] (inputs [B, D] get K = 1)."""
        xs = [feats[n] if feats[n].dim() == 3 else feats[n].unsqueeze(0) for n in self.names]
        tokens = torch.stack([self.proj[n](self.drop_in(x)) for n, x in zip(self.names, xs)], 2)
        tokens = self.norm_in(tokens) + self.modality.unsqueeze(1)  # [K, B, M, H]
        mask = torch.ones(tokens.shape[:3], dtype=torch.bool, device=tokens.device)
        tokens = self.norm_out(self.layer(tokens, mask))
        weights = torch.softmax(linear_nd(self.score, tokens).squeeze(-1), dim=-1)  # [K, B, M]
        return (tokens * weights.unsqueeze(-1)).sum(dim=2), weights

    def modality_weights(self, feats: Mapping[str, Tensor]) -> Tensor:
        weights = self.fuse(feats)[1]
        return weights[0] if self._unstacked(feats) else weights

    def forward(self, feats: Mapping[str, Tensor]) -> Tensor:
        logits = self.fc_out(self.drop_out(self.fuse(feats)[0]))
        return logits[0] if self._unstacked(feats) else logits

    def _unstacked(self, feats: Mapping[str, Tensor]) -> bool:
        """[B, D] inputs to a one-member head give [B, C], as with Linear."""
        return self.fc_out.weight.shape[0] == 1 and feats[self.names[0]].dim() == 2


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
