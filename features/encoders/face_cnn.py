"""A small FER2013-trained face-expression CNN as a vision-family encoder (EmotionViT's role in paper 002).

The weights are the state dict `what-the-face-classification` ships (`active_model.pth`: three
3x3 conv + tanh + 2x2 max-pool blocks on 48x48 grey faces, then fc 2000 -> 304 -> 7 classes).
The network is rebuilt here from the state dict's shapes, so the package (whose inference module
needs torchvision, OpenCV and pkg_resources) is never imported; tests/features/encoders/test_face_encoder.py checks
the logits against the package's own network class on a face crop.

Layers, like CLIP's hidden states, one vector per face frame: 0 = the 48x48 grey input (spatial
mean), 1-3 = each conv block (spatial mean per channel), 4 = fc1, 5 = fc2 (both before their
ReLU: ~40 % of fc1's units are zero for nearly every face, and such near-constant columns make
ridge probes ill-conditioned), 6 = the 7 logits.
Widths differ, so each vector is zero-padded to the widest (fc1's 2000); the store's meta lists
the real widths. The clip's pooled vector is the mean over its frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from features.encoders.base import Segment
from features.encoders.vision import VisionEncoder, check_crops
from features.errors import ConfigError, ModelLoadError

SIZE = 48  # the package's transforms.Resize(48) + CenterCrop(48)
CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # the package's order


def is_face_cnn(path: str) -> bool:
    return Path(path).suffix in (".pth", ".pt") and Path(path).is_file()


class FaceCNN(torch.nn.Module):
    """The package's SimpleConvolutionalNetwork (3 conv blocks, 3 fc), returning every layer."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        convs = sorted(k[:-len(".weight")] for k in state if k.startswith("conv") and k.endswith(".weight"))
        fcs = sorted(k[:-len(".weight")] for k in state if k.startswith("fc") and k.endswith(".weight"))
        if not convs or not fcs:
            raise ModelLoadError(f"face CNN state dict has keys {sorted(state)[:6]}...; expected conv*/fc*.")
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(state[f"{c}.weight"].shape[1], state[f"{c}.weight"].shape[0], state[f"{c}.weight"].shape[2])
            for c in convs)
        self.fcs = torch.nn.ModuleList(
            torch.nn.Linear(state[f"{f}.weight"].shape[1], state[f"{f}.weight"].shape[0]) for f in fcs)
        mapped = {f"convs.{i}.{p}": state[f"{c}.{p}"] for i, c in enumerate(convs) for p in ("weight", "bias")}
        mapped |= {f"fcs.{i}.{p}": state[f"{f}.{p}"] for i, f in enumerate(fcs) for p in ("weight", "bias")}
        self.load_state_dict(mapped)
        self.widths = [self.convs[0].in_channels] + [c.out_channels for c in self.convs]
        self.widths += [f.out_features for f in self.fcs]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [N, 1, 48, 48] in [0, 1] -> per layer [N, width] (conv maps mean-pooled over space)."""
        outs = [x.mean(dim=(2, 3))]
        for conv in self.convs:
            x = F.max_pool2d(torch.tanh(conv(x)), 2, 2)
            outs.append(x.mean(dim=(2, 3)))
        x = x.flatten(1)
        for fc in self.fcs:
            x = fc(x)
            outs.append(x)  # before the ReLU: dead units would be near-constant columns
            x = F.relu(x)
        return outs


def preprocess(crop: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [1, 48, 48]: the package's Resize(48), CenterCrop(48),
    Grayscale(), ToTensor() done with PIL as torchvision does on PIL images."""
    image = Image.fromarray(crop)
    w, h = image.size
    short = min(w, h)
    size = (SIZE, int(SIZE * h / w)) if w == short else (int(SIZE * w / h), SIZE)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - SIZE) / 2.0)), int(round((size[1] - SIZE) / 2.0))
    image = image.crop((left, top, left + SIZE, top + SIZE)).convert("L")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


class FaceCNNEncoder(VisionEncoder):
    """Vision family on a FER2013 CNN state dict (`model: pypkg:what_the_face_classification/active_model.pth`)."""

    def _load(self) -> torch.nn.Module:
        if self.pooling != "mean":
            raise ConfigError(f"face CNN encoder: pooling {self.pooling!r}; use mean (conv maps are "
                              f"averaged over space, frames over the clip).")
        try:  # weights_only: a plain tensor dict, never arbitrary pickled code
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as err:
            raise ModelLoadError(f"face CNN: cannot read {self.path!r} ({err}).") from err
        model = FaceCNN(state)
        return model.to(self.dtype)

    def _model_config(self):
        widths = self.model.widths
        return type("FaceShape", (), {"num_hidden_layers": len(widths) - 1, "hidden_size": max(widths),
                                      "_commit_hash": None})()

    def _extra_fingerprint(self) -> dict:
        return {"architecture": "face_cnn", "widths": list(self.model.widths), "input": SIZE}

    def prepare(self, crops: np.ndarray) -> list[Segment]:
        check_crops("?", crops)
        pixels = np.stack([preprocess(c) for c in crops])
        return [Segment(np.ascontiguousarray(pixels), len(crops), float(len(crops)))]

    def _frame_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            layers = self.model(pixels)
        width = max(self.model.widths)
        return torch.stack([F.pad(h.float(), (0, width - h.shape[1])) for h in layers], dim=1)
