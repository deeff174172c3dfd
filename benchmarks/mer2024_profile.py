"""The MER2024 profile (params.mer2024.yaml), exercised on CPU with its real encoder architectures.

    python benchmarks/mer2024_profile.py [--clips 3] [--llm-width 256] [--encoders hubert,clip,llm]

What a user does with the profile is edit ids and paths only. This script does the same to a copy:
model folders become random-weight models built here from configs (HuBERT-large: 24 layers,
1024 wide, conv 512; CLIP ViT-L/14: 24 layers, 1024 wide, 224 px; a Qwen2 decoder with
Qwen2.5-7B's depth (28 layers: the profile keeps frames of its layer 24) at --llm-width wide and
a small word-level vocabulary, since 7B parameters do not fit this CPU run), input paths become
scratch stores, and `device: cuda` becomes `cpu` (`dtype: auto` then resolves to float32). Then:

1. every section is built through the config class its stage uses (prepare, audio, denoise,
   asr, faces, embed.encoders.*, probe, train with every head, ensemble.*, evaluate): a user
   who edits only ids/paths meets no config error;
2. each encoder runs through the embed stage's own entry (`python -m stages.embed NAME`, in a
   scratch project holding the edited params.yaml) on --clips synthetic clips (audio of MER
   lengths, face crops of the profile's size, transcripts), one process per encoder;
3. each store is checked for the architecture's layer count and width; wall time and peak RSS
   (`/usr/bin/time`) of each process are recorded.

Not run here: denoise (MossFormer2 weights cannot be built locally), asr (faster-whisper
large-v3), and the heads on so few clips; their configs are checked in step 1.
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

from features.reports import write_json_atomic  # noqa: E402
from features.store import StoreReader, write_store  # noqa: E402

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
    from features.asr import AsrConfig
    from features.config import from_section
    from features.denoise import DenoiseConfig
    from features.encoders import EncoderConfig
    from features.extract import AudioConfig
    from features.faces import FacesConfig
    from features.manifest import PrepareConfig
    from models.config import EvaluateConfig, train_config
    from models.ensemble import EnsembleConfig
    from models.probing import ProbeConfig

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=3)
    p.add_argument("--llm-width", type=int, default=256)
    p.add_argument("--encoders", default="hubert,clip,llm", help="which encoders to run")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mer2024-profile-", dir=args.workdir))
    start = time.perf_counter()
    try:
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
    finally:
        shutil.rmtree(work, ignore_errors=True)
    expected = {**EXPECTED, "llm": (29, args.llm_width)}
    for name, r in encoders.items():
        r["expected_layers_dim"] = list(expected[name])
        if (r["layers"], r["dim"]) != expected[name] or r["clips"] != args.clips:
            raise RuntimeError(f"{name}: store holds {r['clips']} clips x {r['layers']} x {r['dim']}, "
                               f"expected {args.clips} x {expected[name]}")
    results = {"clips": args.clips, "llm_width": args.llm_width, "configs_built": built,
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
