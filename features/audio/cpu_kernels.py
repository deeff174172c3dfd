"""The same CTranslate2 (faster-whisper) transcripts on every x86 CPU: pin the kernels it picks.

Per machine, CTranslate2 picks an ISA for its own kernels (AVX512 on Intel CPUs, AVX2 on AMD), a
GEMM library (Intel MKL on Intel CPUs, oneDNN elsewhere), and oneDNN picks its own ISA (AVX512-VNNI
int8 kernels where the CPU has them). int8 results differ between these: on the demo, 38 of 108
Whisper tiny.en transcripts changed when oneDNN was capped at AVX2 on one AMD CPU
(benchmarks/asr_isa.py), and text features follow transcripts. `pin_ctranslate2("AVX2")` sets all
three to one choice that every x86-64 CPU since 2013 supports, before CTranslate2 is loaded.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from features.errors import ConfigError

# asr.cpu_isa -> (CPU flag it needs, oneDNN's name for the same ceiling)
ISAS = {"AVX2": ("avx2", "AVX2"), "AVX": ("avx", "AVX"), "GENERIC": (None, "SSE41")}


def pin_ctranslate2(isa: str) -> dict[str, str]:
    """Set the variables CTranslate2 and oneDNN read at start-up; returns what was set ({} where
    nothing applies: `isa` is "" (each machine's fastest), or the CPU is not x86)."""
    if not isa or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return {}
    if isa not in ISAS:
        raise ConfigError(f"asr.cpu_isa {isa!r} is unknown; use one of {sorted(ISAS)} or \"\".")
    flag, onednn = ISAS[isa]
    if flag and flag not in _cpu_flags():
        raise ConfigError(f"asr.cpu_isa {isa}: this CPU has no {flag.upper()}; set asr.cpu_isa to "
                          f"a lower one ({', '.join(ISAS)}), or \"\" (transcripts may then differ "
                          "from other machines).")
    pins = {"CT2_FORCE_CPU_ISA": isa, "CT2_USE_MKL": "0", "ONEDNN_MAX_CPU_ISA": onednn,
            "DNNL_MAX_CPU_ISA": onednn}
    if "ctranslate2" in sys.modules and any(os.environ.get(k) != v for k, v in pins.items()):
        raise ConfigError(f"asr.cpu_isa {isa}: CTranslate2 was already loaded in this process with "
                          "other kernel settings; run ASR in its own process (`mer asr`).")
    os.environ.update(pins)
    return pins


def _cpu_flags() -> set[str]:
    """Linux /proc/cpuinfo flags; elsewhere unknown, so assumed present."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"avx", "avx2"}
