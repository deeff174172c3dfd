"""The encoder contract shared by the speech, vision and text families.

An encoder turns a list of clips into per-layer vectors: `pooled` [L, D] (every hidden state,
pooled over the clip's valid positions) and `frames` [K, T, D] (the frame-level states of the
K layers named in `layers_frames`). Families register under their name; `load_encoder` picks one.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from packaging.version import Version
from tqdm.auto import tqdm

from features.cache import hashcache
from features.cache import versions
from features.cache.versions import ENCODER_WEIGHT_SUFFIXES
from features.encoders import FAMILIES
from features.params import resolve_model_path
from features.encoders.encoder_config import DTYPE_NAMES, EncoderConfig
from features.encoders.pooling import span_picks, span_pool, spans_to_mask
from features.errors import ConfigError, ModelLoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Weights nothing here reads (heads, poolers, pretraining-only parameters): missing is fine.
UNUSED_WEIGHTS = ("pooler.", "masked_spec_embed", "lm_head.", "visual_projection", "text_projection")


@dataclass
class EncodedClip:
    pooled: np.ndarray  # float32 [L, D]: every hidden state pooled over valid positions
    frames: np.ndarray  # float32 [K, T, D]: the layers_frames states at valid positions


def register(family: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator: make an Encoder subclass available as `family: <family>`."""
    def add(cls: type[Encoder]) -> type[Encoder]:
        cls.family = family
        return FAMILIES.register(family, cls)

    return add


