"""`EncoderConfig`: one params.yaml `embed.encoders.<name>` entry, checked where it is built.

Torch-free on purpose: a stage checks its config, and computes its cache keys (see
`features.encoders.sourcekey`), before it imports torch or loads any weights, so a typo fails in a
fraction of a second and a fully cached rerun never pays for the imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from features.errors import ConfigError

POOLINGS = ("mean", "cls", "last")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "auto")
STORE_DTYPES = ("float16", "float32")
COMPRESSIONS = ("", "gzip", "lzf")
CHUNKINGS = ("overlap", "mertools")
QUANTIZE = ("", "int8")
MERTOOLS_PIECE_SECONDS = 10.0  # MERTools' extract_audio_huggingface.py cuts audio into 10 s pieces
# Options that mean something to some families only: a non-default value elsewhere is a mistake.
FAMILY_ONLY = {"gguf_file": ("text",), "chunking": ("speech",)}
POOLING_BY_FAMILY = {"vision": ("cls", "mean")}  # images have no "last valid token"
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


class OptionError(ConfigError, ValueError):
    """A bad option; a ValueError too, so `features.params.from_section` prefixes the section."""


@dataclass
class EncoderConfig:
    """One entry under params.yaml `embed.encoders.<name>`; every value is checked on construction."""

    family: str  # "speech" | "vision" | "text"
    model: str  # local path, hub id, or pypkg:<pkg>/<sub> (see resolve_model_path)
    gguf_file: str = ""  # text family: load a GGUF through transformers gguf_file=
    layers_frames: list[int] = field(default_factory=lambda: [-1])  # negative = from the end
    pooling: str = "mean"  # mean | cls | last (last valid token, causal LMs); vision: cls | mean
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (GPU: bf16, else fp16; CPU: fp32)
    quantize: str = ""  # "" | int8: dynamic int8 quantisation of linear layers (CPU, float32 only)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    batch_size: int = 8
    max_seconds: float = 600.0  # speech: longer clips keep their first max_seconds (then chunked)
    chunking: str = "overlap"  # speech: overlap (one-pass frames) | mertools (MERTools' 10 s pieces)
    trust_remote_code: bool = False
    input: str = ""  # the store this encoder reads; used by the stage only
    store_dtype: str = "float16"  # float16 | float32: dtype of the stored vectors (fp16 halves disk)
    compression: str = ""  # "" | gzip | lzf: HDF5 filter of new shards (fp16 barely shrinks: opt-in)
    shard_mb: float = 1024.0  # target shard size; unchanged shards are never re-uploaded by DVC

    def __post_init__(self) -> None:
        self._check_types()
        from features.encoders import FAMILY_MODULES, known_families  # package is initialised

        if self.family not in known_families():
            raise OptionError(f"encoder family {self.family!r} is unknown; known families are "
                              f"{sorted({*known_families(), *FAMILY_MODULES})}. Set `family:`.")
        choose("pooling", self.pooling, POOLING_BY_FAMILY.get(self.family, POOLINGS),
               f"for the {self.family} family")
        choose("dtype", self.dtype, DTYPE_NAMES)
        choose("quantize", self.quantize, QUANTIZE)
        choose("chunking", self.chunking, CHUNKINGS)
        choose("store_dtype", self.store_dtype, STORE_DTYPES)
        choose("compression", self.compression, COMPRESSIONS,
               '("" = none, the default; benchmarks/store.py measures each)')
        if not _DEVICE.match(self.device):
            raise OptionError(f"device {self.device!r} is unknown; use cpu, cuda, cuda:N or auto.")
        for name, low in (("batch_size", 1), ("max_seconds", 1e-9), ("shard_mb", 1e-12)):
            if not getattr(self, name) >= low:
                raise OptionError(f"{name} = {getattr(self, name)!r} must be > 0.")
        self._check_family_options()
        self._check_combinations()

    def _check_types(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), f.type
            ok = {"str": isinstance(value, str), "bool": isinstance(value, bool),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "list[int]": isinstance(value, (list, tuple)) and all(
                      isinstance(v, int) and not isinstance(v, bool) for v in value)}[kind]
            if not ok:
                raise OptionError(f"{f.name} = {value!r} ({type(value).__name__}) must be a {kind}.")
        if not self.model:
            raise OptionError("model is empty: give a local folder, a hub id or pypkg:<package>/<sub>.")
        self.layers_frames = list(self.layers_frames)

    def _check_family_options(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name, families in FAMILY_ONLY.items():
            if self.family not in families and getattr(self, name) != defaults[name]:
                raise OptionError(f"{name} = {getattr(self, name)!r} applies to the {list(families)} "
                                  f"famil{'y' if len(families) == 1 else 'ies'} only, not "
                                  f"{self.family!r}; remove it.")

    def _check_combinations(self) -> None:
        if self.chunking == "mertools" and self.pooling != "mean":
            raise OptionError("chunking: mertools averages every frame of MERTools' pieces; it needs "
                              f"pooling: mean (got {self.pooling!r}).")
        if self.quantize and self.dtype not in ("float32", "auto"):
            raise OptionError(f"quantize: {self.quantize} replaces float32 linear layers; it cannot be "
                              f"combined with dtype: {self.dtype} (set dtype: float32).")
        if self.quantize and self.device.startswith("cuda"):
            raise OptionError(f"quantize: {self.quantize} is PyTorch's CPU dynamic quantisation; on "
                              f"device {self.device!r} use dtype: bfloat16 or float16 instead.")


def choose(name: str, value: str, allowed: tuple, why: str = "") -> str:
    if value not in allowed:
        raise OptionError(f"{name} {value!r} is unknown{' ' + why if why else ''}; use one of "
                          f"{list(allowed)}.")
    return value
