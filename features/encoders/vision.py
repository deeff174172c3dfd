"""Vision encoders: the CLIP vision tower on the face crops of a clip.

Each frame is summarised per layer by one vector, chosen by `pooling`: cls = the CLS token (the
token CLIP builds its image embedding from; the usual choice), mean = the average of the patch
tokens. That gives frames [L, F, D]; `pooled` is always the mean over the clip's frames.
A folder holding a full CLIPModel works too: only its vision tower is loaded.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoImageProcessor, CLIPVisionModel

from features.encoders.base import (
    EncodedClip,
    Encoder,
    HostBatch,
    Segment,
    dtype_kwargs,
    load_checked,
    register,
    safetensors_kwargs,
)
from features.errors import ClipError, ModelLoadError

# Images per segment and per forward pass: bounds memory (all hidden states of a ViT-L are large
# and a clip's frames are many), not results: a clip's vector is the mean over all its segments.
IMAGES_PER_PASS = 64


@register("vision")
class VisionEncoder(Encoder):
    unit = "images"

    def _load(self) -> torch.nn.Module:
        remote = {"trust_remote_code": self.cfg.trust_remote_code}
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path, **remote)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"vision encoder: no image processor in {self.path!r} ({err}); the folder needs "
                f"preprocessor_config.json next to the weights."
            ) from err
        return load_checked(
            CLIPVisionModel,
            self.path,
            "vision encoder",
            **dtype_kwargs(self.dtype),
            **safetensors_kwargs(self.path),
            **remote,
        )

    def _extra_fingerprint(self) -> dict:
        return {
            "image_processor": type(self.processor).__name__,
            "crop_size": dict(getattr(self.processor, "crop_size", None) or {}),
        }

    def encode(self, items: list) -> list[EncodedClip]:
        for index, crops in enumerate(items):
            check_crops(index, crops)
        return super().encode(items)

    def prepare(self, crops: np.ndarray) -> list[Segment]:
        """A clip's frames in segments of at most IMAGES_PER_PASS: memory grows with the batch,
        never with the clip (a long video sampled densely has thousands of frames)."""
        check_crops("?", crops)
        return [self._pixels(crops[i : i + IMAGES_PER_PASS]) for i in range(0, len(crops), IMAGES_PER_PASS)]

    def _pixels(self, crops: np.ndarray) -> Segment:
        pixels = self.processor(images=list(crops), return_tensors="np")["pixel_values"]
        return Segment(np.ascontiguousarray(pixels, dtype=np.float32), len(crops), float(len(crops)))

    def collate(self, segments: list[Segment]) -> dict:
        # ViT inputs have one fixed size: a batch is every image of its clips, no padding at all.
        pixels = torch.from_numpy(np.concatenate([s.data for s in segments]))
        return {"pixel_values": self.pin(pixels), "counts": [s.length for s in segments]}

    def forward(self, batch: dict) -> HostBatch:
        pixels = self.to_device(batch["pixel_values"], self.dtype)
        tokens = torch.cat([self._frame_vectors(part) for part in pixels.split(IMAGES_PER_PASS)])
        # Regroup [N, L, D] frames into clips [B, F_max, L, D], padded; spans mark real frames.
        counts = batch["counts"]
        padded = torch.nn.utils.rnn.pad_sequence(list(torch.split(tokens, counts)), batch_first=True)
        layers = tuple(padded[:, :, layer] for layer in range(padded.shape[2]))
        return self._collect(layers, [(0, n) for n in counts], how="mean")

    def _frame_vectors(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, L, D]: each image's CLS token or patch-token mean, per hidden state."""
        with self.autocast():
            out = self.model(pixel_values=pixels, output_hidden_states=True)
        pick = (lambda h: h[:, 0]) if self.pooling == "cls" else (lambda h: h[:, 1:].mean(dim=1))
        return torch.stack([pick(h) for h in out.hidden_states], dim=1)


def check_crops(index: int | str, crops: np.ndarray) -> None:
    shape = getattr(crops, "shape", ())
    if len(shape) != 4 or shape[-1] != 3 or shape[0] == 0 or crops.dtype != np.uint8:
        raise ClipError(
            f"item {index}",
            "no_face",
            f"vision encoder needs uint8 RGB crops [F>=1, H, W, 3]; got shape {shape} "
            f"dtype {getattr(crops, 'dtype', type(crops).__name__)}. Use features.media.faces.extract_faces.",
        )
