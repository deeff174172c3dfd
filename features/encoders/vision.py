"""Vision encoders: the CLIP vision tower on the face crops of a clip.

Each frame is summarised per layer by its CLS token (the token CLIP builds its image embedding
from), giving frames [L, F, D]; `pooling` then pools over the clip's frames (mean = average of
frames, cls = first frame, last = last frame). A folder holding a full CLIPModel works too: only
its vision tower is loaded.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoImageProcessor, CLIPVisionModel

from features.encoders.base import (
    EncodedClip,
    Encoder,
    chunks,
    dtype_kwargs,
    load_checked,
    register,
    safetensors_kwargs,
)
from features.encoders.pooling import lengths_to_mask
from features.errors import ClipError, ModelLoadError

# Images per forward pass: bounds memory (all hidden states of a ViT-L are large), not results.
IMAGES_PER_PASS = 64


@register("vision")
class VisionEncoder(Encoder):
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
            CLIPVisionModel, self.path, "vision encoder",
            **dtype_kwargs(self.dtype), **safetensors_kwargs(self.path), **remote,
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

    def _encode_batch(self, items: list) -> list[EncodedClip]:
        images = [frame for crops in items for frame in crops]
        cls = torch.cat([self._cls_tokens(part) for part in chunks(images, IMAGES_PER_PASS)])
        # Regroup [N, L, D] frames into clips [B, F_max, L, D], padded, with a frame mask.
        counts = [len(crops) for crops in items]
        per_clip = torch.split(cls, counts)
        padded = torch.nn.utils.rnn.pad_sequence(list(per_clip), batch_first=True)
        mask = lengths_to_mask(torch.tensor(counts, device=self.device), padded.shape[1])
        layers = tuple(padded[:, :, layer] for layer in range(padded.shape[2]))
        return self._collect(layers, mask)

    def _cls_tokens(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return torch.stack([h[:, 0] for h in out.hidden_states], dim=1)


def check_crops(index: int, crops: np.ndarray) -> None:
    shape = getattr(crops, "shape", ())
    if len(shape) != 4 or shape[-1] != 3 or shape[0] == 0 or crops.dtype != np.uint8:
        raise ClipError(
            f"item {index}", "no_face",
            f"vision encoder needs uint8 RGB crops [F>=1, H, W, 3]; got shape {shape} "
            f"dtype {getattr(crops, 'dtype', type(crops).__name__)}. Use features.faces.extract_faces.",
        )
