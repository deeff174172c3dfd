"""The encoder contract shared by the speech, vision and text families.

An encoder turns a list of clips into per-layer vectors: `pooled` [L, D] (every hidden state,
pooled over the clip's valid positions) and `frames` [K, T, D] (the frame-level states of the
K layers named in `layers_frames`). Families register under their name; `load_encoder` picks one.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from packaging.version import Version
from tqdm.auto import tqdm

from features.config import resolve_model_path
from features.encoders.pooling import check_pooling, pool
from features.errors import ConfigError, ModelLoadError

# Bump when a change here alters the numbers an encoder returns (part of every fingerprint).
CODE_VERSION = "encoders-1"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Weights nothing here reads (heads, poolers, pretraining-only parameters): missing is fine.
UNUSED_WEIGHTS = ("pooler.", "masked_spec_embed", "lm_head.", "visual_projection", "text_projection")


@dataclass
class EncoderConfig:
    """One entry under params.yaml `embed.encoders.<name>`."""

    family: str  # "speech" | "vision" | "text"
    model: str  # local path, hub id, or pypkg:<pkg>/<sub> (see resolve_model_path)
    gguf_file: str = ""  # text family: load a GGUF through transformers gguf_file=
    layers_frames: list[int] = field(default_factory=lambda: [-1])  # negative = from the end
    pooling: str = "mean"  # mean | cls | last (last valid token, causal LMs); vision: cls | mean
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "cpu"  # cpu | cuda | auto
    batch_size: int = 8
    max_seconds: float = 30.0  # speech: longer clips keep their first max_seconds
    trust_remote_code: bool = False
    input: str = ""  # the store this encoder reads; used by the stage only
    store_dtype: str = "float16"  # float16 | float32: dtype of the stored vectors (fp16 halves disk)


@dataclass
class EncodedClip:
    pooled: np.ndarray  # float32 [L, D]: every hidden state pooled over valid positions
    frames: np.ndarray  # float32 [K, T, D]: the layers_frames states at valid positions


FAMILIES: dict[str, type[Encoder]] = {}


def register(family: str) -> Callable[[type[Encoder]], type[Encoder]]:
    def add(cls: type[Encoder]) -> type[Encoder]:
        cls.family = family
        FAMILIES[family] = cls
        return cls

    return add


class Encoder(ABC):
    """Loads a model once; `encode` batches clips so padding never changes a clip's features."""

    family: ClassVar[str]

    def __init__(self, cfg: EncoderConfig):
        if cfg.batch_size < 1:
            raise ConfigError(f"encoder {cfg.model!r}: batch_size={cfg.batch_size} must be >= 1.")
        self.cfg = cfg
        self.pooling = check_pooling(cfg.pooling)
        self.device = pick_device(cfg.device)
        self.dtype = compute_dtype(cfg.dtype, self.device)
        self.path = resolve_model_path(cfg.model)
        self.model = self._load()
        self.model.to(self.device).eval()
        self.layers = resolve_layers(cfg.layers_frames, self.num_layers)
        self._weights_hash: str | None = None

    # -- what a family provides ------------------------------------------------------------
    @abstractmethod
    def _load(self) -> torch.nn.Module:
        """Load preprocessing and the model (weights in self.dtype); return the model."""

    @abstractmethod
    def _encode_batch(self, items: list) -> list[EncodedClip]:
        """Encode one batch (already grouped by `_batches`)."""

    @property
    def num_layers(self) -> int:
        """Hidden states returned per clip, the embeddings output included."""
        return int(self._model_config().num_hidden_layers) + 1

    @property
    def hidden_size(self) -> int:
        return int(self._model_config().hidden_size)

    def _model_config(self) -> Any:
        return self.model.config

    def _extra_fingerprint(self) -> dict:
        return {}

    # -- the shared contract ---------------------------------------------------------------
    def fingerprint(self) -> dict:
        """Everything that decides the numbers: a changed value means re-encode."""
        return {
            "family": self.family,
            "model": self.cfg.model,
            "gguf_file": self.cfg.gguf_file,
            "resolved_path": self.path,
            "weights": self.weights_hash(),
            "dtype": self.cfg.dtype,
            "pooling": self.pooling,
            "layers_frames": list(self.cfg.layers_frames),
            "code_version": CODE_VERSION,
            **self._extra_fingerprint(),
        }

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.path, self.cfg.gguf_file, self._model_config())
        return self._weights_hash

    def encode(self, items: list) -> list[EncodedClip]:
        out: list[EncodedClip | None] = [None] * len(items)
        batches = self._batches(items)
        bar = tqdm(batches, desc=f"encode {self.family}", unit="batch", disable=len(batches) < 2)
        with torch.inference_mode():
            for index in bar:
                for i, clip in zip(index, self._encode_batch([items[i] for i in index])):
                    out[i] = clip
        return out  # type: ignore[return-value]

    def _batches(self, items: list) -> list[list[int]]:
        """Indices of each forward pass; similar lengths go together to waste little padding."""
        order = sorted(range(len(items)), key=lambda i: self._length(items[i]))
        return chunks(order, self.cfg.batch_size)

    def _length(self, item: Any) -> int:
        return len(item)

    def _collect(
        self, hidden_states: tuple[torch.Tensor, ...], mask: torch.Tensor, how: str | None = None
    ) -> list[EncodedClip]:
        """Per-clip results from per-layer states [B, T, D] and the validity mask [B, T].

        `how` overrides the pooling along T (vision pools tokens per frame, then means frames).
        """
        how = how or self.pooling
        pooled = torch.stack([pool(h, mask, how) for h in hidden_states], dim=1).cpu()
        lengths = mask.long().sum(dim=1).tolist()
        batch, _, dim = hidden_states[0].shape
        if self.layers:
            kept = torch.stack([hidden_states[i] for i in self.layers], dim=1).cpu()
        else:
            kept = torch.zeros(batch, 0, max(lengths, default=0), dim)
        return [
            EncodedClip(
                pooled=pooled[b].float().numpy(),
                frames=kept[b, :, : lengths[b]].float().numpy(),
            )
            for b in range(batch)
        ]


