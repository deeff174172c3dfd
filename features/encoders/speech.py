"""Speech encoders: wav2vec2-style models (HuBERT, wav2vec2, WavLM, data2vec-audio) on 16 kHz audio.

Batching rule: models whose conv front end uses layer norm (`feat_extract_norm == "layer"`, e.g.
hubert-large, wavlm-large, wav2vec2-large-lv60) are batched with zero padding and an attention
mask, which leaves every clip's features unchanged. Group-norm front ends (the *-base models)
normalise over time, padding included, so they are batched only with segments of identical
length (exact-length buckets: in practice mostly one by one, and the equal chunks of long clips)
and get no attention mask, as their checkpoints expect.

Long clips: a clip is cut at `max_seconds` (default 10 minutes), normalised as a whole, then
split into chunks of CHUNK_SECONDS (20 s) overlapping by OVERLAP_SECONDS (2 s). Each chunk keeps
its output frames up to the middle of its overlaps, so the stitched clip has exactly the frames
a single pass gives (chunk starts are multiples of the conv stride: one shared frame grid) and
every kept frame saw at least 1 s of context on each side. Clips up to CHUNK_SECONDS are one
segment: the numbers of a single whole-clip pass.
`chunking: mertools` reproduces MERTools' extract_audio_huggingface.py instead: a clip longer
than 10 s is normalised as a whole, zero-padded to a multiple of 10 s and cut into 10 s pieces
run without context from their neighbours and without an attention mask (inputs are batched
with others of exactly their length only, as for group-norm models); every frame of every piece is kept (the padding's
frames too), so `pooled` is MERTools' average over all frames and `frames` its [T, D] states.
Clips shorter than the conv front end's receptive field (25 ms for the standard layout) are
zero-padded up to it.
"""

from __future__ import annotations

from itertools import groupby

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModel

from features.encoders.base import (
    EncodedClip,
    Encoder,
    HostBatch,
    Segment,
    chunks,
    dtype_kwargs,
    load_checked,
    register,
    safetensors_kwargs,
)
from features.encoders.encoder_config import MERTOOLS_PIECE_SECONDS
from features.errors import ClipError, ModelLoadError

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 20.0  # longer clips are encoded in chunks (attention memory grows with T^2)
OVERLAP_SECONDS = 2.0  # context shared by neighbouring chunks; each keeps half of it


