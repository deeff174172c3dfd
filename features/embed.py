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
from features.store import StoreReader, StoreUpdate, clip_key

INPUT_KIND = {"speech": "audio", "vision": "faces"}


def store_dtype(cfg: EncoderConfig) -> np.dtype:
    # Half precision halves the store at no measurable cost to probes; fp32 when asked for.
    if cfg.store_dtype not in ("float16", "float32"):
        raise ConfigError(f"store_dtype {cfg.store_dtype!r}: use float16 or float32.")
    return np.dtype(cfg.store_dtype)


class Inputs:
    """The encoder's input clips: ids, upstream cache keys, and a loader for one item."""

    def __init__(self, cfg: EncoderConfig, path: str | os.PathLike):
        self._reader = None
        if cfg.family == "text":
            texts = read_transcripts(path)
            self.keys = {cid: t["key"] for cid, t in texts.items()}
            self.load = lambda cid: texts[cid]["text"]
        elif cfg.family in INPUT_KIND:
            self._reader = StoreReader(path, kind=INPUT_KIND[cfg.family])
            self.keys = dict(self._reader.keys)
            self.load = self._reader.get
        else:
            raise ConfigError(f"encoder family {cfg.family!r} has no input reader; "
                              f"known: {sorted([*INPUT_KIND, 'text'])}.")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(size, 1)):
        yield items[i:i + size]


def embed_store(name: str, cfg: EncoderConfig, input_path: str | os.PathLike,
                out_path: str | os.PathLike) -> Path:
    """Encode the clips of `input_path` that have no cached result; write the store at `out_path`.

    A clip's cache key is its upstream key plus the encoder's fingerprint (model, weights hash,
    layers, pooling, dtype, code version), so any change to those recomputes every clip and
    nothing else ever does. Finished batches are persisted at once (the resume point).
    """
    encoder = load_encoder(cfg)
    inputs = Inputs(cfg, input_path)
    out_path = Path(out_path)
    failures = FailureReport(f"embed@{name}")
    dtype = store_dtype(cfg)
    fp = encoder.fingerprint()
    meta = {"encoder": name, "fingerprint": fp, "layers_frames": cfg.layers_frames,
            "num_layers": encoder.num_layers, "hidden_size": encoder.hidden_size,
            "store_dtype": dtype.name}
    wanted = {cid: clip_key("embed", key, fp, dtype.name) for cid, key in inputs.keys.items()}
    try:
        with StoreUpdate(out_path, "embedding", meta, wanted) as up:
            print(f"[embed {name}] {len(wanted)} clips: {up.reused} cached, {len(up.todo)} to encode")

            def work(_, ids):
                batch = [(cid, inputs.load(cid)) for cid in ids]
                for cid, enc in zip(ids, _encode_isolated(encoder, batch)):
                    if isinstance(enc, ClipError):
                        failures.add_error(enc)
                        continue
                    up.add(cid, enc.frames.astype(dtype), pooled=enc.pooled.astype(dtype),
                           attrs={"layers": np.asarray(cfg.layers_frames, dtype=np.int64)})
                up.checkpoint()  # a killed run loses at most the batch in flight
            batches = [(f"batch{i}", ids) for i, ids in enumerate(batched(up.todo, cfg.batch_size))]
            for_each_clip(batches, work, failures, f"embed[{name}] batches", total=len(batches))
    finally:
        inputs.close()
    failures.write(out_path.parent / f"{out_path.name}.failures.json")
    return out_path


def _encode_isolated(encoder, batch: list) -> list:
    """Encode a batch; if it fails, retry clip by clip so one bad clip fails alone."""
    try:
        return encoder.encode([item for _, item in batch])
    except Exception as err:  # noqa: BLE001 - find the culprit below
        if len(batch) == 1:
            return [ClipError(batch[0][0], "encode_failed", f"{type(err).__name__}: {err}")]
        return [_encode_isolated(encoder, [b])[0] for b in batch]
