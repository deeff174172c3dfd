"""Keys before weights: a rerun over fully cached stores loads no model (loaders that fail if
called), and any change to a fingerprint's sources loads again (a stale memo would be a wrong hit)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_fingerprints import _bert

import features.cache.keys
import features.encoders
from features.cache import versions
import features.audio.stages
from features.audio.denoise import DenoiseConfig
from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
from features.audio.stages import denoise_audio
from features.reliability.reports import write_json_atomic
from features.storage.store import StoreReader, StoreUpdate

ROOT = Path(__file__).resolve().parents[3]


def _transcripts(path, texts):
    write_json_atomic(path, {"asr": {}, "transcripts": {
        cid: {"text": t, "source": "csv", "key": f"k-{cid}-{t}"} for cid, t in texts.items()}})


@pytest.fixture
def text_setup(tmp_path):
    src = tmp_path / "transcripts.json"
    _transcripts(src, {"a": "i am so happy", "b": "why is this sad", "c": "angry today"})
    return tmp_path, src, EncoderConfig(family="text", model=str(_bert(tmp_path / "bert")))


def _no_loading(monkeypatch):
    def refuse(cfg):
        raise AssertionError("a model was loaded although every clip is cached")
    monkeypatch.setattr(features.encoders, "load_encoder", refuse)


def _keys(store):
    with StoreReader(store) as s:
        return dict(s.keys)


def test_cached_embed_rerun_loads_no_model(text_setup, monkeypatch, capsys):
    tmp_path, src, cfg = text_setup
    out = tmp_path / "store"
    embed_store("t", cfg, src, out)
    before = _keys(out)
    _no_loading(monkeypatch)
    embed_store("t", cfg, src, out)  # everything cached: no load
    assert "no model loaded" in capsys.readouterr().out and _keys(out) == before
    # A removed clip and a layout change need no model either.
    _transcripts(src, {"a": "i am so happy", "b": "why is this sad"})
    embed_store("t", EncoderConfig(**{**vars(cfg), "compression": "gzip"}), src, out)
    assert _keys(out) == {k: before[k] for k in "ab"}
    # A new clip needs the model.
    _transcripts(src, {"a": "i am so happy", "b": "why is this sad", "d": "new"})
    with pytest.raises(AssertionError, match="a model was loaded"):
        embed_store("t", cfg, src, out)


@pytest.mark.parametrize("change", ["weights", "setting", "code"])
def test_changed_sources_load_again(text_setup, monkeypatch, change):
    tmp_path, src, cfg = text_setup
    out = tmp_path / "store"
    embed_store("t", cfg, src, out)
    if change == "weights":  # a retrained checkpoint copied over, same path and config
        other = _bert(tmp_path / "other", seed=1)
        shutil.copy(other / "model.safetensors", Path(cfg.model) / "model.safetensors")
    elif change == "setting":
        cfg = EncoderConfig(**{**vars(cfg), "pooling": "cls"})
    else:  # the code that computes the fingerprint changed (an edit to the text encoder's module)
        real = features.cache.keys.sha256_file
        text_module = str(versions.module_file("features.encoders.text"))
        monkeypatch.setattr(features.cache.keys, "sha256_file",
                            lambda p: "edited" if str(p) == text_module else real(p))
    _no_loading(monkeypatch)
    with pytest.raises(AssertionError, match="a model was loaded"):
        embed_store("t", cfg, src, out)


def test_cached_rerun_does_not_import_torch(text_setup):
    """The fully cached path of the stage's own function never imports torch (~3 s here)."""
    tmp_path, src, cfg = text_setup
    embed_store("t", cfg, src, tmp_path / "store")
    code = (f"import sys, json; from features.embedding.stage import embed_store; "
            f"from features.encoders import EncoderConfig; "
            f"embed_store('t', EncoderConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]); "
            f"print('TORCH', 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, json.dumps(vars(cfg)), str(src),
                          str(tmp_path / "store")], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "TORCH False" in run.stdout and "no model loaded" in run.stdout


def _audio_store(path, n=3):
    rng = np.random.default_rng(0)
    wanted = {f"c{i}": f"key{i}" for i in range(n)}
    with StoreUpdate(path, "audio", {"sample_rate": 16000}, wanted) as up:
        for cid in up.todo:
            up.add(cid, rng.standard_normal(1600).astype(np.float32), attrs={"sample_rate": 16000})


def test_cached_denoise_rerun_loads_no_denoiser(tmp_path, monkeypatch):
    _audio_store(tmp_path / "audio")
    made = []
    real = features.audio.stages.make_denoiser
    monkeypatch.setattr(features.audio.stages, "make_denoiser", lambda cfg: made.append(cfg) or real(cfg))
    cfg = DenoiseConfig(backend="none")
    denoise_audio(tmp_path / "audio", cfg, tmp_path / "out")
    store = tmp_path / "out" / features.audio.stages.DENOISED_DIR
    before = _keys(store)
    denoise_audio(tmp_path / "audio", cfg, tmp_path / "out")
    assert len(made) == 1 and _keys(store) == before  # the rerun made no denoiser
    shutil.rmtree(tmp_path / "audio")
    _audio_store(tmp_path / "audio", n=4)  # one new clip: the denoiser is needed again
    denoise_audio(tmp_path / "audio", cfg, tmp_path / "out")
    assert len(made) == 2 and set(_keys(store)) == {"c0", "c1", "c2", "c3"}
