"""Encoders that read a family's input but are not that family's model class, picked by the model.

`speech` with a Whisper model (a CTranslate2 folder such as faster-whisper's, or a transformers
Whisper folder) -> `whisper.WhisperEncoder`; `vision` with a torch state-dict file (`.pth`/`.pt`,
the FER2013 CNN) -> `face_cnn.FaceCNNEncoder`. Everything else keeps its family's class.
"""
from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from features.params import resolve_model_path

if TYPE_CHECKING:
    from features.encoders import EncoderConfig


def specialised(cfg: EncoderConfig) -> type | None:
    path = resolve_model_path(cfg.model)
    if cfg.family == "speech":
        from features.encoders.whisper import WhisperEncoder, is_whisper

        return WhisperEncoder if is_whisper(path) else None
    if cfg.family == "vision" and Path(path).suffix in (".pth", ".pt"):
        from features.encoders.face_cnn import FaceCNNEncoder

        return FaceCNNEncoder
    return None
