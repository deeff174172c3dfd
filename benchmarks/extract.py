"""Extraction throughput: the embed stage (features.embedding.engine via embed_store) vs a MERTools-style loop.

    python benchmarks/extract.py --quick        # CPU, small random models, a few minutes
    python benchmarks/extract.py --precision    # CPU: fp32 vs dtype bfloat16 vs quantize int8 (~10 min)
    python benchmarks/extract.py --gpu          # GPU: HuBERT-large, CLIP ViT-L/14, a 7B decoder
    python benchmarks/extract.py --gpu --dry-run   # the --gpu code path on CPU, tiny models

For each family (speech, vision, text) a model is built from a config with random weights, saved
to a temporary folder and loaded by `load_encoder` exactly as users load theirs. The same clips go
through (1) the MERTools-style loop: batch 1, fp32, one `np.save` per clip, and (2) `embed_store`
(the stage's code: bucketing, mixed precision on GPU, loader workers, background store writes) on
an input store like the stage reads. Model loading is timed apart and not counted for either.
Throughput is reported in audio-seconds/s, images/s and tokens/s; FLOPs are counted analytically
from the model config (matmuls, convs, attention scores) and compared with a measured matmul peak
(bf16 on GPU, fp32 on CPU). Speech durations follow MER2024 (lognormal, mean 4.25 s, median 3.8 s).

--precision (CPU) runs the real widths (HuBERT-large, CLIP ViT-L/14 at 224 px, a Qwen2-0.5B-wide
decoder) at 4 layers, and times the embed stage in float32, `dtype: bfloat16` and `quantize:
int8` against the fp32 loop. Fidelity against the fp32 stage on the same clips: the minimum
cosine similarity of pooled vectors per layer, and the change in a ridge probe's out-of-fold
weighted F1 (models.training.layer_probing, 4 folds) on a class signal planted in the inputs (tone pitch,
face-crop colour, word choice), so the probe has something to find.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, timer  # noqa: E402  (common puts the repo root on sys.path)

from features.embedding.stage import embed_store  # noqa: E402
from features.encoders import EncoderConfig, load_encoder  # noqa: E402
from features.reliability.reports import write_json_atomic  # noqa: E402
from features.storage.store import write_store  # noqa: E402

# (clips, model size) per mode; GPU sizes are the real architectures.
SIZES = {
    "quick": dict(speech=48, vision=48, text=384, frames=4, image=112),
    "cpu": dict(speech=160, vision=120, text=300, frames=4, image=112),
    "gpu": dict(speech=2000, vision=1000, text=4000, frames=8, image=224),
    "precision": dict(speech=40, vision=40, text=120, frames=4, image=224),
    "dry-run": dict(speech=6, vision=6, text=8, frames=2, image=112),
}
CLASSES = 4  # planted in the inputs for the fidelity probe
PRECISIONS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


# ----------------------------------------------------------------------------- models

def build_models(folder: Path, gpu: bool, image: int, big: bool | None = None,
                 layers: int | None = None) -> dict[str, str]:
    """Random-weight speech/vision/text models; `big`: the real widths (default: on GPU),
    `layers`: fewer layers than the real depth (CPU measurements of the real widths)."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, HubertConfig, HubertModel,
                              LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                              Wav2Vec2FeatureExtractor)
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor
    torch.manual_seed(0)
    big = gpu if big is None else big
    deep = {} if layers is None else {"num_hidden_layers": layers}
    conv = dict(conv_dim=(512,) * 7 if big else (64,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                conv_stride=(5, 2, 2, 2, 2, 2, 2), feat_extract_norm="layer", do_stable_layer_norm=True)
    hubert = HubertConfig(hidden_size=1024 if big else 256, num_hidden_layers=24 if big else 4,
                          num_attention_heads=16 if big else 4, intermediate_size=4096 if big else 1024,
                          num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, **conv)
    hubert.update(deep)
    clip = CLIPVisionConfig(image_size=image, patch_size=14 if big else 16, hidden_size=1024 if big else 256,
                            intermediate_size=4096 if big else 1024, num_hidden_layers=24 if big else 4,
                            num_attention_heads=16 if big else 4)
    clip.update(deep)
    llama = LlamaConfig(vocab_size=32000 if big else 1000, hidden_size=4096 if big else 256,
                        intermediate_size=11008 if big else 688, num_hidden_layers=32 if big else 4,
                        num_attention_heads=32 if big else 4, num_key_value_heads=32 if big else 4,
                        max_position_embeddings=2048, eos_token_id=1, bos_token_id=1)
    if big and layers is not None:  # CPU: a Qwen2-0.5B-wide decoder, not a 7B one
        llama.update(dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                          num_key_value_heads=2, **deep))
    paths = {}
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    for name, cls, cfg in (("speech", HubertModel, hubert), ("vision", CLIPVisionModel, clip),
                           ("text", LlamaForCausalLM, llama)):
        with torch.device(device):
            model = cls(cfg).to(dtype)
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
        paths[name] = str(folder / name)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder / "speech")
    CLIPImageProcessor(size={"shortest_edge": image},
                       crop_size={"height": image, "width": image}).save_pretrained(folder / "vision")
    _word_tokenizer(PreTrainedTokenizerFast, llama.vocab_size).save_pretrained(folder / "text")
    return paths


