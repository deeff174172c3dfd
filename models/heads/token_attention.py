"""Paper 000's attention fusion (Zhao et al., MER2024) as we read it: modalities as tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from models.heads.blocks import Dropout, EncoderLayer, LayerNorm, Linear, linear_nd
from models.training.train_config import PooledConfig, check_heads, check_positive
from models.heads.registry import HeadType, register


@dataclass
class TokenAttentionConfig(PooledConfig):
    """`type: token_attention`: + the number of attention heads."""

    attn_heads: int = 4  # hidden must be a multiple of it

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(attn_heads=self.attn_heads)
        check_heads(self.hidden, self.attn_heads, self.type)


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


register(HeadType(
    "token_attention", TokenAttentionConfig, "pooled", "models.training.pooled_trainer",
    build=lambda cfg, dims, n_classes, members: TokenAttentionHead(
        dims, cfg.hidden, cfg.dropout, n_classes, members, attn_heads=cfg.attn_heads),
    summary="paper 000's attention fusion as we read it: modalities as attending tokens"))
