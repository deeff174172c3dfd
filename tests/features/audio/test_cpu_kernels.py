"""asr.cpu_isa pins CTranslate2's kernel choices, whatever the machine (or its environment) would pick."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from features.audio import cpu_kernels
from features.audio.asr import AsrConfig
from features.errors import ConfigError
from features.audio.stages import asr_fingerprint

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def env(monkeypatch):
    fake = {"PATH": os.environ.get("PATH", "")}
    monkeypatch.setattr(cpu_kernels.os, "environ", fake)
    monkeypatch.delitem(sys.modules, "ctranslate2", raising=False)
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    return fake


def test_pin_sets_every_choice_and_checks_the_cpu(env, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"sse4_2", "avx", "avx2"})
    assert cpu_kernels.pin_ctranslate2("") == {} and "CT2_FORCE_CPU_ISA" not in env
    pins = cpu_kernels.pin_ctranslate2("AVX2")
    assert env["CT2_FORCE_CPU_ISA"] == "AVX2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert env["CT2_USE_MKL"] == "0" and pins["CT2_USE_MKL"] == "0"
    with pytest.raises(ConfigError, match="'AVX3'"):
        cpu_kernels.pin_ctranslate2("AVX3")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"sse4_2", "avx"})
    with pytest.raises(ConfigError, match="no AVX2"):
        cpu_kernels.pin_ctranslate2("AVX2")
    assert cpu_kernels.pin_ctranslate2("GENERIC")["ONEDNN_MAX_CPU_ISA"] == "SSE41"


def test_pin_refuses_an_already_loaded_ctranslate2(env, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", object())
    with pytest.raises(ConfigError, match="already loaded"):
        cpu_kernels.pin_ctranslate2("GENERIC")


def test_cpu_isa_is_part_of_the_asr_cache_key():
    assert asr_fingerprint(AsrConfig()) != asr_fingerprint(AsrConfig(cpu_isa=""))


CHILD = """
import json, sys
from features.audio.asr import AsrConfig, make_transcriber
from features.media.ffmpeg import load_audio
t = make_transcriber(AsrConfig(cpu_isa=sys.argv[1]))
print(json.dumps([t.transcribe(load_audio(p, "c"), "c") for p in sys.argv[2:]]))
"""


@pytest.mark.slow
def test_pinned_asr_ignores_what_the_machine_would_pick():
    """An environment that asks for Intel's choices (MKL, AVX512 kernels, VNNI int8) changes
    nothing once asr.cpu_isa is set: the same kernels are selected and the same text comes out."""
    clips = sorted((ROOT / "data/demo/video").glob("*.mp4"))[:1]
    intel_like = {"CT2_USE_MKL": "1", "CT2_FORCE_CPU_ISA": "AVX512",
                  "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
    if "avx512f" not in cpu_kernels._cpu_flags():
        intel_like["CT2_FORCE_CPU_ISA"] = "AVX2"  # forcing an ISA the CPU lacks would crash it
    runs = {}
    for name, extra in (("plain", {}), ("intel_like", intel_like)):
        env = {**os.environ, **extra, "CT2_VERBOSE": "1", "ONEDNN_VERBOSE": "1",
               "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-c", CHILD, "AVX2", *map(str, clips)], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Selected ISA: AVX2" in done.stderr and "Use Intel MKL: false" in done.stderr
        assert "cpu,isa:Intel AVX2\n" in done.stdout  # oneDNN's own choice (AVX2, not -VNNI)
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["plain"] == runs["intel_like"] and all(runs["plain"])