class Encoder(ABC):
    """Loads a model once; `encode` batches clips so padding never changes a clip's features.

    Work is split in three steps so an engine can run them in different places at once:
    `prepare(item)` (CPU, picklable output: runs in loader worker processes) turns one clip into
    one or more `Segment`s; `collate(segments)` (CPU: pads and pins a batch) and `forward(batch)`
    (device: the model, pooling on the device, an asynchronous copy of only what is stored) run
    one batch; `assemble` joins a clip's segment results into one `EncodedClip`.
    """

    family: ClassVar[str]
    unit: ClassVar[str] = "items"  # what `Segment.amount` counts, for throughput reports

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg  # checked when it was built (features.encoders.encoder_config)
        self.pooling = cfg.pooling
        self.device = pick_device(cfg.device)
        self.dtype = compute_dtype(cfg.dtype, self.device)
        self.path = resolve_model_path(cfg.model)
        self.model = self._load()
        self.model.to(self.device).eval()
        if cfg.quantize:
            self.model = quantize_int8(self.model, self.device)
        self.layers = resolve_layers(cfg.layers_frames, self.num_layers)
        self._weights_hash: str | None = None

    # -- what a family provides ------------------------------------------------------------
    @abstractmethod
    def _load(self) -> torch.nn.Module:
        """Load preprocessing and the model (weights in self.dtype); return the model."""

    @abstractmethod
    def prepare(self, item: Any) -> list[Segment]:
        """One clip -> its forward-pass units (CPU only; raises ClipError for a bad clip)."""

    @abstractmethod
    def collate(self, segments: list[Segment]) -> dict:
        """Pad a batch of segments into CPU tensors (pinned when the device is a GPU)."""

    @abstractmethod
    def forward(self, batch: dict) -> HostBatch:
        """Run one collated batch on the device; return the pooled/kept states being copied back."""

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
            # What the model is, never where it lives: its weights' hashes here, its config,
            # tokenizer and preprocessor files in the stage's `model_files` (no path, no name).
            "family": self.family,
            "gguf_file": self.cfg.gguf_file,
            "weights": self.weights_hash(),
            # The dtype the model computes in (auto and CPU float16 resolve to a real one).
            "dtype": dtype_name(self.dtype),
            "pooling": self.pooling,
            "layers_frames": list(self.cfg.layers_frames),
            "quantize": quantize_name(self.cfg.quantize),
            "code_version": self.code_version(),
            **self._extra_fingerprint(),
        }

    def code_version(self) -> str:
        """Source hash of this encoder's own module and what it imports (features.cache.versions):
        an edit to one family's module changes only that family's stores."""
        module = type(self).__module__
        try:
            return versions.module_version(module)
        except ModuleNotFoundError:  # a class defined outside the project: hash its file
            return "file:" + hashlib.sha256(Path(inspect.getfile(type(self))).read_bytes()).hexdigest()[:16]

    def weights_hash(self) -> str:
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.path, self.cfg.gguf_file, self._model_config())
        return self._weights_hash

    def encode(self, items: list) -> list[EncodedClip]:
        """The simple serial path (tests, notebooks); features.embedding.engine overlaps the same steps."""
        segments = [seg for i, item in enumerate(items) for seg in self._prepare_clip(i, item)]
        parts: dict[Any, list[Partial]] = {}
        bar = tqdm(total=len(items), desc=f"encode {self.family}", unit="clip", disable=len(items) < 2)
        with torch.inference_mode():
            for index in self.segment_batches([s.length for s in segments], self.cfg.batch_size):
                batch = [segments[i] for i in index]
                for seg, part in zip(batch, self.forward(self.collate(batch)).wait()):
                    part.part = seg.part
                    parts.setdefault(seg.clip, []).append(part)
                    bar.update(int(seg.part == seg.parts - 1))
        bar.close()
        return [self.assemble(parts[i]) for i in range(len(items))]

    def _prepare_clip(self, clip: Any, item: Any) -> list[Segment]:
        segments = self.prepare(item)
        for part, seg in enumerate(segments):
            seg.clip, seg.part, seg.parts = clip, part, len(segments)
        return segments

    def _batches(self, items: list) -> list[list[int]]:
        """Indices of each forward pass over whole items (see `segment_batches`)."""
        return self.segment_batches([self._length(item) for item in items], self.cfg.batch_size)

    def segment_batches(self, lengths: list[int], size: int) -> list[list[int]]:
        """Similar lengths go together to waste little padding (families that cannot mask
        padding override this to group equal lengths only)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return chunks(order, size)

    def _length(self, item: Any) -> int:
        return len(item)

    def assemble(self, parts: list[Partial]) -> EncodedClip:
        """Join a clip's segment results (in part order) into its pooled vectors and frames."""
        parts = sorted(parts, key=lambda p: p.part)
        if parts[0].mean:
            total = parts[0].vec if len(parts) == 1 else np.sum([p.vec for p in parts], axis=0)
            pooled = total / np.float32(max(sum(p.count for p in parts), 1))
        else:  # cls: the first kept position of the clip; last: the last one
            pooled = parts[0].vec if self.pooling == "cls" else parts[-1].vec
        frames = parts[0].frames if len(parts) == 1 else np.concatenate([p.frames for p in parts], axis=1)
        return EncodedClip(pooled=pooled.astype(np.float32), frames=frames.astype(np.float32))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on a GPU (matmuls in the half dtype, reductions in fp32); none on CPU."""
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Batches are pinned by `collate` on a GPU, so this copy does not block the host.
        return tensor.to(self.device, dtype=dtype, non_blocking=True)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def _collect(
        self,
        hidden_states: tuple[torch.Tensor, ...],
        spans: list[tuple[int, int]],
        how: str | None = None,
    ) -> HostBatch:
        """Pool per-layer states [B, T, D] over each segment's kept span [start, end) on the
        device, and start copying the pooled vectors and the `layers_frames` states to the host.

        `how` overrides the pooling along T (vision pools tokens per frame, then means frames).
        Mean pooling returns fp32 sums (joined over a long clip's chunks, then divided); cls and
        last return the span's first / last position.
        """
        how = how or self.pooling
        steps = hidden_states[0].shape[1]
        # Masks and indices are built on the host and copied from pinned memory: no device sync.
        mask = self.to_device(self.pin(spans_to_mask(spans, steps)))
        picks = self.to_device(self.pin(span_picks(spans, how)))
        vec = torch.stack([span_pool(h, mask, picks, how) for h in hidden_states], dim=1)
        batch, _, dim = hidden_states[0].shape
        width = max((end - start for start, end in spans), default=0)
        kept = torch.zeros(batch, len(self.layers), width, dim, device=self.device, dtype=hidden_states[0].dtype)
        for b, (start, end) in enumerate(spans):  # only the stored layers leave the device
            for k, layer in enumerate(self.layers):
                kept[b, k, : end - start] = hidden_states[layer][b, start:end]
        counts = [end - start for start, end in spans]
        return HostBatch(vec, kept, counts, how == "mean")


@dataclass
class Segment:
    """One forward-pass unit: a whole clip, or one chunk of a long clip."""

    data: Any  # family-specific prepared input (numpy arrays / token ids), picklable
    length: int  # what padding grows with: samples, tokens, images
    amount: float  # throughput units (audio seconds, images, tokens) it stands for
    keep: tuple[int, int] | None = None  # speech chunks: [start, end) output frames it contributes
    clip: Any = None  # the clip it belongs to (set by whoever prepares it)
    part: int = 0  # its index among the clip's chunks
    parts: int = 1


@dataclass
class Partial:
    """One segment's result on the host."""

    vec: np.ndarray  # [L, D] float32: sum over kept positions (mean) or the chosen position
    count: int  # kept positions (frames, tokens, images)
    frames: np.ndarray  # [K, count, D] the layers_frames states at the kept positions
    part: int = 0
    mean: bool = True


class HostBatch:
    """A batch's results being copied device -> host without blocking; `wait()` finishes it.

    The copy goes to pinned memory with an event recorded after it, so the compute thread moves
    on to the next batch and only the writer thread waits (never once per clip).
    """

    def __init__(self, vec: torch.Tensor, frames: torch.Tensor, counts: list[int], mean: bool):
        self.counts, self.mean = counts, mean
        self.vec, self.frames = host_copy(vec), host_copy(frames)
        self.event = None
        if vec.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[Partial]:
        if self.event is not None:
            self.event.synchronize()
        vec, frames = self.vec.float().numpy(), self.frames.float().numpy()
        return [
            Partial(vec[b], n, frames[b, :, :n], mean=self.mean) for b, n in enumerate(self.counts)
        ]


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cuda":
        return tensor.detach()
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return out.copy_(tensor, non_blocking=True)


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

    float16 on CPU computes in float32: CPU half kernels are slow or missing. bfloat16 on CPU
    runs only where the CPU has native bf16 arithmetic (elsewhere it is emulated: slower than
    float32). `auto` is mixed precision where it pays: bfloat16 on a GPU that has it, float16
    on older GPUs, float32 on CPU.
    """
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype {name!r} is unknown; use one of {list(DTYPE_NAMES)}.")
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "float16" and device.type == "cpu":
        return torch.float32
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        raise ConfigError(
            "dtype: bfloat16 on this CPU would be emulated (no avx512_bf16 or amx_bf16 in "
            "/proc/cpuinfo): slower than float32, not faster. Use dtype: float32, or quantize: int8 "
            "for a faster CPU run."
        )
    return DTYPES[name]


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return {w for line in fh if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cpu_has_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def quantize_name(option: str) -> str:
    """The quantisation in the fingerprint: int8 results depend on the kernel engine too."""
    return f"{option}:{torch.backends.quantized.engine}" if option else ""


def quantize_int8(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Dynamic int8 quantisation of every nn.Linear (weights int8, activations quantised per
    batch): the attention and MLP matmuls, most of a transformer's time. CPU only."""
    if device.type != "cpu":
        raise ConfigError(f"quantize: int8 runs on CPU only; device resolved to {device}.")
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        # in place: families keep references to submodules (the text family's backbone)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8,
                                                      inplace=True)


def runtime_facts(cfg: EncoderConfig) -> dict:
    """What this machine resolves in `cfg` (part of the source key of features.cache.keys)."""
    device = pick_device(cfg.device)
    return {"device": device.type, "dtype": dtype_name(compute_dtype(cfg.dtype, device)),
            "quantize": quantize_name(cfg.quantize)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
    def compute() -> str:
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(block)
        return f"sha256:{digest.hexdigest()}"

    return hashcache.cached("weights", files, compute)


def weight_files(folder: Path, gguf_file: str = "") -> list[Path]:
    if gguf_file:
        return [folder / gguf_file]
    files = sorted(p for p in folder.iterdir() if p.suffix in ENCODER_WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if safetensors:  # loaded in preference to .bin, so they alone decide the numbers
        return safetensors
    if not files:
        raise ModelLoadError(f"{folder}: no weight files ({', '.join(ENCODER_WEIGHT_SUFFIXES)}) found.")
    return files
