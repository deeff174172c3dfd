"""Speech encoders: wav2vec2-style models (HuBERT, wav2vec2, WavLM, data2vec-audio) on 16 kHz audio.

Batching rule: models whose conv front end uses layer norm (`feat_extract_norm == "layer"`, e.g.
hubert-large, wavlm-large, wav2vec2-large-lv60) are batched with zero padding and an attention
mask, which leaves every clip's features unchanged. Group-norm front ends (the *-base models)
normalise over time, padding included, so they are batched only with clips of identical length
(in practice one by one) and get no attention mask, as their checkpoints expect.
Clips longer than `max_seconds` keep their first `max_seconds`; clips shorter than the conv
front end's receptive field (25 ms for the standard layout) are zero-padded up to it.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModel

from features.encoders.base import (
    EncodedClip,
    Encoder,
    chunks,
    dtype_kwargs,
    load_checked,
    register,
    safetensors_kwargs,
)
from features.encoders.pooling import lengths_to_mask
from features.errors import ClipError, ModelLoadError

SAMPLE_RATE = 16_000


@register("speech")
class SpeechEncoder(Encoder):
    def _load(self) -> torch.nn.Module:
        remote = {"trust_remote_code": self.cfg.trust_remote_code}
        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(self.path, **remote)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"speech encoder: no feature extractor in {self.path!r} ({err}); the folder needs "
                f"preprocessor_config.json next to the weights."
            ) from err
        rate = getattr(self.extractor, "sampling_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise ModelLoadError(
                f"speech encoder {self.path!r} expects {rate} Hz audio; the pipeline feeds "
                f"{SAMPLE_RATE} Hz. Use a 16 kHz model."
            )
        model = load_checked(
            AutoModel,
            self.path,
            "speech encoder",
            **dtype_kwargs(self.dtype),
            **safetensors_kwargs(self.path),
            **remote,
        )
        if not hasattr(model, "_get_feat_extract_output_lengths"):
            raise ModelLoadError(
                f"speech encoder {self.path!r} is a {type(model).__name__}; supported are "
                f"wav2vec2-style models (HuBERT, wav2vec2, WavLM, data2vec-audio)."
            )
        self.padded_batches = getattr(model.config, "feat_extract_norm", "group") == "layer"
        self.min_samples = receptive_field(model.config)
        return model

    def _extra_fingerprint(self) -> dict:
        return {
            "max_seconds": self.cfg.max_seconds,
            "feature_extractor": type(self.extractor).__name__,
            "normalize": bool(getattr(self.extractor, "do_normalize", False)),
        }

    def _batches(self, items: list) -> list[list[int]]:
        if self.padded_batches:
            return super()._batches(items)
        order = sorted(range(len(items)), key=lambda i: self._length(items[i]))
        same = [list(g) for _, g in groupby(order, key=lambda i: self._length(items[i]))]
        return [batch for group in same for batch in chunks(group, self.cfg.batch_size)]

    def _length(self, item: np.ndarray) -> int:
        return min(len(item), int(self.cfg.max_seconds * SAMPLE_RATE))

    def encode(self, items: list) -> list[EncodedClip]:
        for index, wave in enumerate(items):
            if np.asarray(wave).size == 0:
                raise ClipError(
                    f"item {index}",
                    "zero_length",
                    "empty waveform given to the speech encoder; the audio stage should drop it.",
                )
        return super().encode(items)

    def _encode_batch(self, items: list) -> list[EncodedClip]:
        waves = [self._prepare(w) for w in items]
        feats = self.extractor(
            waves,
            sampling_rate=SAMPLE_RATE,
            padding=True,
            return_attention_mask=self.padded_batches,
            return_tensors="pt",
        )
        values = feats["input_values"].to(self.device, self.dtype)
        extra = {}
        if self.padded_batches:
            extra["attention_mask"] = feats["attention_mask"].to(self.device)
        out = self.model(values, output_hidden_states=True, **extra)
        # Valid frames per clip after the conv stride; padded frames never enter the pooling.
        lengths = self.model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in waves]))
        mask = lengths_to_mask(lengths.to(self.device), out.hidden_states[0].shape[1])
        return self._collect(out.hidden_states, mask)

    def _prepare(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)[: int(self.cfg.max_seconds * SAMPLE_RATE)]
        if wave.size < self.min_samples:
            wave = np.pad(wave, (0, self.min_samples - wave.size))
        return wave


def receptive_field(config) -> int:
    """Fewest samples the conv front end turns into one frame (400 = 25 ms for wav2vec2/HuBERT)."""
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need
