"""Text encoders: BERT-like encoders (AutoModel) and causal LMs (AutoModelForCausalLM), GGUF included.

A GGUF file is given either as `model: <folder>` + `gguf_file: <name>` or as `model: <path>.gguf`;
transformers de-quantises it into `dtype`. Causal LMs run their decoder stack only (no LM head);
use `pooling: last` for them (the last token has seen the whole text). Texts are right-padded
with an attention mask, so a batch gives the same numbers as one text at a time; they are cut at
the model's maximum length. An empty text becomes a single pad (or eos) token so every clip gets
a vector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from features.encoders.base import (
    Encoder,
    HostBatch,
    Segment,
    dtype_kwargs,
    load_checked,
    quiet_transformers,
    register,
    safetensors_kwargs,
)
from features.errors import ConfigError, ModelLoadError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@register("text")
class TextEncoder(Encoder):
    unit = "tokens"

    def _load(self) -> torch.nn.Module:
        self.folder, self.gguf = split_gguf(self.path, self.cfg.gguf_file)
        common: dict[str, Any] = {"trust_remote_code": self.cfg.trust_remote_code}
        if self.gguf:
            common["gguf_file"] = self.gguf
        self.tokenizer = self._load_tokenizer(common)
        self.causal = bool(self.gguf) or is_causal(self._load_config(common))
        loader = AutoModelForCausalLM if self.causal else AutoModel
        weights = {} if self.gguf else safetensors_kwargs(self.folder)
        model = load_checked(
            loader, self.folder, "text encoder", **dtype_kwargs(self.dtype), **weights, **common
        )
        # The LM head is not needed for hidden states: run the decoder stack alone.
        self.backbone = model.base_model if self.causal else model
        self.fill_id = fill_token(self.tokenizer, self.folder)
        self.max_tokens = max_tokens(self.tokenizer, model.config)
        return model

    def _load_tokenizer(self, common: dict) -> Any:
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(self.folder, **common)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(
                f"text encoder: no tokenizer in {self.folder!r} ({err}); the folder needs "
                f"tokenizer files (tokenizer.json / vocab) or a GGUF with an embedded tokenizer."
            ) from err

    def _load_config(self, common: dict) -> Any:
        try:
            config = AutoConfig.from_pretrained(self.folder, **common)
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(f"text encoder: no usable config.json in {self.folder!r} ({err}).") from err
        if getattr(config, "is_encoder_decoder", False):
            raise ConfigError(
                f"text encoder {self.cfg.model!r} is an encoder-decoder model; use an encoder "
                f"(BERT-like) or a decoder-only causal LM."
            )
        return config

    def _extra_fingerprint(self) -> dict:
        return {
            "tokenizer": type(self.tokenizer).__name__,
            "max_tokens": self.max_tokens,
            "causal": self.causal,
        }

    def _length(self, item: str) -> int:
        return len(item)

    def prepare(self, text: str) -> list[Segment]:
        ids = self.tokenizer(str(text), truncation=True, max_length=self.max_tokens)["input_ids"]
        ids = list(ids) or [self.fill_id]
        return [Segment(np.asarray(ids, dtype=np.int64), len(ids), float(len(ids)))]

    def collate(self, segments: list[Segment]) -> dict:
        width = max(s.length for s in segments)
        input_ids = torch.full((len(segments), width), self.fill_id, dtype=torch.long)
        mask = torch.zeros((len(segments), width), dtype=torch.long)
        for row, seg in enumerate(segments):  # right padding: valid tokens first
            input_ids[row, : seg.length] = torch.from_numpy(seg.data)
            mask[row, : seg.length] = 1
        return {"input_ids": self.pin(input_ids), "attention_mask": self.pin(mask),
                "spans": [(0, s.length) for s in segments]}

    def forward(self, batch: dict) -> HostBatch:
        input_ids = self.to_device(batch["input_ids"])
        mask = self.to_device(batch["attention_mask"])
        with self.autocast():
            out = self.backbone(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        return self._collect(out.hidden_states, batch["spans"])


def split_gguf(path: str, gguf_file: str) -> tuple[str, str]:
    """(folder, gguf file name); `model` may itself be the .gguf path."""
    target = Path(path)
    if target.suffix == ".gguf":
        if gguf_file:
            raise ConfigError(
                f"text encoder: model {path!r} is already a .gguf file and gguf_file={gguf_file!r} "
                f"is also set; give either the file as model or the folder plus gguf_file."
            )
        if not target.is_file():
            raise ConfigError(f"text encoder: GGUF file {path!r} does not exist.")
        return str(target.parent), target.name
    if gguf_file and target.is_dir() and not (target / gguf_file).is_file():
        raise ConfigError(f"text encoder: gguf_file {gguf_file!r} is not in folder {path!r}.")
    return path, gguf_file


def is_causal(config: Any) -> bool:
    return any(arch.endswith(CAUSAL_SUFFIXES) for arch in (config.architectures or []))


def fill_token(tokenizer: Any, where: str) -> int:
    """Token used for empty texts and as (masked) padding."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ModelLoadError(f"text encoder: the tokenizer in {where!r} has no pad, eos or unk token.")


def max_tokens(tokenizer: Any, config: Any) -> int:
    limits = [getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None)]
    # Tokenizers without a limit report a huge sentinel (1e30); positions bound the real limit.
    usable = [int(v) for v in limits if isinstance(v, (int, float)) and 0 < v < 1e9]
    return min(usable) if usable else 512
