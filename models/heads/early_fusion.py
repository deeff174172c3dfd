"""`early_fusion`: a frame-level early-fusion baseline (audio frames + text tokens in one transformer).

Not paper 002's joint audio-text LLM module (that module is an adapt stage that trains a
projector and LoRA on the LLM itself and writes a feature store): this head is a small
transformer trained from scratch on cached, frozen frame states, with a fixed random input
projection (`input_dim`, see models.training.frame_trainer). ``features[0]`` = audio frames (HuBERT),
``features[1]`` = text/LLM token states, further features (CLIP frames, ...) = unimodal inputs.

1. Early fusion: audio frames and text tokens are projected to one size (Linear, learnt
   positions, LayerNorm), tagged with a learnt modality embedding, concatenated into one
   sequence and run through a small pre-norm transformer of `depth` layers, so that every audio
   frame attends to every token and back; the masked mean of that sequence is the joint feature.
2. Late fusion: each modality's own projected frames, mean-pooled (the unimodal features), are
   concatenated with the joint feature and classified by an MLP (one hidden layer).
Inputs ``x[name]`` are ``[K, B, T_m, D_m]`` with masks ``[K, B, T_m]`` (models.heads.blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from features.errors import ConfigError
from models.heads.blocks import Dropout, EncoderLayer, FrameInput, LayerNorm, Linear, masked_mean
from models.training.train_config import FrameConfig
from models.heads.registry import HeadType, register


@dataclass
class EarlyFusionConfig(FrameConfig):
    """`type: early_fusion`: frame settings + the fixed random input projection."""

    input_dim: int = 128  # fixed seeded random projection of standardised frames to this size
    #                       before the learnt layers (0 = none); cuts the cost of wide encoders

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input_dim < 0:
            raise ConfigError(f"input_dim={self.input_dim} must be >= 0 (0 keeps the "
                              f"encoder's size).")
        if len(self.features) < 2:
            raise ConfigError(f"an 'early_fusion' head needs at least two features: first the "
                              f"audio encoder, then the LLM/text encoder, e.g. [hubert, smollm]; "
                              f"got {self.features}.")


class EarlyFusionHead(nn.Module):
    """Audio-text early-fusion transformer, late-fused with unimodal means -> logits [K, B, C]."""

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


register(HeadType(
    "early_fusion", EarlyFusionConfig, "frames", "models.training.frame_trainer",
    build=lambda cfg, dims, n_classes, members: EarlyFusionHead(
        dims, cfg.hidden, cfg.dropout, n_classes, members, attn_heads=cfg.attn_heads,
        depth=cfg.depth, max_frames=cfg.max_frames),
    summary="frame-level early-fusion baseline: audio frames and text tokens in one small "
            "transformer, late-fused with unimodal means"))
