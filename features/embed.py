"""The embed stage: run one encoder over its input store and write an embedding store.

Inputs by family: speech reads an audio store (PCM), vision a faces store (uint8 crops), text the
asr stage's transcripts.json. The output keeps a pooled vector per layer for every clip
(``/pooled`` [L, N, D]) and frame-level states for ``layers_frames`` (``/clips/<id>`` [K, T, D]).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from features.clips import for_each_clip
from features.encoders import EncoderConfig, load_encoder
from features.errors import ClipError, ConfigError
from features.extract import read_transcripts
from features.reports import FailureReport
from features.store import StoreReader, StoreWriter

INPUT_KIND = {"speech": "audio", "vision": "faces"}


def store_dtype(cfg: EncoderConfig) -> np.dtype:
    # Half precision halves the store at no cost to probes; fp32 only when asked for.
    return np.dtype(np.float32 if cfg.dtype == "float32" else np.float16)


def iter_inputs(cfg: EncoderConfig, path: str | os.PathLike) -> tuple[int, Iterator]:
    """(count, iterator of (clip_id, item)) for the encoder's family."""
    if cfg.family == "text":
        texts = read_transcripts(path)
        return len(texts), iter(sorted(texts.items()))
    if cfg.family not in INPUT_KIND:
        raise ConfigError(f"encoder family {cfg.family!r} has no input reader; "
                          f"known: {sorted([*INPUT_KIND, 'text'])}.")
    reader = StoreReader(path, kind=INPUT_KIND[cfg.family])

    def items():
        with reader:
            for cid in reader.ids:
                yield cid, reader.get(cid)
    return len(reader), items()


def batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def embed_store(name: str, cfg: EncoderConfig, input_path: str | os.PathLike,
                out_path: str | os.PathLike) -> Path:
    """Encode every clip of `input_path` with encoder `name`; write ``out_path`` and failures.json."""
    encoder = load_encoder(cfg)
    total, items = iter_inputs(cfg, input_path)
    out_path = Path(out_path)
    failures = FailureReport(f"embed@{name}")
    dtype = store_dtype(cfg)
    meta = {"encoder": name, "fingerprint": encoder.fingerprint(), "layers_frames": cfg.layers_frames,
            "num_layers": encoder.num_layers, "hidden_size": encoder.hidden_size,
            "store_dtype": dtype.name}
    with StoreWriter(out_path, "embedding", meta=meta) as writer:
        def work(_, batch):
            for cid, enc in zip([c for c, _ in batch], _encode_isolated(encoder, batch)):
                if isinstance(enc, ClipError):
                    failures.add_error(enc)
                    continue
                writer.add(cid, enc.frames.astype(dtype), pooled=enc.pooled.astype(dtype),
                           attrs={"layers": np.asarray(cfg.layers_frames, dtype=np.int64)})
        batches = ((f"batch{i}", b) for i, b in enumerate(batched(items, cfg.batch_size)))
        for_each_clip(batches, work, failures, f"embed[{name}]",
                      total=-(-total // max(cfg.batch_size, 1)))
    failures.write(out_path.with_name(out_path.stem + ".failures.json"))
    return out_path


def _encode_isolated(encoder, batch: list) -> list:
    """Encode a batch; if it fails, retry clip by clip so one bad clip fails alone."""
    try:
        return encoder.encode([item for _, item in batch])
    except Exception:  # noqa: BLE001 - find the culprit below
        if len(batch) == 1:
            cid = batch[0][0]
            import traceback
            return [ClipError(cid, "encode_failed", traceback.format_exc(limit=1).strip())]
        return [_encode_isolated(encoder, [b])[0] for b in batch]