def chunks(seq: list, size: int) -> list[list]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r}: CUDA is not available here; set device: cpu or auto in params.yaml."
            )
        return torch.device(name)
    raise ConfigError(f"device {name!r} is unknown; use cpu, cuda or auto.")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype weights are loaded in and the forward pass runs in.

    float16 on CPU computes in float32: CPU half kernels are slow or missing. bfloat16 and
    float32 are used as given on every device.
    """
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is unknown; use one of {sorted(DTYPES)}.")
    if name == "float16" and device.type == "cpu":
        return torch.float32
    return DTYPES[name]


def resolve_layers(layers: list[int], num_layers: int) -> list[int]:
    """Turn layer indices (negative = from the end) into positive ones, checking the range."""
    resolved = []
    for layer in layers:
        if not -num_layers <= int(layer) < num_layers:
            raise ConfigError(
                f"layers_frames entry {layer} is out of range: the model returns {num_layers} hidden "
                f"states (0 = embeddings output); use -{num_layers}..{num_layers - 1}."
            )
        resolved.append(int(layer) % num_layers)
    return resolved


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`dtype=` for transformers >= 4.56, `torch_dtype=` before (the project supports >= 4.45)."""
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def safetensors_kwargs(path: str) -> dict:
    """Prefer safetensors (no pickle) when a local folder ships them."""
    folder = Path(path)
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        return {"use_safetensors": True}
    return {}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence load reports (e.g. a CLIP text tower we skip); missing weights are checked by us."""
    logging = transformers.utils.logging
    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def load_checked(loader: Any, path: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path)`, refusing a model whose used weights are missing.

    transformers fills missing weights with random values and only warns; an encoder built on
    random weights would produce plausible but meaningless features, so that is an error here.
    """
    try:
        with quiet_transformers():
            model, info = loader.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(
            f"{what}: could not load {path!r} with {loader.__name__} ({err}). Point `model` at a "
            f"folder with config.json and weights, a cached hub id, or a pypkg: reference."
        ) from err
    missing = sorted(k for k in info.get("missing_keys", ()) if not any(u in k for u in UNUSED_WEIGHTS))
    if missing:
        raise ModelLoadError(
            f"{what}: {path!r} lacks {len(missing)} weight(s) the model needs (e.g. {missing[:5]}); "
            f"they would be random. Check that the folder holds the matching checkpoint."
        )
    return model


def weights_hash(path: str, gguf_file: str, config: Any) -> str:
    """sha256 of the weight files of a local model; the hub revision for a hub id."""
    target = Path(path)
    if target.is_file():
        files = [target]
    elif target.is_dir():
        files = weight_files(target, gguf_file)
    else:
        revision = getattr(config, "_commit_hash", None)
        return f"hub:{path}@{revision or 'unknown'}"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def weight_files(folder: Path, gguf_file: str = "") -> list[Path]:
    if gguf_file:
        return [folder / gguf_file]
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if safetensors:  # loaded in preference to .bin, so they alone decide the numbers
        return safetensors
    if not files:
        raise ModelLoadError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) found.")
    return files
