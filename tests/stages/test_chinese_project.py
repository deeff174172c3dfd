"""A tiny MER2024-like project in Chinese (issue 25): MER's transcript CSV through the `asr` stage
(the `chinese` column, chosen by `asr.language: zh`, wins over ASR), the text encoders (a Chinese
BERT and the profile's `llm` causal LM) and a head, by calling the stage functions directly."""
from pathlib import Path

import numpy as np
import pytest
import yaml

from features.audio.asr import AsrConfig
from features.audio.stages import read_transcripts, transcribe_audio
from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
from features.media.manifest import Clip, write_manifest
from features.params import from_section
from features.storage.store import StoreReader, write_store
from models.evaluation.metrics import compute_metrics
from models.training.bundles import labelled_probs
from models.training.stage import train_head
from models.training.train_config import CLASSES, train_config
from tiny_chinese import SENTENCES, chinese_bert, chinese_llama

ROOT = Path(__file__).resolve().parents[2]
PROFILE = yaml.safe_load((ROOT / "params.mer2024.yaml").read_text())
ENGLISH = {"neutral": "I am watching TV", "angry": "You went too far", "happy": "I am so happy",
           "sad": "I am very sad", "worried": "I worry about him", "surprise": "I never expected it"}
PER_CLASS = 4


def _clips() -> list[tuple[str, str]]:
    labels = [label for label in CLASSES for _ in range(PER_CLASS)]
    return [(f"sample_{i:08d}", label) for i, label in enumerate(labels, 1)]


def _mer_csv(path: Path, clips) -> Path:
    """MER2024's transcription.csv layout (name,chinese,english), saved by Excel as UTF-8 with a BOM."""
    rows = ["name,chinese,english"] + [f"{c},{SENTENCES[y]},{ENGLISH[y]}" for c, y in clips]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    return path


def _encoder(section: dict, model: str, transcripts: Path) -> EncoderConfig:
    """A profile text encoder moved to this CPU and a tiny model."""
    cfg = {**section, "model": model, "input": str(transcripts), "device": "cpu", "dtype": "float32",
           "layers_frames": [-1], "batch_size": 8}
    return from_section(EncoderConfig, cfg, "embed.encoders")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    d = tmp_path_factory.mktemp("zh_project")
    clips = _clips()
    audio = write_store(d / "audio", "audio", {"sample_rate": 16000},
                        [(c, np.zeros(1600, np.float32), {}, None) for c, _ in clips])
    # The MER2024 profile's asr section as it is (large-v3 on cuda: never loaded, the CSV has every clip)
    section = {**PROFILE["asr"], "transcripts_csv": str(_mer_csv(d / "t.csv", clips))}
    asr = from_section(AsrConfig, section, "asr")
    transcripts = transcribe_audio(audio, asr, d / "asr")
    features = d / "features"
    llm = _encoder(PROFILE["embed"]["encoders"]["llm"], chinese_llama(d / "llama"), transcripts)
    bert = _encoder({"family": "text", "pooling": "mean"}, chinese_bert(d / "bert"), transcripts)
    for name, cfg in (("llm", llm), ("bert", bert)):
        embed_store(name, cfg, transcripts, features / name)
    manifest = d / "manifest.csv"
    write_manifest(manifest, [Clip(c, f"video/{c}.mp4", 1, "0" * 64, 1.0, y, i % 2, "labelled")
                              for i, (c, y) in enumerate(clips)])
    return {"dir": d, "asr": asr, "transcripts": transcripts, "features": features, "manifest": manifest}


def test_the_chinese_column_wins_over_asr(project):
    assert project["asr"].language == "zh" and project["asr"].enhance.rewrite.language == "zh"
    texts = read_transcripts(project["transcripts"])
    assert {c: t["text"] for c, t in texts.items()} == {c: SENTENCES[y] for c, y in _clips()}
    assert {t["source"] for t in texts.values()} == {"csv"}


def test_text_encoders_and_a_head_run_on_the_chinese_transcripts(project):
    for name in ("llm", "bert"):
        with StoreReader(project["features"] / name, kind="embedding") as store:
            assert len(store) == len(_clips())
    cfg = train_config({"seed": 0, "threads": 1, "heads": {
        "attention": {"type": "attention", "features": ["llm", "bert"], "layer": -1, "hidden": 16,
                      "epochs": 200, "batch_size": 8}}})
    out = train_head("attention", cfg.heads["attention"], cfg, project["manifest"], project["features"],
                     project["dir"] / "heads/attention", probe_dir=project["dir"] / "probe")
    y, probs = labelled_probs(out / "predictions.csv")
    assert len(y) == len(_clips())
    # Each class says its own sentence: the head separates them out of fold. Were the characters
    # unknown tokens, every five-character sentence would look alike and the head would be at chance.
    assert compute_metrics(y, probs)["weighted_f1"] > 0.8
