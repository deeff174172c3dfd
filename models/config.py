"""Config dataclasses of the `train` section of params.yaml, and the fixed class list."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from features.config import from_section
from features.errors import ConfigError

from features.manifest import CLASSES  # noqa: F401  (fixed order: label ids, prob columns, plots)

HEAD_TYPES = ("probe", "attention")  # kept in sync with models.heads.HEADS (a test checks)
LAYER_NAMES = ("mean", "last4")


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
        if not 0.0 <= self.dropout < 1.0 or self.weight_decay < 0:
            raise ConfigError(
                f"dropout={self.dropout} must be in [0, 1) and "
                f"weight_decay={self.weight_decay} must be >= 0."
            )


@dataclass
class TrainConfig:
    """The `train` section: cross-validation settings and the heads to train."""

    folds: int = 5  # used only without manifest folds (the API); stages use prepare.folds
    seed: int = 0
    device: str = "cpu"  # "cpu" or "cuda"; bit-identical reruns are guaranteed on CPU
    threads: int = 0  # torch CPU threads for training; 0 keeps torch's setting (OMP_NUM_THREADS)
    heads: dict[str, HeadConfig] = field(default_factory=dict)

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


def head_config(entry: Mapping[str, Any] | None, where: str) -> HeadConfig:
    """Build one HeadConfig; messages name the params.yaml entry."""
    try:
        return from_section(HeadConfig, entry, where)
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


def _check_positive(**values: float) -> None:
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ConfigError(f"{bad} must be > 0.")
