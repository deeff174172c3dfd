"""The Audio-Guided Transformer (AGT) fusion of paper 001 (Shi & Gao, 3rd in MER2024-SEMI).

The paper fuses "inter-channel and intra-channel information" with HuBERT-large's audio stream
guiding attention over the video (CLIP) and text (Baichuan) channels, then fuses the channels
adaptively. Its abstract names these parts, not their sizes; the sizes and the gate's form are
our choices. Inputs are frame-level states, ``features[0]`` the audio encoder and the rest the
channels it guides: ``x[name]`` is ``[K, B, T_m, D_m]`` with a mask ``[K, B, T_m]`` (the member
axis K of models.heads.blocks). `max_frames` sets the segments per channel, `depth` the blocks.

1. Learnt input projections: each channel's frames get a Linear projection to `hidden` from the
   encoder's full width (no fixed random projection), learnt positions and LayerNorm.
2. `depth` AGT blocks, each:
   - intra-channel: a pre-norm transformer layer (self-attention + FFN) in EVERY channel, so
     video frames and text tokens build their own context, not only the audio;
   - inter-channel, audio-guided: for each other channel m, the audio frames are the queries of
     a cross-attention over m's frames (keys/values), added to the audio stream and followed by
     an FFN: the audio-guided representation of m, [K, B, T_audio, H].
   Channel streams carry on into the next block; the audio-guided ones of the last block fuse.
3. Adaptive fusion: the audio stream and each audio-guided representation are mean-pooled over
   the audio frames; a softmax gate computed from their concatenation weighs them into one
   vector for a linear classifier.

The paper fine-tuned CLIP-ViT-L and Baichuan-13B on the labels before fusing; feed the AGT the
adapted feature stores (the `adapt@<name>` stages) to reproduce that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from features.errors import ConfigError
from models.heads.blocks import (Dropout, EncoderLayer, FeedForward, FrameInput, LayerNorm, Linear,
                           MultiHeadAttention, masked_mean)
from models.training.train_config import FrameConfig
from models.heads.registry import HeadType, register


@dataclass
class AGTConfig(FrameConfig):
    """`type: agt`: frame settings; features[0] is the audio encoder that guides the others."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.features) < 2:
            raise ConfigError(f"an 'agt' head needs at least two features: first the audio "
                              f"encoder (its frames are the queries), then the channels it "
                              f"guides, e.g. [hubert, clip, minilm]; got {self.features}.")


class GuidedAttention(nn.Module):
    """Audio [K, B, Ta, H] attends to one channel's frames: the audio-guided representation."""

    def __init__(self, dim: int, heads: int, dropout: float, members: int):
        super().__init__()
        self.norm_q, self.norm_kv = LayerNorm(dim, members), LayerNorm(dim, members)
        self.attn = MultiHeadAttention(dim, heads, members)
        self.norm_ff = LayerNorm(dim, members)
        self.ffn = FeedForward(dim, dropout, members)
        self.drop = Dropout(dropout)

    def forward(self, audio: Tensor, channel: Tensor, mask: Tensor) -> Tensor:
        h = audio + self.drop(self.attn(self.norm_q(audio), self.norm_kv(channel), mask))
        return h + self.drop(self.ffn(self.norm_ff(h)))


class AGTBlock(nn.Module):
    """Intra-channel self-attention in every channel, then audio-guided cross-attention."""

    def __init__(self, names: list[str], dim: int, heads: int, dropout: float, members: int):
        super().__init__()
        self.audio, self.guided = names[0], names[1:]
        self.intra = nn.ModuleDict({n: EncoderLayer(dim, heads, dropout, members) for n in names})
        self.inter = nn.ModuleDict({n: GuidedAttention(dim, heads, dropout, members)
                                    for n in self.guided})

    def forward(self, states: Mapping[str, Tensor], masks: Mapping[str, Tensor]
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """New channel streams, and each guided channel's audio-guided representation."""
        states = {n: self.intra[n](x, masks[n]) for n, x in states.items()}
        audio = states[self.audio]
        guided = {m: self.inter[m](audio, states[m], masks[m]) for m in self.guided}
        return states, guided


class AGTHead(nn.Module):
    """Audio-Guided Transformer: frame inputs of every channel -> logits [K, B, C]."""

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1, attn_heads: int = 4, depth: int = 1,
                 max_frames: int = 8):
        super().__init__()
        self.names = list(feature_dims)
        self.audio, self.guided = self.names[0], self.names[1:]
        self.inputs = nn.ModuleDict({n: FrameInput(d, hidden, max_frames, dropout, members)
                                     for n, d in feature_dims.items()})
        self.blocks = nn.ModuleList([AGTBlock(self.names, hidden, attn_heads, dropout, members)
                                     for _ in range(depth)])
        self.norm = LayerNorm(hidden, members)
        self.gate = Linear(hidden * len(self.names), len(self.names), members)
        self.drop = Dropout(dropout)
        self.fc_out = Linear(hidden, n_classes, members)

    def fuse(self, x: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Fused vector [K, B, H] and gate weights [K, B, M] (audio, then each guided one)."""
        states = {n: self.inputs[n](x[n]) for n in self.names}
        guided: dict[str, Tensor] = {}
        for block in self.blocks:
            states, guided = block(states, mask)
        a_mask = mask[self.audio]
        channels = [states[self.audio], *(guided[m] for m in self.guided)]
        pooled = torch.stack([self.norm(masked_mean(v, a_mask)) for v in channels], dim=2)
        weights = torch.softmax(self.gate(pooled.flatten(2)), dim=-1)  # [K, B, M]
        return (pooled * weights.unsqueeze(-1)).sum(dim=2), weights

    def forward(self, x: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> Tensor:
        return self.fc_out(self.drop(self.fuse(x, mask)[0]))


register(HeadType(
    "agt", AGTConfig, "frames", "models.training.frame_trainer",
    build=lambda cfg, dims, n_classes, members: AGTHead(
        dims, cfg.hidden, cfg.dropout, n_classes, members, attn_heads=cfg.attn_heads,
        depth=cfg.depth, max_frames=cfg.max_frames),
    summary="Audio-Guided Transformer (paper 001): intra-channel self-attention, audio-guided "
            "cross-attention, adaptive fusion"))
