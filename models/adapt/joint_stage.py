"""The `joint@<name>` stage: paper 002's joint audio-text module (models/adapt/joint_llm.py) trained
k-fold on the cached speech frames and LLM token states; out-of-fold pooled states -> a store.

Reads `artifacts/features/<speech>` (frames of `speech_layer`) and `artifacts/features/<llm>`
(token states of hidden state `first - 1`), the manifest's labels and folds; writes
`artifacts/features/<name>` (pooled LLM states of layers first..last over the joint sequence) and
`report.json`. The LLM's weights must be those its store was made with (fingerprints compared).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from features.cache import versions
from features.encoders import EncoderConfig, load_encoder
from features.encoders.base import pick_device
from features.errors import ConfigError
from features.media.manifest import read_manifest
from features.reliability.reports import write_json_atomic
from features.storage.record import StoreRecord
from features.storage.store import StoreReader, StoreUpdate, clip_key
from models.adapt.lora import adapt_features, layer_stack, resolve_layers, training_digest
from models.adapt.lora_stage import base_config, base_model, check_base, prefix_index, read_report
from models.training.train_config import CLASSES
from models.adapt.joint_llm import JointAudioText, JointConfig
from models.evaluation.metrics import compute_metrics


def joint_store(name: str, cfg: JointConfig, llm_cfg: EncoderConfig, manifest: str | Path,
                features: str | Path, out_dir: str | Path, store_out: str | Path | None = None) -> dict:
    start = time.perf_counter()
    features, out_dir = Path(features), Path(out_dir)
    store_out = Path(store_out or features / name)
    device = pick_device(cfg.device)
    llm = load_encoder(base_config(llm_cfg, cfg.dtype, device))
    if not getattr(llm, "causal", False):
        raise ConfigError(f"joint@{name}: llm {cfg.llm!r} is not a causal LM; the joint module runs an LLM.")
    with StoreReader(features / cfg.speech, kind="embedding") as speech, \
            StoreReader(features / cfg.llm, kind="embedding") as text:
        base_fp = check_base(name, cfg.llm, text.meta, llm)
        stack = layer_stack(base_model(llm))
        first, last = resolve_layers(cfg.adapt_config(), stack.num_hidden, None)
        k_text = prefix_index(name, cfg.llm, text.meta, first - 1, stack.num_hidden)
        n_speech = int(speech.pooled_shape[0])
        k_speech = prefix_index(name, cfg.speech, speech.meta, cfg.speech_layer % n_speech, n_speech)
        clips = {c.clip_id: c for c in read_manifest(manifest)}
        ids = [cid for cid in text.ids if cid in speech and cid in clips]
        labelled = [cid for cid in ids if clips[cid].label and clips[cid].fold >= 0]
        labels = {cid: CLASSES.index(clips[cid].label) for cid in labelled}
        folds = {cid: clips[cid].fold for cid in labelled}
        keys = {cid: f"{speech.keys[cid]}|{text.keys[cid]}" for cid in ids}
        fp = {"llm": base_fp, "speech": (speech.meta.get("fingerprint") or {}).get("weights")}
        digest = training_digest(cfg, fp, keys, labels, folds, first, last, stage="joint")
        wanted = {cid: clip_key("joint", keys[cid], digest) for cid in ids}
        meta = StoreRecord(
            producer="transform", name=name, family="joint", layers_pooled=tuple(range(first, last + 1)),
            layers_frames=(), hidden_size=int(text.pooled_shape[2]), store_dtype="float16",
            fingerprint={**fp, "joint": digest},
            code_version=versions.code_version("joint"),  # inside `digest` (training_digest)
            extra={"sources": [cfg.speech, cfg.llm], "adapted_layers": list(range(first, last + 1)),
                   "config": dataclasses.asdict(cfg)}).to_meta()
        with StoreUpdate(store_out, "embedding", meta, wanted) as up:
            print(f"[joint {name}] {len(ids)} clips ({len(labelled)} labelled): {up.reused} cached, "
                  f"{len(up.todo)} to write; audio -> LLM layers {first}..{last}")
            if not up.todo:
                return read_report(out_dir)
            items = {cid: (speech.get(cid)[k_speech], text.get(cid)[k_text]) for cid in ids}
            dim = int(speech.pooled_shape[2])
            make = lambda: JointAudioText(stack, first, last, cfg, dim, len(CLASSES))  # noqa: E731
            result = adapt_features(stack, base_model(llm), first, last, cfg.adapt_config(), items, labels,
                                    folds, device, make)
            for cid in up.todo:
                up.add(cid, None, pooled=result.pooled[cid].astype(np.float16))
    oof = [c for c in labelled if c in result.oof_probs]
    scores = compute_metrics(np.array([labels[c] for c in oof]), np.stack([result.oof_probs[c] for c in oof]))
    report = {"name": name, "speech": cfg.speech, "llm": cfg.llm, "llm_layers": [first, last],
              **result.parameters, "clips": len(ids), "labelled": len(labelled),
              "loss_per_fold": [[round(v, 5) for v in f] for f in result.losses],
              "module_oof_weighted_f1": scores["weighted_f1"], "module_oof_accuracy": scores["accuracy"],
              "unlabelled_features": "mean over the fold modules", "seconds": round(time.perf_counter() - start, 2)}
    write_json_atomic(out_dir / "report.json", report)
    print(f"[joint {name}] trainable {report['trainable']:,} of {report['total']:,} parameters; "
          f"module's own OOF weighted F1 {report['module_oof_weighted_f1']:.4f}; {report['seconds']} s")
    return report