def _word_tokenizer(cls, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *[f"w{i}" for i in range(vocab_size - 2)]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return cls(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


# ----------------------------------------------------------------------------- clips

def make_inputs(folder: Path, sizes: dict, seed: int = 0) -> dict:
    """MER-like inputs in the stores the stage reads; returns {family: (input path, items)}.
    Clip i has class i % CLASSES, planted as a tone's pitch, a crop's colour and word choice
    (`labels_of`)."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(3.81), 0.4675, sizes["speech"]), 0.24, 46.7)
    waves = {f"a{i:05d}": (0.1 * rng.standard_normal(int(s * 16000))
                           + 0.05 * np.sin(2 * np.pi * (150 + 100 * (i % CLASSES))
                                           * np.arange(int(s * 16000)) / 16000)).astype(np.float32)
             for i, s in enumerate(seconds)}
    write_store(folder / "audio", "audio", {}, [(c, w, None, None) for c, w in waves.items()])
    shape = (sizes["frames"], sizes["image"], sizes["image"], 3)
    crops = {f"v{i:05d}": np.clip(rng.normal(80 + 25 * (i % CLASSES), 50, shape)
                                  + 40 * np.eye(3)[i % CLASSES % 3], 0, 255).astype(np.uint8)
             for i in range(sizes["vision"])}
    write_store(folder / "faces", "faces", {}, [(c, x, None, None) for c, x in crops.items()])
    texts = {f"t{i:05d}": " ".join(f"w{j}" for j in rng.integers(200 * (i % CLASSES), 200 * (i % CLASSES) + 300,
                                                                  int(rng.integers(8, 48))))
             for i in range(sizes["text"])}
    write_json_atomic(folder / "transcripts.json", {"asr": {}, "transcripts": {
        c: {"text": t, "source": "csv", "key": c} for c, t in texts.items()}})
    return {"speech": (folder / "audio", waves), "vision": (folder / "faces", crops),
            "text": (folder / "transcripts.json", texts)}


# ----------------------------------------------------------------------------- FLOPs

def flops_per_segment(family: str, cfg, length: int, frames_of=None) -> float:
    """Forward FLOPs of one input: 2 x MACs of matmuls and convs, plus attention scores."""
    d, layers, ffn = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    if family == "speech":
        t, conv, width = length, 0.0, 1
        for dim, k, s in zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride):
            t = (t - k) // s + 1
            conv += 2 * width * dim * k * t
            width = dim
        conv += 2 * t * width * d + 2 * t * d * (d // cfg.num_conv_pos_embedding_groups) * cfg.num_conv_pos_embeddings
        return conv + layers * (2 * t * (4 * d * d + 2 * d * ffn) + 4 * t * t * d)
    if family == "vision":
        t = (cfg.image_size // cfg.patch_size) ** 2 + 1
        patch = 2 * (t - 1) * 3 * cfg.patch_size ** 2 * d
        return length * (patch + layers * (2 * t * (4 * d * d + 2 * d * ffn) + 4 * t * t * d))
    kv = d // cfg.num_attention_heads * cfg.num_key_value_heads
    t = length
    return layers * (2 * t * (2 * d * d + 2 * d * kv + 3 * d * ffn) + 4 * t * t * d)


def total_flops(enc, items: dict) -> float:
    cfg = enc.model.config
    cfg = getattr(cfg, "vision_config", cfg)
    return float(sum(flops_per_segment(enc.family, cfg, s.length)
                     for item in items.values() for s in enc.prepare(item)))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 3.0) -> float:
    """Measured dense matmul rate in TFLOP/s (the best of repeated n x n products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best, stop = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        _sync(device)
        start = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        reps = 10 if device.type == "cuda" else 1
        best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def _free() -> None:
    """Release a model before the next one loads (a 7B fp32 copy would not fit twice)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the two runs

def mertools_loop(cfg: EncoderConfig, items: dict, out: Path) -> dict:
    """Batch 1, fp32, one `.npy` per clip: how MERTools extracts."""
    enc = load_encoder(EncoderConfig(**{**cfg.__dict__, "dtype": "float32", "batch_size": 1}))
    out.mkdir(parents=True, exist_ok=True)
    _sync(enc.device)
    cpu = time.process_time()
    with timer() as t, torch.inference_mode():
        for cid, item in items.items():
            clip = enc.encode([item])[0]
            np.save(out / f"{cid}.npy", clip.pooled)
        _sync(enc.device)
    cpu = time.process_time() - cpu
    flops = total_flops(enc, items)
    del enc
    _free()
    return {"seconds": t["s"], "cpu_seconds": cpu, "flops": flops}


def engine_run(name: str, cfg: EncoderConfig, src: Path, out: Path) -> dict:
    """The embed stage's own code path; model load timed apart and subtracted."""
    with timer() as load:
        enc = load_encoder(cfg)
        enc.weights_hash()
    del enc
    _free()
    cpu = time.process_time()
    with timer() as t:
        embed_store(name, cfg, src, out)
    # CPU seconds of this process (all threads): less sensitive than wall time to other jobs
    # sharing the machine; the stage's model load is in both and subtracted from wall only.
    return {"seconds": t["s"] - load["s"], "load_seconds": load["s"],
            "cpu_seconds": time.process_time() - cpu}


def amount(family: str, enc_items: dict, tokens: int) -> float:
    if family == "speech":
        return sum(len(w) for w in enc_items.values()) / 16000
    if family == "vision":
        return float(sum(len(x) for x in enc_items.values()))
    return float(tokens)


def bench_family(family: str, path: str, src: Path, items: dict, work: Path, gpu: bool,
                 batch: int) -> dict:
    cfg = EncoderConfig(family=family, model=path, pooling={"vision": "cls", "text": "last"}.get(family, "mean"),
                        layers_frames=[-1], dtype="auto", device="cuda" if gpu else "cpu", batch_size=batch)
    loop = mertools_loop(cfg, items, work / f"npy-{family}")
    fast = engine_run(family, cfg, src, work / f"store-{family}")
    tokens = 0
    if family == "text":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        tokens = sum(len(tok(t)["input_ids"]) or 1 for t in items.values())
    units = {"speech": "audio_s", "vision": "images", "text": "tokens"}[family]
    done = amount(family, items, tokens)
    return {"clips": len(items), "unit": units, "amount": done, "batch_size": batch,
            "loop_s": loop["seconds"], "engine_s": fast["seconds"], "load_s": fast["load_seconds"],
            f"loop_{units}_per_s": done / loop["seconds"], f"engine_{units}_per_s": done / fast["seconds"],
            "speedup_vs_loop": loop["seconds"] / fast["seconds"], "flops": loop["flops"],
            "engine_tflops": loop["flops"] / fast["seconds"] / 1e12,
            "loop_tflops": loop["flops"] / loop["seconds"] / 1e12}


def labels_of(items: dict) -> np.ndarray:
    return np.arange(len(items)) % CLASSES  # as make_inputs planted them


def min_cosine_per_layer(a: np.ndarray, b: np.ndarray) -> list[float]:
    """[N, L, D] x2 -> per layer, the smallest cosine similarity over clips."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return [round(float(c), 6) for c in cos.min(axis=0)]


def precision_family(family: str, path: str, src: Path, items: dict, work: Path, batch: int) -> dict:
    """fp32 loop vs the stage in each of PRECISIONS: speed-up and fidelity against stage fp32."""
    from models.training.layer_probing import ProbeConfig, probe_layers
    from features.storage.store import StoreReader

    base = dict(family=family, model=path, pooling={"vision": "cls", "text": "last"}.get(family, "mean"),
                layers_frames=[-1], device="cpu", batch_size=batch, store_dtype="float32")
    loop = mertools_loop(EncoderConfig(**base), items, work / f"npy-{family}")
    runs, pooled = {}, {}
    for name, option in PRECISIONS.items():
        out = work / f"store-{family}-{name}"
        run = engine_run(family, EncoderConfig(**base, **option), src, out)
        with StoreReader(out) as reader:
            pooled[name] = reader.pooled(ids=list(items))  # [N, L, D]
        runs[name] = {"engine_s": run["seconds"], "load_s": run["load_seconds"],
                      "engine_cpu_s": run["cpu_seconds"],
                      "speedup_vs_loop": loop["seconds"] / run["seconds"],
                      "cpu_speedup_vs_loop": loop["cpu_seconds"] / run["cpu_seconds"]}
    labels = labels_of(items)
    folds = (np.arange(len(labels)) // CLASSES) % 4  # every fold holds every class
    probe = ProbeConfig(featurizer=False)
    f1 = {name: probe_layers(p, labels, folds, probe).weighted_f1 for name, p in pooled.items()}
    for name, run in runs.items():
        run.update(min_cosine_per_layer=min_cosine_per_layer(pooled[name], pooled["float32"]),
                   probe_wf1_per_layer=[round(float(v), 4) for v in f1[name]],
                   probe_wf1_delta_last=round(float(f1[name][-1] - f1["float32"][-1]), 4),
                   probe_wf1_delta_best=round(float(max(f1[name]) - max(f1["float32"])), 4))
        run["min_cosine"] = min(run["min_cosine_per_layer"])
    return {"clips": len(items), "batch_size": batch, "loop_s": loop["seconds"],
            "loop_cpu_s": loop["cpu_seconds"], "runs": runs}


def _rate(r: dict) -> str:
    unit = r["unit"]
    return f"{r['engine_' + unit + '_per_s']:.1f} {unit}/s"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU, few clips, small models (< 10 min)")
    mode.add_argument("--precision", action="store_true",
                      help="CPU: float32 vs bfloat16 vs int8, real widths at 4 layers, fidelity")
    mode.add_argument("--gpu", action="store_true", help="real architectures on a CUDA GPU")
    p.add_argument("--dry-run", action="store_true",
                   help="with --gpu: its code path on CPU with tiny models, to check it runs")
    p.add_argument("--families", default="speech,vision,text")
    p.add_argument("--clips", type=int, default=None, help="clips per family (default: per mode)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.dry_run and not args.gpu:
        p.error("--dry-run goes with --gpu")
    gpu = args.gpu and not args.dry_run
    if gpu and not torch.cuda.is_available():
        sys.exit("benchmarks/extract.py --gpu: no CUDA device is visible (torch.cuda.is_available() "
                 "is False), so there is nothing to measure. Run it on a GPU machine with a CUDA "
                 "build of torch (`make setup TORCH_SPEC=torch`), or --gpu --dry-run to check the "
                 "code path here.")
    size_name = "dry-run" if args.dry_run else "gpu" if gpu else "precision" if args.precision \
        else "quick" if args.quick else "cpu"
    sizes = SIZES[size_name]
    if args.clips:
        sizes = {**sizes, "speech": args.clips, "vision": args.clips, "text": args.clips}
    # GPU: params.mer2024.yaml's sizes; CPU: params.yaml's demo profile (text 16, others 8).
    batch = {"speech": 32, "vision": 32, "text": 32} if args.gpu else {"speech": 8, "vision": 8, "text": 16}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-extract-"))
    start = time.perf_counter()
    try:
        paths = build_models(work / "models", gpu, sizes["image"], big=True if args.precision else None,
                             layers=4 if args.precision else None)
        inputs = make_inputs(work / "inputs", sizes)
        device = torch.device("cuda" if gpu else "cpu")
        peak_dtype = torch.bfloat16 if args.gpu else torch.float32
        peak = matmul_peak(device, peak_dtype, 8192 if gpu else 256 if args.dry_run else 1024)
        results = {"mode": size_name, "sizes": sizes, "peak_tflops": peak, "peak_dtype": str(peak_dtype)[6:],
                   "families": {}}
        for family in args.families.split(","):
            src, items = inputs[family]
            if args.precision:
                r = precision_family(family, paths[family], src, items, work, batch[family])
            else:
                r = bench_family(family, paths[family], src, items, work, gpu, batch[family])
                r["fraction_of_peak"] = r["engine_tflops"] / peak
            results["families"][family] = r
            print(json.dumps({family: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}}),
                  file=sys.stderr)
        if gpu:
            results["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - start
    if args.dry_run:  # a check that the code runs: its numbers are not results
        print(json.dumps(summarise(results)))
        return
    save("extract", results, summarise(results))


def summarise(results: dict) -> dict:
    fam = results["families"]
    if results["mode"] == "precision":
        return {"mode": "precision", "wall_s": round(results["wall_s"]), "speedup_vs_fp32_loop": {
            f: {n: round(run["speedup_vs_loop"], 2) for n, run in r["runs"].items()} for f, r in fam.items()},
            "min_cosine": {f: {n: run["min_cosine"] for n, run in r["runs"].items()} for f, r in fam.items()},
            "probe_wf1_delta_last": {f: {n: run["probe_wf1_delta_last"] for n, run in r["runs"].items()}
                                     for f, r in fam.items()}}
    return {"mode": results["mode"], "wall_s": round(results["wall_s"]),
            "speedup_vs_loop": {f: round(r["speedup_vs_loop"], 2) for f, r in fam.items()},
            "throughput": {f: _rate(r) for f, r in fam.items()},
            "achieved_tflops": {f: round(r["engine_tflops"], 3) for f, r in fam.items()},
            "fraction_of_peak": {f: round(r["fraction_of_peak"], 3) for f, r in fam.items()},
            "peak_tflops": round(results["peak_tflops"], 3), "peak_dtype": results["peak_dtype"]}


if __name__ == "__main__":
    main()
