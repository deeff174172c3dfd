"""Benchmark: full k-fold training of every head type, LightGBM, and probing all 25 layers, at
MER2024 size on CPU, from synthetic cached features written through the real store API.

    python benchmarks/heads.py [--clips 5030] [--frames 24] [--skip-frames] [--keep DIR]

Three encoders (hubert, clip, llm) with pooled [25, 1024] vectors for 5,030 labelled clips in
MER2024's class proportions (fp16 in the store, as `embed` writes them); a class signal is put
in layers 14-20 of each so the numbers mean something. Frame-level states are kept for one
layer ([1, T, 1024] per clip; T defaults to 24 frames instead of ~210 for a 4 s HuBERT clip, to
keep the temporary store small: the frame heads segment-pool every clip to `max_frames` (8) as
they load it, so T changes only the read time). Every head runs through the stage function
`models.training.stage.train_head` (store read + k-fold + predictions), on the manifest's 5 folds, with the
settings of the MER2024 profile (`params.mer2024.yaml` train.heads, on CPU), `layer: best` read
from the probe outputs made here.
Targets (issue 5): every head under 60 s; all-layer probing of one encoder under 60 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, save, timer  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from features.media.manifest import CLASSES, Clip, assign_folds, write_manifest  # noqa: E402
from features.storage.store import StoreUpdate, clip_key  # noqa: E402
from models.heads import registry  # noqa: E402
from models.training.bundles import PREDICTIONS, read_predictions  # noqa: E402
from models.training.train_config import train_config  # noqa: E402
from models.evaluation.metrics import compute_metrics  # noqa: E402
from models.training.layer_probing import ProbeConfig, probe_encoder  # noqa: E402
from models.training.stage import train_head  # noqa: E402

COUNTS = {"neutral": 1248, "angry": 1208, "happy": 1038, "sad": 730, "worried": 616,
          "surprise": 190}  # MER2024 labelled set
ENCODERS = ("hubert", "clip", "llm")
LAYERS, DIM = 25, 1024
SIGNAL_LAYERS = range(14, 21)


def make_data(root: Path, n: int, frames: int, seed: int = 0) -> Path:
    """manifest.csv + one embedding store per encoder under root; returns the features folder."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(CLASSES)), [COUNTS[c] for c in CLASSES])
    labels = rng.permutation(labels)[:n] if n < len(labels) else rng.permutation(labels)
    folds = assign_folds([CLASSES[i] for i in labels], 5, seed)
    clips = [Clip(f"clip_{i:05d}", f"v/clip_{i:05d}.mp4", 1, "0", 4.25, CLASSES[t], int(f),
                  "labelled") for i, (t, f) in enumerate(zip(labels, folds))]
    write_manifest(root / "manifest.csv", clips)
    for e, name in enumerate(ENCODERS):
        centroids = rng.normal(size=(len(CLASSES), DIM)).astype(np.float32)
        strength = np.zeros(LAYERS, np.float32)
        strength[list(SIGNAL_LAYERS)] = 0.05 * np.hanning(len(SIGNAL_LAYERS) + 2)[1:-1] * (1 + e / 2)
        meta = {"encoder": name, "num_layers": LAYERS, "layers_frames": [-1] if frames else []}
        wanted = {c.clip_id: clip_key(name, c.clip_id) for c in clips}
        pooled = rng.standard_normal((n, LAYERS, DIM), dtype=np.float32)
        pooled += strength[None, :, None] * centroids[labels][:, None, :]
        pooled = pooled.astype(np.float16)
        fr = None
        if frames:
            fr = rng.standard_normal((n, 1, frames, DIM), dtype=np.float32)
            fr = (fr + 0.1 * centroids[labels][:, None, None, :]).astype(np.float16)
        with StoreUpdate(root / "features" / name, "embedding", meta, wanted) as up:
            for i, c in enumerate(clips):
                up.add(c.clip_id, None if fr is None else fr[i], pooled=pooled[i])
        del pooled, fr
    return root / "features"


