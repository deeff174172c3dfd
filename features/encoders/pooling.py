"""Pooling of hidden states over valid positions, on the device that computed them.

Every family reduces a `[B, T, D]` tensor along T with a `[B, T]` validity mask, so padding
never leaks into a clip's vector. Positions must be right-padded (valid ones first), which every
encoder here guarantees.
"""

from __future__ import annotations

import torch

from features.encoders.encoder_config import POOLINGS
from features.errors import ConfigError


def check_pooling(name: str) -> str:
    if name not in POOLINGS:
        raise ConfigError(
            f"pooling {name!r} is unknown; use one of {list(POOLINGS)} "
            f"(mean = average of valid positions, cls = first position, last = last valid position)."
        )
    return name


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce `hidden` [B, T, D] over valid positions of `mask` [B, T] -> [B, D] float32.

    Sums accumulate in float32 so half-precision models do not lose the mean over long clips.
    """
    if how == "mean":
        return masked_mean(hidden, mask)
    if how == "cls":
        return hidden[:, 0].float()
    if how == "last":
        return last_valid(hidden, mask)
    raise ConfigError(f"pooling {how!r} is unknown; use one of {list(POOLINGS)}.")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    total = (hidden * weights).sum(dim=1, dtype=torch.float32)
    count = mask.sum(dim=1, dtype=torch.float32).clamp(min=1.0).unsqueeze(-1)
    return total / count


def last_valid(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Right padding: the last valid position is length - 1.
    index = (mask.long().sum(dim=1) - 1).clamp(min=0)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, index].float()


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B] valid lengths -> [B, max_len] bool mask with valid positions first."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def spans_to_mask(spans: list[tuple[int, int]], max_len: int) -> torch.Tensor:
    """[B] kept spans [start, end) -> [B, max_len] bool mask (a chunk of a long clip keeps only
    the middle of its overlaps; a whole clip keeps [0, valid length))."""
    steps = torch.arange(max_len)
    starts = torch.tensor([s for s, _ in spans]).unsqueeze(1)
    ends = torch.tensor([e for _, e in spans]).unsqueeze(1)
    return (steps >= starts) & (steps < ends)


def span_pool(hidden: torch.Tensor, mask: torch.Tensor, picks: torch.Tensor, how: str) -> torch.Tensor:
    """[B, T, D] -> [B, D] float32 over each row's kept span: the fp32 *sum* for mean (divided
    once a clip's chunks are joined), else the position in `picks` [B] (the span's first for cls,
    its last for last)."""
    if how == "mean":
        return (hidden * mask.to(hidden.dtype).unsqueeze(-1)).sum(dim=1, dtype=torch.float32)
    check_pooling(how)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, picks].float()


def span_picks(spans: list[tuple[int, int]], how: str) -> torch.Tensor:
    """[B] positions cls / last pooling take (built on the host, copied without a sync)."""
    return torch.tensor([s if how == "cls" else e - 1 for s, e in spans], dtype=torch.long)
