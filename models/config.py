"""Config dataclasses of the `train` section of params.yaml, and the fixed class list."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from features.config import from_section
from features.errors import ConfigError

from features.manifest import CLASSES  # noqa: F401  (fixed order: label ids, prob columns, plots)

FRAME_HEAD_TYPES = ("agt", "joint_at")  # frame-level heads: models.sequence.SEQUENCE_HEADS
HEAD_TYPES = ("probe", "attention", "concat", "token_attention") + FRAME_HEAD_TYPES
# pooled types are kept in sync with models.heads.HEADS (a test checks)
ATTENTION_TYPES = ("token_attention",) + FRAME_HEAD_TYPES  # the types that use attn_heads
LAYER_NAMES = ("mean", "last4", "best")  # "best": the encoder's probe best.json (models.probing)
GBDT_TYPES = ("lightgbm",)  # tree heads: models.gbdt, configured by GbdtConfig


@dataclass
class HeadConfig:
    """One entry of `train.heads.<name>`."""

    type: str  # "probe" | "attention"
    features: list[str]  # encoder names in the feature store, e.g. ["hubert", "clip", "minilm"]
    layer: int | str = -1  # pooled layer: an index (negative from the end), "mean" or "last4"
    hidden: int = 128  # hidden size; for "probe", 0 means a linear probe
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    epochs: int = 60  # fixed: no early stopping on the held-out fold (it would leak)
    batch_size: int = 32
    class_weight: bool = True  # class-weighted cross entropy, weights from the train part
    # attention heads (token_attention, agt, joint_at)
    attn_heads: int = 4  # attention heads; hidden must be a multiple of it
    # frame-level heads (agt, joint_at; see models/sequence.py)
    depth: int = 1  # transformer layers per block
    frames_layer: int = -1  # which stored frame-level layer (one of the encoder's layers_frames)
    max_frames: int = 8  # frames per modality and clip: longer clips are mean-pooled into this
    #                      many equal contiguous segments
    input_dim: int = 128  # fixed seeded random projection of standardised frames to this size
    #                       before the learnt layers (0 = none); cuts the cost of wide encoders

    def __post_init__(self) -> None:
        if self.type not in HEAD_TYPES:
            raise ConfigError(
                f"type {self.type!r} is not a head type; known types are {list(HEAD_TYPES)}."
            )
        if isinstance(self.features, str):
            self.features = [self.features]  # a lone name is a one-modality probe
        self.features = list(self.features)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ConfigError(
                f"features {self.features!r} must list one or more distinct encoder names, "
                f"e.g. [hubert, clip, minilm]."
            )
        _check_layer(self.layer)
        _check_positive(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)
        if self.hidden < 0 or (self.hidden == 0 and self.type != "probe"):
            raise ConfigError(
                f"hidden={self.hidden} must be > 0 (0 is allowed only for a linear 'probe')."
            )
        _check_fusion(self)
        if not 0.0 <= self.dropout < 1.0 or self.weight_decay < 0:
            raise ConfigError(
                f"dropout={self.dropout} must be in [0, 1) and "
                f"weight_decay={self.weight_decay} must be >= 0."
            )


@dataclass
class GbdtConfig:
    """A `train.heads.<name>` entry of a tree type: LightGBM on pooled features (models.gbdt)."""

    type: str  # "lightgbm"
    features: list[str]  # encoders whose pooled vectors are concatenated (one = per modality)
    layer: int | str = -1  # as HeadConfig.layer (an index, "mean", "last4" or "best")
    n_estimators: int = 100  # boosting rounds (fixed: no early stopping on the held-out fold)
    learning_rate: float = 0.1
    num_leaves: int = 15
    max_depth: int = -1  # -1: no limit
    min_child_samples: int = 10
    feature_fraction: float = 0.2  # share of features per tree: pooled vectors are wide
    bagging_fraction: float = 1.0  # share of rows per tree (1: no bagging)
    lambda_l2: float = 1.0
    max_bin: int = 63  # histogram bins per feature (fewer bins: faster on wide features)
    class_weight: bool = True  # sklearn "balanced" sample weights from each fold's train part
    num_threads: int = 0  # LightGBM threads; 0 = LightGBM's default (all cores)

    def __post_init__(self) -> None:
        if self.type not in GBDT_TYPES:
            raise ConfigError(f"type {self.type!r} is not a tree type; known: {list(GBDT_TYPES)}.")
        if isinstance(self.features, str):
            self.features = [self.features]
        self.features = list(self.features)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ConfigError(f"features {self.features!r} must list one or more distinct "
                              f"encoder names, e.g. [hubert] or [hubert, clip, minilm].")
        _check_layer(self.layer)
        _check_positive(n_estimators=self.n_estimators, learning_rate=self.learning_rate,
                        min_child_samples=self.min_child_samples, max_bin=self.max_bin)
        if self.num_leaves < 2 or self.max_bin < 2 or self.num_threads < 0:
            raise ConfigError(f"num_leaves={self.num_leaves} and max_bin={self.max_bin} must be "
                              f">= 2, num_threads={self.num_threads} >= 0.")
        for name in ("feature_fraction", "bagging_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in (0, 1].")
        if self.lambda_l2 < 0:
            raise ConfigError(f"lambda_l2={self.lambda_l2} must be >= 0.")


@dataclass
class TrainConfig:
    """The `train` section: cross-validation settings and the heads to train."""

    folds: int = 5  # used only without manifest folds (the API); stages use prepare.folds
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"; bit-identical reruns are guaranteed on CPU
    threads: int = 0  # torch CPU threads for training; 0 keeps torch's setting (OMP_NUM_THREADS)
    heads: dict[str, HeadConfig | GbdtConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"folds={self.folds}: cross-validation needs folds >= 2.")
        if self.threads < 0:
            raise ConfigError(f"threads={self.threads} must be >= 0 (0 keeps torch's setting).")


def train_config(section: Mapping[str, Any] | None, where: str = "train") -> TrainConfig:
    """Build TrainConfig from the params.yaml `train` section (unknown keys are errors)."""
    section = dict(section or {})
    heads = section.pop("heads", None) or {}
    if not isinstance(heads, Mapping):
        raise ConfigError(
            f"{where}.heads must map a head name to its settings, got {type(heads).__name__}."
        )
    cfg = from_section(TrainConfig, section, where)
    cfg.heads = {name: head_config(entry, f"{where}.heads.{name}") for name, entry in heads.items()}
    return cfg


def head_config(entry: Mapping[str, Any] | None, where: str) -> HeadConfig | GbdtConfig:
    """Build one HeadConfig (GbdtConfig for tree types); messages name the params.yaml entry."""
    tree = isinstance(entry, Mapping) and entry.get("type") in GBDT_TYPES
    try:
        return from_section(GbdtConfig if tree else HeadConfig, entry, where)
    except ConfigError as err:
        if str(err).startswith(where):
            raise
        raise ConfigError(f"{where}: {err}") from err


def _check_layer(layer: int | str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, (int, str)) or (
        isinstance(layer, str) and layer not in LAYER_NAMES
    ):
        raise ConfigError(
            f"layer {layer!r} must be an integer index (negative counts from the end) or one of "
            f"{list(LAYER_NAMES)}."
        )


def _check_fusion(cfg: HeadConfig) -> None:
    """Settings of the attention and frame-level heads."""
    _check_positive(attn_heads=cfg.attn_heads, depth=cfg.depth, max_frames=cfg.max_frames)
    if cfg.input_dim < 0:
        raise ConfigError(f"input_dim={cfg.input_dim} must be >= 0 (0 keeps the encoder's size).")
    if isinstance(cfg.frames_layer, bool) or not isinstance(cfg.frames_layer, int):
        raise ConfigError(f"frames_layer {cfg.frames_layer!r} must be an integer layer index, "
                          f"one of the encoder's layers_frames.")
    if cfg.type in ATTENTION_TYPES and cfg.hidden % cfg.attn_heads:
        raise ConfigError(f"hidden={cfg.hidden} must be a multiple of attn_heads="
                          f"{cfg.attn_heads} for a {cfg.type!r} head.")
    if cfg.type in FRAME_HEAD_TYPES and len(cfg.features) < 2:
        first = "the audio encoder (its frames are the queries)" if cfg.type == "agt" else \
            "the audio encoder, then the LLM/text encoder"
        raise ConfigError(f"a {cfg.type!r} head needs at least two features: first {first}, "
                          f"e.g. [hubert, smollm]; got {cfg.features}.")


def _check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ConfigError(f"{bad} must be > 0.")
