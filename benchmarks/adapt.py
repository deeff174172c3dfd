"""LoRA from cached prefix states vs running the whole encoder: one training epoch each, same model.

    python benchmarks/adapt.py                      # CPU: HuBERT-large shape at reduced width
    python benchmarks/adapt.py --width 1024 --device cuda --dtype bfloat16   # full HuBERT-large size

The model is HuBERT-large-shaped (24 pre-LN layers, the 7-conv front end with its 512 channels,
random weights: speed does not depend on them); `--width` narrows the transformer on a CPU, the
same model for both runs. LoRA (rank 8, q/v projections) sits on the top 6 layers (19-24) with a
linear classifier, as adapt@ trains it. The full run feeds waveforms through the whole model
each step; the prefix run feeds hidden state 18, computed once beforehand as the embed stage
does (not timed: it is the cached store). `prefix_epoch_ratio` = prefix epoch / full epoch.

`demo` compares, on a finished demo run (`--artifacts`, default ./artifacts), the out-of-fold
weighted F1 of the ridge probe of `probe@` on the base encoder's layers and on the adapt@ store,
for the speech and the text encoder of `params.yaml`'s adapt section.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, save  # noqa: E402

from models.adapt.lora import Adapter, AdaptConfig, class_weights, layer_stack, pool, train_adapter  # noqa: E402
from models.training.train_config import CLASSES  # noqa: E402


def hubert_large_shape(width: int):
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig(hidden_size=width, num_hidden_layers=24, num_attention_heads=max(width // 64, 1),
                          intermediate_size=4 * width, feat_extract_norm="layer", do_stable_layer_norm=True,
                          conv_bias=True, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          feat_proj_dropout=0.0, layerdrop=0.0)
    return HubertModel(config).eval()


def full_epoch(model, waves, y, first, last, adapter, cfg, device) -> float:
    """One epoch with LoRA inside the whole model (same LoRA weights and data order)."""
    from peft import LoraConfig, inject_adapter_in_model

    full = copy.deepcopy(model)
    full.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=["q_proj", "v_proj"],
                                       layers_to_transform=list(range(first - 1, last)), layers_pattern="layers"),
                            full)
    params = [p for n, p in full.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    classifier = copy.deepcopy(adapter.classifier)
    full.to(device)
    classifier.to(device)
    opt = torch.optim.AdamW(params + list(classifier.parameters()), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights(y, len(CLASSES)).to(device))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(waves))
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(order), cfg.batch_size):
        rows = order[i:i + cfg.batch_size]
        batch = torch.from_numpy(np.stack([waves[r] for r in rows])).to(device)
        with _autocast(device, cfg.dtype):
            h = full(batch, output_hidden_states=True).hidden_states[last]
            logits = classifier(pool(h, torch.ones(h.shape[:2], dtype=torch.bool, device=device), "mean"))
        loss = loss_fn(logits.float(), torch.from_numpy(y[rows]).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - start


def _autocast(device, dtype):
    from models.adapt.lora import autocast
    return autocast(device, dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timing(args) -> dict:
    device = torch.device(args.device)
    model = hubert_large_shape(args.width)
    first, last = 19, 24
    cfg = AdaptConfig(encoder="bench", layers=[first, last], rank=8, alpha=16, epochs=1, lr=1e-3,
                      batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(args.seconds * 16000)).astype(np.float32) for _ in range(args.clips)]
    y = np.arange(args.clips) % len(CLASSES)
    with torch.no_grad():  # the cached store: hidden state 18 of every clip (not timed)
        model.to(device)
        prefix = []
        for i in range(0, len(waves), args.batch_size):
            batch = torch.from_numpy(np.stack(waves[i:i + args.batch_size])).to(device)
            hs = model(batch, output_hidden_states=True).hidden_states[first - 1]
            prefix.extend(h.float().cpu().numpy() for h in hs)
    stack = layer_stack(model)
    torch.manual_seed(0)
    adapter = Adapter(stack, first, last, cfg, len(CLASSES))
    # warm-up both paths once (allocator, kernels), then one timed epoch each
    warm = AdaptConfig(**{**cfg.__dict__, "epochs": 1})
    train_adapter(copy.deepcopy(adapter), prefix[: args.batch_size], y[: args.batch_size], warm, device, 0)
    full_epoch(model, waves[: args.batch_size], y[: args.batch_size], first, last, adapter, cfg, device)
    full_s = full_epoch(model, waves, y, first, last, adapter, cfg, device)
    _sync(device)
    start = time.perf_counter()
    train_adapter(adapter, prefix, y, cfg, device, cfg.seed)
    _sync(device)
    prefix_s = time.perf_counter() - start
    trainable = sum(p.numel() for p in adapter.trainable())
    total = sum(p.numel() for p in model.parameters()) + trainable
    return {"model": f"HuBERT-large shape: 24 layers, width {args.width}, 7-conv front end (512 ch)",
            "adapted_layers": [first, last], "prefix_layer": first - 1, "lora_rank": cfg.rank,
            "clips": args.clips, "seconds_per_clip": args.seconds, "batch_size": args.batch_size,
            "device": args.device, "dtype": args.dtype, "full_epoch_s": round(full_s, 3),
            "prefix_epoch_s": round(prefix_s, 3), "prefix_epoch_ratio": round(prefix_s / full_s, 4),
            "trainable_parameters": int(trainable), "total_parameters": int(total),
            "trainable_share": trainable / total}


def demo(artifacts: Path, params: Path) -> dict:
    """Probe OOF weighted F1 on base vs adapted features of the demo run's adapt@ stores."""
    from features.storage.dataset import FeatureSet
    from features.media.manifest import read_manifest
    from models.training.layer_probing import ProbeConfig, probe_layers

    adapt = (yaml.safe_load(params.read_text()) or {}).get("adapt") or {}
    if not (artifacts / "prepare/manifest.csv").is_file():
        return {"not_run": f"no demo run under {artifacts}: run `make demo` first"}
    clips = [c for c in read_manifest(artifacts / "prepare/manifest.csv") if c.label and c.fold >= 0]
    out = {}
    with FeatureSet(artifacts / "features") as fs:
        for name, entry in adapt.items():
            if name not in fs.encoders or entry["encoder"] not in fs.encoders:
                out[name] = {"not_run": f"store {name} or {entry['encoder']} missing under {artifacts}/features"}
                continue
            base = entry["encoder"]
            ids = fs.common_ids([name, base], [c.clip_id for c in clips])
            keep = {c.clip_id: c for c in clips}
            y = np.array([CLASSES.index(keep[c].label) for c in ids])
            folds = np.array([keep[c].fold for c in ids])
            layers = fs.store(name).meta["adapted_layers"]
            base_f1 = probe_layers(fs.pooled(base, ids=ids)[:, layers], y, folds, ProbeConfig()).weighted_f1
            adapted_f1 = probe_layers(fs.pooled(name, ids=ids), y, folds, ProbeConfig()).weighted_f1
            family = fs.store(base).meta.get("fingerprint", {}).get("family", "?")
            out[name] = {"encoder": base, "family": family, "clips": len(ids), "layers": layers,
                         "base_oof_weighted_f1": [round(v, 4) for v in base_f1],
                         "adapted_oof_weighted_f1": [round(v, 4) for v in adapted_f1],
                         "probe": "ridge probe of probe@ (alpha 1, class-weighted), manifest folds"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256, help="transformer width (HuBERT-large: 1024)")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = timing(args)
    results["torch_threads"] = torch.get_num_threads()
    print(f"one epoch, {results['clips']} clips: full encoder {results['full_epoch_s']} s, from cached "
          f"prefix {results['prefix_epoch_s']} s (ratio {results['prefix_epoch_ratio']}); trainable "
          f"{results['trainable_parameters']:,} / {results['total_parameters']:,}")
    results["demo"] = demo(args.artifacts, args.params)
    for name, row in results["demo"].items():
        print(f"demo {name}: {row}")
    summary = {"prefix_epoch_ratio": results["prefix_epoch_ratio"], "trainable_share": results["trainable_share"],
               "full_epoch_s": results["full_epoch_s"], "prefix_epoch_s": results["prefix_epoch_s"],
               "width": args.width, "demo": {k: {m: v[m] for m in ("base_oof_weighted_f1", "adapted_oof_weighted_f1")
                                                  if m in v} or v for k, v in results["demo"].items()}}
    save("adapt", results, summary)


if __name__ == "__main__":
    main()
