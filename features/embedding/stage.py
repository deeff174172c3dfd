"""The embed stage: run one encoder over its input store and write an embedding store.

Inputs by family: speech reads an audio store (PCM), vision a faces store (uint8 crops), text the
asr stage's transcripts.json. The output keeps a pooled vector per layer for every clip
(``/pooled`` [L, N, D]) and frame-level states for ``layers_frames`` (``/clips/<id>`` [K, T, D]).
The work runs on `features.embedding.engine.Engine` (loading, compute and writes overlapped); under
torchrun (WORLD_SIZE > 1) each rank encodes its share into its own store and rank 0 merges
them into `out_path` (`features.embedding.distributed`).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from features.cache import versions
from features.cache.keys import remembered, source_key, still_to_do
from features.params import resolve_model_path
from features.reliability.clips import check_not_all_failed
from features.encoders.encoder_config import EncoderConfig
from features.errors import ConfigError, MerError
from features.reliability.reports import FailureReport, read_json
from features.storage.record import StoreRecord
from features.storage.store import StoreReader, StoreUpdate, clip_key

INPUT_KIND = {"speech": "audio", "vision": "faces"}
# Settings that change how shards are written or where inputs come from, never the numbers.
LAYOUT_ONLY = ("input", "store_dtype", "compression", "shard_mb")


def store_dtype(cfg: EncoderConfig) -> np.dtype:
    # Half precision halves the store at no measurable cost to probes; fp32 when asked for.
    return np.dtype(cfg.store_dtype)  # checked by EncoderConfig


def store_layout(cfg: EncoderConfig) -> dict:
    """How shards are written (not what they hold: neither setting enters the cache keys)."""
    return {"compression": cfg.compression or None, "shard_mb": float(cfg.shard_mb)}


class Inputs:
    """The encoder's input clips: ids, upstream cache keys, and `load(clip_id)` for one item.

    Picklable and fork-safe: each process (loader workers included) opens its own reader.
    """

    def __init__(self, cfg: EncoderConfig, path: str | os.PathLike):
        self.family, self.path = cfg.family, str(path)
        self._texts: dict | None = None
        self._reader: StoreReader | None = None
        self._pid = -1
        if cfg.family == "text":
            self._texts = read_json(path)["transcripts"]  # the asr stage's transcripts.json
            self.keys = {cid: t["key"] for cid, t in self._texts.items()}
        elif cfg.family in INPUT_KIND:
            with StoreReader(path, kind=INPUT_KIND[cfg.family]) as reader:
                self.keys = dict(reader.keys)
        else:
            raise ConfigError(f"encoder family {cfg.family!r} has no input reader; "
                              f"known: {sorted([*INPUT_KIND, 'text'])}.")

    def load(self, clip_id: str) -> Any:
        if self._texts is not None:
            return self._texts[clip_id]["text"]
        if self._reader is None or self._pid != os.getpid():  # HDF5 handles do not survive fork
            self._reader = StoreReader(self.path, kind=INPUT_KIND[self.family])
            self._pid = os.getpid()
        return self._reader.get(clip_id)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None, "_pid": -1}

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader = None


def embed_store(name: str, cfg: EncoderConfig, input_path: str | os.PathLike,
                out_path: str | os.PathLike, workers: int | None = None) -> Path:
    """Encode the clips of `input_path` that have no cached result; write the store at `out_path`.

    A clip's cache key is its upstream key plus the encoder's fingerprint (model, weights hash,
    layers, pooling, dtype, quantize, chunking, code version), so any change to those recomputes
    every clip and nothing else ever does. Keys come before weights: when the store remembers
    the fingerprint of the same sources (`features.cache.keys`) and every clip is cached, no model
    is loaded and torch is not imported. Finished work is persisted every CHECKPOINT_S seconds
    (the resume point). Under torchrun each rank takes every WORLD_SIZE-th clip still to do.
    """
    out_path, dtype = Path(out_path), store_dtype(cfg)
    inputs = Inputs(cfg, input_path)
    failures = FailureReport(f"embed@{name}")
    try:
        meta = _cached_meta(name, cfg, out_path, inputs.keys, dtype)
        if meta is not None:  # nothing to compute: refresh the store's clip set and layout only
            wanted = _wanted(inputs.keys, meta, dtype)
            with StoreUpdate(out_path, "embedding", meta, wanted, compression=meta["compression"],
                             shard_mb=meta["shard_mb"]) as up:
                print(f"[embed {name}] {len(wanted)} clips: {up.reused} cached, 0 to encode "
                      f"(no model loaded)")
            failures.write(out_path.parent / f"{out_path.name}.failures.json")
            return out_path
        _load_and_encode(name, cfg, inputs, out_path, failures, workers)
    finally:
        inputs.close()
    return out_path


def _sources(cfg: EncoderConfig) -> str | None:
    """The source key of this encoder's fingerprint (None: a hub id, always load)."""
    runtime = None
    if cfg.device != "cpu" or cfg.dtype not in ("float32", "float16") or cfg.quantize:
        from features.encoders.base import runtime_facts  # torch: what auto / bf16 / int8 resolve to

        runtime = runtime_facts(cfg)
    settings = {k: v for k, v in vars(cfg).items() if k not in LAYOUT_ONLY}
    # Every encoder module: the family's class is known only once the model loads, and its
    # module's source is the fingerprint's code_version (an edit anywhere here reloads, once).
    code = versions.code_modules("embed") | versions.walk(versions.package_modules("features.encoders"))
    # The packages in the clip keys' fingerprint (versions.fingerprint): a remembered fingerprint
    # is reused only while none of them changed.
    return source_key(settings, cfg.model, versions.STAGE_PACKAGES["embed"], code, runtime)