def head_specs(frames: bool) -> dict[str, dict]:
    """The heads of the MER2024 profile (params.mer2024.yaml `train.heads`), run on CPU."""
    heads = yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())["train"]["heads"]
    return {name: spec for name, spec in heads.items()
            if frames or registry.get(spec["type"]).inputs != "frames"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=sum(COUNTS.values()))
    p.add_argument("--frames", type=int, default=24, help="frames per clip in the frame store")
    p.add_argument("--skip-frames", action="store_true")
    p.add_argument("--only", default="", help="comma-separated head names (default: all)")
    p.add_argument("--keep", default="", help="build the data here and keep it")
    args = p.parse_args()
    frames = 0 if args.skip_frames else args.frames
    tmp = tempfile.TemporaryDirectory(prefix="mer-bench-heads-") if not args.keep else None
    root = Path(args.keep or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    with timer() as t_data:
        features = make_data(root, args.clips, frames)
    print(f"synthetic stores: {args.clips} clips x {len(ENCODERS)} encoders x {LAYERS} x {DIM} "
          f"(+ frames T={frames}) in {t_data['s']:.1f} s", file=sys.stderr)
    results: dict[str, dict] = {}
    probe_cfg = ProbeConfig()
    with timer() as t_probe:
        best = probe_encoder("hubert", root / "manifest.csv", features / "hubert",
                             root / "probe" / "hubert", probe_cfg)
    ridge_only = ProbeConfig(featurizer=False)
    with timer() as t_ridge:
        probe_encoder("hubert", root / "manifest.csv", features / "hubert",
                      root / "probe" / "hubert_ridge", ridge_only)
    for name in ENCODERS[1:]:  # `layer: best` of the profile's heads reads every encoder's probe
        probe_encoder(name, root / "manifest.csv", features / name, root / "probe" / name,
                      ridge_only)
    results["probe_all_layers"] = {"s": round(t_probe["s"], 2), "ridge_only_s": round(t_ridge["s"], 2),
                                   "best_layer": best["best_layer"],
                                   "weighted_f1": best["weighted_f1"],
                                   "featurizer_weighted_f1": best["featurizer_weighted_f1"],
                                   "signal_layers": list(SIGNAL_LAYERS)}
    print(f"probe 25 layers: {t_probe['s']:.1f} s (ridge alone {t_ridge['s']:.1f} s), best layer "
          f"{best['best_layer']}", file=sys.stderr, flush=True)
    specs = head_specs(bool(frames))
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only.split(",")}
    train_cfg = train_config({"seed": 0, "device": "cpu"})
    for name, spec in specs.items():
        cfg = registry.head_config(spec, f"bench.{name}")
        out = root / "heads" / name
        with timer() as t:
            train_head(name, cfg, train_cfg, root / "manifest.csv", features, out,
                       probe_dir=root / "probe")
        rows = [r for r in read_predictions(out / PREDICTIONS) if r["split"] == "labelled"]
        y = np.array([CLASSES.index(r["label"]) for r in rows])
        wf1 = compute_metrics(y, np.array([[float(r[c]) for c in CLASSES] for r in rows]))
        results[name] = {"fit_s": round(t["s"], 2), "weighted_f1": wf1["weighted_f1"],
                         "config": spec}
        print(f"{name:<18} {t['s']:7.1f} s  wF1 {wf1['weighted_f1']:.4f}  "
              f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    print_table(results, t_probe["s"], t_ridge["s"], best)
    fits = {k: v["fit_s"] for k, v in results.items() if "fit_s" in v}
    summary = {"max_head_fit_s": max(fits.values()) if fits else None,
               "slowest_head": max(fits, key=fits.get) if fits else None,
               "probe_all_layers_s": round(t_probe["s"], 2),
               "clips": args.clips, "threads": int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
               "load_1min": round(os.getloadavg()[0], 2)}
    save("heads", results, summary)
    if tmp is not None:
        tmp.cleanup()


def print_table(results: dict, probe_s: float, ridge_s: float, best: dict) -> None:
    print(f"\n{'head':<18} {'k-fold s':>9} {'wF1':>7}  (5 folds, {LAYERS}x{DIM} pooled, CPU)")
    for name, r in results.items():
        if "fit_s" in r:
            print(f"{name:<18} {r['fit_s']:>9.1f} {r['weighted_f1']:>7.4f}")
    print(f"{'probe 25 layers':<18} {probe_s:>9.1f} {best['weighted_f1']:>7.4f}  best layer "
          f"{best['best_layer']} (signal in {SIGNAL_LAYERS.start}-{SIGNAL_LAYERS.stop - 1}); "
          f"ridge per layer alone {ridge_s:.1f} s; learnt weighting wF1 "
          f"{best['featurizer_weighted_f1']}")
    print(f"load average (1 min) {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
