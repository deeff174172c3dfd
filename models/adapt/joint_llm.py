"""Paper 002's joint audio-text module: cached speech frames -> a learnt projector -> the LLM's
token-state space, placed before the transcript's tokens in one sequence (the audio-LLM design of
Qwen-Audio), run through the LLM's blocks with LoRA; projector, LoRA and a classifier train
jointly on the labels; the pooled hidden state is written out-of-fold as a feature store that the
existing heads late-fuse with the unimodal features.

Nothing here reruns a frozen part: speech frames come from a speech store (`speech_layer`), the
transcript's token states from the LLM's store at hidden state `first - 1` (0 = the input
embeddings: the whole LLM runs, the paper's design; a higher prefix enters the audio deeper into
the LLM and runs only the top blocks, the demo's CPU setting). Audio frames are mean-pooled into
at most `audio_tokens` segments first (Qwen-Audio pools its encoder output too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from models.adapt.lora import Adapter, AdaptConfig, LayerStack, pad, run_blocks


@dataclass
class JointConfig:
    """params.yaml `joint.<name>`: one joint audio-text feature store."""

    speech: str  # embed.encoders entry of the speech encoder
    llm: str  # embed.encoders entry of the causal LM (text family)
    speech_layer: int = -1  # speech hidden state whose frames feed the projector (in its layers_frames)
    layers: list[int] = field(default_factory=lambda: [1, -1])  # LLM hidden states run with LoRA
    audio_tokens: int = 8  # audio positions in the sequence (frames mean-pooled into segments)
    projector_hidden: int = 256  # the projector's MLP width
    rank: int = 4
    alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # [] = q/k/v/o projections
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    pooling: str = "mean"  # over the whole joint sequence
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype on a GPU
    gradient_checkpointing: bool = False

    def adapt_config(self) -> AdaptConfig:
        """The shared LoRA/training settings in the form the fold trainer takes."""
        keys = ("rank", "alpha", "lora_dropout", "target_modules", "epochs", "lr", "weight_decay",
                "batch_size", "pooling", "seed", "device", "dtype", "gradient_checkpointing")
        return AdaptConfig(encoder=self.llm, layers=list(self.layers), **{k: getattr(self, k) for k in keys})


def segments(frames: np.ndarray, count: int) -> np.ndarray:
    """[T, D] -> [min(T, count), D]: the means of `count` near-equal consecutive runs."""
    parts = np.array_split(np.asarray(frames, np.float32), min(len(frames), count))
    return np.stack([p.mean(0) for p in parts])


class JointAudioText(Adapter):
    """LoRA on LLM blocks first..last + an audio projector + a classifier on the pooled sequence."""

    def __init__(self, stack: LayerStack, first: int, last: int, cfg: JointConfig, speech_dim: int,
                 n_classes: int):
        super().__init__(stack, first, last, cfg.adapt_config(), n_classes)
        width = self.classifier.in_features
        self.audio_tokens = cfg.audio_tokens
        self.projector = nn.Sequential(nn.Linear(speech_dim, cfg.projector_hidden), nn.GELU(),
                                       nn.Linear(cfg.projector_hidden, width))

    def collate(self, items: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device,
                rng: Any = None, max_frames: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(speech frames [Ta, Ds], token states [Tt, H]) pairs -> padded audio segments and tokens."""
        audio = [segments(a, self.audio_tokens) for a, _ in items]
        text = [np.asarray(t, np.float32) for _, t in items]
        return (*pad(audio, device), *pad(text, device))

    def states(self, audio: Tensor, audio_mask: Tensor, text: Tensor, text_mask: Tensor,
               checkpoint: bool = False) -> tuple[list[Tensor], Tensor]:
        """The LLM states over [projected audio ; transcript tokens], right-padded per row."""
        projected = self.projector(audio).to(text.dtype)
        rows = [torch.cat([projected[b, audio_mask[b]], text[b, text_mask[b]]]) for b in range(len(text))]
        h = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(r) for r in rows], device=h.device)
        mask = torch.arange(h.shape[1], device=h.device)[None] < lengths[:, None]
        return run_blocks(self.stack, self.blocks, self.final_norm, h, mask, checkpoint), mask

