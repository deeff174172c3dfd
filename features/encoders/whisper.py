"""Whisper's encoder as a speech-family encoder, from a transformers folder or a CTranslate2 model.

The demo's Whisper tiny.en ships as a CTranslate2 model (`model.bin`, faster-whisper's format).
`convert_ct2` reads that file directly (no ctranslate2 import: its layout is a flat list of named
arrays) and writes a transformers `WhisperEncoder` folder once, under the cache folder keyed by the
source weights' digest; later loads reuse it. tests/features/encoders/test_whisper.py checks the converted encoder
against CTranslate2's own `encode` on a clip.

Whisper always encodes 30 s windows of log-mel (1,500 output frames, 20 ms each); a clip's
states are its first ceil(samples / 320) frames of each window (the rest is the window's padding),
so frame rate and pooling match the wav2vec2-style encoders. Longer clips are cut into 30 s
windows and their valid frames joined.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from features.cache import hashcache, versions
from features.encoders.base import (
    Encoder,
    HostBatch,
    Segment,
    dtype_kwargs,
    load_checked,
    safetensors_kwargs,
    weights_hash,
)
from features.errors import ClipError, ModelLoadError

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's fixed input window
SAMPLES_PER_FRAME = 320  # mel hop 160 x conv2 stride 2
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def is_whisper(path: str) -> bool:
    """A CTranslate2 Whisper folder, or a transformers folder whose config says whisper."""
    folder = Path(path)
    if (folder / "model.bin").is_file() and ct2_spec(folder / "model.bin") == "WhisperSpec":
        return True
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "whisper"
    except (OSError, ValueError):
        return False


def ct2_spec(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4 + 2 + 256)
    if len(head) < 6 or struct.unpack_from("<I", head)[0] < 2:
        return ""
    (length,) = struct.unpack_from("<H", head, 4)
    return head[6 : 6 + length].rstrip(b"\0").decode(errors="replace")


def read_ct2(path: Path, prefix: str = "encoder/") -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin (binary version >= 4) whose names start with `prefix`."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    def text() -> str:
        nonlocal offset
        (length,) = take("<H")
        value = data[offset : offset + length].rstrip(b"\0").decode()
        offset += length
        return value

    (version,) = take("<I")
    if version < 4:
        raise ModelLoadError(f"{path}: CTranslate2 binary version {version} is too old (need >= 4).")
    text(), take("<I")  # spec name, spec revision
    out = {}
    for _ in range(take("<I")[0]):
        name = text()
        (rank,) = take("<B")
        dims = take(f"<{rank}I")
        dtype_id, nbytes = take("<BI")
        if name.startswith(prefix):
            if dtype_id not in CT2_DTYPES:
                raise ModelLoadError(f"{path}: {name} has CTranslate2 dtype {dtype_id}; not supported.")
            out[name[len(prefix):]] = np.frombuffer(data, CT2_DTYPES[dtype_id], nbytes // np.dtype(
                CT2_DTYPES[dtype_id]).itemsize, offset).reshape(dims).copy()
        offset += nbytes
    return out


def ct2_to_state_dict(ct2: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], int]:
    """CTranslate2 encoder variables -> transformers WhisperEncoder state dict, and the layer count.

    CTranslate2 fuses q/k/v into one projection (k has no bias in Whisper) and scales int8
    weights; only float weights are accepted here (faster-whisper's float16 export).
    """
    if any(k.endswith("weight_scale") for k in ct2):
        raise ModelLoadError("CTranslate2 model is int8-quantised; convert from a float16/float32 export.")
    t = lambda name: torch.from_numpy(ct2[name].astype(np.float32))  # noqa: E731
    sd = {
        "conv1.weight": t("conv1/weight"), "conv1.bias": t("conv1/bias"),
        "conv2.weight": t("conv2/weight"), "conv2.bias": t("conv2/bias"),
        "embed_positions.weight": t("position_encodings/encodings"),
        "layer_norm.weight": t("layer_norm/gamma"), "layer_norm.bias": t("layer_norm/beta"),
    }
    layers = 0
    while f"layer_{layers}/ffn/linear_0/weight" in ct2:
        src, dst = f"layer_{layers}/", f"layers.{layers}."
        q, k, v = t(src + "self_attention/linear_0/weight").chunk(3)
        qb, _, vb = t(src + "self_attention/linear_0/bias").chunk(3)
        sd.update({
            dst + "self_attn.q_proj.weight": q, dst + "self_attn.q_proj.bias": qb,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v, dst + "self_attn.v_proj.bias": vb,
            dst + "self_attn.out_proj.weight": t(src + "self_attention/linear_1/weight"),
            dst + "self_attn.out_proj.bias": t(src + "self_attention/linear_1/bias"),
            dst + "self_attn_layer_norm.weight": t(src + "self_attention/layer_norm/gamma"),
            dst + "self_attn_layer_norm.bias": t(src + "self_attention/layer_norm/beta"),
            dst + "fc1.weight": t(src + "ffn/linear_0/weight"), dst + "fc1.bias": t(src + "ffn/linear_0/bias"),
            dst + "fc2.weight": t(src + "ffn/linear_1/weight"), dst + "fc2.bias": t(src + "ffn/linear_1/bias"),
            dst + "final_layer_norm.weight": t(src + "ffn/layer_norm/gamma"),
            dst + "final_layer_norm.bias": t(src + "ffn/layer_norm/beta"),
        })
        layers += 1
    if not layers:
        raise ModelLoadError("CTranslate2 model has no encoder layers (encoder/layer_0/... missing).")
    return sd, layers


def convert_ct2(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a transformers WhisperEncoder folder (safetensors + feature extractor) to `out`."""
    folder, out = Path(folder), Path(out)
    ct2 = read_ct2(folder / "model.bin")
    sd, layers = ct2_to_state_dict(ct2)
    conv1, fc1 = sd["conv1.weight"], sd["layers.0.fc1.weight"]
    heads = int(ct2["num_heads"]) if "num_heads" in ct2 else max(1, conv1.shape[0] // 64)
    config = WhisperConfig(
        d_model=conv1.shape[0], num_mel_bins=conv1.shape[1], encoder_layers=layers,
        encoder_attention_heads=heads, encoder_ffn_dim=fc1.shape[0],
        max_source_positions=sd["embed_positions.weight"].shape[0],
        decoder_layers=1, decoder_attention_heads=heads, decoder_ffn_dim=fc1.shape[0],
    )
    model = HFWhisperEncoder(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("k_proj.bias")]:
        raise ModelLoadError(f"{folder}: conversion mismatch (missing {missing}, unexpected {unexpected}).")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(tmp)
    (tmp / "converted_from.json").write_text(json.dumps({"source": str(folder), "converter": _converter_version()}))
    try:
        os.replace(tmp, out)  # atomic: a concurrent converter loses the race harmlessly
    except OSError:
        if not (out / "config.json").is_file():
            raise
    return out


def _converter_version() -> str:
    """This module's source hash: an edit to the converter never reuses an old conversion (the
    fingerprint's code_version covers the same source)."""
    return versions.module_version(__name__)[:12]


def converted_folder(folder: str, digest: str) -> Path:
    """The cached transformers folder for CTranslate2 `folder` (converted on first use)."""
    base = hashcache.cache_dir() or Path(tempfile.gettempdir()) / "mer-cache"
    out = base / "converted" / f"whisper-{digest.split(':')[-1][:16]}-{_converter_version()}"
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_ct2(folder, out)
    return out


class WhisperEncoder(Encoder):
    """Speech family, Whisper architecture: every encoder hidden state, pooled and per frame."""

    family = "speech"
    unit = "audio_s"

    def _load(self) -> torch.nn.Module:
        folder = self.path
        self.ct2 = (Path(folder) / "model.bin").is_file()
        if self.ct2:  # the digest of the source model.bin names the converted folder
            folder = str(converted_folder(folder, weights_hash(folder, "", None)))
        self.extractor = WhisperFeatureExtractor.from_pretrained(folder)
        loader = HFWhisperEncoder
        if json.loads((Path(folder) / "config.json").read_text()).get("architectures", [""])[0] != "WhisperEncoder":
            from transformers import WhisperModel as loader  # a full Whisper checkpoint
        model = load_checked(loader, folder, "whisper encoder", **dtype_kwargs(self.dtype),
                             **safetensors_kwargs(folder), trust_remote_code=self.cfg.trust_remote_code)
        return model if isinstance(model, HFWhisperEncoder) else model.get_encoder()

    def _model_config(self):
        cfg = self.model.config
        return type("EncoderShape", (), {"num_hidden_layers": cfg.encoder_layers, "hidden_size": cfg.d_model,
                                         "_commit_hash": getattr(cfg, "_commit_hash", None)})()

    def _extra_fingerprint(self) -> dict:
        return {"architecture": "whisper", "max_seconds": self.cfg.max_seconds,
                "converter": "ct2" if self.ct2 else "", "window_samples": WINDOW_SAMPLES}

    def prepare(self, wave: np.ndarray) -> list[Segment]:
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)[: int(self.cfg.max_seconds * SAMPLE_RATE)]
        if wave.size == 0:
            raise ClipError("?", "zero_length", "empty waveform; the audio stage should drop it.")
        segments = []
        for start in range(0, wave.size, WINDOW_SAMPLES):
            part = wave[start : start + WINDOW_SAMPLES]
            mel = self.extractor(part, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]
            frames = min(math.ceil(part.size / SAMPLES_PER_FRAME), self.model.config.max_source_positions)
            segments.append(Segment(np.ascontiguousarray(mel, dtype=np.float32), WINDOW_SAMPLES,
                                    part.size / SAMPLE_RATE, (0, frames)))
        return segments

    def collate(self, segments: list[Segment]) -> dict:
        mel = torch.from_numpy(np.stack([s.data for s in segments]))
        return {"input_features": self.pin(mel), "spans": [s.keep for s in segments]}

    def forward(self, batch: dict) -> HostBatch:
        mel = self.to_device(batch["input_features"], self.dtype)
        with self.autocast():
            out = self.model(mel, output_hidden_states=True)
        return self._collect(out.hidden_states, batch["spans"])
