"""The Audio-Guided Transformer (AGT) fusion of paper 001 (Shi & Gao, 3rd in MER2024-SEMI).

Inputs are frame-level states, ``features[0]`` the audio encoder (HuBERT) and the rest the
modalities it guides (CLIP frame CLS states, LLM/text token states): ``x[name]`` is
``[K, B, T_m, D_m]`` with a mask ``[K, B, T_m]`` (see models.blocks for the member axis K).

1. Inputs: each modality's frames get a Linear projection, learnt positions and LayerNorm.
2. Audio-guided transformer: `depth` pre-norm layers shaped like a transformer decoder layer
   with the audio frames as the sequence: self-attention over the audio frames (intra-modal
   context), then one cross-attention per guided modality with the audio frames as queries
   (audio attends to video frames and to text tokens; the attended contexts are added to the
   audio stream), then a feed-forward block. Only the audio stream attends: on CPU each
   attention call costs more than its arithmetic suggests, so the guided modalities get no
   self-attention of their own.
3. Adaptive fusion: the audio stream and each audio-guided context are mean-pooled over the
   audio frames; a softmax gate over those M vectors (computed from their concatenation) weighs
   them into one vector for a linear classifier, the paper's "Adaptive Multimodal Fusion".
The paper's abstract and summaries name these parts; sizes and the gate's form are our choices.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from models.blocks import (Dropout, FeedForward, FrameInput, LayerNorm, Linear,
                           MultiHeadAttention, masked_mean)


class GuidedLayer(nn.Module):
    """Audio [K, B, Ta, H]: self-attention, cross-attention to each guided modality, FFN."""

    def __init__(self, audio: str, guided: list[str], dim: int, heads: int, dropout: float,
                 members: int):
        super().__init__()
        self.audio, self.guided = audio, guided
        self.norm_self = LayerNorm(dim, members)
        self.self_attn = MultiHeadAttention(dim, heads, members)
        self.norm_q = LayerNorm(dim, members)
        self.norm_kv = nn.ModuleDict({m: LayerNorm(dim, members) for m in guided})
        self.cross = nn.ModuleDict({m: MultiHeadAttention(dim, heads, members) for m in guided})
        self.norm_ff = LayerNorm(dim, members)
        self.ffn = FeedForward(dim, dropout, members)
        self.drop = Dropout(dropout)

    def forward(self, audio: Tensor, states: Mapping[str, Tensor], masks: Mapping[str, Tensor]
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """New audio stream and the attended context of each guided modality [K, B, Ta, H]."""
        h = self.norm_self(audio)
        audio = audio + self.drop(self.self_attn(h, h, masks[self.audio]))
        q = self.norm_q(audio)
        ctx = {m: self.cross[m](q, self.norm_kv[m](states[m]), masks[m]) for m in self.guided}
        audio = audio + self.drop(torch.stack(list(ctx.values())).sum(dim=0))
        return audio + self.drop(self.ffn(self.norm_ff(audio))), ctx


class AGTHead(nn.Module):
    """Audio-Guided Transformer: frame inputs of every modality -> logits [K, B, C]."""

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1, attn_heads: int = 4, depth: int = 1,
                 max_frames: int = 8):
        super().__init__()
        self.names = list(feature_dims)
        self.audio, self.guided = self.names[0], self.names[1:]
        self.inputs = nn.ModuleDict({n: FrameInput(d, hidden, max_frames, dropout, members)
                                     for n, d in feature_dims.items()})
        self.guidance = nn.ModuleList([GuidedLayer(self.audio, self.guided, hidden, attn_heads, dropout,
                                                   members) for _ in range(depth)])
        self.norm = LayerNorm(hidden, members)
        self.gate = Linear(hidden * len(self.names), len(self.names), members)
        self.drop = Dropout(dropout)
        self.fc_out = Linear(hidden, n_classes, members)

    def fuse(self, x: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Fused vector [K, B, H] and gate weights [K, B, M] (audio, then each guided one)."""
        states = {n: self.inputs[n](x[n]) for n in self.names}
        audio, ctx = states[self.audio], {}
        for layer in self.guidance:
            audio, ctx = layer(audio, states, mask)
        a_mask = mask[self.audio]
        pooled = torch.stack([self.norm(masked_mean(v, a_mask))
                              for v in [audio, *(ctx[m] for m in self.guided)]], dim=2)
        weights = torch.softmax(self.gate(pooled.flatten(2)), dim=-1)  # [K, B, M]
        return (pooled * weights.unsqueeze(-1)).sum(dim=2), weights

    def forward(self, x: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> Tensor:
        return self.fc_out(self.drop(self.fuse(x, mask)[0]))
