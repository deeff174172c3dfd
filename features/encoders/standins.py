"""Random-weight stand-ins of the real speech and vision encoders, for demos and tests.

`build_standins` builds SMALL models of the real architectures (HuBERT with hubert-large's conv
layout and layer-norm front end; a CLIP vision tower) from configs with a fixed seed, and saves
them as safetensors with their preprocessor configs, so `load_encoder` loads them exactly like a
user's real model folder. Their weights are RANDOM: features from them carry no meaning; they
exist so the pipeline runs end to end without downloading real weights.

The `standins` stage (stages/standins.py, `mer standins`) builds them into artifacts/standins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2FeatureExtractor,
)

try:  # transformers 5 without torchvision: the PIL backend (only its config is saved here)
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

from features.cache import versions  # noqa: E402

MARKER = "standin.json"


@dataclass
class StandinsConfig:
    """params.yaml `standins`."""
    seed: int = 0  # torch seed of the random weights


def build_hubert(out: Path) -> None:
    """HuBERT-large layout (7 conv layers, stride 320, layer norm, stable layer norm), tiny widths."""
    config = HubertConfig(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=192,
        conv_dim=(64,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
    )
    HubertModel(config).save_pretrained(out, safe_serialization=True)
    # hubert-large's extractor: per-clip normalisation, attention mask for padded batches.
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(out)


def build_clip(out: Path) -> None:
    """CLIP ViT vision tower at 112 px (the face crop size), patch 16, tiny widths."""
    config = CLIPVisionConfig(
        image_size=112,
        patch_size=16,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        projection_dim=96,
    )
    CLIPVisionModel(config).save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112}).save_pretrained(
        out
    )


STANDINS: dict[str, Callable[[Path], None]] = {"hubert-standin": build_hubert, "clip-standin": build_clip}


def build_standins(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Build (or reuse) every stand-in under `out_dir`; returns {name: folder}.

    A folder whose marker matches (name, seed, version) is kept as is; anything else is rebuilt
    in a temporary folder and moved into place, so an interrupted build never looks finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in STANDINS.items():
        folder = out_dir / name
        # the builder's source hash, not a hand-bumped number: any edit rebuilds
        marker = {"name": name, "seed": seed, "version": versions.module_version(__name__),
                  "random_weights": True}
        if not _matches(folder, marker):
            _build(folder, build, seed, marker)
        paths[name] = str(folder)
    return paths


def _matches(folder: Path, marker: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _build(folder: Path, build: Callable[[Path], None], seed: int, marker: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        torch.manual_seed(seed)
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

