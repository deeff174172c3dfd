"""Peak memory of decoding one long clip's audio: chunked reads (features.media.ffmpeg.load_audio) against
reading the whole pipe first (what load_audio did before: communicate(), then a float32 copy).

    python benchmarks/audio_decode.py [--minutes 30]

Each method runs in a fresh process; the number is its peak RSS minus its RSS before decoding.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from common import save, timer


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(method: str, path: str, seconds: float) -> None:
    import numpy as np

    from features.media.ffmpeg import ffmpeg_exe, load_audio

    before = _rss_mb()
    with timer() as t:
        if method == "chunked":
            wav = load_audio(path, "long", 16000, expected_s=seconds)
        else:  # the pre-issue-14 code path, kept here as the baseline
            cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", path, "-map", "0:a:0", "-f", "f32le",
                   "-acodec", "pcm_f32le", "-ac", "1", "-ar", "16000", "pipe:"]
            raw = subprocess.run(cmd, capture_output=True, check=True).stdout
            wav = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    print(json.dumps({"peak_mb": round(_rss_mb() - before, 1), "seconds": round(t["s"], 2),
                      "samples": int(wav.size), "output_mb": round(wav.nbytes / 2**20, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], float(args.child[2]))
    from features.media.ffmpeg import ffmpeg_exe

    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.m4a"
        subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                        f"sine=frequency=220:sample_rate=44100:duration={seconds}", "-c:a", "aac",
                        str(path)], check=True)
        results = {}
        for method in ("whole_pipe", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(path),
                                  str(seconds)], capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{method}: {results[method]}")
    ratio = results["chunked"]["peak_mb"] / max(results["whole_pipe"]["peak_mb"], 1e-9)
    save("audio_decode", {"minutes": args.minutes, **results},
         {"minutes": args.minutes, "output_mb": results["chunked"]["output_mb"],
          "whole_pipe_peak_mb": results["whole_pipe"]["peak_mb"],
          "chunked_peak_mb": results["chunked"]["peak_mb"], "peak_ratio": round(ratio, 2)})


if __name__ == "__main__":
    main()