@register("speech")
class SpeechEncoder(Encoder):
    unit = "audio_s"

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
        # MERTools' mode runs every input unpadded and unmasked, as MERTools does.
        self.padded_batches = getattr(model.config, "feat_extract_norm", "group") == "layer" \
            and self.cfg.chunking != "mertools"
        self.min_samples = receptive_field(model.config)
        self.stride = int(np.prod(model.config.conv_stride))
        return model

    def _extra_fingerprint(self) -> dict:
        return {
            "max_seconds": self.cfg.max_seconds,
            "chunk_seconds": CHUNK_SECONDS,
            "overlap_seconds": OVERLAP_SECONDS,
            "chunking": self.cfg.chunking,
            "mertools_piece_seconds": MERTOOLS_PIECE_SECONDS if self.cfg.chunking == "mertools" else None,
            "feature_extractor": type(self.extractor).__name__,
            "normalize": bool(getattr(self.extractor, "do_normalize", False)),
        }

    def segment_batches(self, lengths: list[int], size: int) -> list[list[int]]:
        if self.padded_batches:
            return super().segment_batches(lengths, size)
        # Group norm sees padding: exact-length buckets only.
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        same = [list(g) for _, g in groupby(order, key=lambda i: lengths[i])]
        return [batch for group in same for batch in chunks(group, size)]

    def _length(self, item: np.ndarray) -> int:
        return max(min(len(item), int(self.cfg.max_seconds * SAMPLE_RATE)), self.min_samples)

    def encode(self, items: list) -> list[EncodedClip]:
        for index, wave in enumerate(items):
            if np.asarray(wave).size == 0:
                raise ClipError(
                    f"item {index}",
                    "zero_length",
                    "empty waveform given to the speech encoder; the audio stage should drop it.",
                )
        return super().encode(items)

    def prepare(self, wave: np.ndarray) -> list[Segment]:
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)[: int(self.cfg.max_seconds * SAMPLE_RATE)]
        if wave.size == 0:
            raise ClipError("?", "zero_length", "empty waveform; the audio stage should drop it.")
        if wave.size < self.min_samples:
            wave = np.pad(wave, (0, self.min_samples - wave.size))
        # Normalise the whole clip once (per-clip mean and variance, as a single pass does).
        wave = self.extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_values"][0]
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if self.cfg.chunking == "mertools":
            return self.mertools_pieces(wave)
        return [
            Segment(wave[a:b], b - a, (b - a) / SAMPLE_RATE, keep) for a, b, keep in self.chunk_plan(wave.size)
        ]

    def mertools_pieces(self, wave: np.ndarray) -> list[Segment]:
        """MERTools' split_into_batch: 10 s pieces, the last zero-padded; all their frames kept."""
        piece = int(MERTOOLS_PIECE_SECONDS * SAMPLE_RATE)
        if wave.size <= piece:
            return [Segment(wave, wave.size, wave.size / SAMPLE_RATE, (0, self._frames(wave.size)))]
        padded = np.zeros(-(-wave.size // piece) * piece, dtype=np.float32)
        padded[: wave.size] = wave
        frames, seconds = self._frames(piece), wave.size / SAMPLE_RATE
        count = padded.size // piece
        return [Segment(padded[i * piece : (i + 1) * piece], piece, seconds / count, (0, frames))
                for i in range(count)]

    def chunk_plan(self, n: int) -> list[tuple[int, int, tuple[int, int]]]:
        """(first sample, end sample, kept output frames [start, end) local to the chunk)."""
        frames = self._frames(n)
        size = int(CHUNK_SECONDS * SAMPLE_RATE) // self.stride * self.stride
        overlap = int(OVERLAP_SECONDS * SAMPLE_RATE) // self.stride * self.stride
        if n <= size:
            return [(0, n, (0, frames))]
        starts = [0]
        while starts[-1] + size < n:
            starts.append(starts[-1] + size - overlap)
        # Chunk i hands over to chunk i+1 in the middle of their overlap (global frame index).
        bounds = [0, *[(a + overlap // 2) // self.stride for a in starts[1:]], frames]
        return [
            (a, min(a + size, n), (bounds[i] - a // self.stride, bounds[i + 1] - a // self.stride))
            for i, a in enumerate(starts)
        ]

    def _frames(self, samples: int) -> int:
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(samples)))

    def collate(self, segments: list[Segment]) -> dict:
        width = max(s.length for s in segments)
        values = torch.zeros(len(segments), width)
        mask = torch.zeros(len(segments), width, dtype=torch.long)
        for row, seg in enumerate(segments):  # zero padding after the normalised samples
            values[row, : seg.length] = torch.from_numpy(seg.data)
            mask[row, : seg.length] = 1
        batch = {"input_values": self.pin(values), "spans": [s.keep for s in segments]}
        if self.padded_batches:
            batch["attention_mask"] = self.pin(mask)
        return batch

    def forward(self, batch: dict) -> HostBatch:
        extra = {}
        if "attention_mask" in batch:
            extra["attention_mask"] = self.to_device(batch["attention_mask"])
        values = self.to_device(batch["input_values"], self.dtype)
        with self.autocast():
            out = self.model(values, output_hidden_states=True, **extra)
        # Kept frames per segment were computed on the host from sample counts (no device
        # sync); padded frames never enter the pooling.
        return self._collect(out.hidden_states, batch["spans"])


def receptive_field(config) -> int:
    """Fewest samples the conv front end turns into one frame (400 = 25 ms for wav2vec2/HuBERT)."""
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need
