"""The head registry: every `train.heads.<name>.type`, with its config, inputs, trainer and model.

A head type is one module that calls `register(HeadType(...))` at import, plus one line in
`MODULES` below (type name -> module), so that `get(name)` can import it on first use (a
`features.registry.Registry`, like the project's other registries). Training
(`models.training.stage`), `mer predict` and `mer metrics` (through `models.training.bundles`) and the docs find head
types only here. This module imports no torch and no head module at import time.

A trainer is a module with three functions, shared by every head type that uses it:

* ``cross_validate(inputs, labels, cfg, train_cfg, folds=None, test=None, extra=None,
  on_epoch=None) -> models.training.pooled_trainer.CVResult`` (inputs: ``{encoder: [N, D]}`` pooled arrays, or
  ``{encoder: models.training.frame_trainer.Frames}``);
* ``bundle_state(result, cfg) -> dict`` (what `models.training.bundles.save_bundle` stores);
* ``predictor(cfg, feature_dims, state, device) -> object`` with ``fold_proba(inputs)`` ([F, M, C],
  one row per fold model: out-of-fold scoring) and ``predict_proba(inputs)`` (their mean).

`models.training.pooled_trainer` (pooled neural heads), `models.training.frame_trainer` (frame-level neural heads) and
`models.heads.gbdt` (LightGBM) are the trainers today.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping

from features.params import from_section
from features.errors import ConfigError
from features.registry import Registry

INPUTS = ("pooled", "frames")

# type name -> the module that registers it (imported on first use)
MODULES = {
    "probe": "models.heads.probe",
    "concat": "models.heads.concat",
    "attention": "models.heads.attention",
    "token_attention": "models.heads.token_attention",
    "agt": "models.heads.agt",
    "early_fusion": "models.heads.early_fusion",
    "lightgbm": "models.heads.gbdt",
}
RENAMED = {"joint_at": "early_fusion (a frame-level early-fusion baseline; paper 002's joint "
                       "audio-text LLM module is an adapt stage that writes a feature store)"}


@dataclass(frozen=True)
class HeadType:
    """One head type: what `train.heads.<name>.type` names."""

    name: str
    config: type  # dataclass whose fields are exactly the keys of a params entry (strict)
    inputs: str  # "pooled": one vector per clip and encoder | "frames": frame-level states
    trainer: str  # module implementing the trainer functions (see the module docstring)
    build: Callable[..., Any] | None = None  # (cfg, dims, n_classes, members) -> nn.Module
    summary: str = ""  # one line: what it is (docs, `mer metrics` legends)

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ConfigError(f"head type {self.name!r}: inputs {self.inputs!r} must be one of "
                              f"{list(INPUTS)}.")
        if not dataclasses.is_dataclass(self.config):
            raise ConfigError(f"head type {self.name!r}: config must be a dataclass.")

    def trainer_module(self) -> ModuleType:
        return importlib.import_module(self.trainer)


# The key is `type`: `head_config` puts the entry's place (train.heads.<name>) in front of it.
HEADS: Registry[HeadType] = Registry("head type", "type", modules=MODULES, renamed=RENAMED,
                                     describe=lambda head: head.trainer)


def register(head: HeadType) -> HeadType:
    """Add a head type (a module calls this at import); the same name twice is an error."""
    return HEADS.register(head.name, head)


def get(name: str) -> HeadType:
    """The registered head type `name` (its module is imported on first use)."""
    return HEADS.get(name)


def names() -> list[str]:
    """Every head type: the built-in ones and any registered at run time."""
    return HEADS.names()


def head_config(entry: Mapping[str, Any] | None, where: str = "train.heads.<name>") -> Any:
    """The config dataclass of one `train.heads.<name>` entry, checked by its type."""
    if not isinstance(entry, Mapping) or "type" not in entry:
        raise ConfigError(f"{where} must be a mapping with a `type` (one of {names()}).")
    try:
        head = get(str(entry["type"]))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    allowed = {f.name for f in dataclasses.fields(head.config)}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where}: key(s) {unknown} do not apply to a head of type "
                          f"{head.name!r}; its keys are {sorted(allowed)}.")
    try:
        return from_section(head.config, entry, where)
    except ConfigError as err:
        if str(err).startswith(where):
            raise
        raise ConfigError(f"{where}: {err}") from err
