"""The `joint@<name>` stage: paper 002's joint audio-text module (models/adapt/joint_llm.py) trained
k-fold on the cached speech frames and LLM token states; out-of-fold pooled states -> a store.

Reads `artifacts/features/<speech>` (frames of `speech_layer`) and `artifacts/features/<llm>`
(token states of hidden state `first - 1`), the manifest's labels and folds; writes
`artifacts/features/<name>` (pooled LLM states of layers first..last over the joint sequence),
`report.json` and the trained fold modules (projector, LoRA and classifier tensors) with their
training record in `artifacts/joint/<name>/trained/`, as adapt@ does (models/adapt/lora_stage.py:
the layout, and retraining only when the training digest changes). The LLM's weights must be
those its store was made with (fingerprints compared).

Apply only (`mer predict` on new videos):

    apply_saved(name, cfg, trained_dir, features_dir, ids, out_dir, llm_cfg=None) -> Path

loads the saved fold modules and their record from `trained_dir` (`artifacts/joint/<name>/trained`),
checks `cfg` (`device` may differ), the code and library versions and the fingerprints of the
stores `<features_dir>/<cfg.speech>` and `<features_dir>/<cfg.llm>` against the record (a MerError
names the store and the fix otherwise), and writes the joint features of `ids` (clips in both
stores, all treated as unlabelled: the mean over the fold modules) into the store `out_dir`, with
the stage store's meta. `llm_cfg` (the LLM's encoder settings) defaults to those recorded.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from features.cache import versions
from features.encoders import EncoderConfig, load_encoder
from features.encoders.base import pick_device
from features.errors import ConfigError
from features.reliability.reports import write_json_atomic
from features.storage.record import StoreRecord
from features.storage.store import StoreReader
from models.adapt.joint_llm import JointAudioText, JointConfig
from models.adapt.lora import LayerStack, layer_stack, resolve_layers, training_digest
from models.adapt.lora_stage import (Transform, base_config, base_model, check_base, check_store, plain_json,
                                     labelled_clips, prefix_index, read_report, run_transform,
                                     saved_record, trained_dir, trained_note, write_saved)
from models.training.train_config import CLASSES


def load_llm(name: str, cfg: JointConfig, llm_cfg: EncoderConfig, device):
    llm = load_encoder(base_config(llm_cfg, cfg.dtype, device))
    if not getattr(llm, "causal", False):
        raise ConfigError(f"joint@{name}: llm {cfg.llm!r} is not a causal LM; the joint module runs an LLM.")
    return llm


def joint_transform(name: str, cfg: JointConfig, stack: LayerStack, speech: StoreReader, text: StoreReader,
                    first: int, last: int, device) -> Transform:
    """Joint modules on LLM blocks first..last, reading speech frames and token states per clip."""
    k_text = prefix_index(name, cfg.llm, text.meta, first - 1, stack.num_hidden)
    n_speech = int(speech.pooled_shape[0])
    k_speech = prefix_index(name, cfg.speech, speech.meta, cfg.speech_layer % n_speech, n_speech)
    dim = int(speech.pooled_shape[2])
    return Transform("joint", name, cfg.adapt_config(),
                     lambda: JointAudioText(stack, first, last, cfg, dim, len(CLASSES)),
                     lambda cid: (speech.frame_layer(cid, k_speech), text.frame_layer(cid, k_text)), device)


def joint_keys(speech: StoreReader, text: StoreReader, ids: Sequence[str]) -> dict[str, str]:
    return {cid: f"{speech.keys[cid]}|{text.keys[cid]}" for cid in ids}


def joint_store(name: str, cfg: JointConfig, llm_cfg: EncoderConfig, manifest: str | Path,
                features: str | Path, out_dir: str | Path, store_out: str | Path | None = None) -> dict:
    start = time.perf_counter()
    features, out_dir = Path(features), Path(out_dir)
    store_out = Path(store_out or features / name)
    device = pick_device(cfg.device)
    llm = load_llm(name, cfg, llm_cfg, device)
    with StoreReader(features / cfg.speech, kind="embedding") as speech, \
            StoreReader(features / cfg.llm, kind="embedding") as text:
        base_fp = check_base(name, cfg.llm, text.meta, llm)
        stack = layer_stack(base_model(llm))
        first, last = resolve_layers(cfg.adapt_config(), stack.num_hidden, None)
        t = joint_transform(name, cfg, stack, speech, text, first, last, device)
        ids, labels, folds = labelled_clips(manifest, [cid for cid in text.ids if cid in speech])
        keys = joint_keys(speech, text, ids)
        fp = {"llm": base_fp, "speech": (speech.meta.get("fingerprint") or {}).get("weights")}
        digest = training_digest(cfg, fp, keys, labels, folds, first, last, stage="joint")
        meta = StoreRecord(
            producer="transform", name=name, family="joint", layers_pooled=tuple(range(first, last + 1)),
            layers_frames=(), hidden_size=int(text.pooled_shape[2]), store_dtype="float16",
            fingerprint={**fp, "joint": digest},
            code_version=versions.code_version("joint"),  # inside `digest` (training_digest)
            extra={"sources": [cfg.speech, cfg.llm], "adapted_layers": list(range(first, last + 1)),
                   "config": dataclasses.asdict(cfg)}).to_meta()
        describe = {"stage": "joint", "name": name, "config": plain_json(dataclasses.asdict(cfg)),
                    "encoder_config": plain_json(dataclasses.asdict(llm_cfg)), "layers": [first, last],
                    "base": fp, "stores": {cfg.speech: speech.meta.get("fingerprint") or {},
                                           cfg.llm: text.meta.get("fingerprint") or {}},
                    "code": plain_json(versions.fingerprint("joint")), "store_meta": meta,
                    "folds": sorted(set(folds.values()))}
        print(f"[joint {name}] audio -> LLM layers {first}..{last}")
        record, trained_now, written = run_transform(t, base_model(llm), store_out, trained_dir(out_dir),
                                                     ids, keys, labels, folds, digest, describe)
    if not (trained_now or written):
        return read_report(out_dir)
    summary = record["training"]
    report = {"name": name, "speech": cfg.speech, "llm": cfg.llm, "llm_layers": [first, last],
              **summary["parameters"], "clips": len(ids), "labelled": len(labels),
              "loss_per_fold": [[round(v, 5) for v in f] for f in summary["loss_per_fold"]],
              "module_oof_weighted_f1": summary["oof_weighted_f1"], "module_oof_accuracy": summary["oof_accuracy"],
              "unlabelled_features": "mean over the fold modules", **trained_note(trained_now, written),
              "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(out_dir / "report.json", report)
    print(f"[joint {name}] trainable {report['trainable']:,} of {report['total']:,} parameters; "
          f"module's own OOF weighted F1 {report['module_oof_weighted_f1']:.4f}; {report['seconds']} s")
    return report


def apply_saved(name: str, cfg: JointConfig, trained_dir: str | Path, features_dir: str | Path,
                ids: Sequence[str], out_dir: str | Path, llm_cfg: EncoderConfig | None = None) -> Path:
    """Joint features of new clips from the saved fold modules (see the module docstring)."""
    record = saved_record(trained_dir, "joint", name, cfg)
    llm_cfg = llm_cfg or EncoderConfig(**record["encoder_config"])
    device = pick_device(cfg.device)
    first, last = record["layers"]
    features_dir = Path(features_dir)
    with StoreReader(features_dir / cfg.speech, kind="embedding") as speech, \
            StoreReader(features_dir / cfg.llm, kind="embedding") as text:
        check_store("joint", name, speech, cfg.speech, record, ids)
        check_store("joint", name, text, cfg.llm, record, ids)
        llm = load_llm(name, cfg, llm_cfg, device)
        check_base(name, cfg.llm, text.meta, llm)
        t = joint_transform(name, cfg, layer_stack(base_model(llm)), speech, text, first, last, device)
        return write_saved(t, record, Path(trained_dir), ids, joint_keys(speech, text, ids), out_dir)
