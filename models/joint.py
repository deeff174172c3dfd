"""The early joint audio-text module of paper 002 (Ge et al., 2nd in MER2024-SEMI and -NOISE).

The paper trains audio and text jointly early, on an LLM, to ease the competition between the
two modalities, and late-fuses that joint audio-text feature with unimodal features. On cached
states this becomes: ``features[0]`` = audio frames (HuBERT), ``features[1]`` = LLM token
states (Baichuan/Qwen/SmolLM), further features (CLIP frames, ...) = unimodal inputs only.

1. Early joint fusion: audio frames and text tokens are projected to one size (Linear,
   learnt positions, LayerNorm), tagged with a learnt modality embedding, concatenated into one
   sequence and run through a small pre-norm transformer of `depth` layers, so that every audio
   frame attends to every token and back; the masked mean of that sequence is the joint feature.
2. Late fusion: each modality's own projected frames, mean-pooled (the unimodal features), are
   concatenated with the joint feature and classified by an MLP (one hidden layer).
Inputs ``x[name]`` are ``[K, B, T_m, D_m]`` with masks ``[K, B, T_m]`` (models.blocks).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from models.blocks import Dropout, EncoderLayer, FrameInput, LayerNorm, Linear, masked_mean


class JointAudioTextHead(nn.Module):
    """Joint audio-text transformer, late-fused with unimodal means -> logits [K, B, C]."""

    def __init__(self, feature_dims: Mapping[str, int], hidden: int, dropout: float,
                 n_classes: int, members: int = 1, attn_heads: int = 4, depth: int = 1,
                 max_frames: int = 8):
        super().__init__()
        self.names = list(feature_dims)
        self.audio, self.text = self.names[0], self.names[1]
        self.inputs = nn.ModuleDict({n: FrameInput(d, hidden, max_frames, dropout, members)
                                     for n, d in feature_dims.items()})
        self.modality = nn.Parameter(torch.randn(members, 2, hidden) * 0.02)
        self.joint = nn.ModuleList([EncoderLayer(hidden, attn_heads, dropout, members)
                                    for _ in range(depth)])
        self.norm = LayerNorm(hidden, members)
        branches = len(self.names) + 1  # the joint feature and one per modality
        self.late = nn.Sequential(Dropout(dropout), Linear(hidden * branches, hidden, members),
                                  nn.ReLU(), Dropout(dropout), Linear(hidden, n_classes, members))

    def joint_feature(self, states: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> Tensor:
        """[K, B, H]: audio frames and text tokens through one transformer, mean over both."""
        seq = torch.cat([states[self.audio] + self.modality[:, None, None, 0],
                         states[self.text] + self.modality[:, None, None, 1]], dim=2)
        seq_mask = torch.cat([mask[self.audio], mask[self.text]], dim=2)
        for layer in self.joint:
            seq = layer(seq, seq_mask)
        return masked_mean(seq, seq_mask)

    def forward(self, x: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> Tensor:
        states = {n: self.inputs[n](x[n]) for n in self.names}
        branches = [self.joint_feature(states, mask)]
        branches += [masked_mean(states[n], mask[n]) for n in self.names]
        return self.late(torch.cat([self.norm(b) for b in branches], dim=-1))
