"""The `adapt@<name>` stage: LoRA adapters from an encoder's cached prefix frames -> a new feature store.

Reads `artifacts/features/<encoder>` (the prefix layer's frames), the manifest's labels and folds,
and (for `layers: best`) the probe's best.json; writes `artifacts/features/<name>` (pooled adapted
layers first..last, optionally the last layer's frames) that any head names like an encoder, and
`report.json` (trainable parameters, loss per fold and epoch, the adapters' own out-of-fold
scores, time). The base encoder is loaded only to take its top blocks; its weights must be the
ones the store was made with (fingerprints compared), or the stage refuses.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from features.cache import versions
from features.encoders import EncoderConfig, load_encoder
from features.errors import ConfigError, ModelLoadError
from features.media.manifest import read_manifest
from features.reliability.reports import write_json_atomic
from features.storage.record import StoreRecord
from features.storage.store import StoreReader, StoreUpdate, clip_key
from features.encoders.base import pick_device
from models.adapt.lora import (AdaptConfig, adapt_features, layer_stack, resolve_layers,
                               training_digest)
from models.training.train_config import CLASSES
from models.evaluation.metrics import compute_metrics


def base_model(encoder) -> "torch.nn.Module":  # noqa: F821
    """The module whose blocks are adapted: a causal LM's decoder stack, else the model."""
    return getattr(encoder, "backbone", None) or encoder.model


def base_config(enc_cfg: EncoderConfig, dtype: str, device) -> EncoderConfig:
    """The base loads on the CPU (only the adapted blocks move to the device): fp32 for CPU
    training, the training dtype (bf16 weights, fp32 LoRA) for a GPU."""
    return dataclasses.replace(enc_cfg, device="cpu", dtype=dtype if device.type == "cuda" else "float32")


def check_base(name: str, source: str, meta: dict, encoder) -> dict:
    """Refuse a base model whose weights differ from those the prefix store was made with."""
    stored = dict(meta.get("fingerprint") or {})
    now = encoder.fingerprint()
    differ = [k for k in ("family", "weights") if stored.get(k) != now.get(k)]
    if differ:
        raise ModelLoadError(
            f"adapt@{name}: the {source!r} model's {differ} differ from the store it adapts "
            f"(store {[stored.get(k) for k in differ]}, model now {[now.get(k) for k in differ]}); "
            f"its cached frames came from other weights. Rerun `dvc repro embed@{source}` first.")
    return {k: now.get(k) for k in ("family", "model", "weights", "code_version")}


def prefix_index(name: str, source: str, meta: dict, prefix: int, num_hidden: int) -> int:
    """Where hidden state `prefix` sits among the store's frame-level layers (or a ConfigError)."""
    stored = [int(v) % num_hidden for v in (meta.get("layers_frames") or [])]
    if prefix not in stored:
        raise ConfigError(
            f"adapt@{name}: adapting from layer {prefix + 1} needs the frame-level states of hidden "
            f"state {prefix}, and store {source!r} keeps layers_frames {stored}. Add {prefix} to "
            f"embed.encoders.{source}.layers_frames in params.yaml and rerun `dvc repro embed@{source}`.")
    return stored.index(prefix)


def best_layer(probe_root: str | Path, source: str) -> int | None:
    path = Path(probe_root) / source / "best.json"
    return int(json.loads(path.read_text())["best_layer"]) if path.is_file() else None


def adapt_store(name: str, cfg: AdaptConfig, enc_cfg: EncoderConfig, manifest: str | Path,
                features: str | Path, probe_root: str | Path, out_dir: str | Path,
                store_out: str | Path | None = None) -> dict:
    """Train the fold adapters (unless every clip's features are cached) and write the store."""
    start = time.perf_counter()
    features, out_dir = Path(features), Path(out_dir)
    store_out = Path(store_out or features / name)
    source = cfg.encoder
    device = pick_device(cfg.device)
    encoder = load_encoder(base_config(enc_cfg, cfg.dtype, device))
    with StoreReader(features / source, kind="embedding") as reader:
        base_fp = check_base(name, source, reader.meta, encoder)
        stack = layer_stack(base_model(encoder))
        first, last = resolve_layers(cfg, stack.num_hidden, best_layer(probe_root, source))
        k = prefix_index(name, source, reader.meta, first - 1, stack.num_hidden)
        manifest_clips = {c.clip_id: c for c in read_manifest(manifest)}
        ids = [cid for cid in reader.ids if cid in manifest_clips]
        labelled = [cid for cid in ids if manifest_clips[cid].label and manifest_clips[cid].fold >= 0]
        labels = {cid: CLASSES.index(manifest_clips[cid].label) for cid in labelled}
        folds = {cid: manifest_clips[cid].fold for cid in labelled}
        keys = {cid: reader.keys[cid] for cid in ids}
        digest = training_digest(cfg, base_fp, keys, labels, folds, first, last)
        wanted = {cid: clip_key("adapt", keys[cid], digest) for cid in ids}
        meta = StoreRecord(
            producer="transform", name=name, family="adapt", layers_pooled=tuple(range(first, last + 1)),
            layers_frames=(-1,) if cfg.write_frames else (), hidden_size=int(reader.pooled_shape[2]),
            store_dtype="float16", fingerprint={"base": base_fp, "adapt": digest},
            code_version=versions.code_version("adapt"),  # inside `digest` with its libraries
            extra={"source": source, "adapted_layers": list(range(first, last + 1)),
                   "prefix_layer": first - 1, "config": dataclasses.asdict(cfg)}).to_meta()
        with StoreUpdate(store_out, "embedding", meta, wanted) as up:
            print(f"[adapt {name}] {len(ids)} clips ({len(labelled)} labelled): {up.reused} cached, "
                  f"{len(up.todo)} to write; layers {first}..{last} from cached layer {first - 1}")
            if not up.todo:
                return read_report(out_dir)
            frames = {cid: reader.get(cid)[k] for cid in ids}
            result = adapt_features(stack, base_model(encoder), first, last, cfg, frames, labels, folds, device)
            for cid in up.todo:
                pooled = result.pooled[cid].astype(np.float16)
                array = result.frames[cid][None].astype(np.float16) if cfg.write_frames else None
                up.add(cid, array, pooled=pooled)
    oof = [cid for cid in labelled if cid in result.oof_probs]
    scores = compute_metrics(np.array([labels[c] for c in oof]), np.stack([result.oof_probs[c] for c in oof]))
    report = {"name": name, "encoder": source, "adapted_layers": [first, last], "prefix_layer": first - 1,
              **result.parameters, "clips": len(ids), "labelled": len(labelled),
              "folds": sorted(set(folds.values())), "epochs": cfg.epochs, "rank": cfg.rank,
              "loss_per_fold": [[round(v, 5) for v in f] for f in result.losses],
              "adapter_oof_weighted_f1": scores["weighted_f1"], "adapter_oof_accuracy": scores["accuracy"],
              "unlabelled_features": "mean over the fold adapters",
              "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(out_dir / "report.json", report)
    print(f"[adapt {name}] trainable {report['trainable']:,} of {report['total']:,} parameters "
          f"({100 * report['trainable_share']:.3f} %); adapters' own OOF weighted F1 "
          f"{report['adapter_oof_weighted_f1']:.4f}; {report['seconds']} s")
    return report


def read_report(out_dir: Path) -> dict:
    path = out_dir / "report.json"
    if path.is_file():
        return json.loads(path.read_text())
    return write_json_atomic(path, {"cached": True}) and {"cached": True}
