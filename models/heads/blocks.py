"""Layers whose weights come in `members` independent copies, one per cross-validation fold.

Cross-validation trains all folds side by side as one model with a member per fold: every
parameter leads with the member axis K, so a fold's model is the slice ``[f:f + 1]`` of every
state tensor (see models.training.pooled_trainer._unstack). Activations lead with K too: ``[K, B, D]`` for pooled
vectors, ``[K, B, T, D]`` for frame sequences, with boolean masks ``[K, B, T]`` (True = a valid
frame). `Linear` also accepts an input without the member axis (``[B, D]``), which every member
then sees; the other layers expect the axis.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def linear_nd(layer: Linear, x: Tensor) -> Tensor:
    """`layer` on [K, ..., in] (any number of middle axes) -> [K, ..., out]."""
    out = layer(x.reshape(x.shape[0], -1, x.shape[-1]))
    return out.view(out.shape[0], *x.shape[1:-1], out.shape[-1])


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


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a gain and bias per member: input [K, ..., D]."""

    def __init__(self, dim: int, members: int = 1):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, dim))
        self.bias = nn.Parameter(torch.zeros(members, dim))

    def forward(self, x: Tensor) -> Tensor:
        shape = (self.weight.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return torch.addcmul(self.bias.view(shape), F.layer_norm(x, x.shape[-1:]),
                             self.weight.view(shape))


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention of queries [K, B, Tq, H] over keys [K, B, Tk, H].

    `key_mask` [K, B, Tk] marks valid keys; masked keys get exactly zero weight, so padding a
    sequence with more masked positions leaves the output unchanged. Every row of `key_mask`
    must have at least one valid key (the loaders give an empty sequence one zero frame).
    """

    def __init__(self, dim: int, heads: int, members: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.q = Linear(dim, dim, members)
        self.kv = Linear(dim, 2 * dim, members)
        self.out = Linear(dim, dim, members)

    def forward(self, x: Tensor, context: Tensor, key_mask: Tensor) -> Tensor:
        k_, b, tq, dim = x.shape
        tk, nh = context.shape[2], self.heads
        q = linear_nd(self.q, x).view(k_ * b, tq, nh, -1).transpose(1, 2)  # [KB, nh, Tq, dh]
        kv = linear_nd(self.kv, context).view(k_ * b, tk, 2, nh, -1).permute(2, 0, 3, 1, 4)
        # one fused kernel (about 2x the speed of matmul + masked softmax + matmul on CPU)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1],
                                             attn_mask=key_mask.reshape(k_ * b, 1, 1, tk))
        return linear_nd(self.out, out.transpose(1, 2).reshape(k_, b, tq, dim))


class FeedForward(nn.Module):
    """Position-wise Linear(H, 2H), GELU, dropout, Linear(2H, H)."""

    def __init__(self, dim: int, dropout: float, members: int = 1):
        super().__init__()
        self.up = Linear(dim, 2 * dim, members)
        self.drop = Dropout(dropout)
        self.down = Linear(2 * dim, dim, members)

    def forward(self, x: Tensor) -> Tensor:
        return linear_nd(self.down, self.drop(F.gelu(linear_nd(self.up, x))))


class EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer on [K, B, T, H] with a key mask [K, B, T]."""

    def __init__(self, dim: int, heads: int, dropout: float, members: int = 1):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dim, members), LayerNorm(dim, members)
        self.attn = MultiHeadAttention(dim, heads, members)
        self.ffn = FeedForward(dim, dropout, members)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, mask))
        return x + self.drop(self.ffn(self.norm2(x)))


class FrameInput(nn.Module):
    """One modality's frames [K, B, T, D] -> [K, B, T, H]: Linear, learnt positions, LayerNorm.

    Positions are those of the (segment-pooled) frames, at most `max_frames`.
    """

    def __init__(self, in_dim: int, dim: int, max_frames: int, dropout: float, members: int = 1):
        super().__init__()
        self.proj = Linear(in_dim, dim, members)
        self.position = nn.Parameter(torch.randn(members, max_frames, dim) * 0.02)
        self.norm = LayerNorm(dim, members)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = linear_nd(self.proj, x) + self.position[:, None, : x.shape[2]]
        return self.drop(self.norm(h))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x [K, B, T, H] over valid positions of mask [K, B, T] -> [K, B, H]."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=2) / m.sum(dim=2).clamp(min=1.0)