def store_meta(name: str, cfg: EncoderConfig, fingerprint: dict, num_layers: int,
               hidden_size: int, sources: str | None) -> dict:
    """The embedding store's meta: every hidden state pooled, `layers_frames` kept as frames."""
    return StoreRecord(
        producer="encoder", name=name, family=cfg.family, layers_pooled=tuple(range(num_layers)),
        layers_frames=tuple(cfg.layers_frames), hidden_size=hidden_size,
        store_dtype=store_dtype(cfg).name, fingerprint=fingerprint,
        code_version=fingerprint.get("code_version"),  # the encoder module's source hash, in the keys
        extra={"sources": sources, **store_layout(cfg)}).to_meta()


def _cached_meta(name: str, cfg: EncoderConfig, out: Path, keys: dict,
                 dtype: np.dtype) -> dict | None:
    """The store meta to write when every clip is cached under a remembered fingerprint."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # ranks coordinate through the process group: see _encode_sharded
    sources = _sources(cfg)
    old = remembered(out, sources)
    if old is None or old.get("store_dtype") != dtype.name:
        return None
    # Rebuilt from the remembered values (a store written before records lacks the new keys).
    meta = store_meta(name, cfg, old["fingerprint"], old["num_layers"], old["hidden_size"], sources)
    return None if still_to_do(out, _wanted(keys, meta, dtype)) else meta


def _wanted(keys: dict, meta: dict, dtype: np.dtype) -> dict:
    return {cid: clip_key("embed", key, meta["fingerprint"], dtype.name) for cid, key in keys.items()}


def _load_and_encode(name: str, cfg: EncoderConfig, inputs: Inputs, out_path: Path,
                     failures: FailureReport, workers: int | None) -> None:
    from features.embedding import distributed as dist
    from features.encoders import load_encoder

    _, world = dist.rank_and_world()
    dist.init()
    encoder = load_encoder(dist.rank_config(cfg))
    fp = {**encoder.fingerprint(), **versions.fingerprint("embed"),  # code, libraries, tokenizer
          "model_files": versions.model_files(resolve_model_path(cfg.model))}
    meta = store_meta(name, cfg, fp, encoder.num_layers, encoder.hidden_size, _sources(cfg))
    wanted = _wanted(inputs.keys, meta, store_dtype(cfg))
    if world == 1:
        _encode_into(out_path, meta, wanted, encoder, inputs, failures, name, workers)
    else:
        _encode_sharded(out_path, meta, wanted, encoder, inputs, failures, name, workers)


def _encode_into(path: Path, meta: dict, wanted: dict, encoder, inputs: Inputs,
                 failures: FailureReport, name: str, workers: int | None,
                 shown: tuple[int, int] | None = None, report: Path | None = None) -> None:
    """One StoreUpdate at `path` for `wanted`, computed by the engine."""
    dtype = np.dtype(meta["store_dtype"])
    attrs = {"layers": np.asarray(meta["layers_frames"], dtype=np.int64)}
    with StoreUpdate(path, "embedding", meta, wanted, compression=meta["compression"],
                     shard_mb=meta["shard_mb"]) as up:
        cached, todo = shown or (up.reused, len(up.todo))
        print(f"[embed {name}] {len(wanted) if shown is None else cached + todo} clips: "
              f"{cached} cached, {todo} to encode")

        def sink(cid, enc):  # called from the engine's writer thread only
            up.add(cid, enc.frames.astype(dtype), pooled=enc.pooled.astype(dtype), attrs=attrs)

        from features.embedding import distributed as dist
        from features.embedding.engine import Engine

        engine = Engine(encoder, workers=workers, desc=f"embed[{name}]")
        summary = engine.run(up.todo, inputs.load, sink, failures.add_error, tick=up.checkpoint,
                             tick_s=dist.checkpoint_seconds())
        check_not_all_failed(f"embed[{name}]", summary.clips, summary.done, up.reused, failures)
    failures.write(report or path.parent / f"{path.name}.failures.json")


def _encode_sharded(out: Path, meta: dict, wanted: dict, encoder, inputs: Inputs,
                    failures: FailureReport, name: str, workers: int | None) -> None:
    """This rank's share into its own store; then rank 0 merges every rank store into `out`."""
    from features.embedding import distributed as dist

    rank, world = dist.rank_and_world()
    todo = still_to_do(out, wanted)
    share = {cid: wanted[cid] for cid in dist.shard(todo, rank, world)}
    mine = dist.rank_store(out, rank, world)
    error = None
    try:
        _encode_into(mine, meta, share, encoder, inputs, failures, f"{name} rank {rank}/{world}",
                     workers, shown=(len(wanted) - len(todo), len(share)),
                     report=mine.parent / f"{mine.name}.failures.json")
    except Exception as err:  # noqa: BLE001 - raised below, once rank 0 has merged
        error = err
    everyone = dist.all_succeeded(error is None)  # every rank store is finished (or failed)
    if rank == 0:
        print(f"[embed {name}] {len(wanted)} clips: {len(wanted) - len(todo)} cached, "
              f"{len(todo)} to encode")
        dist.merge(out, "embedding", meta, wanted, dist.rank_stores(out, world))
        _merge_failures(out, name, world)
        if everyone:  # a failed rank's parts are its rerun's resume point
            shutil.rmtree(dist.ranks_dir(out), ignore_errors=True)
    dist.barrier()
    if error is not None:
        raise error
    if not everyone:
        raise MerError(f"embed[{name}]: a rank failed (see its error above); finished clips "
                       f"are merged into {out}, rerun to finish the rest.")


def _merge_failures(out: Path, name: str, world: int) -> None:
    from features.embedding import distributed as dist

    merged = FailureReport(f"embed@{name}")
    for store in dist.rank_stores(out, world):
        report = store.parent / f"{store.name}.failures.json"
        if report.is_file():
            merged.items.extend(FailureReport.read(report))
    merged.write(out.parent / f"{out.name}.failures.json")
