"""Config dataclasses of the `train` and `evaluate` sections, the shared head settings, the classes.

Each head type has its own config dataclass (registered with the type in models.heads.registry), built
from these bases: `NeuralConfig` (sizes and optimiser of every neural head), `PooledConfig` (+ the
pooled `layer` to read) and `FrameConfig` (+ the frame-level settings). A key the type does not
use is an error naming the key and the type, so no setting is silently ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from features.params import from_section
from features.errors import ConfigError
from features.media.manifest import CLASSES  # noqa: F401  (fixed order: label ids, prob columns, plots)

# `layer` names of pooled heads (models.heads.layer_select resolves them); an int is a layer index and a
# list of ints the mean of those layers (s3prl's layer_selections).
LAYER_NAMES = ("mean", "mean_last4", "sum_last4", "best", "weighted")
RENAMED_LAYERS = {"last4": "'mean_last4' (the mean of the last four layers; MERTools sums "
                           "them: 'sum_last4')"}


@dataclass
class HeadConfigBase:
    """What every `train.heads.<name>` entry has: its type and the encoders it reads."""

    type: str  # a registered head type (models.heads.registry)
    features: list[str]  # encoder names in the feature store, e.g. [hubert, clip, minilm]

    def __post_init__(self) -> None:
        if isinstance(self.features, str):
            self.features = [self.features]  # a lone name is a one-modality head
        self.features = list(self.features)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ConfigError(f"features {self.features!r} must list one or more distinct "
                              f"encoder names, e.g. [hubert, clip, minilm].")


@dataclass
class NeuralConfig(HeadConfigBase):
    """Sizes and optimiser of a neural head, trained for a fixed number of epochs."""

    hidden: int = 128  # hidden size
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 60  # fixed: no early stopping on the held-out fold (it would leak)
    batch_size: int = 32
    class_weight: bool = True  # class-weighted cross entropy, weights from the train part
    LINEAR_OK: ClassVar[bool] = False  # hidden=0 (a linear model) allowed: only the probe head

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        if self.hidden < 0 or (self.hidden == 0 and not self.LINEAR_OK):
            raise ConfigError(f"hidden={self.hidden} must be > 0 (0 is allowed only for a "
                              f"linear 'probe').")
        if not 0.0 <= self.dropout < 1.0 or self.weight_decay < 0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1) and "
                              f"weight_decay={self.weight_decay} must be >= 0.")


@dataclass
class PooledConfig(NeuralConfig):
    """A neural head on one pooled vector per clip and encoder."""

    layer: Any = -1  # index | list of indices | mean | mean_last4 | sum_last4 | best | weighted

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self.layer)


@dataclass
class FrameConfig(NeuralConfig):
    """A neural head on frame-level states (audio frames, per-frame CLS states, text tokens)."""

    frames_layer: int = -1  # which stored frame-level layer (one of the encoder's layers_frames)
    max_frames: int = 8  # frames per modality and clip: longer clips are mean-pooled into this
    #                      many equal contiguous segments
    attn_heads: int = 4  # attention heads; hidden must be a multiple of it
    depth: int = 1  # transformer layers per block

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(attn_heads=self.attn_heads, depth=self.depth, max_frames=self.max_frames)
        if isinstance(self.frames_layer, bool) or not isinstance(self.frames_layer, int):
            raise ConfigError(f"frames_layer {self.frames_layer!r} must be an integer layer "
                              f"index, one of the encoder's layers_frames.")
        check_heads(self.hidden, self.attn_heads, self.type)


@dataclass
class TrainConfig:
    """The `train` section: cross-validation settings and the heads to train."""

    folds: int = 5  # used only without manifest folds (the API); stages use prepare.folds
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"; bit-identical reruns are guaranteed on CPU
    threads: int = 0  # torch CPU threads for training; 0 keeps torch's setting (OMP_NUM_THREADS)
    heads: dict[str, Any] = field(default_factory=dict)  # name -> its type's config dataclass

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"folds={self.folds}: cross-validation needs folds >= 2.")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 0 (0 keeps torch's setting).")


@dataclass
class EvaluateConfig:
    """params.yaml `evaluate`."""

    main_head: str = "attention"  # the head whose confusion matrix is plotted


def train_config(section: Mapping[str, Any] | None, where: str = "train") -> TrainConfig:
    """Build TrainConfig from the params.yaml `train` section (unknown keys are errors)."""
    from models.heads.registry import head_config

    section = dict(section or {})
    heads = section.pop("heads", None) or {}
    if not isinstance(heads, Mapping):
        raise ConfigError(
            f"{where}.heads must map a head name to its settings, got {type(heads).__name__}."
        )
    cfg = from_section(TrainConfig, section, where)
    cfg.heads = {name: head_config(entry, f"{where}.heads.{name}") for name, entry in heads.items()}
    return cfg


def check_layer(layer: Any) -> None:
    """`layer` of a pooled head: an index, a non-empty list of distinct indices, or a name."""
    if isinstance(layer, str) and layer in RENAMED_LAYERS:
        raise ConfigError(f"layer {layer!r} was renamed: use {RENAMED_LAYERS[layer]}.")
    if isinstance(layer, (list, tuple)):
        if layer and all(_is_index(v) for v in layer) and len(set(layer)) == len(layer):
            return
    elif _is_index(layer) or (isinstance(layer, str) and layer in LAYER_NAMES):
        return
    raise ConfigError(f"layer {layer!r} must be an integer index (negative counts from the end), "
                      f"a list of distinct indices (their mean), or one of {list(LAYER_NAMES)}.")


def check_heads(hidden: int, attn_heads: int, head_type: str) -> None:
    if hidden % attn_heads:
        raise ConfigError(f"hidden={hidden} must be a multiple of attn_heads={attn_heads} for a "
                          f"{head_type!r} head.")


def check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ConfigError(f"{bad} must be > 0.")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
